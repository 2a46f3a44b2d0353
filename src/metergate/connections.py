"""Connection limits for both listeners: what a client, with or without a key, can make the gateway hold or parse.

uvicorn's httptools protocol parses request headers without a size or count limit, waits forever for the first
request on a new connection or for the rest of a body, and accepts connections until the process runs out of
file descriptors. Any of those lets one client without a key stall or lock out everyone else.
`GuardedHttpProtocol` adds what nginx has by default:

- the request line and headers together are at most `max_header_bytes`, in at most `max_headers` lines (431);
- a request's headers must be complete within `header_timeout_s` of the connection opening (or, on a kept-alive
  connection, of the request's first byte), else the connection is closed (408);
- a body that stops arriving for `body_timeout_s` while the gateway waits for it ends the request (408);
- at most 16 requests wait pipelined behind the one being served on a connection;
- at most `max_connections` connections are open; a new one past the cap first evicts the connections that have
  no request in progress (idle keep-alive sockets, half-sent headers), oldest first, so clients being served are
  never cut off and a flood of idle sockets cannot lock out clients with keys.

Timeouts are enforced by one sweep per listener a few times a second rather than a timer per request: the
request path only records timestamps. Malformed requests are answered 400 as before; `logs.BoundedLogFilter`
keeps their warnings from flooding the log.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import resource
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

log = logging.getLogger("metergate.connections")


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    header_timeout_s: float = 30.0
    body_timeout_s: float = 60.0
    max_connections: int = 4096


@dataclass(slots=True)
class ConnectionStats:
    """What the guard refused, for `metergate_connections_*` metrics."""

    open: int = 0
    refused: dict[str, int] = field(default_factory=dict)

    def count(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1


# Requests a client may queue on one connection behind the one being served (HTTP/1.1 pipelining).
MAX_PIPELINED = 16


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a request that broke a limit."""


class _Sweeper:
    """Enforces the timeouts of one listener's connections, a few times a second."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.interval_s = min(1.0, max(0.05, min(limits.header_timeout_s, limits.body_timeout_s) / 4))
        self.connections: set[Any] | None = None
        self._handle: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop, connections: set[Any]) -> None:
        if self._handle is None:
            self.connections = connections
            self._handle = loop.call_later(self.interval_s, self._sweep, loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self._handle = None
        if not self.connections:
            return  # restarted by the next connection
        now = time.monotonic()
        for conn in list(self.connections):
            if isinstance(conn, GuardedHttpProtocol):
                conn.check_timeouts(now)
        self._handle = loop.call_later(self.interval_s, self._sweep, loop)


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header limits, header and body timeouts and a connection cap."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()
    stats: ClassVar[ConnectionStats] = ConnectionStats()
    sweeper: ClassVar[_Sweeper] = _Sweeper(ConnectionLimits())

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_bytes = 0
        self._awaiting_headers = True
        self._refusal: tuple[int, str] | None = None
        self._chunk_bytes = 0
        self._upgraded = False
        self.last_active = self.headers_since = time.monotonic()

    # --- connection lifecycle --------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.stats.open += 1
        self.sweeper.start(self.loop, self.connections)
        if len(self.connections) > self.limits.max_connections:
            self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._upgraded:
            self.stats.open -= 1
        super().connection_lost(exc)

    def handle_websocket_upgrade(self) -> None:
        # The socket now belongs to a WebSocket protocol (a Realtime session, counted as a request in flight); this
        # protocol never hears of it again.
        self._upgraded = True
        self.stats.open -= 1
        super().handle_websocket_upgrade()

    def _idle(self) -> bool:
        """No request of this connection is being served: closing it loses nothing but a socket."""
        return self.cycle is None or self.cycle.response_complete

    def _make_room(self) -> None:
        """Close idle connections, oldest first, a batch at a time so a flood does not cost a scan per socket."""
        batch = max(1, self.limits.max_connections // 16)
        idle = [c for c in self.connections if isinstance(c, GuardedHttpProtocol) and c is not self and c._idle()]
        for victim in heapq.nsmallest(batch, idle, key=lambda c: c.last_active):
            self.stats.count("evicted_idle")
            victim.transport.close()
        if not idle:
            # Every other connection is serving a request: this one waits for nothing, so it goes.
            self.stats.count("connection_cap")
            self.transport.close()

    # --- timeouts (called by the sweeper) --------------------------------------------------------------------

    def check_timeouts(self, now: float) -> None:
        if self.transport.is_closing():
            return
        limits = self.limits
        if self._awaiting_headers:
            if now - self.headers_since > limits.header_timeout_s:
                self.stats.count("header_timeout")
                self._reply_and_close(408, "Request headers not received in time.")
            return
        cycle = self.cycle
        if (
            cycle is not None
            and cycle.more_body
            and not cycle.response_started
            and not self.flow.read_paused  # paused: the gateway is not reading, the client is not the slow one
            and now - self.last_active > limits.body_timeout_s
        ):
            self.stats.count("body_timeout")
            cycle.body_timed_out = True  # type: ignore[attr-defined]  # read by edge.AsgiBody
            self._reply_and_close(408, "Request body not received in time.")

    # --- header limits ---------------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        now = self.last_active = time.monotonic()
        self._chunk_bytes = len(data)
        cycle = self.cycle
        if not self._awaiting_headers and (cycle is None or cycle.response_complete):
            # The first bytes of the next request on a kept-alive connection: its headers are on the clock.
            self._awaiting_headers = True
            self._header_bytes = 0
            self.headers_since = now
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            if self._refusal is not None:
                status, message = self._refusal
                self._reply_and_close(status, message)
                return
            self.stats.count("malformed")
            log.warning("invalid HTTP request received: %s", str(exc)[:200])
            self.send_400_response("Invalid HTTP request received.")
            return
        if self._awaiting_headers:
            if self.cycle is not cycle:
                self._awaiting_headers = False  # a request started: its headers are complete
                return
            # Headers still incomplete after this chunk: every byte of it was header bytes.
            self._header_bytes += len(data)
            if self._header_bytes > self.limits.max_header_bytes:
                self.stats.count("headers_too_large")
                self._reply_and_close(431, "Request header fields too large.")

    def on_headers_complete(self) -> None:
        # Checked before any request starts. The byte limit bounds how many lines can arrive.
        limits = self.limits
        if len(self.headers) > limits.max_headers:
            self._refuse("too_many_headers", 431, "Too many request header fields.")
        if self._header_bytes + self._chunk_bytes > limits.max_header_bytes:
            # Headers that arrived whole in one read: measure them.
            size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
            if size > limits.max_header_bytes:
                self._refuse("headers_too_large", 431, "Request header fields too large.")
        if self.cycle is not None and not self.cycle.response_complete and len(self.pipeline) >= MAX_PIPELINED:
            # Each queued request holds its parsed state until its turn: a read of thousands of pipelined requests
            # would hold thousands of them.
            self._refuse("pipelined", 503, "Too many pipelined requests.")
        super().on_headers_complete()

    def _refuse(self, reason: str, status: int, message: str) -> None:
        self.stats.count(reason)
        self._refusal = (status, message)
        raise _Refused

    def _reply_and_close(self, status: int, message: str) -> None:
        body = message.encode()
        self.transport.write(
            b"".join(
                (
                    STATUS_LINE[status],
                    b"content-type: text/plain; charset=utf-8\r\n",
                    b"content-length: %d\r\n" % len(body),
                    b"connection: close\r\n\r\n",
                    body,
                )
            )
        )
        self.transport.close()


def guarded_protocol(limits: ConnectionLimits) -> tuple[type[GuardedHttpProtocol], ConnectionStats]:
    """A protocol class for one listener, with its own limits, timeout sweep and counters."""
    stats = ConnectionStats()
    attributes = {"limits": limits, "stats": stats, "sweeper": _Sweeper(limits)}
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,), attributes), stats


def raise_open_file_limit() -> int:
    """Raise this process's open-file limit to the hard limit (a gateway holds two sockets per request in
    flight, and Linux's default soft limit of 1,024 is far below what it should serve); returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20
