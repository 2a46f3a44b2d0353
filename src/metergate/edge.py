"""The HTTP edge: raw ASGI apps for the API listener and the metrics listener.

Deliberately thin. It reads the request body (refusing oversized ones without buffering them), notices when the
client hangs up, and hands everything else to `Gateway.handle`. No framework: the API surface is a handful of
routes and every microsecond here is added to every LLM call (see benchmarks/README.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from prometheus_client import make_asgi_app

from metergate.admin import AdminApi
from metergate.gateway import Gateway, InboundRequest
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

    __slots__ = ("_cycle", "_gone", "_send", "_watch", "started")

    def __init__(self, receive: Receive, send: Send) -> None:
        self._send = send
        self._gone = False
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
            return bool(self._cycle.disconnected)
        return self._gone

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.started = True
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def send(self, body: bytes, more: bool = False) -> None:
        if not more:
            self.close()
        await self._send({"type": "http.response.body", "body": body, "more_body": more})

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()


class ApiApp:
    """The LLM API listener: /admin/ goes to the admin API, everything else to the gateway."""

    def __init__(self, gateway: Gateway, max_body_bytes: int, admin: AdminApi | None = None) -> None:
        self.gateway = gateway
        self.max_body_bytes = max_body_bytes
        self.admin = admin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        headers = request_headers(scope["headers"])
        body, too_large, incomplete = await self._read_body(headers, receive)
        path: str = scope["path"]
        if self.admin is not None and path.startswith("/admin/"):
            status, payload, content_type = await self.admin.handle(
                scope["method"], path, scope["query_string"].decode("latin-1"), headers, body
            )
            await send(
                {"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type.encode())]}
            )
            await send({"type": "http.response.body", "body": payload})
            return
        request = InboundRequest(
            method=scope["method"],
            path=scope["path"],
            query=scope["query_string"].decode("latin-1"),
            headers=headers,
            body=body,
            body_too_large=too_large,
            body_incomplete=incomplete,
        )
        responder = AsgiResponder(receive, send)
        try:
            await self.gateway.handle(request, responder)
        finally:
            responder.close()

    async def _read_body(self, headers: dict[str, str], receive: Receive) -> tuple[bytes, bool, bool]:
        """The body, whether it exceeds the limit, and whether the client hung up before sending all of it."""
        limit = self.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return b"", True, False
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"".join(chunks), False, True
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", True, False
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        return b"".join(chunks) if len(chunks) != 1 else chunks[0], False, False


def request_headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """Header names to values; a repeated header keeps every value, joined with commas (RFC 9110 5.3).

    Values are decoded as UTF-8 because that is how the upstream client encodes them again, so bytes a client
    sent arrive upstream unchanged; a value that is not UTF-8 falls back to Latin-1, which never fails.
    """
    headers: dict[str, str] = {}
    for name, value in raw:
        key = name.decode("latin-1").lower()
        try:
            text = value.decode()
        except UnicodeDecodeError:
            text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers


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
