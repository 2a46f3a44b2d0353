"""Anthropic's Admin API usage report (tokens per day, model and API key) and cost report (USD per day and
description: model and token type). Docs: docs.claude.com/en/build-with-claude/usage-cost-api."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal, InvalidOperation
from typing import Any

from metergate.reconcile.bill import (
    CACHE_WRITE,
    CACHE_WRITE_1H,
    CACHED_INPUT,
    INPUT,
    OUTPUT,
    WEB_SEARCH,
    ProviderBill,
    ProviderCharge,
    ProviderUsage,
    ReconcileError,
    count,
    day_of,
    day_of_rfc3339,
    text,
)
from metergate.reconcile.source import BillingSource, buckets, check_days, results

DAY_LIMIT = 31  # daily buckets per page: the documented maximum of both reports
_TOKEN_TYPES = {
    "uncached_input_tokens": INPUT,
    "cache_read_input_tokens": CACHED_INPUT,
    "cache_creation.ephemeral_5m_input_tokens": CACHE_WRITE,
    "cache_creation.ephemeral_1h_input_tokens": CACHE_WRITE_1H,
    "output_tokens": OUTPUT,
}
_HUNDRED = Decimal(100)


def rfc3339_day(day: int) -> str:
    return day_of(day).isoformat() + "T00:00:00Z"


def usage_of(day: int, result: dict[str, Any]) -> ProviderUsage:
    what = "anthropic usage_report"
    creation = result.get("cache_creation") or {}
    if not isinstance(creation, dict):
        raise ReconcileError(f"{what}: cache_creation is not an object")
    tokens = {
        INPUT: count(result.get("uncached_input_tokens"), f"{what} uncached_input_tokens"),
        CACHED_INPUT: count(result.get("cache_read_input_tokens"), f"{what} cache_read_input_tokens"),
        CACHE_WRITE: count(creation.get("ephemeral_5m_input_tokens"), f"{what} ephemeral_5m_input_tokens"),
        CACHE_WRITE_1H: count(creation.get("ephemeral_1h_input_tokens"), f"{what} ephemeral_1h_input_tokens"),
        OUTPUT: count(result.get("output_tokens"), f"{what} output_tokens"),
    }
    tools = result.get("server_tool_use") or {}
    if not isinstance(tools, dict):
        raise ReconcileError(f"{what}: server_tool_use is not an object")
    tokens[WEB_SEARCH] = count(tools.get("web_search_requests"), f"{what} web_search_requests")
    model = text(result.get("model"), f"{what} model") or "(unknown)"
    # api_key_id is null for usage from the Console (Workbench): never the gateway's.
    key = text(result.get("api_key_id"), f"{what} api_key_id") or "(console)"
    return ProviderUsage(day, model, key, tokens, requests=None, tier=tier_of(result))


def tier_of(result: dict[str, Any]) -> str:
    """The price variant of a usage row or cost line: batch and standard, short and long context cost differently."""
    tier = text(result.get("service_tier"), "anthropic service_tier", 32) or "standard"
    window = text(result.get("context_window"), "anthropic context_window", 32) or "0-200k"
    return f"{tier}/{window}"


def charge_of(day: int, result: dict[str, Any]) -> ProviderCharge:
    """A cost line; amounts are decimal strings in cents ("123.45" is $1.2345)."""
    what = "anthropic cost_report"
    currency = result.get("currency")
    if currency != "USD":
        raise ReconcileError(f"{what}: amount in {str(currency)[:8]!r}, not USD")
    raw = result.get("amount")
    if not isinstance(raw, str) or len(raw) > 40:
        raise ReconcileError(f"{what}: amount is not a decimal string")
    try:
        cents = Decimal(raw)
    except InvalidOperation:
        raise ReconcileError(f"{what}: amount {raw!r} is not a decimal") from None
    if not cents.is_finite() or abs(cents) > 10**14:
        raise ReconcileError(f"{what}: amount {raw!r} is out of range")
    exponent = cents.as_tuple().exponent
    resolution = Decimal(1).scaleb(exponent if isinstance(exponent, int) else 0) / _HUNDRED
    label = text(result.get("description"), f"{what} description") or "(no description)"
    token_type = _TOKEN_TYPES.get(str(result.get("token_type")))
    model = text(result.get("model"), f"{what} model")
    usd = cents / _HUNDRED
    if result.get("cost_type") == "web_search":
        # stated per day only: shared among keys and models by their web searches in the usage report
        return ProviderCharge(day, label, usd, token_type=WEB_SEARCH, resolution=resolution)
    if result.get("cost_type") not in (None, "tokens") or token_type is None or model is None:
        return ProviderCharge(day, label, usd, resolution=resolution)
    return ProviderCharge(
        day, label, usd, model=model, token_type=token_type, resolution=resolution, tier=tier_of(result)
    )


class AnthropicBilling(BillingSource):
    async def bill(self, first_day: int, last_day: int) -> ProviderBill:
        span = [("starting_at", rfc3339_day(first_day)), ("ending_at", rfc3339_day(last_day + 1))]
        span += [("bucket_width", "1d"), ("limit", str(DAY_LIMIT))]
        bill = ProviderBill(self.provider, requests_counted=False)
        params = [*span, *(("group_by[]", g) for g in ("api_key_id", "model", "service_tier", "context_window"))]
        days: list[int] = []
        async for page in self.client.pages("/v1/organizations/usage_report/messages", params):
            for bucket in buckets(page, "anthropic usage_report"):
                days.append(day := day_of_rfc3339(bucket.get("starting_at")))
                bill.usage.extend(usage_of(day, r) for r in results(bucket, "anthropic usage_report"))
        check_days(days, first_day, last_day, "anthropic usage_report")
        days = []
        async for page in self.client.pages("/v1/organizations/cost_report", [*span, ("group_by[]", "description")]):
            for bucket in buckets(page, "anthropic cost_report"):
                days.append(day := day_of_rfc3339(bucket.get("starting_at")))
                bill.charges.extend(charge_of(day, r) for r in results(bucket, "anthropic cost_report"))
        check_days(days, first_day, last_day, "anthropic cost_report")
        return bill

    async def key_hints(self) -> AsyncIterator[tuple[str, str]]:
        async for key in self.client.listing("/v1/organizations/api_keys", [("limit", "1000")], "after_id"):
            if isinstance(key.get("id"), str) and isinstance(key.get("partial_key_hint"), str):
                yield key["id"], key["partial_key_hint"]
