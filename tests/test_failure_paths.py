"""Failure paths found in review: every request still recorded once, reservations always released, spend kept."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest

from metergate.budgets import BudgetGuard, Hold, SharedReservations, budget_id
from metergate.config import LedgerConfig, parse_config
from metergate.ledger import Ledger, LedgerError
from metergate.ledger.store import open_store
from metergate.pricing import PriceBook
from metergate.usage import to_pusd
from tests.conftest import KEYS, make_gateway, wait_for

MESSAGES = [{"role": "user", "content": "failure"}]


def test_non_latin1_upstream_header_is_relayed_and_recorded(simulator, tmp_path: Path, tag: str) -> None:
    url = f"sqlite:///{tmp_path}/l.db"
    extra = (
        f'ledger: {{url: "{url}", flush_interval_s: 0.05}}\n'
        "budgets:\n  - {team: search, period: day, limit_usd: 100, action: block}\n"
    )
    gw = make_gateway(tmp_path, simulator.url, extra=extra, env={"METERGATE_ADMIN_TOKEN": "t"}).start()
    try:
        r = httpx.post(
            f"{gw.url}/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": MESSAGES},
            headers={**gw.headers("search/ranker"), "x-sim-tag": tag, "x-sim-response-header": "x-note=5%20%E2%82%AC"},
        )
        assert r.status_code == 200
        assert r.headers.raw and dict(r.headers.raw)[b"x-note"] == "5 €".encode()
        assert gw.metrics().sum("llm_requests_total", team="search", code="200") == 1
        # The reservation was settled: nothing stays reserved.
        budgets = httpx.get(f"{gw.url}/admin/budgets", headers={"authorization": "Bearer t"}).json()
        assert budgets[0]["reserved_usd"] == 0 and budgets[0]["spent_usd"] > 0
    finally:
        gw.stop()
    assert open_store(url).count() == 1


def test_stream_cut_short_by_shutdown_is_still_recorded(simulator, tmp_path: Path, tag: str) -> None:
    url = f"sqlite:///{tmp_path}/l.db"
    gw = make_gateway(
        tmp_path, simulator.url, server_extra=", shutdown_timeout_s: 1", extra=f'ledger: {{url: "{url}"}}\n'
    ).start()
    client = openai.OpenAI(
        base_url=f"{gw.url}/v1",
        api_key=KEYS["ads/bidder"],
        max_retries=0,
        default_headers={"x-sim-tag": tag, "x-sim-chunks": "60", "x-sim-chunk-delay-ms": "100"},
    )
    outcome: list[object] = []

    def stream() -> None:
        try:
            outcome.append(
                len(list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)))
            )
        except openai.APIError as exc:
            outcome.append(exc)

    t = threading.Thread(target=stream)
    t.start()
    assert wait_for(lambda: len(simulator.app.billed(tag)) == 1)
    time.sleep(0.3)
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGTERM)
    assert gw.proc.wait(timeout=30) == 0
    t.join(timeout=30)
    rows = open_store(url)._execute("SELECT code, error_type, metered FROM usage_records")
    assert rows == [(499, "cancelled", 0)]  # the provider's final bill is unknown, and the ledger says so


def test_unreadable_usage_is_recorded_as_unmetered(simulator, tmp_path: Path, tag: str) -> None:
    url = f"sqlite:///{tmp_path}/l.db"
    gw = make_gateway(tmp_path, simulator.url, extra=f'ledger: {{url: "{url}"}}\n').start()
    c = openai.OpenAI(
        base_url=f"{gw.url}/v1",
        api_key=KEYS["ads/bidder"],
        max_retries=0,
        default_headers={"x-sim-tag": tag, "x-sim-fail": "bad-usage"},
    )
    with pytest.raises(openai.APIError):  # a whole body whose usage is unreadable is withheld: 502
        c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    # A stream that finished normally is relayed whole; only the record says its usage could not be read.
    list(c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
    gw.stop()
    rows = open_store(url)._execute("SELECT stream, error_type, metered FROM usage_records ORDER BY stream")
    assert rows == [(0, "upstream_malformed_usage", 0), (1, "upstream_malformed_usage", 0)]


def test_worst_case_counts_every_choice() -> None:
    from metergate.endpoints import match_endpoint
    from metergate.exchange import RequestContext
    from metergate.providers import API_ADAPTERS, build_upstream
    from metergate.routing import Route

    cfg = parse_config(
        "providers: {p: {type: openai, base_url: 'http://x'}}\nroutes: [{model: '*', provider: p}]\n"
        "teams: [{name: t}]\n"
    )
    guard = BudgetGuard(cfg, PriceBook([]), None)
    match = match_endpoint("POST", "/v1/chat/completions")
    assert match is not None

    def estimate(body: dict[str, object]) -> int:
        ctx = RequestContext("r", 0.0, time.time(), match)
        ctx.facts = API_ADAPTERS["openai"].request_facts(match.endpoint, body, None)
        ctx.route = Route(build_upstream("p", cfg.providers["p"]), "gpt-4o")
        ctx.raw_body = b"{}"
        return guard.worst_case_pusd(ctx)

    one = estimate({"model": "gpt-4o", "max_tokens": 1000})
    eight = estimate({"model": "gpt-4o", "max_tokens": 1000, "n": 8})
    output_part = to_pusd(Decimal("0.01"))  # 1000 output tokens of gpt-4o
    assert eight - one == 7 * output_part


def test_shared_settlement_after_the_hold_expired_still_counts_the_spend(pg_url: str) -> None:
    cfg = parse_config(
        "providers: {p: {type: openai, base_url: 'http://x'}}\nroutes: [{model: '*', provider: p}]\n"
        f"teams: [{{name: search}}]\nledger: {{url: '{pg_url}'}}\n"
        "budgets: [{team: search, period: day, limit_usd: 10, action: block}]\n"
    )

    async def main() -> tuple[int, int]:
        assert cfg.ledger is not None
        ledger = Ledger(cfg.ledger)
        await ledger.start()
        guard = BudgetGuard(cfg, PriceBook([]), ledger)
        reservations = guard.reservations
        assert isinstance(reservations, SharedReservations)
        reservations.hold_ttl_s = -1  # every hold is already expired
        budget = cfg.budgets[0]
        hold = Hold(budget, guard.tracker.current()["day"], to_pusd(Decimal("1")))
        assert (await reservations.reserve(hold, to_pusd(Decimal("10")))).admitted
        await reservations.expire()  # the replica "died": its hold is released
        await reservations.settle(hold, to_pusd(Decimal("0.75")))  # ...and settles late after all
        rows = await reservations._run(
            "SELECT spent_pusd, reserved_pusd FROM budget_spend WHERE scope = %(s)s", {"s": budget_id(budget)}
        )
        await reservations.close()
        await ledger.stop()
        return int(rows[0][0]), int(rows[0][1])

    spent, reserved = asyncio.run(main())
    assert spent == to_pusd(Decimal("0.75")) and reserved == 0


def test_a_write_cut_short_by_shutdown_is_spooled(tmp_path: Path) -> None:
    from metergate.usage import Usage, UsageRecord

    async def main() -> Ledger:
        ledger = Ledger(LedgerConfig(url=f"sqlite:///{tmp_path}/l.db", flush_interval_s=0.01), replica="t")
        await ledger.start()
        store = await ledger.store()

        def slow_failing_write(rows: object) -> None:
            time.sleep(1.5)
            raise LedgerError("disk on fire")

        store.write = slow_failing_write  # type: ignore[method-assign]
        for i in range(5):
            rec = UsageRecord(f"r{i}", time.time(), "t", "a", "k", "p", "m", "m", "/e", 200, False, Usage(1, 1))
            ledger.submit(rec)
        await asyncio.sleep(0.2)  # the writer has taken the batch and is inside the write
        await ledger.stop(flush_timeout_s=0.5)
        return ledger

    ledger = asyncio.run(main())
    assert len(ledger.spool) == 5
