"""A simulated Anthropic Messages API."""

from __future__ import annotations

from typing import Any

from metergate.simulator.plan import Bill, Billed, Plan, split_text
from metergate.simulator.wire import SimulatedReset, Wire, rand_id, sse

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def error(status: int, message: str) -> dict[str, Any]:
    return {
        "type": "error",
        "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message},
        "request_id": f"req_{rand_id(24)}",
    }


def usage(b: Billed, output: int, garble: bool = False) -> dict[str, Any]:
    """Anthropic's input_tokens exclude cache reads and writes: they are reported beside it, not within it."""
    fresh = b.input - b.cached - b.cache_write
    return {
        "input_tokens": f"{fresh}tok" if garble else fresh,
        "cache_creation_input_tokens": b.cache_write,
        "cache_read_input_tokens": b.cached,
        "cache_creation": {
            "ephemeral_5m_input_tokens": b.cache_write - b.cache_write_1h,
            "ephemeral_1h_input_tokens": b.cache_write_1h,
        },
        "output_tokens": output,
        "service_tier": "standard",
    }


def _headers() -> dict[str, str]:
    return {"request-id": f"req_{rand_id(24)}", "anthropic-organization-id": "sim-org"}


async def messages(body: dict[str, Any], plan: Plan, bill: Bill, wire: Wire, *, legacy_delta: bool = False) -> None:
    model = str(body.get("model"))
    mid = "msg_01" + rand_id(22)
    b = plan.billed
    parts = split_text(b.output, plan.chunks)
    garble = plan.fail == "bad-usage"
    if not bill.stream:
        text = "".join(t for t, _ in parts)
        response: dict[str, Any] = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": usage(b, b.output, garble),
        }
        if plan.fail == "no-usage":
            del response["usage"]
        if plan.fail == "malformed-json":
            bill.usage_readable = False
            await wire.json(200, None, _headers(), raw=b'{"id":"' + mid.encode() + b'","type":"message","usage":{"inp')
            return
        bill.reported = b.copy()
        bill.usage_readable = plan.fail not in ("bad-usage", "no-usage")
        await wire.json(200, response, _headers())
        bill.completed = True
        return

    start_usage = usage(b, 1, garble)
    events: list[tuple[str, bytes]] = [
        (
            "message_start",
            sse(
                {
                    "type": "message_start",
                    "message": {
                        "id": mid,
                        "type": "message",
                        "role": "assistant",
                        "model": model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": start_usage,
                    },
                },
                "message_start",
            ),
        ),
        # Anthropic pads some data lines with spaces inside the JSON text.
        (
            "content_block_start",
            b"event: content_block_start\n"
            b'data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}      }\n\n',
        ),
        ("ping", b'event: ping\ndata: {"type": "ping"}\n\n'),
    ]
    for text, _ in parts:
        payload = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}
        events.append(("content_block_delta", sse(payload, "content_block_delta")))
    events.append(
        (
            "content_block_stop",
            b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0 }\n\n',
        )
    )
    # Newer API versions repeat the (cumulative) input figures in message_delta; older ones send output only.
    delta_usage: dict[str, Any] = {"output_tokens": b.output}
    if not legacy_delta:
        full = usage(b, b.output, garble)
        delta_usage = {
            k: full[k]
            for k in (
                "input_tokens",
                "cache_creation_input_tokens",
                "cache_read_input_tokens",
                "output_tokens",
            )
        }
    delta_index = len(events)
    events.append(
        (
            "message_delta",
            sse(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": delta_usage,
                },
                "message_delta",
            ),
        )
    )
    events.append(("message_stop", b'event: message_stop\ndata: {"type":"message_stop"   }\n\n'))

    await wire.start("text/event-stream; charset=utf-8", _headers())
    for i, (name, data) in enumerate(events):
        if plan.reset_after is not None and i >= plan.reset_after:
            raise SimulatedReset
        if plan.fail == "stream-error" and i == min(4, delta_index):
            await wire.write(
                sse({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, "error")
            )
            await wire.end()
            bill.completed = True
            return
        if name == "message_start":
            bill.reported = Billed(b.input, 1, b.cached, b.cache_write, b.cache_write_1h, 0)
            bill.usage_readable = not garble
        if i == delta_index:
            if plan.fail == "malformed-json":
                bill.usage_readable = False
                await wire.write(b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tok\n\n')
                continue
            if plan.fail == "no-usage":
                bill.usage_readable = False
                await wire.write(sse({"type": "message_delta", "delta": {"stop_reason": "end_turn"}}, "message_delta"))
                continue
            bill.reported = b.copy()
        await wire.write(data)
    await wire.end()
    bill.completed = True


async def count_tokens(body: dict[str, Any], plan: Plan, bill: Bill, wire: Wire) -> None:
    """Free: reports a count and bills nothing."""
    await wire.json(200, {"input_tokens": plan.billed.input}, _headers())
    bill.planned = Billed()
    bill.completed = True
