"""Incremental Server-Sent Events framing.

Upstream chunks arrive cut at arbitrary byte offsets. `SSEBuffer` turns them into whole events while keeping
each event's raw bytes, so the gateway can relay an event exactly as the provider sent it, or drop it, without
re-serialising anything. Events end at a blank line: `\\n\\n` (OpenAI, Anthropic) or `\\r\\n\\r\\n` (Gemini).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class SSEEvent:
    raw: bytes  # the event's bytes as received, blank-line terminator included
    event: str | None
    data: bytes  # the `data:` lines joined by "\n"; b"" when there were none


def _end_of_event(buf: bytes | bytearray, start: int) -> tuple[int, int]:
    """Position and length of the first blank-line terminator at or after `start`, or (-1, 0)."""
    lf = buf.find(b"\n\n", start)
    crlf = buf.find(b"\r\n\r\n", start)
    if crlf != -1 and (lf == -1 or crlf < lf):
        return crlf, 4
    if lf != -1:
        # "\n\n" inside "\r\n\r\n" is found later than the CRLF form, so this is a plain LF terminator,
        # except for a mixed "\r\n\n" which is still one blank line.
        return lf, 2
    return -1, 0


def parse_event(raw: bytes) -> SSEEvent:
    event: str | None = None
    data: list[bytes] = []
    for line in raw.splitlines():
        if not line or line.startswith(b":"):
            continue
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            data.append(value)
        elif name == b"event":
            event = value.decode("utf-8", "replace")
    return SSEEvent(raw, event, b"\n".join(data))


class SSEBuffer:
    """Accumulates bytes and yields complete events in arrival order."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        self._buf += chunk
        events: list[SSEEvent] = []
        start = 0
        buf = self._buf
        while True:
            pos, size = _end_of_event(buf, start)
            if pos == -1:
                break
            end = pos + size
            events.append(parse_event(bytes(buf[start:end])))
            start = end
        if start:
            del buf[:start]
        return events

    def pending(self) -> bytes:
        """Bytes of an event that never got its terminator (a stream cut mid-event)."""
        return bytes(self._buf)
