"""Budgets that hold: concurrency, replicas sharing PostgreSQL, restarts, the 429 each API's SDK understands."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from metergate.simulator import Billed
from tests.conftest import KEYS, Gateway, Metrics, make_gateway, wait_for
from tests.pricesheet import cost

MESSAGES = [{"role": "user", "content": "budget"}]
# Every budget test request costs exactly this: 20 input and 1000 output tokens of gpt-4o.
ONE = cost("gpt-4o", Billed(input=20, output=1000))
FITS_TEN = ONE * 10
HEADERS = {"x-sim-input-tokens": "20", "x-sim-output-tokens": "1000"}


def budgets_yaml(limit: Decimal, ledger_url: str, flush: float = 0.1) -> str:
    return (
        f'ledger: {{url: "{ledger_url}", flush_interval_s: {flush}}}\n'
        "budgets:\n"
        f"  - {{team: search, period: day, limit_usd: {limit}, action: block}}\n"
        "  - {team: ads, app: bidder, period: month, limit_usd: 0.00001, action: alert}\n"
        "  - {team: support, app: assistant, period: day, limit_usd: 0.00001, action: block}\n"
    )


async def _burst(gateways: list[Gateway], n: int, tag: str) -> tuple[int, int]:
    clients = [
        openai.AsyncOpenAI(
            base_url=f"{g.url}/v1",
            api_key=KEYS["search/ranker"],
            max_retries=0,
            default_headers={**HEADERS, "x-sim-tag": tag},
        )
        for g in gateways
    ]

    refusals: list[str] = []

    async def one(i: int) -> bool:
        try:
            await clients[i % len(clients)].chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=1000)
        except openai.RateLimitError as exc:
            refusals.append(exc.body["code"])
            return False
        return True

    results = await asyncio.gather(*(one(i) for i in range(n)))
    # Refused either because the budget is spent or because what is left is held by requests in flight.
    assert set(refusals) <= {"budget_exceeded", "budget_held"}
    for c in clients:
        await c.close()
    return sum(results), n - sum(results)


def _spent_usd(simulator, tag: str) -> Decimal:  # type: ignore[no-untyped-def]
    return sum((cost("gpt-4o", b.reported) for b in simulator.app.billed(tag)), Decimal(0))


@pytest.fixture
def budget_gateway(simulator, tmp_path: Path) -> Iterator[Gateway]:
    gw = make_gateway(tmp_path, simulator.url, extra=budgets_yaml(FITS_TEN, f"sqlite:///{tmp_path}/ledger.db")).start()
    yield gw
    gw.stop()


def test_60_concurrent_requests_overshoot_by_at_most_one(budget_gateway: Gateway, simulator, tag: str) -> None:
    admitted, refused = asyncio.run(_burst([budget_gateway], 60, tag))
    spent = _spent_usd(simulator, tag)
    assert spent <= FITS_TEN + ONE, (admitted, spent)
    assert admitted >= 5 and refused >= 49
    assert len(simulator.app.billed(tag)) == admitted  # refused requests never reached the provider


def test_two_replicas_sharing_postgres_hold_one_budget(simulator, tmp_path: Path, tag: str, pg_url: str) -> None:
    extra = budgets_yaml(FITS_TEN, pg_url)
    gateways = [make_gateway(tmp_path, simulator.url, extra=extra).start() for _ in range(2)]
    try:
        admitted, _ = asyncio.run(_burst(gateways, 60, tag))
        spent = _spent_usd(simulator, tag)
        assert spent <= FITS_TEN + ONE, (admitted, spent)
        assert admitted >= 5
        # Both replicas took part and both refused; per-replica budgets would have let each spend the limit,
        # which the spend bound above rules out. (Which replica admitted what depends on timing.)
        for gw in gateways:
            assert gw.metrics().sum("llm_errors_total", error_type="budget_exceeded") > 0
            assert gw.metrics().sum("llm_requests_total", team="search") >= 25
        # Every replica exports the same global spend (from the shared ledger) once it has resynced.
        assert wait_for(
            lambda: (
                len(
                    {round(g.metrics().sum("llm_spend_usd", team="search", app="", period="day"), 12) for g in gateways}
                )
                == 1
            ),
            timeout=40,
        )
    finally:
        for gw in gateways:
            gw.stop()


def test_budget_429_in_each_api_shape_without_sdk_retries(simulator, tmp_path: Path, tag: str) -> None:
    gw = make_gateway(tmp_path, simulator.url, extra=budgets_yaml(FITS_TEN, f"sqlite:///{tmp_path}/l.db")).start()
    try:
        headers = {"x-sim-tag": tag, "x-sim-output-tokens": "50"}
        # support/assistant has a tiny daily block budget: its first request spends it.
        a = anthropic.Anthropic(base_url=gw.url, api_key=KEYS["support/assistant"], default_headers=headers)
        a.messages.create(model="claude-haiku-4-5", max_tokens=50, messages=MESSAGES)
        with pytest.raises(anthropic.RateLimitError) as info:
            a.messages.create(model="claude-haiku-4-5", max_tokens=50, messages=MESSAGES)  # default retries on
        message = info.value.body["error"]["message"]
        assert "day budget of support/assistant" in message and "resets at" in message and "spent" in message
        assert info.value.response.headers["x-should-retry"] == "false"
        assert int(info.value.response.headers["retry-after"]) > 0
        o = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEYS["support/assistant"], default_headers=headers)
        with pytest.raises(openai.RateLimitError) as oinfo:
            o.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert oinfo.value.code == "budget_exceeded"
        r = httpx.post(
            f"{gw.url}/v1beta/models/gemini-2.5-flash:generateContent",
            json={"contents": []},
            headers={"x-goog-api-key": KEYS["support/assistant"], **headers},
        )
        assert r.status_code == 429 and r.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
        # One request reached the provider; the SDKs did not retry the refusals.
        assert len(simulator.app.billed(tag)) == 1
        m = gw.metrics()
        assert m.sum("llm_errors_total", team="support", error_type="budget_exceeded", code="429") == 3
        # An alert budget only reports: ads/bidder is far over its $0.00001 and still served.
        b = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEYS["ads/bidder"], max_retries=0)
        for _ in range(2):
            b.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        # The budget is per app: support's other apps, and other teams, are not held by it.
        assert wait_for(lambda: "budget ads/bidder/month: limit of $1e-05 reached" in gw.log())
    finally:
        gw.stop()


def test_spend_and_budgets_survive_a_restart(simulator, tmp_path: Path, tag: str) -> None:
    url = f"sqlite:///{tmp_path}/ledger.db"
    gw = make_gateway(tmp_path, simulator.url, extra=budgets_yaml(ONE * 3, url)).start()
    c = openai.OpenAI(
        base_url=f"{gw.url}/v1",
        api_key=KEYS["search/ranker"],
        max_retries=0,
        default_headers={**HEADERS, "x-sim-tag": tag},
    )
    for _ in range(3):
        c.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=1000)
    spent_before = gw.metrics().sum("llm_spend_usd", team="search", app="", period="day")
    assert abs(Decimal(repr(spent_before)) - ONE * 3) < Decimal("1e-12")
    gw.stop()
    again = Gateway(gw.config_path, gw.env, gw.listen, gw.metrics_listen, log_path=gw.log_path).start()
    try:
        m = again.metrics()
        assert m.sum("llm_spend_usd", team="search", app="", period="day") == spent_before
        assert m.sum("llm_spend_usd", team="search", app="", period="month") == spent_before
        assert m.sum("llm_budget_usd", team="search", period="day") == pytest.approx(float(ONE * 3))
        c2 = openai.OpenAI(
            base_url=f"{again.url}/v1",
            api_key=KEYS["search/ranker"],
            max_retries=0,
            default_headers={**HEADERS, "x-sim-tag": tag},
        )
        with pytest.raises(openai.RateLimitError):
            c2.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=1000)
    finally:
        again.stop()


def test_budget_gauges(budget_gateway: Gateway, simulator, tag: str) -> None:
    c = openai.OpenAI(
        base_url=f"{budget_gateway.url}/v1",
        api_key=KEYS["ads/bidder"],
        max_retries=0,
        default_headers={**HEADERS, "x-sim-tag": tag},
    )
    c.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=1000)
    m: Metrics = budget_gateway.metrics()
    assert m.sum("llm_budget_usd", team="search", app="", period="day") == pytest.approx(float(FITS_TEN))
    assert m.sum("llm_budget_warn_ratio", team="ads", app="bidder", period="month") == 0.8
    for period in ("day", "week", "month"):
        assert m.sum("llm_spend_usd", team="ads", app="", period=period) == pytest.approx(float(ONE))
        assert m.sum("llm_spend_usd", team="ads", app="bidder", period=period) == pytest.approx(float(ONE))
        assert m.sum("llm_spend_forecast_usd", team="ads", app="", period=period) >= float(ONE)
    assert m.sum("llm_spend_usd", team="search", app="", period="day") == 0


def test_shared_clock_corrects_a_skewed_replica(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica whose clock is an hour off still puts requests in the database's period."""
    from metergate.budgets import BudgetGuard
    from metergate.config import parse_config
    from metergate.ledger import Ledger
    from metergate.pricing import PriceBook

    cfg = parse_config(
        "providers:\n  p: {type: openai, base_url: 'http://x'}\nroutes: [{model: '*', provider: p}]\n"
        f"teams: [{{name: t}}]\nledger: {{url: '{pg_url}'}}\n"
    )
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)

    async def main() -> float:
        assert cfg.ledger is not None
        ledger = Ledger(cfg.ledger)
        guard = BudgetGuard(cfg, PriceBook([]), ledger)
        await ledger.start()
        await guard.sync()
        await ledger.stop()
        return guard.clock.time() - real()

    assert abs(asyncio.run(main())) < 1.0


def test_every_replica_reports_the_reservations_of_all(pg_url: str) -> None:
    """`/admin/budgets` reads reservations per replica: after its maintenance pass a replica that reserved nothing
    still reports what another replica holds, and both report zero once it is settled."""
    from datetime import UTC, datetime

    from metergate.budgets import BudgetGuard, Hold
    from metergate.config import parse_config
    from metergate.ledger import Ledger
    from metergate.periods import window
    from metergate.pricing import PriceBook

    cfg = parse_config(
        "providers:\n  p: {type: openai, base_url: 'http://x'}\nroutes: [{model: '*', provider: p}]\n"
        f"teams: [{{name: t}}]\nledger: {{url: '{pg_url}'}}\n"
        "budgets: [{team: t, period: day, limit_usd: 10, action: block}]\n"
    )
    budget = cfg.budgets[0]

    async def main() -> list[int]:
        assert cfg.ledger is not None
        ledger = Ledger(cfg.ledger)
        await ledger.start()  # migrations
        a, b = (BudgetGuard(cfg, PriceBook([]), ledger) for _ in range(2))
        hold = Hold(budget, window("day", datetime.now(UTC), a.tz), 5_000_000)
        seen = []
        try:
            assert (await a.reservations.reserve(hold, 10**13)).admitted
            await b.reservations.reconcile()
            seen.append(b.reservations.reserved_pusd(hold.counter, hold.window_start))
            await a.reservations.settle(hold, 4_000_000)
            await a.reservations.reconcile()
            await b.reservations.reconcile()
            seen += [g.reservations.reserved_pusd(hold.counter, hold.window_start) for g in (a, b)]
        finally:
            for guard in (a, b):
                await guard.stop()
            await ledger.stop()
        return seen

    assert asyncio.run(main()) == [5_000_000, 0, 0]
