"""The HTTP edge: raw ASGI apps for the API listener and the metrics listener.

Deliberately thin. It hands the raw request line, the headers and a lazily read body to `Dispatcher.handle`, and
notices when the client hangs up. No framework: the API surface is a handful of
routes and every microsecond here is added to every LLM call (see benchmarks/README.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import make_asgi_app

from metergate.admin import AdminApi
from metergate.console import SECURITY_HEADERS, Console, Reply
from metergate.dispatch import Dispatcher
from metergate.errors import GatewayError
from metergate.exchange import InboundRequest
from metergate.metrics import Meter

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class AsgiResponder:
    """Writes a response through ASGI and knows when the client has gone away.

    uvicorn silently drops writes to a closed connection. Its request cycle (the object `receive` is bound to)
    keeps a `disconnected` flag, which is read directly when present: free, and exact. Under any other ASGI server
    a task waits on `receive()`, which returns `http.disconnect` once the connection is lost.
    """

    __slots__ = ("_cycle", "_gone", "_send", "_watch", "_write_timeout_s", "started")

    def __init__(self, receive: Receive, send: Send, write_timeout_s: float = 60.0) -> None:
        self._send = send
        self._gone = False
        self._write_timeout_s = write_timeout_s
        self.started = False
        cycle = getattr(receive, "__self__", None)
        self._cycle = cycle if isinstance(getattr(cycle, "disconnected", None), bool) else None
        self._watch = None if self._cycle is not None else asyncio.ensure_future(self._wait_for_disconnect(receive))

    async def _wait_for_disconnect(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self._gone = True
                return

    @property
    def disconnected(self) -> bool:
        if self._cycle is not None:
            return self._gone or bool(self._cycle.disconnected)
        return self._gone

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.started = True
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def send(self, body: bytes, more: bool = False) -> None:
        if not more:
            self.close()
        message = {"type": "http.response.body", "body": body, "more_body": more}
        cycle = self._cycle
        if cycle is None or not cycle.flow.write_paused:
            await self._send(message)
            return
        # The client stopped reading: uvicorn would wait for it forever, and meanwhile nobody reads the provider's
        # answer or records the request. Past the timeout it is treated as gone (the gateway then drains).
        try:
            async with asyncio.timeout(self._write_timeout_s):
                await self._send(message)
        except TimeoutError:
            self._gone = True
            cycle.transport.close()

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()


class AsgiBody:
    """A request body read only when the gateway asks for it: after the key is checked, so a client without a key
    never makes the gateway buffer a byte of its body.

    `read` (a body the gateway parses) and `stream` (a body it forwards) raise GatewayError: 413 past their limit
    (without reading past it), 499 when the client hangs up before the end, 408 when the connection guard ended a
    body that stopped arriving (connections.py). `error` keeps what `stream` raised, because the HTTP client
    forwarding the stream reports it as a broken upload.
    """

    __slots__ = ("_limit", "_receive", "_stream_limit", "declared", "error", "finished")

    def __init__(self, receive: Receive, headers: dict[str, str], limit: int, stream_limit: int | None = None) -> None:
        self._receive = receive
        self._limit = limit
        self._stream_limit = stream_limit or limit
        self.declared = headers.get("content-length")
        self.finished = self.declared in (None, "0") and "transfer-encoding" not in headers
        self.error: GatewayError | None = None

    @property
    def declared_length(self) -> int | None:
        declared = self.declared
        return int(declared) if declared is not None and declared.isdigit() and len(declared) < 20 else None

    async def read(self) -> bytes:
        # The common case, a body in one message, without the generator `stream` uses: this is on every model call.
        declared = self.declared_length
        if declared is not None and declared > self._limit:
            raise _too_large(self._limit)
        message = await self._receive()
        if message["type"] == "http.request" and not message.get("more_body") and len(message["body"]) <= self._limit:
            self.finished = True
            return message["body"]  # type: ignore[no-any-return]
        chunks = [chunk async for chunk in self._chunks(self._limit, message)]
        return b"".join(chunks) if len(chunks) != 1 else chunks[0]

    async def stream(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._chunks(self._stream_limit):
                yield chunk
        except GatewayError as err:
            self.error = err
            raise

    async def _chunks(self, limit: int, first: Message | None = None) -> AsyncIterator[bytes]:
        declared = self.declared_length
        if declared is not None and declared > limit:
            raise _too_large(limit)
        size = 0
        while True:
            message = first if first is not None else await self._receive()
            first = None
            if message["type"] == "http.disconnect":
                if getattr(getattr(self._receive, "__self__", None), "body_timed_out", False):
                    raise GatewayError(408, "body_timeout", "The client stopped sending the request body.")
                raise GatewayError(
                    499, "client_disconnected", "The client closed the connection before sending the whole body."
                )
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            more = message.get("more_body", False)
            if not more:
                self.finished = True
            if chunk:
                yield chunk
            if not more:
                return


def _too_large(limit: int) -> GatewayError:
    return GatewayError(413, "body_too_large", f"Request body exceeds the gateway limit of {limit} bytes.")


@dataclass(frozen=True, slots=True)
class EdgeLimits:
    max_body_bytes: int = 32 * 1024 * 1024
    max_stream_body_bytes: int = 4 * 1024**3
    admin_body_bytes: int = 1024 * 1024
    write_timeout_s: float = 60.0  # the longest a client may leave a streamed response unread


class ApiApp:
    """The LLM API listener: /admin/ goes to the admin API, everything else to the gateway."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        limits: EdgeLimits,
        admin: AdminApi | None = None,
        websockets: ASGIApp | None = None,
        console: Console | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.console = console
        self.websockets = websockets  # WebSocket sessions (realtime.RealtimeRelay)
        self.limits = limits
        self.admin = admin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            if self.websockets is not None:
                await self.websockets(scope, receive, send)
            else:
                await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            return
        headers, refusal = request_headers(scope["headers"])
        # The path exactly as sent: uvicorn's `path` is percent-decoded, and forwarding a decoded path would let
        # the provider see a different request than the one the gateway classified (issue 8).
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        path = raw_path.decode("latin-1")
        query = scope["query_string"].decode("latin-1")
        limits = self.limits
        if path.startswith(("/admin/", "/console")):  # one check on the way of LLM traffic
            if self.admin is not None and path.startswith(("/admin/", "/console/admin/")):
                await self._admin(scope, receive, send, path, query, headers)
                return
            if self.console is not None and (path == "/console" or path.startswith("/console/")):
                await self._console(scope, receive, send, path, headers)
                return
        request = InboundRequest(
            method=scope["method"],
            path=path,
            query=query,
            headers=headers,
            body=AsgiBody(receive, headers, limits.max_body_bytes, limits.max_stream_body_bytes),
            refusal=refusal,
        )
        responder = AsgiResponder(receive, send, limits.write_timeout_s)
        try:
            await self.dispatcher.handle(request, responder)
        finally:
            responder.close()

    async def _admin(
        self, scope: Scope, receive: Receive, send: Send, path: str, query: str, headers: dict[str, str]
    ) -> None:
        """The admin API, under /admin/ (bearer token) or /console/admin/ (the console's session cookie too)."""
        assert self.admin is not None
        body = AsgiBody(receive, headers, self.limits.admin_body_bytes)
        status, payload, content_type = await self.admin.handle(
            scope["method"],
            path.removeprefix("/console"),
            query,
            headers,
            body,
            via_console=path.startswith("/console/"),
            client=(scope.get("client") or ("",))[0],
        )
        response_headers = [
            (b"content-type", content_type.encode()),
            (b"cache-control", b"no-store"),
            (b"x-content-type-options", b"nosniff"),
        ]
        if not body.finished:
            response_headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        await send({"type": "http.response.body", "body": payload})

    async def _console(self, scope: Scope, receive: Receive, send: Send, path: str, headers: dict[str, str]) -> None:
        assert self.console is not None
        body = AsgiBody(receive, headers, 64 * 1024)
        try:
            data = await body.read()
        except GatewayError as exc:
            data, reply = b"", Reply(exc.status, exc.message.encode(), [("content-type", "text/plain")])
        else:
            client = (scope.get("client") or ("",))[0]
            reply = await self.console.handle(scope["method"], path, headers, data, client)
        out = [(k.encode(), v.encode()) for k, v in reply.headers]
        names = {k for k, _ in reply.headers}
        if "content-type" not in names:
            out.append((b"content-type", b"text/html; charset=utf-8"))
        if "cache-control" not in names:
            out.append((b"cache-control", b"no-store"))
        out += [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS]
        if not body.finished:
            out.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": reply.status, "headers": out})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else reply.body})


def request_headers(raw: Iterable[tuple[bytes, bytes]]) -> tuple[dict[str, str], GatewayError | None]:
    """Header names to values; a repeated header keeps every value, joined with commas (RFC 9110 5.3), in linear
    time however many times it repeats.

    Values must be UTF-8, because that is how the upstream client encodes them again: a value that is not is
    refused (the second element) rather than forwarded altered.
    """
    headers: dict[str, str] = {}
    repeated: dict[str, list[str]] | None = None
    refusal: GatewayError | None = None
    for name, value in raw:
        key = name.decode("latin-1").lower()
        try:
            text = value.decode()
        except UnicodeDecodeError:
            text = value.decode("latin-1")
            refusal = refusal or GatewayError(
                400, "invalid_header", f"The value of header {key[:64]!r} is not UTF-8 text."
            )
        if key in headers:
            if repeated is None:
                repeated = {}
            repeated.setdefault(key, [headers[key]]).append(text)
        headers[key] = text
    if repeated:
        for key, values in repeated.items():
            headers[key] = ", ".join(values)
    return headers, refusal


class MetricsApp:
    """The metrics listener: `/metrics` for Prometheus, `/healthz` and `/readyz` for orchestrators."""

    def __init__(self, meter: Meter, is_ready: Callable[[], bool]) -> None:
        self._metrics: ASGIApp = make_asgi_app(meter.registry)
        self._is_ready = is_ready

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/metrics":
            await self._metrics(scope, receive, send)
            return
        if path == "/healthz":
            await _plain(send, 200, b"ok\n")
        elif path == "/readyz":
            ready = self._is_ready()
            await _plain(send, 200 if ready else 503, b"ready\n" if ready else b"draining\n")
        else:
            await _plain(send, 404, b"not found: try /metrics\n")


async def _plain(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain; charset=utf-8")],
        }
    )
    await send({"type": "http.response.body", "body": body})
