"""Provider URLs in forwarded responses, pointed back at the gateway.

Some responses carry absolute URLs on the provider's host that the official SDKs follow as they are: Anthropic's
batch `results_url`, Gemini's resumable-upload URL (`x-goog-upload-url`). Left alone, the client would send its
gateway key straight to the provider (refused there) or, configured with a provider key, bypass the meter. Each
such URL is rewritten to the same path on the gateway; nothing else in the response changes.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from metergate.auth import KeyRing, Principal
from metergate.exchange import InboundRequest
from metergate.passthrough import ResponseTap, TapFactory, TapRequest
from metergate.query import query_items, query_value

log = logging.getLogger("metergate.gateway")

# Batch objects are a few kilobytes; a response past this is relayed as it came.
MAX_REWRITTEN_BODY = 8 * 1024 * 1024


def gateway_url(url: str, upstream_base: str, public_url: str) -> str:
    """`url` on the gateway when it points at the upstream's base URL; else unchanged."""
    if url.startswith(upstream_base) and url[len(upstream_base) : len(upstream_base) + 1] in ("/", "?", ""):
        return public_url + url[len(upstream_base) :]
    return url


class JsonUrlTap:
    """Rewrites the named string fields of a JSON object response (top level, or in `data` list items)."""

    rewrites = True
    drains = False

    def __init__(self, request: TapRequest, fields: tuple[str, ...]) -> None:
        self._base = request.upstream.config.base_url
        self._public = request.public_url
        self._fields = fields
        self._chunks: list[bytes] = []
        self._size = 0
        self._passthrough = False
        self._status = 0
        self.limit = MAX_REWRITTEN_BODY

    def response_headers(self, status: int, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        self._status = status
        return headers

    def feed(self, chunk: bytes) -> bytes:
        if self._passthrough:
            return chunk
        self._chunks.append(chunk)
        self._size += len(chunk)
        if self._size > self.limit:
            self._passthrough = True
            held, self._chunks = b"".join(self._chunks), []
            return held
        return b""

    def finish(self, complete: bool) -> bytes:
        if self._passthrough:
            return b""
        body = b"".join(self._chunks)
        if not complete or self._status >= 400:
            return body
        return self.rewrite(body)

    def rewrite(self, body: bytes) -> bytes:
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            return body
        objects = [parsed] if isinstance(parsed, dict) else []
        if isinstance(parsed, dict) and isinstance(parsed.get("data"), list):
            objects += [o for o in parsed["data"] if isinstance(o, dict)]
        changed = False
        for obj in objects:
            for name in self._fields:
                value = obj.get(name)
                if isinstance(value, str):
                    new = gateway_url(value, self._base, self._public)
                    if new != value:
                        # Replaced where it stands, so the rest of the body stays byte for byte as the provider sent it.
                        old_json, new_json = orjson.dumps(value), orjson.dumps(new)
                        if old_json in body:
                            body = body.replace(old_json, new_json)
                        else:
                            obj[name] = new
                            changed = True
        return orjson.dumps(parsed) if changed else body


@dataclass(frozen=True, slots=True)
class _Upload:
    principal: Principal
    path: str  # the one path the session's chunks go to
    expires: float


class UploadSessions:
    """Resumable upload sessions the gateway opened, by upload id, with the key that opened them.

    google-genai sends the chunks of an upload to the session URL without its API key (the provider authorises
    them by the upload id), so the gateway attributes them to the key that opened the session. Only that: an
    upload id authenticates POSTs to the session's own path carrying an upload command, only while the opening key
    is still valid, and only until the upload is finalised or cancelled; an id the gateway never handed out
    authenticates nobody. Sessions live in this process: behind several replicas, an upload must reach the
    replica that opened it (or send its key).
    """

    TTL_S = 7 * 86400.0  # Google keeps an unfinished resumable upload for a week
    MAX_SESSIONS = 100_000
    _COMMANDS = frozenset({"upload", "finalize", "query", "cancel"})

    def __init__(self, keys: KeyRing | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._sessions: OrderedDict[str, _Upload] = OrderedDict()
        self._keys = keys
        self._clock = clock

    def open(self, upload_id: str, principal: Principal, path: str) -> None:
        self._sessions[upload_id] = _Upload(principal, path, self._clock() + self.TTL_S)
        self._sessions.move_to_end(upload_id)
        while len(self._sessions) > self.MAX_SESSIONS:
            self._sessions.popitem(last=False)

    def close(self, upload_id: str) -> None:
        self._sessions.pop(upload_id, None)

    def authenticate(self, req: InboundRequest) -> Principal | None:
        """The principal of a key-less upload request to a session this gateway opened."""
        if req.method not in ("POST", "PUT") or not req.path.startswith("/upload/") or "upload_id" not in req.query:
            return None
        commands = {c.strip().lower() for c in req.headers.get("x-goog-upload-command", "").split(",")}
        if not commands or not commands <= self._COMMANDS:
            return None  # opening a session (`start`), or anything that is not a chunk, needs a key
        upload_id = _upload_id(req.query) or ""
        found = self._sessions.get(upload_id)
        if found is None or found.path != req.path or found.expires < self._clock():
            return None
        if self._keys is not None and not self._keys.holds(found.principal):
            self.close(upload_id)  # the key was revoked since
            return None
        return found.principal


def _upload_id(query: str) -> str | None:
    for name, item in query_items(query):
        if name == "upload_id":
            return query_value(item)
    return None


class UploadUrlTap:
    """Gemini's resumable uploads: the session URL in `x-goog-upload-url` is the gateway's, and the session is
    remembered with the key that opened it."""

    rewrites = False
    drains = False

    def __init__(self, request: TapRequest, sessions: UploadSessions) -> None:
        self._base = request.upstream.config.base_url
        self._public = request.public_url
        self._principal = request.ctx.principal
        self._sessions = sessions
        self._upload_id = _upload_id(request.req.query)  # a chunk of an open session

    def response_headers(self, status: int, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        out = []
        for name, value in headers:
            if name == b"x-goog-upload-url":
                url = gateway_url(value.decode("latin-1"), self._base, self._public)
                path, _, query = url.partition("?")
                upload_id = _upload_id(query)
                if upload_id and self._principal is not None and path.startswith(self._public):
                    self._sessions.open(upload_id, self._principal, path[len(self._public) :])
                value = url.encode("latin-1")
            elif name == b"x-goog-upload-status" and self._upload_id and value.lower() in (b"final", b"cancelled"):
                self._sessions.close(self._upload_id)
            out.append((name, value))
        return out

    def feed(self, chunk: bytes) -> bytes:
        return chunk

    def finish(self, complete: bool) -> bytes:
        return b""


def _anthropic_batch(request: TapRequest) -> ResponseTap:
    return JsonUrlTap(request, ("results_url",))


def url_taps(sessions: UploadSessions) -> dict[str, TapFactory]:
    return {
        "anthropic_batch": _anthropic_batch,
        "gemini_upload": lambda request: UploadUrlTap(request, sessions),
    }
