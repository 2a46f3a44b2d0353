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

import orjson

from metergate.auth import Principal
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


class UploadSessions:
    """Resumable upload sessions the gateway opened, by upload id, with the key that opened them.

    google-genai sends the chunks of an upload to the session URL without its API key (the provider authorises
    them by the upload id), so the gateway attributes them to the key that opened the session; an upload id the
    gateway never handed out authenticates nobody. Sessions live in this process: behind several replicas, an upload
    must reach the replica that opened it (or send its key).
    """

    TTL_S = 7 * 86400.0
    MAX_SESSIONS = 100_000

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._sessions: OrderedDict[str, tuple[Principal, float]] = OrderedDict()
        self._clock = clock

    def open(self, upload_id: str, principal: Principal) -> None:
        self._sessions[upload_id] = (principal, self._clock() + self.TTL_S)
        self._sessions.move_to_end(upload_id)
        while len(self._sessions) > self.MAX_SESSIONS:
            self._sessions.popitem(last=False)

    def authenticate(self, req: InboundRequest) -> Principal | None:
        """The principal of a key-less upload request to a session this gateway opened."""
        if not req.path.startswith("/upload/") or "upload_id" not in req.query:
            return None
        if req.headers.get("x-goog-upload-command", "").strip().lower() == "start":
            return None  # opening a session needs a key
        upload_id = _upload_id(req.query)
        found = self._sessions.get(upload_id or "")
        if found is None or found[1] < self._clock():
            return None
        return found[0]


def _upload_id(query: str) -> str | None:
    for name, item in query_items(query):
        if name == "upload_id":
            return query_value(item)
    return None


class UploadUrlTap:
    """Gemini's resumable uploads: the session URL in `x-goog-upload-url` is the gateway's, and the session is
    remembered with the key that opened it."""

    rewrites = False

    def __init__(self, request: TapRequest, sessions: UploadSessions) -> None:
        self._base = request.upstream.config.base_url
        self._public = request.public_url
        self._principal = request.ctx.principal
        self._sessions = sessions

    def response_headers(self, status: int, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        out = []
        for name, value in headers:
            if name == b"x-goog-upload-url":
                url = gateway_url(value.decode("latin-1"), self._base, self._public)
                upload_id = _upload_id(url.partition("?")[2])
                if upload_id and self._principal is not None:
                    self._sessions.open(upload_id, self._principal)
                value = url.encode("latin-1")
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
