"""A simulated Gemini API (generativelanguage.googleapis.com)."""

from __future__ import annotations

from typing import Any

import orjson

from metergate.simulator.plan import Bill, Billed, Plan, split_text
from metergate.simulator.wire import SimulatedReset, Wire, pretty, rand_id

STATUSES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


def error(status: int, message: str) -> dict[str, Any]:
    return {"error": {"code": status, "message": message, "status": STATUSES.get(status, "UNKNOWN")}}


def content_tokens(content: Any) -> int:
    """Tokens of one embedding input; countTokens answers with the same figure for the same content."""
    return 4 + len(orjson.dumps(content)) // 4


def usage_metadata(b: Billed, visible: int, thoughts: int, garble: bool = False) -> dict[str, Any]:
    """Gemini's promptTokenCount includes cached content; thoughts are counted apart from candidates."""
    meta: dict[str, Any] = {
        "promptTokenCount": f"{b.input}tok" if garble else b.input,
        "candidatesTokenCount": visible,
        "totalTokenCount": b.input + visible + thoughts,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": b.input}],
    }
    if b.cached:
        meta["cachedContentTokenCount"] = b.cached
        meta["cacheTokensDetails"] = [{"modality": "TEXT", "tokenCount": b.cached}]
    if thoughts:
        meta["thoughtsTokenCount"] = thoughts
    return meta


def _json_spaced(obj: Any) -> bytes:
    """Google's SSE chunks put a space after ':' but not after ','."""
    return orjson.dumps(obj).replace(b'":', b'": ')


async def generate(
    body: dict[str, Any], model: str, plan: Plan, bill: Bill, wire: Wire, *, sse: bool, fields: set[str] | None = None
) -> None:
    b = plan.billed
    thoughts = b.reasoning
    visible_total = b.output - thoughts
    parts = split_text(visible_total, plan.chunks)
    response_id = rand_id(22)
    garble = plan.fail == "bad-usage"

    def chunk(text: str, visible: int, th: int, finish: bool) -> dict[str, Any]:
        candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
        if finish:
            candidate["finishReason"] = "STOP"
        out: dict[str, Any] = {"candidates": [candidate]}
        if not (plan.fail == "no-usage" and finish):
            out["usageMetadata"] = usage_metadata(b, visible, th, garble and finish)
        out["modelVersion"] = model
        out["responseId"] = response_id
        return out if fields is None else {k: v for k, v in out.items() if k in fields}

    if not bill.stream:
        response = chunk("".join(t for t, _ in parts), visible_total, thoughts, True)
        if plan.fail == "no-usage":
            response.pop("usageMetadata", None)
        if plan.fail == "malformed-json":
            bill.usage_readable = False
            await wire.json(200, None, raw=b'{\n  "candidates": [\n    {\n      "content": {')
            return
        bill.reported = b.copy()
        bill.usage_readable = plan.fail not in ("bad-usage", "no-usage")
        await wire.json(200, response, indent=True)
        bill.completed = True
        return

    # Thinking comes first in its own chunk; usage on every chunk is a running total.
    chunks: list[tuple[dict[str, Any], Billed]] = []
    if thoughts:
        chunks.append((chunk("", 0, thoughts, False), Billed(b.input, thoughts, b.cached, 0, 0, thoughts)))
    seen = 0
    for i, (text, n) in enumerate(parts):
        seen += n
        final = i == len(parts) - 1
        chunks.append((chunk(text, seen, thoughts, final), Billed(b.input, seen + thoughts, b.cached, 0, 0, thoughts)))

    await wire.start("text/event-stream" if sse else "application/json; charset=UTF-8")
    if not sse:
        await wire.write(b"[")
    for i, (obj, running) in enumerate(chunks):
        if plan.reset_after is not None and i >= plan.reset_after:
            raise SimulatedReset
        final = i == len(chunks) - 1
        if plan.fail == "stream-error" and i == min(2, len(chunks) - 1):
            err = error(503, "The model is overloaded. Please try again later.")
            await wire.write(b"data: " + _json_spaced(err) + b"\r\n\r\n" if sse else b"\n,\r\n" + pretty(err))
            if not sse:
                await wire.write(b"\n]")
            await wire.end()
            bill.completed = True
            return
        if final and plan.fail == "malformed-json":
            bill.usage_readable = False
            data = b'{"candidates": [{"content": {"parts": [{"text": "x"}]},"usageMetadata": {"promptTok'
            await wire.write(b"data: " + data + b"\r\n\r\n" if sse else b"\n,\r\n" + data)
            continue
        if "usageMetadata" in obj:
            bill.reported = running
            bill.usage_readable = not (garble and final)
        elif final:
            bill.usage_readable = False
        if sse:
            await wire.write(b"data: " + _json_spaced(obj) + b"\r\n\r\n")
        else:
            await wire.write((b"\n,\r\n" if i else b"") + pretty(obj))
    if not sse:
        await wire.write(b"\n]")
    await wire.end()
    bill.completed = True


async def embed(body: dict[str, Any], plan: Plan, bill: Bill, wire: Wire, *, batch: bool) -> None:
    """Embeddings report `usageMetadata.promptTokenCount`; `no-usage` answers as responses did before that field."""
    if batch:
        requests = body.get("requests") or []
        tokens = sum(content_tokens(r.get("content")) for r in requests if isinstance(r, dict))
        response: dict[str, Any] = {"embeddings": [{"values": [0.01 * (i + 1)] * 8} for i in range(len(requests))]}
    else:
        tokens = content_tokens(body.get("content"))
        response = {"embedding": {"values": [0.01] * 8}}
    if plan.fail != "no-usage":
        response["usageMetadata"] = {
            "promptTokenCount": tokens,
            "promptTokenDetails": [{"modality": "TEXT", "tokenCount": tokens}],
        }
    bill.planned = bill.reported = Billed(input=tokens)
    await wire.json(200, response, indent=True)
    bill.completed = True


async def count_tokens(body: dict[str, Any], plan: Plan, bill: Bill, wire: Wire) -> None:
    contents = body.get("contents")
    if not isinstance(contents, list):
        request = body.get("generateContentRequest")
        contents = request.get("contents") if isinstance(request, dict) else []
    total = sum(content_tokens(c) for c in contents or [])
    bill.planned = Billed()
    await wire.json(
        200,
        {"totalTokens": total, "promptTokensDetails": [{"modality": "TEXT", "tokenCount": total}]},
        indent=True,
    )
    bill.completed = True
