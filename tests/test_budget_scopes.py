"""Budgets at every scope (issue 11): key, end user (each user their own limit), tags, model, provider, quarter
and year; a per-request cost cap; refusals that say whether the budget is spent or only held by requests in flight.
Checked with the official SDKs against what the simulated provider billed, on one gateway and on two replicas."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import anthropic
import httpx
import openai
import pytest

from metergate.config import ConfigError, parse_config
from metergate.periods import window
from metergate.scopes import ScopeIndex, Subject, scope_id
from metergate.simulator import Billed
from tests.conftest import KEYS, Gateway, make_gateway, wait_for
from tests.pricesheet import cost

TOKEN = "scopes-admin-token"
MESSAGES = [{"role": "user", "content": "budget"}]
ONE = cost("gpt-4o", Billed(input=20, output=1000))  # what every gpt-4o test request costs
HEADERS = {"x-sim-input-tokens": "20", "x-sim-output-tokens": "1000"}


def key_id(scope: str) -> str:
    return hashlib.sha256(KEYS[scope].encode()).hexdigest()[:12]


# --- pure parts -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fiscal_start", "day", "quarter", "year"),
    [
        (1, date(2026, 11, 29), ("2026-10-01", "2027-01-01"), ("2026-01-01", "2027-01-01")),
        (4, date(2026, 11, 29), ("2026-10-01", "2027-01-01"), ("2026-04-01", "2027-04-01")),
        (4, date(2026, 3, 31), ("2026-01-01", "2026-04-01"), ("2025-04-01", "2026-04-01")),
        (2, date(2026, 1, 15), ("2025-11-01", "2026-02-01"), ("2025-02-01", "2026-02-01")),
        (12, date(2026, 12, 1), ("2026-12-01", "2027-03-01"), ("2026-12-01", "2027-12-01")),
    ],
)
def test_fiscal_quarters_and_years(
    fiscal_start: int, day: date, quarter: tuple[str, str], year: tuple[str, str]
) -> None:
    tz = ZoneInfo("Europe/Paris")
    at = datetime(day.year, day.month, day.day, 12, tzinfo=tz).astimezone(UTC)
    for period, (start, end) in (("quarter", quarter), ("year", year)):
        w = window(period, at, tz, fiscal_start)  # type: ignore[arg-type]
        assert (w.start.date().isoformat(), w.end.date().isoformat()) == (start, end)
        assert w.start.tzinfo == tz and w.start.hour == 0  # local midnight


def _budgets(yaml: str) -> list:  # type: ignore[type-arg]
    base = (
        "providers: {openai: {type: openai, base_url: 'http://x:1'}, anthropic: {type: anthropic, base_url: 'http://x:2'}}\n"
        "routes: [{model: '*', provider: openai}]\n"
        "keys: [{sha256: '" + "a" * 64 + "', team: search, app: ranker}]\n"
        "attribution: {tags: [customer]}\n"
    )
    return list(parse_config(base + yaml).budgets)


def test_scopes_match_every_field_and_named_users_override_the_star() -> None:
    budgets = _budgets(
        "budgets:\n"
        "  - {team: search, user: '*', period: day, limit_usd: 1, action: block}\n"
        "  - {team: search, user: vip, period: day, limit_usd: 9, action: block}\n"
        "  - {tags: {customer: acme}, period: quarter, limit_usd: 5}\n"
        "  - {team: search, model: 'gpt-4o*', period: year, limit_usd: 5}\n"
        "  - {key: key_1, provider: anthropic, period: week, limit_usd: 5}\n"
    )
    index = ScopeIndex(budgets, lambda b: scope_id(b, b.period), lambda b: b.period)

    def ids(**kw: object) -> list[str]:
        subject = Subject(**{"team": "search", "app": "ranker", "key_id": "key_1", **kw})  # type: ignore[arg-type]
        return [counter for _, counter in index.matching(subject)]

    assert ids(user="alice", model="gpt-4o-mini", provider="openai") == [
        "search/*/day;user=*|alice",
        "search/*/year;model=gpt-4o*",
    ]
    # vip has a budget of her own: the `*` one no longer counts her.
    assert ids(user="vip", model="o4-mini", provider="openai") == ["search/*/day;user=vip"]
    # No user: per-user budgets do not apply; tags match across teams; key and provider must both match.
    assert ids(model="claude", provider="anthropic", tags=(("customer", "acme"),)) == [
        "*/*/quarter;tag.customer=acme",
        "*/*/week;key=key_1;provider=anthropic",
    ]
    assert ids(team="ads", model="claude", provider="anthropic", key_id="key_2", tags=(("customer", "acme"),)) == [
        "*/*/quarter;tag.customer=acme"
    ]
    # A team-wide budget keeps the id of earlier releases (its shared counter carries over).
    (team_budget,) = _budgets("budgets: [{team: search, period: day, limit_usd: 1}]\n")
    assert scope_id(team_budget, "day") == "search/*/day"


@pytest.mark.parametrize(
    ("yaml", "says"),
    [
        ("budgets: [{app: ranker, period: day, limit_usd: 1}]", "app needs team"),
        ("budgets: [{user: '*', period: day, limit_usd: 1}]", "name what it applies to"),
        ("budgets: [{team: search, period: day}]", "period and limit_usd go together"),
        ("budgets: [{team: search}]", "a budget needs period and limit_usd, max_request_usd, or both"),
        ("budgets: [{tags: {project: x}, period: day, limit_usd: 1}]", "'project' is not listed in attribution.tags"),
        ("budgets: [{team: search, provider: azure, period: day, limit_usd: 1}]", "unknown provider 'azure'"),
        ("budgets: [{team: search, period: fortnight, limit_usd: 1}]", "budgets.0.period"),
        ("budgets: [{team: search, max_request_usd: 0}]", "greater than 0"),
    ],
)
def test_scope_config_errors_name_the_field(yaml: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        _budgets(yaml + "\n")
    assert says in str(info.value)


# --- one gateway, official SDKs ------------------------------------------------------------------------------


def scoped_gateway(simulator, tmp_path: Path, budgets: str, ledger: str | None = None) -> Gateway:  # type: ignore[no-untyped-def]
    return make_gateway(
        tmp_path,
        simulator.url,
        env={"METERGATE_ADMIN_TOKEN": TOKEN},
        extra=(
            f'ledger: {{url: "{ledger or f"sqlite:///{tmp_path}/ledger.db"}", flush_interval_s: 0.05}}\n'
            "attribution: {tags: [customer]}\n"
            "budgets:\n" + budgets
        ),
        server_extra=", fiscal_year_start_month: 4",
    ).start()


def chat(gw: Gateway, scope: str, tag: str, user: str | None = None, **kw: object) -> openai.types.chat.ChatCompletion:
    c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEYS[scope], max_retries=0)
    return c.chat.completions.create(
        model=kw.pop("model", "gpt-4o"),  # type: ignore[arg-type]
        messages=MESSAGES,
        max_tokens=kw.pop("max_tokens", 1000),  # type: ignore[arg-type]
        extra_headers={**HEADERS, "x-sim-tag": tag, **kw.pop("headers", {})},  # type: ignore[dict-item]
        **({"user": user} if user else {}),
        **kw,  # type: ignore[arg-type]
    )


def refused(call) -> openai.APIStatusError:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value


def spent(simulator, tag: str) -> Decimal:  # type: ignore[no-untyped-def]
    return sum((cost(b.model, b.reported) for b in simulator.app.billed(tag)), Decimal(0))


@pytest.fixture
def user_gateway(simulator, tmp_path: Path) -> Iterator[Gateway]:
    gw = scoped_gateway(
        simulator,
        tmp_path,
        f"  - {{team: search, user: '*', period: day, limit_usd: {ONE * 2}, action: block}}\n"
        f"  - {{team: search, user: vip, period: day, limit_usd: {ONE * 4}, action: block}}\n",
    )
    yield gw
    gw.stop()


def test_every_user_has_a_limit_of_their_own(user_gateway: Gateway, simulator, tag: str) -> None:
    gw = user_gateway
    for user in ("alice", "bob"):
        chat(gw, "search/ranker", f"{tag}-{user}", user)
        chat(gw, "search/ranker", f"{tag}-{user}", user)
        err = refused(lambda user=user: chat(gw, "search/ranker", f"{tag}-{user}", user))
        # Spent: nothing clears before the day ends, so the SDK must not retry.
        assert err.status_code == 429 and err.body["code"] == "budget_exceeded"  # type: ignore[index]
        assert err.response.headers["x-should-retry"] == "false"
        assert 0 < int(err.response.headers["retry-after"]) <= 86400
        assert f"user {user}" in err.message and "is spent. It resets at" in err.message
        assert err.response.headers["x-metergate-budget"] == f"search/*/day;user=*|{user}"
        assert spent(simulator, f"{tag}-{user}") == ONE * 2
    # vip's own budget overrides the `*` one; requests naming no user are not held to any user's limit.
    for _ in range(4):
        chat(gw, "search/ranker", f"{tag}-vip", "vip")
    assert refused(lambda: chat(gw, "search/ranker", f"{tag}-vip", "vip")).status_code == 429
    for _ in range(3):
        chat(gw, "search/ranker", f"{tag}-anon")
    # The header names the user as well as the body; the Anthropic API is held to the same budget.
    an = anthropic.Anthropic(base_url=gw.url, api_key=KEYS["search/ranker"], max_retries=0)
    an.messages.create(
        model="claude-haiku-4-5",
        max_tokens=1000,
        messages=MESSAGES,
        extra_headers={**HEADERS, "x-sim-tag": f"{tag}-carol", "x-metergate-user": "carol"},
    )
    with pytest.raises(anthropic.RateLimitError) as info:
        for _ in range(5):
            an.messages.create(
                model="claude-haiku-4-5",
                max_tokens=1000,
                messages=MESSAGES,
                metadata={"user_id": "carol"},
                extra_headers={**HEADERS, "x-sim-tag": f"{tag}-carol"},
            )
    assert info.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    # Carol's requests are cheaper (claude-haiku): admitted until her spend reached the limit, one past it at most.
    haiku = cost("claude-haiku-4-5", Billed(input=20, output=1000))
    carol = spent(simulator, f"{tag}-carol")
    assert ONE * 2 <= carol < ONE * 2 + haiku
    # One series per budget whatever the number of users; the admin API lists each user's counter.
    metrics = gw.metrics()
    assert metrics.sum("llm_scoped_budget_usd", budget="search/*/day;user=*", period="day") == pytest.approx(
        float(ONE * 2)
    )
    assert metrics.sum("llm_scoped_spend_usd", budget="search/*/day;user=*", period="day") == pytest.approx(
        float(carol)  # the highest user's
    )
    rows = httpx.get(f"{gw.url}/admin/budgets", headers={"authorization": f"Bearer {TOKEN}"}).json()
    alice = next(r for r in rows if r["id"] == "search/*/day;user=*|alice")
    assert alice["user"] == "alice" and alice["spent_usd"] == pytest.approx(float(ONE * 2))
    assert next(r for r in rows if r["id"] == "search/*/day;user=vip")["spent_usd"] == pytest.approx(float(ONE * 4))


def test_refusal_says_held_while_part_of_the_budget_is_unspent(user_gateway: Gateway, simulator, tag: str) -> None:
    gw = user_gateway
    slow = {"x-sim-delay-ms": "1500"}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        in_flight = [pool.submit(chat, gw, "search/ranker", tag, "dana", headers=slow) for _ in range(2)]
        time.sleep(0.5)
        # Two requests in flight hold their worst case; nothing is spent yet: the refusal says so and the SDK may
        # retry shortly.
        err = refused(lambda: chat(gw, "search/ranker", tag, "dana"))
        assert err.status_code == 429 and err.body["code"] == "budget_held"  # type: ignore[index]
        assert err.response.headers["retry-after"] == "2" and err.response.headers["x-should-retry"] == "true"
        assert "$0.0000 is spent" in err.message and "reserved by requests in flight" in err.message
        for f in in_flight:
            f.result()
    # Once they settle at their real cost the budget is spent: exhausted, not held.
    err = refused(lambda: chat(gw, "search/ranker", tag, "dana"))
    assert err.body["code"] == "budget_exceeded" and err.response.headers["x-should-retry"] == "false"  # type: ignore[index]
    assert spent(simulator, tag) == ONE * 2


def test_key_tag_model_provider_scopes_and_the_request_cap(simulator, tmp_path: Path, tag: str) -> None:
    haiku = cost("claude-haiku-4-5", Billed(input=20, output=1000))
    gw = scoped_gateway(
        simulator,
        tmp_path,
        f"  - {{key: {key_id('support/assistant')}, period: week, limit_usd: {ONE}, action: block}}\n"
        f"  - {{tags: {{customer: acme}}, period: quarter, limit_usd: {ONE * 2}, action: block}}\n"
        f"  - {{team: ads, model: 'gpt-4o', period: year, limit_usd: {ONE}, action: block}}\n"
        f"  - {{team: search, provider: anthropic, period: month, limit_usd: {haiku}, action: block}}\n"
        "  - {team: ads, max_request_usd: 0.05}\n",
    )
    try:
        # Key: only that key's traffic counts.
        chat(gw, "support/assistant", tag)
        assert refused(lambda: chat(gw, "support/assistant", tag)).status_code == 429
        # Tags: acme's spend counts across teams and keys; another customer is not held.
        acme = {"headers": {"x-metergate-tags": "customer=acme"}}
        chat(gw, "search/indexer", f"{tag}-acme", **acme)  # type: ignore[arg-type]
        chat(gw, "ads/bidder", f"{tag}-acme", model="gpt-4o-mini", **acme)  # type: ignore[arg-type]
        chat(gw, "search/indexer", f"{tag}-acme", **acme)  # type: ignore[arg-type]
        err = refused(lambda: chat(gw, "ads/bidder", f"{tag}-acme", model="gpt-4o-mini", **acme))  # type: ignore[arg-type]
        assert "tag customer=acme" in err.message and "quarter" in err.message
        chat(gw, "search/indexer", tag, headers={"x-metergate-tags": "customer=globex"})
        # Model: ads's gpt-4o is capped for the (fiscal) year, its gpt-4o-mini is not.
        chat(gw, "ads/bidder", tag)
        assert refused(lambda: chat(gw, "ads/bidder", tag)).status_code == 429
        for _ in range(3):
            chat(gw, "ads/bidder", tag, model="gpt-4o-mini")
        # Provider: search's Anthropic traffic has its own monthly limit, its OpenAI traffic does not.
        an = anthropic.Anthropic(base_url=gw.url, api_key=KEYS["search/ranker"], max_retries=0)

        def claude() -> None:
            an.messages.create(
                model="claude-haiku-4-5",
                max_tokens=1000,
                messages=MESSAGES,
                extra_headers={**HEADERS, "x-sim-tag": tag},
            )

        claude()
        with pytest.raises(anthropic.RateLimitError):
            claude()
        chat(gw, "search/ranker", tag)
        # The per-request cap: a worst case over $0.05 is refused unsent (400, not retried), in the caller's shape.
        before = len(simulator.app.billed(f"{tag}-cap"))
        err = refused(lambda: chat(gw, "ads/bidder", f"{tag}-cap", model="gpt-4o-mini", max_tokens=100_000))
        assert err.status_code == 400 and err.body["code"] == "request_cost_limit"  # type: ignore[index]
        assert "per-request limit of ads" in err.message and "Lower max_tokens" in err.message
        assert len(simulator.app.billed(f"{tag}-cap")) == before
        chat(gw, "ads/bidder", f"{tag}-cap", model="gpt-4o-mini", max_tokens=1000)
        # Every admitted request was billed by the provider and metered exactly: the ledger agrees to the cent.
        rows = httpx.get(f"{gw.url}/admin/budgets", headers={"authorization": f"Bearer {TOKEN}"}).json()
        by_id = {r["id"]: r for r in rows}
        assert by_id["*/*/quarter;tag.customer=acme"]["spent_usd"] == pytest.approx(
            float(spent(simulator, f"{tag}-acme"))
        )
        assert by_id[f"*/*/week;key={key_id('support/assistant')}"]["spent_usd"] == pytest.approx(float(ONE))
        assert by_id["ads/*/year;model=gpt-4o"]["period_start"].startswith("2026-04-01")  # fiscal year from April
    finally:
        gw.stop()


def test_scoped_spend_survives_a_restart(simulator, tmp_path: Path, tag: str) -> None:
    budgets = f"  - {{team: search, user: '*', period: month, limit_usd: {ONE * 2}, action: block}}\n"
    gw = scoped_gateway(simulator, tmp_path, budgets)
    try:
        chat(gw, "search/ranker", tag, "erin")
    finally:
        gw.stop()
    again = scoped_gateway(simulator, tmp_path, budgets)  # same ledger: the spend is read back per user
    try:
        chat(again, "search/ranker", tag, "erin")
        assert refused(lambda: chat(again, "search/ranker", tag, "erin")).body["code"] == "budget_exceeded"  # type: ignore[index]
        chat(again, "search/ranker", tag, "frank")
    finally:
        again.stop()


# --- two replicas sharing PostgreSQL --------------------------------------------------------------------------


def test_two_replicas_hold_each_users_budget_together(simulator, tmp_path: Path, tag: str, pg_url: str) -> None:
    limit = ONE * 5
    budgets = f"  - {{team: search, user: '*', period: day, limit_usd: {limit}, action: block}}\n"
    gateways = [scoped_gateway(simulator, tmp_path, budgets, ledger=pg_url) for _ in range(2)]
    try:

        async def burst() -> None:
            clients = [
                openai.AsyncOpenAI(base_url=f"{g.url}/v1", api_key=KEYS["search/ranker"], max_retries=0)
                for g in gateways
            ]

            codes: list[str] = []

            async def one(i: int, user: str) -> None:
                try:
                    await clients[i % 2].chat.completions.create(
                        model="gpt-4o",
                        messages=MESSAGES,
                        max_tokens=1000,
                        user=user,
                        extra_headers={**HEADERS, "x-sim-tag": f"{tag}-{user}"},
                    )
                except openai.RateLimitError as exc:
                    codes.append(exc.body["code"])  # type: ignore[index]

            await asyncio.gather(*(one(i, user) for i in range(30) for user in ("gail", "hank")))
            assert codes and set(codes) <= {"budget_exceeded", "budget_held"}
            for c in clients:
                await c.close()

        asyncio.run(burst())
        for user in ("gail", "hank"):
            billed = simulator.app.billed(f"{tag}-{user}")
            # At most one request past each user's limit, across both replicas; each user got their own share.
            assert ONE * 4 <= spent(simulator, f"{tag}-{user}") <= limit + ONE, (user, len(billed))
        assert wait_for(
            lambda: all(
                g.metrics().sum("llm_scoped_spend_usd", budget="search/*/day;user=*") >= float(ONE * 4)
                for g in gateways
            ),
            timeout=40,
        )
    finally:
        for g in gateways:
            g.stop()


# --- what a review found (each failed before its fix) ------------------------------------------------------------


def test_budgets_of_one_scope_count_each_request_once(simulator, tmp_path: Path, tag: str) -> None:
    # An alert and a block budget on the same scope and period share a counter: a request is counted once.
    gw = scoped_gateway(
        simulator,
        tmp_path,
        f"  - {{team: search, model: 'gpt-4o*', period: month, limit_usd: {ONE * 3}, action: block}}\n"
        f"  - {{team: search, model: 'gpt-4o*', period: month, limit_usd: {ONE * 2}, action: alert}}\n",
    )
    try:
        chat(gw, "search/ranker", tag)
        chat(gw, "search/ranker", tag)
        rows = httpx.get(f"{gw.url}/admin/budgets", headers={"authorization": f"Bearer {TOKEN}"}).json()
        assert [r["spent_usd"] for r in rows] == pytest.approx([float(ONE * 2)] * 2)
        chat(gw, "search/ranker", tag)  # the third fits the block budget: it was not counted twice
        assert refused(lambda: chat(gw, "search/ranker", tag)).status_code == 429
        assert spent(simulator, tag) == ONE * 3
    finally:
        gw.stop()


def test_a_request_whose_bill_is_unknown_makes_the_budget_exhausted_not_busy(
    user_gateway: Gateway, simulator, tag: str
) -> None:
    gw = user_gateway
    c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEYS["search/ranker"], max_retries=0)

    def unknown_bill(user: str, max_tokens: int) -> None:
        # The provider reports no usage: the request's worst case stays held until the day ends.
        for _ in c.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            max_tokens=max_tokens,
            user=user,
            stream=True,
            extra_headers={**HEADERS, "x-sim-tag": tag, "x-sim-fail": "no-usage"},
        ):
            pass

    unknown_bill("kim", 1000)  # holds about half of kim's limit
    chat(gw, "search/ranker", tag, "kim")
    err = refused(lambda: chat(gw, "search/ranker", tag, "kim"))
    # What holds the rest will never clear before the reset: exhausted, and the SDK must not retry every 2 s.
    assert err.body["code"] == "budget_exceeded" and err.response.headers["x-should-retry"] == "false"  # type: ignore[index]
    assert "whose bill is unknown" in err.message
    # A reset lets a user spend again, even one whose whole limit is held for an unknown bill.
    unknown_bill("lou", 4000)  # its worst case is above lou's limit: all of it stays held
    assert refused(lambda: chat(gw, "search/ranker", tag, "lou")).body["code"] == "budget_exceeded"  # type: ignore[index]
    reset = httpx.post(
        f"{gw.url}/admin/budgets/resets",
        headers={"authorization": f"Bearer {TOKEN}"},
        json={"budget": "search/*/day;user=*|lou", "by": "ops"},
    )
    assert reset.status_code == 201, reset.text
    chat(gw, "search/ranker", tag, "lou")


def test_a_per_request_cap_needs_an_output_cap(simulator, tmp_path: Path, tag: str) -> None:
    gw = scoped_gateway(simulator, tmp_path, "  - {team: ads, max_request_usd: 0.05}\n")
    try:
        c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEYS["ads/bidder"], max_retries=0)
        with pytest.raises(openai.BadRequestError) as info:
            c.chat.completions.create(model="o4-mini", messages=MESSAGES, extra_headers={"x-sim-tag": tag})
        assert "set an output cap" in info.value.message
        assert not simulator.app.billed(tag)
        c.chat.completions.create(model="o4-mini", messages=MESSAGES, max_completion_tokens=500)
    finally:
        gw.stop()


def test_a_spent_model_budget_refuses_creating_batches(simulator, tmp_path: Path, tag: str) -> None:
    # A batch names its models only in its input file: while the gpt-4o budget is spent, no batch is created.
    gw = scoped_gateway(
        simulator, tmp_path, f"  - {{team: search, model: 'gpt-4o', period: day, limit_usd: {ONE}, action: block}}\n"
    )
    try:
        chat(gw, "search/ranker", tag)
        r = httpx.post(
            f"{gw.url}/v1/batches",
            headers={"authorization": f"Bearer {KEYS['search/ranker']}"},
            json={"input_file_id": "file-abc", "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        )
        assert r.status_code == 429 and r.json()["error"]["code"] == "budget_exceeded"
        # Other teams' batches, and this team's uploads, are not held by it.
        upload = httpx.get(f"{gw.url}/v1/files", headers={"authorization": f"Bearer {KEYS['search/ranker']}"})
        assert upload.status_code == 200
    finally:
        gw.stop()


def test_counters_of_users_who_spent_nothing_are_not_kept() -> None:
    from metergate.budgets import Clock, Hold, LocalReservations, SpendTracker
    from metergate.config import BudgetConfig

    tracker = SpendTracker(ZoneInfo("UTC"), Clock())
    local = LocalReservations(tracker)
    budget = BudgetConfig(team="t", user="*", period="day", limit_usd=1, action="block")
    w = tracker.current()["day"]

    async def run() -> None:
        for i in range(1000):
            hold = Hold(budget, w, 1000, f"t/*/day;user=*|u{i}")
            assert (await local.reserve(hold, 10**12)).admitted
            local.release(hold)
        assert local._reserved == {}
        kept = Hold(budget, w, 1000, "t/*/day;user=*|k")
        await local.reserve(kept, 10**12)
        local.release(kept, keep_pusd=400)
        assert local.reserved_pusd(kept.counter, w.start_ts) == 400 == local.kept_pusd(kept.counter, w.start_ts)
        tracker.clock.skew_s = w.end_ts - time.time() + 1  # the day is over
        await local.expire()
        assert local._reserved == {} and local._kept == {}

    asyncio.run(run())
