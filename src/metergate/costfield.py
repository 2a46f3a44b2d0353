"""The request's cost in the response, for callers who opt in (`x-metergate-include-cost: true`, or a key's
`include_cost`).

The cost goes where each API reports usage, as a `cost_usd` member of that object: OpenAI `usage` (chat,
completions, responses, embeddings, images; in streams the usage chunk and `response.completed`), Anthropic
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
    return orjson.dumps(tree)


def event_with_cost(event: SSEEvent, path: tuple[str, ...], cost_usd: float) -> bytes | None:
    """The SSE event rebuilt with the cost in its usage object; None when it carries none."""
    data = body_with_cost(event.data, path, cost_usd)
    if data is None:
        return None
    name = f"event: {event.event}\n".encode() if event.event is not None else b""
    return name + b"data: " + data + b"\n\n"
