"""What a recorded provider response billed, computed independently of metergate's parsers and rate cards.

Straight from each provider's documented rules (README "Token normalisation"), written again from scratch: one
pass over the recorded bytes, fields merged the way the docs say, and dollars from genai-prices' own `calc_price`
(the pinned catalogue metergate prices from) plus the few per-unit prices genai-prices does not carry, typed here
from the providers' price pages. A disagreement with the gateway's ledger row is a metering bug on one side.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import genai_prices

# Prices genai-prices 0.2.3 lacks, from the providers' price pages (USD per unit).
UNIT_PRICES = {
    ("anthropic", "web_fetch"): Decimal(0),  # "no additional charges beyond standard token costs"
    ("openai", "code_interpreter_session"): Decimal("0.03"),  # containers: 1 GB, per 20-minute session
}


@dataclass
class Expected:
    tokens_in: int = 0
    tokens_out: int = 0
    tokens_cached: int = 0
    tokens_cache_write: int = 0
    tokens_reasoning: int = 0
    units: dict[str, int] = field(default_factory=dict)
    cost_usd: Decimal = Decimal(0)

    def add_units(self, unit: str, n: int) -> None:
        if n:
            self.units[unit] = self.units.get(unit, 0) + n


def _calc(provider_id: str, model: str, at: datetime, context: dict[str, str] | None = None, **usage: int) -> Decimal:
    values = {k: v for k, v in usage.items() if v}
    return genai_prices.calc_price(
        genai_prices.Usage(**values),
        model,
        provider_id=provider_id,
        genai_request_timestamp=at,
        price_context=context,
    ).total_price


def _priced_unit(provider_id: str, model: str, at: datetime, key: str) -> bool:
    _, info = genai_prices.data_snapshot.get_snapshot().find_provider_model(model, None, provider_id, None)
    price_key = {"web_searches": "web_searches_kcount", "storage_searches": "storage_searches_kcount"}[key]
    return getattr(info.get_prices(at), price_key, None) is not None


def sse_payloads(body: bytes) -> list[tuple[str | None, dict[str, Any]]]:
    """(event name, JSON data) of every SSE event with a JSON payload."""
    events = []
    for block in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        name, data = None, []
        for line in block.split(b"\n"):
            if line.startswith(b"event:"):
                name = line[6:].strip().decode()
            elif line.startswith(b"data:"):
                data.append(line[5:].strip())
        payload = b"\n".join(data)
        if payload and payload != b"[DONE]":
            events.append((name, json.loads(payload)))
    return events


# --- Anthropic -----------------------------------------------------------------------------------------------


def anthropic(body: bytes, stream: bool, model: str, at: datetime) -> Expected:
    if stream:
        usage: dict[str, Any] = {}
        for _, event in sse_payloads(body):
            if event.get("type") == "message_start":
                usage.update(event["message"]["usage"])
            elif event.get("type") == "message_delta":
                usage.update({k: v for k, v in event.get("usage", {}).items() if v is not None})
    else:
        usage = json.loads(body)["usage"]
    passes = usage.get("iterations") or [usage]
    exp = Expected()
    for item in passes:
        fresh = item.get("input_tokens") or 0
        read = item.get("cache_read_input_tokens") or 0
        breakdown = item.get("cache_creation") or {}
        write_1h = breakdown.get("ephemeral_1h_input_tokens") or 0
        write = max(
            item.get("cache_creation_input_tokens") or 0, (breakdown.get("ephemeral_5m_input_tokens") or 0) + write_1h
        )
        out = item.get("output_tokens") or 0
        exp.tokens_in += fresh + read + write
        exp.tokens_out += out
        exp.tokens_cached += read
        exp.tokens_cache_write += write
        exp.cost_usd += _calc(
            "anthropic",
            item.get("model") or model,
            at,
            input_tokens=fresh + read + write,
            cache_read_tokens=read,
            cache_write_tokens=write,
            cache_write_1h_tokens=write_1h,
            output_tokens=out,
        )
    exp.tokens_reasoning = (usage.get("output_tokens_details") or {}).get("thinking_tokens") or 0
    tools = usage.get("server_tool_use") or {}
    exp.add_units("web_search", tools.get("web_search_requests") or 0)
    exp.add_units("web_fetch", tools.get("web_fetch_requests") or 0)
    exp.cost_usd += _calc("anthropic", model, at, web_searches=exp.units.get("web_search", 0))
    return exp


# --- Gemini ------------------------------------------------------------------------------------------------------


def _modalities(meta: dict[str, Any], name: str) -> dict[str, int]:
    counts = {"TEXT": 0, "AUDIO": 0, "IMAGE": 0}
    for item in meta.get(name) or []:
        modality = {"DOCUMENT": "IMAGE", "VIDEO": "TEXT"}.get(item.get("modality"), item.get("modality"))
        counts[modality if modality in counts else "TEXT"] += item.get("tokenCount") or 0
    return counts


def gemini(body: bytes, stream: bool, array: bool, model: str, at: datetime) -> Expected:
    if array:
        chunks = json.loads(body)
    elif stream:
        chunks = [event for _, event in sse_payloads(body)]
    else:
        chunks = [json.loads(body)]
    meta: dict[str, Any] = {}
    queries: set[str] = set()
    for chunk in chunks:
        meta.update({k: v for k, v in (chunk.get("usageMetadata") or {}).items() if v is not None})
        model = chunk.get("modelVersion") or model
        for candidate in chunk.get("candidates") or []:
            queries |= {
                q for q in (candidate.get("groundingMetadata") or {}).get("webSearchQueries") or [] if q.strip()
            }
    prompt, tool = meta.get("promptTokenCount") or 0, meta.get("toolUsePromptTokenCount") or 0
    cached = meta.get("cachedContentTokenCount") or 0
    thoughts = meta.get("thoughtsTokenCount") or 0
    out_m = _modalities(meta, "candidatesTokensDetails")
    candidates = max(meta.get("candidatesTokenCount") or 0, sum(out_m.values()))
    prompt_m, tool_m, cache_m = (
        _modalities(meta, n) for n in ("promptTokensDetails", "toolUsePromptTokensDetails", "cacheTokensDetails")
    )
    exp = Expected(
        tokens_in=prompt + tool,
        tokens_out=candidates + thoughts,
        tokens_cached=cached,
        tokens_reasoning=thoughts,
    )
    if queries:
        # Gemini 3 bills each unique query; earlier models one grounded prompt.
        exp.add_units("web_search", len(queries) if model.startswith("gemini-3") else 1)
    exp.cost_usd = _calc(
        "google",
        model,
        at,
        input_tokens=prompt + tool,
        cache_read_tokens=cached,
        input_audio_tokens=prompt_m["AUDIO"] + tool_m["AUDIO"],
        cache_audio_read_tokens=cache_m["AUDIO"],
        input_image_tokens=prompt_m["IMAGE"] + tool_m["IMAGE"],
        cache_image_read_tokens=cache_m["IMAGE"],
        output_tokens=candidates + thoughts,
        output_audio_tokens=out_m["AUDIO"],
        output_image_tokens=out_m["IMAGE"],
        web_searches=exp.units.get("web_search", 0),
    )
    return exp


# --- OpenAI ------------------------------------------------------------------------------------------------------


def openai_chat(body: bytes, stream: bool, model: str, at: datetime) -> Expected:
    if stream:
        usage = next(e["usage"] for _, e in reversed(sse_payloads(body)) if e.get("usage"))
        tier = next((e.get("service_tier") for _, e in sse_payloads(body) if e.get("service_tier")), None)
    else:
        response = json.loads(body)
        usage, tier = response["usage"], response.get("service_tier")
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    exp = Expected(
        tokens_in=usage["prompt_tokens"],
        tokens_out=usage["completion_tokens"],
        tokens_cached=prompt_details.get("cached_tokens") or 0,
        tokens_cache_write=prompt_details.get("cache_write_tokens") or 0,
        tokens_reasoning=completion_details.get("reasoning_tokens") or 0,
    )
    exp.cost_usd = _calc(
        "openai",
        model,
        at,
        _tier(tier),
        input_tokens=exp.tokens_in,
        cache_read_tokens=exp.tokens_cached,
        cache_write_tokens=exp.tokens_cache_write,
        input_audio_tokens=prompt_details.get("audio_tokens") or 0,
        input_image_tokens=prompt_details.get("image_tokens") or 0,
        output_tokens=exp.tokens_out,
        output_audio_tokens=completion_details.get("audio_tokens") or 0,
    )
    return exp


def _tier(tier: str | None) -> dict[str, str] | None:
    return {"service_tier": tier} if tier and tier not in ("default", "auto", "standard") else None


def openai_responses(body: bytes, stream: bool, model: str, at: datetime, image_model: str) -> Expected:
    if stream:
        response = next(
            e["response"]
            for _, e in reversed(sse_payloads(body))
            if e.get("type") in ("response.completed", "response.incomplete", "response.failed")
        )
    else:
        response = json.loads(body)
    usage = response["usage"]
    in_details = usage.get("input_tokens_details") or {}
    exp = Expected(
        tokens_in=usage["input_tokens"],
        tokens_out=usage["output_tokens"],
        tokens_cached=in_details.get("cached_tokens") or 0,
        tokens_cache_write=in_details.get("cache_write_tokens") or 0,
        tokens_reasoning=(usage.get("output_tokens_details") or {}).get("reasoning_tokens") or 0,
    )
    items = response.get("output") or []
    tools = response.get("tool_usage") or {}
    if "web_search" in tools:
        exp.add_units("web_search", tools["web_search"].get("num_requests") or 0)
    else:
        searches = [
            i
            for i in items
            if i.get("type") == "web_search_call"
            and i.get("status") != "failed"
            and (i.get("action") or {}).get("type", "search") == "search"
        ]
        exp.add_units("web_search", len(searches))
    exp.add_units("file_search", sum(1 for i in items if i.get("type") == "file_search_call"))
    exp.add_units(
        "code_interpreter_session",
        len({i.get("container_id") for i in items if i.get("type") == "code_interpreter_call"}),
    )
    context = _tier(response.get("service_tier"))
    exp.cost_usd = _calc(
        "openai",
        model,
        at,
        context,
        input_tokens=exp.tokens_in,
        cache_read_tokens=exp.tokens_cached,
        cache_write_tokens=exp.tokens_cache_write,
        output_tokens=exp.tokens_out,
        web_searches=exp.units.get("web_search", 0) if _priced_unit("openai", model, at, "web_searches") else 0,
        storage_searches=exp.units.get("file_search", 0)
        if _priced_unit("openai", model, at, "storage_searches")
        else 0,
    )
    # The pricing page's per-call fees, where genai-prices has none for the model.
    if exp.units.get("web_search") and not _priced_unit("openai", model, at, "web_searches"):
        exp.cost_usd += Decimal("0.010") * exp.units["web_search"]
    if exp.units.get("file_search") and not _priced_unit("openai", model, at, "storage_searches"):
        exp.cost_usd += Decimal("0.0025") * exp.units["file_search"]
    exp.cost_usd += UNIT_PRICES[("openai", "code_interpreter_session")] * exp.units.get("code_interpreter_session", 0)
    image = tools.get("image_gen") or {}
    if image.get("input_tokens") or image.get("output_tokens"):
        exp.tokens_in += image.get("input_tokens") or 0
        exp.tokens_out += image.get("output_tokens") or 0
        exp.cost_usd += _calc(
            "openai",
            image_model,
            at,
            input_tokens=image.get("input_tokens") or 0,
            input_image_tokens=(image.get("input_tokens_details") or {}).get("image_tokens") or 0,
            output_tokens=image.get("output_tokens") or 0,
            output_image_tokens=(image.get("output_tokens_details") or {}).get("image_tokens") or 0,
        )
    elif not image:
        exp.add_units("image_generation_call", sum(1 for i in items if i.get("type") == "image_generation_call"))
    return exp


def openai_embeddings(body: bytes, model: str, at: datetime) -> Expected:
    tokens = json.loads(body)["usage"]["prompt_tokens"]
    return Expected(tokens_in=tokens, cost_usd=_calc("openai", model, at, input_tokens=tokens))


def gemini_embeddings(body: bytes, model: str, at: datetime) -> Expected:
    meta = json.loads(body)["usageMetadata"]  # EmbeddingUsageMetadata: "promptTokenDetails", singular "Token"
    tokens = meta["promptTokenCount"]
    audio = sum(i["tokenCount"] for i in meta.get("promptTokenDetails") or [] if i.get("modality") == "AUDIO")
    try:
        cost = _calc("google", model, at, input_tokens=tokens, input_audio_tokens=audio)
    except LookupError:
        cost = Decimal(0)  # not in the catalogue: unpriced, and the gateway says so
    return Expected(tokens_in=tokens, cost_usd=cost)


def now() -> datetime:
    return datetime.now(UTC)
