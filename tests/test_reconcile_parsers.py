"""The admin-report parsers and the comparison, without a network: on responses recorded against the live OpenAI
API (tests/corpus/admin, sources in its SOURCES.jsonl), on the shapes the providers document, and on edge cases."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from metergate.ledger.store import ProviderDay
from metergate.reconcile.anthropic import charge_of as anthropic_charge
from metergate.reconcile.anthropic import usage_of as anthropic_usage
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
    day_of_timestamp,
    model_key,
)
from metergate.reconcile.client import retry_after_s
from metergate.reconcile.compare import reconcile
from metergate.reconcile.openai import charge_of as openai_charge
from metergate.reconcile.openai import parse_line_item
from metergate.reconcile.openai import usage_of as openai_usage
from metergate.reconcile.source import hint_matches

ADMIN = Path(__file__).parent / "corpus" / "admin"


def test_recorded_openai_usage_buckets_parse_to_the_recorded_totals() -> None:
    """31 daily buckets printed by OpenAI's cookbook from the live API: no group_by (model and key null), the first
    bucket starting mid-day, empty buckets."""
    buckets = json.loads((ADMIN / "openai-usage-completions.buckets.json").read_text())
    usage = [openai_usage("completions", day_of_timestamp(b["start_time"]), r) for b in buckets for r in b["results"]]
    raw = [r for b in buckets for r in b["results"]]
    assert len(usage) == len(raw) > 0
    assert sum(u.tokens[INPUT] + u.tokens[CACHED_INPUT] for u in usage) == sum(r["input_tokens"] for r in raw)
    assert sum(u.tokens[OUTPUT] for u in usage) == sum(r["output_tokens"] for r in raw)
    assert sum(u.requests or 0 for u in usage) == sum(r["num_model_requests"] for r in raw)
    assert {u.model for u in usage} == {"(unknown)"} and {u.api_key_id for u in usage} == {None}
    assert usage[0].day == 1736616660 // 86400  # the partial first bucket counts for the day it starts in
    assert usage[0].tokens == {INPUT: 141201, CACHED_INPUT: 0, CACHE_WRITE: 0, OUTPUT: 9756}
    assert usage[0].requests == 470


def test_recorded_openai_costs_keep_the_amount_as_written() -> None:
    buckets = json.loads((ADMIN / "openai-costs.buckets.json").read_text())
    charges = [openai_charge(day_of_timestamp(b["start_time"]), r) for b in buckets for r in b["results"]]
    assert charges[0].usd == Decimal("0.13080438340307526")  # not the binary expansion of the float
    assert all(c.model is None and c.token_type is None for c in charges)  # no line_item grouping: not per model
    total = sum((c.usd for c in charges), Decimal(0))
    assert total == sum(Decimal(repr(r["amount"]["value"])) for b in buckets for r in b["results"])


def test_anthropic_cost_amounts_are_cents_with_their_stated_precision() -> None:
    """The documented example (not a live capture: Anthropic publishes none): "123.78912" cents is $1.2378912."""
    doc = json.loads((ADMIN / "anthropic-cost-report.docs-example.json").read_text())
    charge = anthropic_charge(0, doc["data"][0]["results"][0])
    assert charge.usd == Decimal("1.2378912")
    assert charge.resolution == Decimal("0.0000001")
    assert (charge.model, charge.token_type) == ("claude-sonnet-4-20250514", INPUT)
    other = anthropic_charge(
        0, {"currency": "USD", "amount": "50", "description": "Web Search", "cost_type": "web_search"}
    )
    assert (other.model, other.token_type, other.usd) == (None, WEB_SEARCH, Decimal("0.5"))
    code = anthropic_charge(0, {"currency": "USD", "amount": "5", "description": "Code", "cost_type": "code_execution"})
    assert (code.model, code.token_type, code.usd) == (None, None, Decimal("0.05"))
    for bad in (
        {"currency": "EUR", "amount": "1"},
        {"currency": "USD", "amount": 1.5},
        {"currency": "USD", "amount": "NaN"},
    ):
        with pytest.raises(ReconcileError):
            anthropic_charge(0, bad)


def test_anthropic_usage_splits_cache_writes_by_ttl() -> None:
    u = anthropic_usage(
        3,
        {
            "uncached_input_tokens": 1500,
            "cache_creation": {"ephemeral_1h_input_tokens": 1000, "ephemeral_5m_input_tokens": 500},
            "cache_read_input_tokens": 200,
            "output_tokens": 500,
            "api_key_id": None,
            "model": "claude-opus-4-6",
        },
    )
    assert u.tokens == {
        INPUT: 1500,
        CACHED_INPUT: 200,
        CACHE_WRITE: 500,
        CACHE_WRITE_1H: 1000,
        OUTPUT: 500,
        WEB_SEARCH: 0,
    }
    assert u.api_key_id == "(console)" and u.requests is None and u.tier == "standard/0-200k"


@pytest.mark.parametrize(
    ("line", "parsed"),
    [
        ("gpt-4o-2024-08-06, input", ("gpt-4o-2024-08-06", INPUT)),
        ("gpt-4o-mini-2024-07-18, cached input", ("gpt-4o-mini-2024-07-18", CACHED_INPUT)),
        ("gpt-4.1-2025-04-14, output", ("gpt-4.1-2025-04-14", OUTPUT)),
        ("gpt-4o-2024-08-06, Input", ("gpt-4o-2024-08-06", INPUT)),
        ("priority | gpt-5.1, output, long context", ("gpt-5.1", OUTPUT)),
        ("ft-gpt-4o-2024-08-06, cache writes", ("ft-gpt-4o-2024-08-06", CACHE_WRITE)),
        ("web search tool calls", None),
        ("Vector storage", None),
        ("whisper-1, audio", None),
    ],
)
def test_openai_line_items(line: str, parsed: tuple[str, str] | None) -> None:
    assert parse_line_item(line) == parsed


@pytest.mark.parametrize(
    "result",
    [
        {"input_tokens": -1, "output_tokens": 0, "num_model_requests": 1},
        {"input_tokens": "12", "output_tokens": 0, "num_model_requests": 1},
        {"input_tokens": 2**70, "output_tokens": 0, "num_model_requests": 1},
        {"input_tokens": 5, "input_cached_tokens": 6, "output_tokens": 0, "num_model_requests": 1},
        {"input_tokens": 5, "output_tokens": 0, "num_model_requests": 1, "model": "x" * 1000},
    ],
)
def test_impossible_usage_figures_are_refused_not_summed(result: dict) -> None:
    with pytest.raises(ReconcileError):
        openai_usage("completions", 0, result)


def test_key_hints_match_only_their_key() -> None:
    assert hint_matches("sk-ant-api03-R2D...igAA", "sk-ant-api03-R2DxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxigAA")
    assert hint_matches("sk-proj-***...WXYZ".replace("***", ""), "sk-proj-abcdefWXYZ")
    assert not hint_matches("sk-ant-api03-R2D...igAA", "sk-ant-api03-R2DxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxigAB")
    assert not hint_matches("sk-abc", "sk-abc")  # no elision: not a redacted key
    assert not hint_matches("sk-abcdef...ghij", "sk-abcdefghij"[:8])  # shorter than the hint's two ends


def test_snapshot_names_match_the_name_that_was_sent() -> None:
    assert model_key("gpt-4o-mini-2024-07-18") == model_key("gpt-4o-mini") == "gpt-4o-mini"
    assert model_key("claude-sonnet-4-5-20250929") == "claude-sonnet-4-5"
    assert model_key("gpt-4.1") == "gpt-4.1"


def test_retry_after_forms() -> None:
    assert retry_after_s({"retry-after-ms": "1500"}, 0) == 1.5
    assert retry_after_s({"retry-after": "7"}, 0) == 7.0
    assert retry_after_s({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0) == 0.0  # in the past
    assert retry_after_s({}, 3) == 4.0


def _gateway_day(day: int, model: str, tokens_in: int, tokens_out: int, cached: int, pusd: int) -> ProviderDay:
    return ProviderDay(day, "anthropic", model, 2, 0, 0, tokens_in, tokens_out, cached, 0, pusd)


def test_costs_without_a_key_are_shared_by_each_keys_tokens_and_add_up() -> None:
    """Anthropic states costs per model and token type only: each key's share follows its tokens of that type, in
    whole pico-dollars that add up to the line exactly."""
    bill = ProviderBill("anthropic", requests_counted=False)
    bill.usage = [
        ProviderUsage(10, "claude-x-20250101", "apikey_gw", {INPUT: 1000, OUTPUT: 10}),
        ProviderUsage(10, "claude-x-20250101", "apikey_other", {INPUT: 2000, OUTPUT: 20}),
    ]
    third = Decimal("0.000010")  # $0.00001 over 3000 tokens: not a whole number of pico-dollars per token
    bill.charges = [
        ProviderCharge(10, "in", third, model="claude-x-20250101", token_type=INPUT),
        ProviderCharge(10, "out", Decimal("0.0003"), model="claude-x-20250101", token_type=OUTPUT),
    ]
    # the gateway: the same 1000/10 tokens, priced at exactly the gateway key's share
    ours = Decimal("0.000010") / 3 + Decimal("0.0001")
    gw = [_gateway_day(10, "claude-x", 1000, 10, 0, int((ours * 10**12).quantize(Decimal(1))))]
    result = reconcile(bill, gw, {"apikey_gw"}, 10, 10, lambda m, d: None)
    rows = {r["api_key_id"]: r for r in result.rows}
    assert sum(Decimal(r["provider_cost_usd"]) for r in rows.values()) == third + Decimal("0.0003")
    assert rows["apikey_gw"]["through_gateway"] and rows["apikey_gw"]["causes"] in (["match"], ["rounding"])
    assert rows["apikey_other"]["causes"] == ["bypass"]
    assert abs(Decimal(rows["apikey_gw"]["gap_usd"])) <= Decimal("1e-12")


def test_gateway_traffic_missing_from_the_bill_is_said_to_be_late() -> None:
    bill = ProviderBill("anthropic", requests_counted=False)
    result = reconcile(bill, [_gateway_day(5, "claude-x", 10, 5, 0, 100)], {"apikey_gw"}, 5, 5, lambda m, d: None)
    assert result.rows[0]["causes"] == ["not_on_provider_bill"]
    assert result.totals()["ratio"] == 0.0


def test_requests_billed_per_unit_point_at_the_line_items() -> None:
    bill = ProviderBill("openai")
    bill.usage = [ProviderUsage(7, "dall-e-3", "key_gw", {}, requests=2)]
    bill.charges = [ProviderCharge(7, "dall-e-3, images", Decimal("0.08"), api_key_id="key_gw")]
    gw = [ProviderDay(7, "openai", "dall-e-3", 2, 0, 0, 0, 0, 0, 0, 80_000_000_000)]
    rows = {r["model"]: r for r in reconcile(bill, gw, {"key_gw"}, 7, 7, lambda m, d: None).rows}
    assert rows["dall-e-3"]["causes"] == ["unit_charges"]
    assert rows["dall-e-3, images"]["causes"] == ["other_charge"]
    assert sum(Decimal(r["gap_usd"]) for r in rows.values()) == 0  # the day's totals agree


def test_a_cost_line_is_shared_only_among_usage_at_its_price() -> None:
    """Batch usage on the gateway's key, standard usage on another: each tier's cost line goes to its own key."""
    bill = ProviderBill("anthropic", requests_counted=False)
    bill.usage = [
        ProviderUsage(4, "claude-x", "apikey_gw", {INPUT: 1000}, tier="batch/0-200k"),
        ProviderUsage(4, "claude-x", "apikey_other", {INPUT: 1000}, tier="standard/0-200k"),
    ]
    bill.charges = [
        ProviderCharge(4, "batch in", Decimal("0.0015"), model="claude-x", token_type=INPUT, tier="batch/0-200k"),
        ProviderCharge(4, "std in", Decimal("0.003"), model="claude-x", token_type=INPUT, tier="standard/0-200k"),
    ]
    gw = [ProviderDay(4, "anthropic", "claude-x", 1, 0, 0, 1000, 0, 0, 0, 1_500_000_000)]
    rows = {r["api_key_id"]: r for r in reconcile(bill, gw, {"apikey_gw"}, 4, 4, lambda m, d: None).rows}
    assert rows["apikey_gw"]["provider_cost_usd"] == "0.0015" and rows["apikey_gw"]["causes"] == ["match"]
    assert rows["apikey_other"]["provider_cost_usd"] == "0.003"


def test_web_search_fees_follow_the_searches_and_unkeyed_charges_are_not_bypass() -> None:
    bill = ProviderBill("anthropic", requests_counted=False)
    bill.usage = [
        ProviderUsage(4, "claude-x", "apikey_gw", {INPUT: 100, WEB_SEARCH: 3}),
        ProviderUsage(4, "claude-x", "apikey_other", {INPUT: 100, WEB_SEARCH: 1}),
    ]
    bill.charges = [
        ProviderCharge(4, "in", Decimal("0.0006"), model="claude-x", token_type=INPUT),
        ProviderCharge(4, "Web Search Usage", Decimal("0.04"), token_type=WEB_SEARCH),
        ProviderCharge(4, "Code Execution Usage", Decimal("0.05")),
    ]
    # the gateway priced its 100 tokens and 3 searches: $0.0003 + $0.03
    gw = [ProviderDay(4, "anthropic", "claude-x", 1, 0, 0, 100, 0, 0, 0, 30_300_000_000)]
    result = reconcile(bill, gw, {"apikey_gw"}, 4, 4, lambda m, d: None)
    rows = {r["api_key_id"]: r for r in result.rows}
    assert rows["apikey_gw"]["provider_cost_usd"] == "0.0303" and rows["apikey_gw"]["causes"] == ["match"]
    assert rows["apikey_other"]["provider_cost_usd"] == "0.0103" and rows["apikey_other"]["causes"] == ["bypass"]
    assert rows["(unattributed)"]["causes"] == ["other_charge"]
    totals = result.totals()
    assert totals["ratio"] == 1.0
    assert totals["bypass_cost_usd"] == Decimal("0.0103") and totals["unattributed_cost_usd"] == Decimal("0.05")


def test_usage_on_the_gateways_key_that_the_ledger_lacks_is_not_in_ledger() -> None:
    bill = ProviderBill("openai")
    bill.usage = [ProviderUsage(4, "gpt-x", "key_gw", {INPUT: 10, OUTPUT: 5}, requests=1)]
    rows = reconcile(bill, [], {"key_gw"}, 4, 4, lambda m, d: None).rows
    assert rows[0]["causes"] == ["not_in_ledger"] and rows[0]["through_gateway"]


def test_ledger_groups_a_provider_never_bills_make_no_rows() -> None:
    """Listing models or uploading files is recorded but billed by no one: no 'late bill' row every day."""
    free = ProviderDay(4, "openai", "", 12, 0, 0, 0, 0, 0, 0, 0)
    assert reconcile(ProviderBill("openai"), [free], {"key_gw"}, 4, 4, lambda m, d: None).rows == []


def test_reports_missing_or_repeating_a_day_are_refused() -> None:
    from metergate.reconcile.source import check_days

    check_days([3, 4, 5], 3, 5, "x")
    with pytest.raises(ReconcileError, match="no bucket for 1970-01-05"):
        check_days([3, 5], 3, 5, "x")
    with pytest.raises(ReconcileError, match="more than once"):
        check_days([3, 4, 4, 5], 3, 5, "x")


def test_pages_larger_than_one_read_are_read_whole(tmp_path: Path) -> None:
    """A page of several MB comes in many chunks (and over TLS in smaller ones): all of it is read and parsed."""
    import asyncio

    from aiohttp import web

    from metergate.reconcile.client import AdminClient

    big = {"object": "page", "data": [{"x": "y" * 200, "i": i} for i in range(20_000)], "has_more": False}
    body = json.dumps(big).encode()
    assert len(body) > 4_000_000

    async def main() -> dict:
        async def handler(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse(headers={"content-type": "application/json"})
            await resp.prepare(request)
            for i in range(0, len(body), 8192):
                await resp.write(body[i : i + 8192])
            await resp.write_eof()
            return resp

        app = web.Application()
        app.router.add_get("/big", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            async with AdminClient("t", f"http://127.0.0.1:{port}", {}, timeout_s=30, max_retries=0, max_wait_s=0) as c:
                return await c.get("/big", [])
        finally:
            await runner.cleanup()

    assert asyncio.run(main()) == big


def test_several_keys_looking_like_the_gateways_is_an_error() -> None:
    import asyncio
    from collections.abc import AsyncIterator

    from metergate.reconcile.source import BillingSource

    class Two(BillingSource):
        async def bill(self, first_day: int, last_day: int) -> ProviderBill:
            raise NotImplementedError

        async def key_hints(self) -> AsyncIterator[tuple[str, str]]:
            for k in ("key_a", "key_b"):
                yield k, "sk-ab...yz"

    with pytest.raises(ReconcileError, match=r"2 .* look like the gateway's key"):
        asyncio.run(Two("openai", None).key_ids_of("sk-abcdxyz"))  # type: ignore[arg-type]


def test_unit_prices_are_those_of_an_ordinary_request() -> None:
    """Below the long-context tier: gemini-2.5-pro is $1.25/M in and $10/M out up to 200k tokens."""
    from datetime import UTC, datetime

    from metergate.pricing import PriceBook

    prices = PriceBook([]).per_mtok("gemini", "google", "gemini-2.5-pro", datetime(2026, 11, 1, tzinfo=UTC))
    assert prices is not None
    assert (prices["input"], prices["output"]) == (Decimal("1.25"), Decimal("10"))
    assert PriceBook([]).per_mtok("openai", "openai", "no-such-model", datetime(2026, 11, 1, tzinfo=UTC)) is None
