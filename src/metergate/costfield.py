"""The request's cost in the response, for callers who opt in (`x-metergate-include-cost: true`, or a key's
`include_cost`).

The cost goes where each API reports usage, as a `cost_usd` member of that object: OpenAI `usage` (chat,
completions, responses, embeddings, images; in streams the usage chunk, sent on opt-in even to a caller that did
not ask for it, and `response.completed`), Anthropic
`usage` (in streams `message_delta`), Gemini `usageMetadata` (in SSE streams every chunk that carries it: the
cost so far, the request's in the last). The official openai and anthropic SDKs keep unknown members, so
`response.usage.cost_usd` reads it; google-genai drops them (read the raw body or the x-metergate-cost-usd
header). Without the opt-in no byte of a response changes.
"""

from __future__ import annotations

from typing import Any

import orjson

from metergate.sse import SSEEvent

COST_HEADER_OPT_IN = "x-metergate-include-cost"
COST_FIELD = "cost_usd"

# Where a complete response reports usage, per API family.
BODY_USAGE_PATH = {"openai": ("usage",), "anthropic": ("usage",), "gemini": ("usageMetadata",)}


def wants_cost(value: str | None) -> bool:
    return value is not None and value.strip().lower() in ("true", "1")


def _usage_object(tree: Any, path: tuple[str, ...]) -> dict[str, Any] | None:
    for name in path:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(name)
    return tree if isinstance(tree, dict) else None


def body_with_cost(data: bytes, path: tuple[str, ...], cost_usd: float) -> bytes | None:
    """The JSON body with the cost added to its usage object; None when it has none (left as it is)."""
    try:
        tree = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    usage = _usage_object(tree, path)
    if usage is None:
        return None
    usage[COST_FIELD] = cost_usd
    try:
        return orjson.dumps(tree)
    except (orjson.JSONEncodeError, TypeError):
        # orjson reads deeper nesting than it writes (tool arguments can be nested hundreds deep): the body goes
        # out as the provider sent it, with the cost in the x-metergate-cost-usd header only.
        return None


def event_with_cost(event: SSEEvent, path: tuple[str, ...], cost_usd: float) -> bytes | None:
    """The SSE event with the cost in its usage object; None when it carries none. Only the `data:` line changes:
    the event's other fields, comments and line endings stay as the provider sent them."""
    data = body_with_cost(event.data, path, cost_usd)
    if data is None:
        return None
    lines = event.raw.split(b"\n")
    data_lines = [i for i, line in enumerate(lines) if line.startswith(b"data:")]
    if len(data_lines) != 1:
        # The JSON was split over several data lines: one line carries it now.
        name = f"event: {event.event}\n".encode() if event.event is not None else b""
        return name + b"data: " + data + b"\n\n"
    i = data_lines[0]
    line = lines[i]
    prefix = b"data: " if line.startswith(b"data: ") else b"data:"
    lines[i] = prefix + data + (b"\r" if line.endswith(b"\r") else b"")
    return b"\n".join(lines)
