"""OpenAI's organization Usage API (tokens and requests per day, model and API key) and Costs API (USD per day,
line item and API key). Docs: platform.openai.com/docs/api-reference/usage and .../usage/costs."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from decimal import Decimal, InvalidOperation
from typing import Any

from metergate.reconcile.bill import (
    CACHE_WRITE,
    CACHED_INPUT,
    INPUT,
    OUTPUT,
    ProviderBill,
    ProviderCharge,
    ProviderUsage,
    ReconcileError,
    count,
    day_of_timestamp,
    text,
)
from metergate.reconcile.source import BillingSource, buckets, check_days, results

# The usage endpoints that bill per model; moderations are free, vector stores and containers are not per model.
USAGE_ENDPOINTS = ("completions", "embeddings", "images", "audio_speeches", "audio_transcriptions")
DAY_LIMIT = 31  # daily buckets per page: the documented maximum for usage (costs allow 180)
# Line items name the model and what was billed: "gpt-4o-mini-2024-07-18, cached input", with an optional
# "priority | " in front and ", long context" behind. Anything else is a charge not tied to a model's tokens.
_LINE_ITEM = re.compile(
    r"^(?:(?P<tier>[a-z]+) \| )?(?P<model>.+?), (?P<kind>input|cached input|cache writes?|output)(?:, .+)?$",
    re.IGNORECASE,
)
_KINDS = {"input": INPUT, "cached input": CACHED_INPUT, "cache write": CACHE_WRITE, "cache writes": CACHE_WRITE}
_KINDS["output"] = OUTPUT


def parse_line_item(line: str) -> tuple[str, str] | None:
    """(model, token type) of a token line item, None for other charges."""
    m = _LINE_ITEM.match(line)
    if m is None:
        return None
    return m.group("model"), _KINDS[m.group("kind").lower()]


def usage_of(endpoint: str, day: int, result: dict[str, Any]) -> ProviderUsage:
    """One result of a usage page, grouped by model and api_key_id."""
    what = f"openai usage/{endpoint}"
    model = text(result.get("model"), f"{what} model") or "(unknown)"
    key = text(result.get("api_key_id"), f"{what} api_key_id")
    usage = ProviderUsage(day, model, key, requests=count(result.get("num_model_requests"), f"{what} requests"))
    if endpoint in ("completions", "embeddings"):
        total_in = count(result.get("input_tokens"), f"{what} input_tokens")  # cache reads and writes included
        cached = count(result.get("input_cached_tokens"), f"{what} input_cached_tokens")
        written = count(result.get("input_cache_write_tokens"), f"{what} input_cache_write_tokens")
        if cached + written > total_in:
            raise ReconcileError(f"{what}: more cached and cache-write tokens than input tokens ({total_in})")
        usage.tokens = {INPUT: total_in - cached - written, CACHED_INPUT: cached, CACHE_WRITE: written}
        usage.tokens[OUTPUT] = count(result.get("output_tokens"), f"{what} output_tokens")
    return usage


def charge_of(day: int, result: dict[str, Any]) -> ProviderCharge:
    amount = result.get("amount")
    if not isinstance(amount, dict):
        raise ReconcileError("openai costs: a result has no amount")
    currency = amount.get("currency")
    if not isinstance(currency, str) or currency.lower() != "usd":
        raise ReconcileError(f"openai costs: amount in {str(currency)[:8]!r}, not USD")
    value = amount.get("value")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ReconcileError("openai costs: amount.value is not a number")
    try:
        usd = Decimal(repr(value))  # the figure as written, not its binary float expansion
    except InvalidOperation:
        raise ReconcileError("openai costs: amount.value is not a finite number") from None
    if not usd.is_finite() or abs(usd) > 10**12:
        raise ReconcileError("openai costs: amount.value is out of range")
    line = text(result.get("line_item"), "openai costs line_item") or "(no line item)"
    parsed = parse_line_item(line)
    key = text(result.get("api_key_id"), "openai costs api_key_id")
    if parsed is None:
        return ProviderCharge(day, line, usd, api_key_id=key)
    return ProviderCharge(day, line, usd, model=parsed[0], token_type=parsed[1], api_key_id=key)


class OpenAIBilling(BillingSource):
    async def bill(self, first_day: int, last_day: int) -> ProviderBill:
        span = [("start_time", str(first_day * 86400)), ("end_time", str((last_day + 1) * 86400))]
        span += [("bucket_width", "1d"), ("limit", str(DAY_LIMIT))]
        bill = ProviderBill(self.provider)
        for endpoint in USAGE_ENDPOINTS:
            params = [*span, ("group_by[]", "model"), ("group_by[]", "api_key_id")]
            days: list[int] = []
            async for page in self.client.pages(f"/v1/organization/usage/{endpoint}", params):
                for bucket in buckets(page, f"openai usage/{endpoint}"):
                    days.append(day := day_of_timestamp(count(bucket.get("start_time"), "openai bucket start_time")))
                    for result in results(bucket, f"openai usage/{endpoint}"):
                        bill.usage.append(usage_of(endpoint, day, result))
            check_days(days, first_day, last_day, f"openai usage/{endpoint}")
        params = [*span, ("group_by[]", "line_item"), ("group_by[]", "api_key_id")]
        days = []
        async for page in self.client.pages("/v1/organization/costs", params):
            for bucket in buckets(page, "openai costs"):
                days.append(day := day_of_timestamp(count(bucket.get("start_time"), "openai bucket start_time")))
                bill.charges.extend(charge_of(day, r) for r in results(bucket, "openai costs"))
        check_days(days, first_day, last_day, "openai costs")
        return bill

    async def key_hints(self) -> AsyncIterator[tuple[str, str]]:
        projects = [
            p["id"]
            async for p in self.client.listing(
                "/v1/organization/projects", [("limit", "100"), ("include_archived", "true")], "after"
            )
            if isinstance(p.get("id"), str)
        ]
        for project in projects:
            path = f"/v1/organization/projects/{project}/api_keys"
            async for key in self.client.listing(path, [("limit", "100")], "after"):
                if isinstance(key.get("id"), str) and isinstance(key.get("redacted_value"), str):
                    yield key["id"], key["redacted_value"]
