"""A simulated OpenAI (and Azure OpenAI): Chat Completions, Completions, Responses, Embeddings."""

from __future__ import annotations

import base64
import struct
import time
from typing import Any

from metergate.simulator.plan import Bill, Plan, split_text
from metergate.simulator.wire import SimulatedReset, Wire, rand_id, sse

# OpenAI answers with the dated snapshot behind an alias.
MODEL_VERSIONS = {"gpt-4o-mini": "gpt-4o-mini-2024-07-18", "gpt-4o": "gpt-4o-2024-08-06"}


def error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


ERRORS = {
    400: error(400, "Invalid request.", code="invalid_value"),
    401: error(401, "Incorrect API key provided.", code="invalid_api_key"),
    404: error(404, "The model does not exist or you do not have access to it.", code="model_not_found"),
    429: error(429, "Rate limit reached for requests.", "requests", "rate_limit_exceeded"),
    500: error(500, "The server had an error while processing your request.", "server_error"),
    503: error(503, "The engine is currently overloaded.", "server_error"),
}


def chat_usage(plan: Plan, garble: bool = False) -> dict[str, Any]:
    b = plan.billed
    prompt: Any = f"{b.input}tok" if garble else b.input
    return {
        "prompt_tokens": prompt,
        "completion_tokens": b.output,
        "total_tokens": b.input + b.output,
        "prompt_tokens_details": {"cached_tokens": b.cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": b.reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def responses_usage(plan: Plan, garble: bool = False) -> dict[str, Any]:
    b = plan.billed
    return {
        "input_tokens": f"{b.input}tok" if garble else b.input,
        "input_tokens_details": {"cached_tokens": b.cached},
        "output_tokens": b.output,
        "output_tokens_details": {"reasoning_tokens": b.reasoning},
        "total_tokens": b.input + b.output,
    }


def _headers() -> dict[str, str]:
    return {
        "x-request-id": f"req_{rand_id(24)}",
        "openai-processing-ms": "42",
        "openai-version": "2020-10-01",
    }


def _finish_bill(bill: Bill, plan: Plan) -> None:
    bill.reported = plan.billed.copy()
    bill.usage_readable = plan.fail not in ("bad-usage", "no-usage")


async def chat(
    body: dict[str, Any], plan: Plan, bill: Bill, wire: Wire, *, azure: bool = False, legacy: bool = False
) -> None:
    model = str(body.get("model"))
    version = MODEL_VERSIONS.get(model, model)
    created = int(time.time())
    cid = ("cmpl-" if legacy else "chatcmpl-") + rand_id(29)
    obj = "text_completion" if legacy else "chat.completion"
    text_parts = split_text(plan.billed.output - plan.billed.reasoning, plan.chunks)
    if not bill.stream:
        text = "".join(t for t, _ in text_parts)
        choice: dict[str, Any]
        if legacy:
            choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": "stop"}
        else:
            message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None, "annotations": []}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
        response: dict[str, Any] = {
            "id": cid,
            "object": obj,
            "created": created,
            "model": version,
            "choices": [choice],
            "usage": chat_usage(plan, garble=plan.fail == "bad-usage"),
            "service_tier": "default",
            "system_fingerprint": "fp_sim0001",
        }
        if plan.fail == "no-usage":
            del response["usage"]
        if plan.fail == "malformed-json":
            bill.usage_readable = False
            await wire.json(200, None, _headers(), raw=b'{"id": "' + cid.encode() + b'", "choices": [{"ind')
            return
        _finish_bill(bill, plan)
        await wire.json(200, response, _headers())
        bill.completed = True
        return

    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and plan.flag(options.get("include_usage"))
    if plan.ignore_include_usage:
        include_usage = False
        bill.usage_readable = False
    chunk_obj = "text_completion" if legacy else "chat.completion.chunk"

    def chunk(choices: list[dict[str, Any]], usage: Any = None, final: bool = False) -> bytes:
        data: dict[str, Any] = {
            "id": cid,
            "object": chunk_obj,
            "created": created,
            "model": version,
            "system_fingerprint": "fp_sim0001",
            "choices": choices,
        }
        if include_usage:
            data["usage"] = usage
        data["obfuscation"] = rand_id(3 + len(cid) % 7)
        return sse(data, spaced=plan.spaced_json)

    def delta(content: str | None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
        if legacy:
            return {"text": content or "", "index": 0, "logprobs": None, "finish_reason": finish}
        d: dict[str, Any] = {}
        if role:
            d = {"role": "assistant", "content": "", "refusal": None}
        elif content is not None:
            d = {"content": content}
        choice: dict[str, Any] = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
        if azure:
            choice["content_filter_results"] = {}
        return choice

    events: list[bytes] = []
    if azure:
        # Azure's first chunk reports the prompt filter verdict with empty choices and no usage: not a usage chunk.
        verdict = {
            "hate": {"filtered": False, "severity": "safe"},
            "violence": {"filtered": False, "severity": "safe"},
        }
        events.append(
            sse(
                {
                    "choices": [],
                    "created": 0,
                    "id": "",
                    "model": "",
                    "object": "",
                    "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": verdict}],
                }
            )
        )
    if not legacy:
        events.append(chunk([delta(None, role=True)]))
    for text, _ in text_parts:
        events.append(chunk([delta(text)]))
    events.append(chunk([delta(None if not legacy else "", finish="stop")]))
    usage_index = None
    if include_usage:
        usage_index = len(events)
        usage = chat_usage(plan, garble=plan.fail == "bad-usage")
        events.append(chunk([], usage=None if plan.fail == "no-usage" else usage))
    events.append(b"data: [DONE]\n\n")

    await wire.start("text/event-stream; charset=utf-8", _headers())
    for i, event in enumerate(events):
        if plan.reset_after is not None and i >= plan.reset_after:
            raise SimulatedReset
        if plan.fail == "stream-error" and i == min(3, len(events) - 2):
            await wire.write(sse(error(500, "The server had an error while processing your request.", "server_error")))
            await wire.write(b"data: [DONE]\n\n")
            await wire.end()
            bill.completed = True
            return
        if plan.fail == "malformed-json" and i == usage_index:
            bill.usage_readable = False
            await wire.write(b'data: {"id":"' + cid.encode() + b'","choices":[],"usage":{"prompt_tok\n\n')
            continue
        if i == usage_index:
            _finish_bill(bill, plan)
        await wire.write(event)
    await wire.end()
    bill.completed = True


async def responses(body: dict[str, Any], plan: Plan, bill: Bill, wire: Wire) -> None:
    model = str(body.get("model"))
    version = MODEL_VERSIONS.get(model, model)
    rid = "resp_" + rand_id(48).lower()
    mid = "msg_" + rand_id(48).lower()
    created = int(time.time())
    parts = split_text(plan.billed.output - plan.billed.reasoning, plan.chunks)
    text = "".join(t for t, _ in parts)

    def response_obj(status: str, usage: Any, output: list[Any]) -> dict[str, Any]:
        return {
            "id": rid,
            "object": "response",
            "created_at": created,
            "status": status,
            "background": False,
            "error": None,
            "incomplete_details": None,
            "instructions": None,
            "max_output_tokens": body.get("max_output_tokens"),
            "model": version,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "service_tier": "default",
            "store": True,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": usage,
            "user": None,
            "metadata": {},
        }

    content = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
    message = {"id": mid, "type": "message", "status": "completed", "content": [content], "role": "assistant"}
    usage = responses_usage(plan, garble=plan.fail == "bad-usage")
    if not bill.stream:
        final = response_obj("completed", None if plan.fail == "no-usage" else usage, [message])
        _finish_bill(bill, plan)
        await wire.json(200, final, _headers())
        bill.completed = True
        return

    seq = 0
    events: list[tuple[str, dict[str, Any]]] = []

    def add(kind: str, **payload: Any) -> None:
        nonlocal seq
        events.append((kind, {"type": kind, "sequence_number": seq, **payload}))
        seq += 1

    add("response.created", response=response_obj("in_progress", None, []))
    add("response.in_progress", response=response_obj("in_progress", None, []))
    add("response.output_item.added", output_index=0, item={**message, "status": "in_progress", "content": []})
    empty = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
    add("response.content_part.added", item_id=mid, output_index=0, content_index=0, part=empty)
    for part, _ in parts:
        add(
            "response.output_text.delta",
            item_id=mid,
            output_index=0,
            content_index=0,
            delta=part,
            logprobs=[],
            obfuscation=rand_id(6),
        )
    add("response.output_text.done", item_id=mid, output_index=0, content_index=0, text=text, logprobs=[])
    add("response.content_part.done", item_id=mid, output_index=0, content_index=0, part=content)
    add("response.output_item.done", output_index=0, item=message)
    terminal_index = len(events)
    add(
        "response.completed",
        response=response_obj("completed", None if plan.fail == "no-usage" else usage, [message]),
    )

    await wire.start("text/event-stream; charset=utf-8", _headers())
    for i, (kind, payload) in enumerate(events):
        if plan.reset_after is not None and i >= plan.reset_after:
            raise SimulatedReset
        if plan.fail == "stream-error" and i == 5:
            await wire.write(
                sse(
                    {
                        "type": "error",
                        "code": "server_error",
                        "message": "Internal error",
                        "param": None,
                        "sequence_number": i,
                    },
                    "error",
                )
            )
            await wire.end()
            bill.completed = True
            return
        if i == terminal_index:
            if plan.fail == "malformed-json":
                bill.usage_readable = False
                await wire.write(b'event: response.completed\ndata: {"type":"response.completed","respo\n\n')
                continue
            _finish_bill(bill, plan)
        await wire.write(sse(payload, kind))
    await wire.end()
    bill.completed = True


def _vector(seed: int, dims: int = 8) -> list[float]:
    return [((seed * 31 + i * 17) % 1000) / 1000.0 - 0.5 for i in range(dims)]


async def embeddings(body: dict[str, Any], plan: Plan, bill: Bill, wire: Wire) -> None:
    inputs = body.get("input")
    items = inputs if isinstance(inputs, list) else [inputs]
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for i, _ in enumerate(items):
        vector = _vector(i)
        embedding: Any = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode() if as_base64 else vector
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    usage: dict[str, Any] = {"prompt_tokens": plan.billed.input, "total_tokens": plan.billed.input}
    if plan.fail == "bad-usage":
        usage["prompt_tokens"] = f"{plan.billed.input}tok"
    response = {"object": "list", "data": data, "model": str(body.get("model")), "usage": usage}
    _finish_bill(bill, plan)
    await wire.json(200, response, _headers())
    bill.completed = True


def models_list(models: list[str]) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": m, "object": "model", "created": 1715367049, "owned_by": "system"} for m in models],
    }
