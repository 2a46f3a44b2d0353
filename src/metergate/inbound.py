"""What the gateway refuses before reading a request's body: anything that would let the provider read a different
request than the one the gateway classified, routed, priced and budgeted.

The rule (issue 8): the provider receives the path and query exactly as the client sent them, so they must mean
the same thing to the gateway as to the provider. A percent-escape, a dot segment or an empty segment can be
decoded or normalised by the provider (`gemini-2.5-pr%6F` runs gemini-2.5-pro, `%3A` becomes `:`), so paths
carrying them are refused rather than interpreted. Headers that ask a server to treat the request as another
method are refused too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from metergate.errors import GatewayError

# Unreserved characters plus the few sub-delimiters real API paths use (`:` in Gemini methods and fine-tuned
# model ids, `@` in versioned model names); every segment non-empty and neither `.` nor `..`.
_SAFE_PATH = re.compile(r"^(?:/(?!\.\.?(?:/|$))[A-Za-z0-9._~:@+,=-]+)+$")
# Headers some servers honour to run a request as another method or path than the one on the request line.
_OVERRIDE_HEADERS = ("x-http-method-override", "x-http-method", "x-method-override", "x-original-url", "x-rewrite-url")


def path_problem(path: str) -> str | None:
    """Why the gateway will not forward this path, or None."""
    if path == "/" or _SAFE_PATH.match(path):
        return None
    if "%" in path:
        return "percent-encoded characters"
    if "//" in path or path.endswith("/"):
        return "an empty path segment"
    if re.search(r"(^|/)\.\.?(/|$)", path):
        return "a `.` or `..` segment"
    return "characters outside letters, digits and -._~:@+,="


def refuse_request(path: str, headers: Mapping[str, str], checked_path: bool = False) -> GatewayError | None:
    """A 400 for a path or header the gateway cannot forward unambiguously, else None. `checked_path`: the path is
    known to be safe (it equals one of the gateway's fixed routes)."""
    problem = None if checked_path else path_problem(path)
    if problem is not None:
        return GatewayError(
            400,
            "invalid_path",
            f"The request path contains {problem}; metergate forwards paths byte for byte and refuses ambiguous ones.",
        )
    for name in _OVERRIDE_HEADERS:
        if name in headers:
            return GatewayError(400, "invalid_header", f"The header {name} is not accepted by metergate.")
    return None
