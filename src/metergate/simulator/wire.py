"""Writing responses the way providers do: JSON bodies, SSE events, and connections cut mid-stream."""

from __future__ import annotations

import asyncio
import json
import secrets
import string
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
_ALNUM = string.ascii_letters + string.digits


class SimulatedReset(Exception):
    """Raised mid-response so the server drops the connection, as a crashing upstream would."""


def rand_id(n: int) -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(n))


def pretty(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_INDENT_2)


class Wire:
    def __init__(self, send: Send, chunk_delay_s: float = 0.0, extra_headers: dict[str, str] | None = None) -> None:
        self._send = send
        self._chunk_delay_s = chunk_delay_s
        self._extra = extra_headers or {}
        self.events_sent = 0

    async def json(
        self,
        status: int,
        obj: Any,
        headers: dict[str, str] | None = None,
        *,
        raw: bytes | None = None,
        indent: bool = False,
    ) -> None:
        body = raw if raw is not None else (pretty(obj) + b"\n" if indent else orjson.dumps(obj))
        await self._send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), *_encode({**(headers or {}), **self._extra})],
            }
        )
        await self._send({"type": "http.response.body", "body": body})

    async def raw(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        """A whole non-JSON body (file contents, audio, JSONL results)."""
        await self._send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", content_type.encode()), *_encode({**(headers or {}), **self._extra})],
            }
        )
        await self._send({"type": "http.response.body", "body": body})

    async def start(self, content_type: str, headers: dict[str, str] | None = None) -> None:
        await self._send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", content_type.encode()), *_encode({**(headers or {}), **self._extra})],
            }
        )

    async def write(self, data: bytes) -> None:
        if self.events_sent and self._chunk_delay_s:
            await asyncio.sleep(self._chunk_delay_s)
        await self._send({"type": "http.response.body", "body": data, "more_body": True})
        self.events_sent += 1

    async def end(self) -> None:
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})


def _encode(headers: dict[str, str] | None) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in (headers or {}).items()]


def sse(data: Any, event: str | None = None, sep: bytes = b"\n\n", spaced: bool = False) -> bytes:
    """One SSE event; `spaced` writes the JSON the way Python's json.dumps does (some OpenAI-compatible servers)."""
    payload = data if isinstance(data, bytes) else json.dumps(data).encode() if spaced else orjson.dumps(data)
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + payload + sep


class CaptureWire(Wire):
    """A Wire that keeps the response instead of sending it: how the simulated batch APIs run each request."""

    def __init__(self) -> None:
        self.status = 0
        self.body = b""
        super().__init__(self._keep)

    async def _keep(self, message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        else:
            self.body += message.get("body", b"")
