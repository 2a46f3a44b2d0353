"""SSE framing: `SSEBuffer` turns arbitrarily cut chunks into whole events, keeping each event's raw bytes."""

from __future__ import annotations

import pytest

from metergate.sse import SSEBuffer, SSEEvent, parse_event

# Three events as Anthropic frames them (wire-formats.md §3.3, claude-3-7-sonnet capture): `event:` + `data:` lines,
# "\n\n" after each, and JSON padded with spaces inside the line.
ANTHROPIC_STYLE = (
    b"event: content_block_start\n"
    b'data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}        }\n'
    b"\n"
    b"event: ping\n"
    b'data: {"type": "ping"}\n'
    b"\n"
    b"event: message_stop\n"
    b'data: {"type":"message_stop"       }\n'
    b"\n"
)

# Two data-only events as Gemini frames them (wire-formats.md §4.2, usageMetadata left out): "\r\n\r\n" after each.
GEMINI_FIRST = b'{"candidates": [{"content": {"parts": [{"text": "1\\n2\\n"}],"role": "model"},"index": 0}]}'
GEMINI_SECOND = (
    b'{"candidates": [{"content": {"parts": [{"text": "3\\n4\\n5"}],"role": "model"},'
    b'"finishReason": "STOP","index": 0}]}'
)
GEMINI_STYLE = b"data: " + GEMINI_FIRST + b"\r\n\r\n" + b"data: " + GEMINI_SECOND + b"\r\n\r\n"


def feed_in(chunks: list[bytes]) -> tuple[list[SSEEvent], bytes]:
    """The events a fresh buffer yields for `chunks` fed in order, and what is left pending."""
    buffer = SSEBuffer()
    events = [event for chunk in chunks for event in buffer.feed(chunk)]
    return events, buffer.pending()


def every_cut(blob: bytes) -> list[list[bytes]]:
    """`blob` whole, cut once at every offset, cut twice at every pair of neighbouring offsets, and byte by byte."""
    ways = [[blob]]
    ways += [[blob[:i], blob[i:]] for i in range(1, len(blob))]
    ways += [[blob[:i], blob[i : i + 1], blob[i + 1 :]] for i in range(1, len(blob) - 1)]
    ways.append([blob[i : i + 1] for i in range(len(blob))])
    return ways


def test_lf_events_with_names() -> None:
    events, pending = feed_in([ANTHROPIC_STYLE])
    assert pending == b""
    assert [e.event for e in events] == ["content_block_start", "ping", "message_stop"]
    assert [e.data for e in events] == [
        b'{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}        }',
        b'{"type": "ping"}',
        b'{"type":"message_stop"       }',
    ]
    # Each event keeps its bytes, terminator included, so relaying them rebuilds the stream exactly.
    assert events[1].raw == b'event: ping\ndata: {"type": "ping"}\n\n'
    assert b"".join(e.raw for e in events) == ANTHROPIC_STYLE


def test_crlf_events() -> None:
    events, pending = feed_in([GEMINI_STYLE])
    assert pending == b""
    assert len(events) == 2
    assert all(e.event is None for e in events)
    assert [e.data for e in events] == [GEMINI_FIRST, GEMINI_SECOND]
    assert events[1].raw == b"data: " + GEMINI_SECOND + b"\r\n\r\n"
    assert b"".join(e.raw for e in events) == GEMINI_STYLE


def test_crlf_lines_inside_an_event() -> None:
    events, _ = feed_in([b"event: message_delta\r\ndata: {}\r\n\r\n"])
    assert [(e.event, e.data) for e in events] == [("message_delta", b"{}")]


@pytest.mark.parametrize("blob", [ANTHROPIC_STYLE, GEMINI_STYLE], ids=["lf", "crlf"])
def test_events_split_across_chunks_at_every_offset(blob: bytes) -> None:
    whole, _ = feed_in([blob])
    for chunks in every_cut(blob):
        events, pending = feed_in(chunks)
        assert events == whole, [len(c) for c in chunks]
        assert pending == b""


def test_an_event_is_only_yielded_once_its_blank_line_is_complete() -> None:
    buffer = SSEBuffer()
    assert buffer.feed(b"data: a\n") == []
    assert buffer.feed(b"\n") == [SSEEvent(b"data: a\n\n", None, b"a")]
    assert buffer.feed(b"data: b\r\n\r") == []
    assert buffer.pending() == b"data: b\r\n\r"
    assert buffer.feed(b"\n") == [SSEEvent(b"data: b\r\n\r\n", None, b"b")]
    assert buffer.pending() == b""


def test_mixed_terminators_in_one_chunk() -> None:
    events, pending = feed_in([b"data: lf\n\ndata: crlf\r\n\r\ndata: mixed\r\n\ndata: lf again\n\n"])
    assert [e.data for e in events] == [b"lf", b"crlf", b"mixed", b"lf again"]
    assert [e.raw for e in events] == [
        b"data: lf\n\n",
        b"data: crlf\r\n\r\n",
        b"data: mixed\r\n\n",
        b"data: lf again\n\n",
    ]
    assert pending == b""


def test_comment_lines_are_ignored() -> None:
    # OpenRouter-style keep-alive comment events, and a comment inside an event.
    events, _ = feed_in([b": OPENROUTER PROCESSING\n\n: ping\ndata: {}\n:more\n\n"])
    assert events[0] == SSEEvent(b": OPENROUTER PROCESSING\n\n", None, b"")
    assert (events[1].event, events[1].data) == (None, b"{}")


def test_multi_line_data_is_joined_with_newlines() -> None:
    events, _ = feed_in([b"event: note\ndata: first\ndata:second\ndata:  third\ndata\n\n"])
    assert events[0].event == "note"
    # One leading space is dropped, a second one kept; a bare `data` line adds an empty line.
    assert events[0].data == b"first\nsecond\n third\n"


def test_field_values_and_unknown_fields() -> None:
    event = parse_event(b'id: 7\nretry: 1000\nevent:message_start\nfoo: bar\ndata:{"a":1}\n\n')
    assert (event.event, event.data) == ("message_start", b'{"a":1}')
    # A value may itself contain colons; only the first one separates the field name.
    assert parse_event(b'data: {"url":"https://x"}\n\n').data == b'{"url":"https://x"}'
    # The last `event:` line wins; no `event:` line means None; no `data:` line means b"".
    assert parse_event(b"event: a\nevent: b\n\n").event == "b"
    assert parse_event(b"data: x\n\n").event is None
    assert parse_event(b"event: ping\n\n").data == b""


def test_trailing_spaces_inside_data_are_kept() -> None:
    # Anthropic pads the JSON with spaces before the last brace (wire-formats.md §3.3); they are data.
    event = parse_event(b'event: message_stop\ndata: {"type":"message_stop"       }\n\n')
    assert event.data == b'{"type":"message_stop"       }'


def test_pending_holds_an_unterminated_tail() -> None:
    buffer = SSEBuffer()
    events = buffer.feed(b'data: {"a":1}\n\ndata: {"b":')
    assert [e.data for e in events] == [b'{"a":1}']
    assert buffer.pending() == b'data: {"b":'
    assert buffer.feed(b"2}\n") == []
    assert buffer.pending() == b'data: {"b":2}\n'
    assert [e.data for e in buffer.feed(b"\n")] == [b'{"b":2}']
    assert buffer.pending() == b""


def test_pending_of_a_fresh_buffer_and_empty_feeds() -> None:
    buffer = SSEBuffer()
    assert buffer.pending() == b""
    assert buffer.feed(b"") == []
    assert buffer.feed(b"data: x") == []
    assert buffer.feed(b"") == []
    assert buffer.pending() == b"data: x"


def test_blank_lines_between_events() -> None:
    # An extra blank line after an event becomes part of the next one and changes nothing in it.
    events, pending = feed_in([b"data: a\n\n\ndata: b\n\n"])
    assert [e.data for e in events] == [b"a", b"b"]
    assert b"".join(e.raw for e in events) == b"data: a\n\n\ndata: b\n\n"
    assert pending == b""


def test_data_with_escaped_newlines_is_one_line() -> None:
    # JSON escapes newlines, so "\\n\\n" inside a string never ends an event.
    events, _ = feed_in([b'data: {"text":"a\\n\\nb"}\n\n'])
    assert [e.data for e in events] == [b'{"text":"a\\n\\nb"}']


def test_non_utf8_event_name_does_not_raise() -> None:
    assert parse_event(b"event: \xff\ndata: x\n\n").event == "\ufffd"
