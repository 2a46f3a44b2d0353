"""Attribution to end users and tags (issue 11): read from each API's own field or the gateway's headers, stored
exactly per ledger row, never a Prometheus label, reported and charged back per user and per tag."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from datetime import date
from decimal import Decimal
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from metergate.attribution import Attribution, AttributionPolicy
from metergate.auth import Principal
from metergate.config import LedgerConfig
from metergate.ledger import Ledger
from metergate.ledger.store import open_store
from metergate.usage import Usage, UsageRecord, to_pusd
from tests.conftest import KEYS, Gateway, admin, cli, make_gateway, wait_for
from tests.pricesheet import cost

TOKEN = "attribution-admin-token"
MESSAGES = [{"role": "user", "content": "who pays"}]
TODAY = date.today().isoformat()
MONTH = date.today().strftime("%Y-%m")


@pytest.fixture(scope="module")
def gw(simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("attribution")
    gateway = make_gateway(
        tmp,
        simulator.url,
        env={"METERGATE_ADMIN_TOKEN": TOKEN},
        extra=(
            f'ledger: {{url: "sqlite:///{tmp}/ledger.db", flush_interval_s: 0.05}}\n'
            "attribution: {tags: [customer, project, cost_center]}\n"
        ),
    ).start()
    yield gateway
    gateway.stop()


def ledger_rows(gw: Gateway, where: str, params: tuple[object, ...] = ()) -> list[sqlite3.Row]:
    path = gw.config_path.parent / "ledger.db"
    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    try:
        return db.execute(f"SELECT * FROM usage_records WHERE {where} ORDER BY started_at", params).fetchall()
    finally:
        db.close()


def rows_for_users(gw: Gateway, users: list[str], n: int | None = None) -> list[sqlite3.Row]:
    marks = ",".join("?" * len(users))
    want = len(users) if n is None else n
    found = wait_for(lambda: len(r := ledger_rows(gw, f"end_user IN ({marks})", tuple(users))) >= want and r)
    assert found, f"the ledger did not get {want} rows for {users}"
    return found


def bill_of(simulator, tag: str):  # type: ignore[no-untyped-def]
    (bill,) = simulator.app.billed(tag)
    return bill


# --- the policy, without a network -------------------------------------------------------------------------------


def test_policy_reads_users_and_allow_listed_tags_only() -> None:
    policy = AttributionPolicy(["customer", "project", "cost_center"])
    keyed = Principal("search", "ranker", "k1", (("cost_center", "cc-42"),))
    got = policy.attribute(
        keyed,
        {
            "x-metergate-user": "  u-1  ",
            "x-metergate-tags": "customer=acme, project = x ,secret=1,novalue=,=x,Bad=1,cost_center=cc-9,,junk",
        },
    )
    # The key's own tag wins over the header's; unlisted, malformed and empty items are ignored and counted.
    assert got == Attribution("u-1", (("cost_center", "cc-42"), ("customer", "acme"), ("project", "x")))
    assert policy.ignored["unlisted_tag"] == 1
    assert policy.ignored["malformed_tag"] == 4  # novalue=, =x, Bad=1 (key pattern), junk
    # The header's user wins over the body's; the body's is used when the header names none.
    assert policy.with_body_user(got, "body-user").user == "u-1"
    assert policy.with_body_user(Attribution(), "body-user").user == "body-user"
    # A non-string user (the provider refuses it) is not kept; an overlong one is cut to a bounded size.
    assert policy.with_body_user(Attribution(), {"id": 1}).user is None
    assert policy.ignored["invalid_user"] == 1
    long = policy.with_body_user(Attribution(), "x" * 10_000).user
    assert long == "x" * 256 and policy.ignored["user_too_long"] == 1
    assert policy.with_body_user(Attribution(), "a\x00b\nc").user == "a\ufffdb\ufffdc"
    # Tag values are bounded too: more than 128 characters is malformed, and a header cannot add more than 32 tags.
    assert policy.attribute(keyed, {"x-metergate-tags": "customer=" + "a" * 129}).tag("customer") is None
    many = AttributionPolicy([f"t{i}" for i in range(40)])
    header = ",".join(f"t{i}=v" for i in range(40))
    assert len(many.attribute(Principal("a", "b", "k"), {"x-metergate-tags": header}).tags) == 32
    assert many.ignored["too_many_tags"] == 8


# --- through the gateway, with the official SDKs ------------------------------------------------------------------


def test_end_user_from_each_api_and_header_reaches_the_ledger_exactly(gw: Gateway, simulator) -> None:
    run = uuid.uuid4().hex[:8]
    headers = {"x-metergate-tags": "customer=acme,project=atlas,secret=nope"}
    oa = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEYS["search/ranker"], max_retries=0)
    tags = {name: f"{run}-{name}" for name in ("chat", "stream", "responses", "header", "anthropic", "gemini")}
    oa.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        user=f"{run}-alice",
        extra_headers={**headers, "x-sim-tag": tags["chat"]},
    )
    stream = oa.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        user=f"{run}-alice",
        stream=True,
        extra_headers={"x-sim-tag": tags["stream"]},
    )
    for _ in stream:
        pass
    oa.responses.create(
        model="gpt-4o-mini",
        input="hi",
        safety_identifier=f"{run}-bob",
        extra_headers={"x-sim-tag": tags["responses"]},
    )
    # The application's header wins over the user the body names.
    oa.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        user=f"{run}-alice",
        extra_headers={"x-metergate-user": f"{run}-dave", "x-sim-tag": tags["header"]},
    )
    an = anthropic.Anthropic(base_url=gw.url, api_key=KEYS["support/assistant"], max_retries=0)
    an.messages.create(
        model="claude-haiku-4-5",
        max_tokens=100,
        messages=MESSAGES,
        metadata={"user_id": f"{run}-carol"},
        extra_headers={"x-metergate-tags": "customer=globex", "x-sim-tag": tags["anthropic"]},
    )
    r = httpx.post(
        f"{gw.url}/v1beta/models/gemini-2.5-flash:generateContent",
        headers={
            "x-goog-api-key": KEYS["ads/bidder"],
            "x-metergate-user": f"{run}-erin",
            "x-sim-tag": tags["gemini"],
        },
        json={"contents": [{"parts": [{"text": "hi"}]}]},
    )
    assert r.status_code == 200
    users = [f"{run}-{u}" for u in ("alice", "bob", "carol", "dave", "erin")]
    rows = rows_for_users(gw, users, n=6)
    by_user: dict[str, list[sqlite3.Row]] = {}
    for row in rows:
        by_user.setdefault(row["end_user"], []).append(row)
    assert sorted(len(v) for v in by_user.values()) == [1, 1, 1, 1, 2]
    # Tags: the allow-listed ones of the header, as one canonical JSON object; `secret` is not allow-listed.
    chat = next(r for r in by_user[f"{run}-alice"] if not r["stream"])
    assert json.loads(chat["tags"]) == {"customer": "acme", "project": "atlas"}
    assert next(r for r in by_user[f"{run}-alice"] if r["stream"])["tags"] is None
    assert json.loads(by_user[f"{run}-carol"][0]["tags"]) == {"customer": "globex"}
    assert by_user[f"{run}-carol"][0]["team"] == "support"
    # Each row is exactly what the provider billed, to the pico-dollar.
    pairs = {
        "chat": chat,
        "stream": next(r for r in by_user[f"{run}-alice"] if r["stream"]),
        "responses": by_user[f"{run}-bob"][0],
        "header": by_user[f"{run}-dave"][0],
        "anthropic": by_user[f"{run}-carol"][0],
        "gemini": by_user[f"{run}-erin"][0],
    }
    for name, row in pairs.items():
        bill = bill_of(simulator, tags[name])
        assert (row["tokens_in"], row["tokens_out"]) == (bill.reported.input, bill.reported.output), name
        assert row["cost_pusd"] == to_pusd(cost(bill.model, bill.reported)), name
    # Users and tags are never labels: no series carries them.
    text = httpx.get(gw.metrics_url).text
    assert run not in text and "acme" not in text and "globex" not in text
    ignored = gw.metrics().sum("metergate_attribution_ignored_total", reason="unlisted_tag")
    assert ignored >= 1


def test_key_tags_are_set_by_the_key_and_cannot_be_overridden(gw: Gateway, simulator) -> None:
    made = cli(gw, "keys", "create", "--team", "search", "--app", "ranker", "--tag", "cost_center=cc-42")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    listed = cli(gw, "keys", "list")
    assert "cost_center=cc-42" in listed.stdout
    user = f"keyed-{uuid.uuid4().hex[:8]}"
    c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0)

    def works() -> bool:
        try:
            c.chat.completions.create(
                model="gpt-4o-mini",
                messages=MESSAGES,
                user=user,
                extra_headers={"x-metergate-tags": "cost_center=elsewhere,customer=initech"},
            )
        except openai.AuthenticationError:
            return False
        return True

    assert wait_for(works, timeout=15)
    (row,) = rows_for_users(gw, [user], n=1)[:1]
    assert json.loads(row["tags"]) == {"cost_center": "cc-42", "customer": "initech"}
    # The admin API creates tagged keys the same way, and both refuse a tag key outside the allow-list.
    created = admin(gw, "POST", "/admin/keys", json={"team": "ads", "app": "bidder", "tags": {"customer": "acme"}})
    assert created.status_code == 201 and created.json()["tags"] == {"customer": "acme"}
    bad = admin(gw, "POST", "/admin/keys", json={"team": "ads", "app": "bidder", "tags": {"region": "eu"}})
    assert bad.status_code == 422 and "tags.region: not listed in attribution.tags" in bad.text
    refused = cli(gw, "keys", "create", "--team", "ads", "--app", "bidder", "--tag", "region=eu")
    assert refused.returncode == 1 and "not listed in attribution.tags" in refused.stderr
    malformed = cli(gw, "keys", "create", "--team", "ads", "--app", "bidder", "--tag", "customer")
    assert malformed.returncode == 1 and "KEY=VALUE" in malformed.stderr


def test_reports_by_user_and_tag_reconcile_with_the_ledger(gw: Gateway, simulator) -> None:
    run = uuid.uuid4().hex[:8]
    customer = f"cust-{run}"
    c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEYS["search/indexer"], max_retries=0)
    d = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEYS["ads/bidder"], max_retries=0)
    sent = []
    for i in range(6):
        client = c if i % 2 else d
        tag = f"{run}-{i}"
        client.chat.completions.create(
            model="gpt-4o" if i % 3 else "gpt-4o-mini",
            messages=MESSAGES,
            user=f"{run}-u{i % 3}",
            extra_headers={"x-metergate-tags": f"customer={customer},project=p{i % 2}", "x-sim-tag": tag},
        )
        sent.append(bill_of(simulator, tag))
    # A formula in a user id must not run in the spreadsheet the CSV is opened in.
    c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, user=f"=HYPERLINK({run})")
    c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # no user at all
    rows_for_users(gw, [f"{run}-u{i}" for i in range(3)], n=6)
    want_total = sum((cost(b.model, b.reported) for b in sent), Decimal(0))

    by_user = cli(gw, "report", "--from", TODAY, "--to", TODAY, "--by", "team,user", "--format", "json")
    assert by_user.returncode == 0, by_user.stderr
    user_rows = [r for r in json.loads(by_user.stdout) if (r["user"] or "").startswith(run)]
    assert {(r["team"], r["user"]) for r in user_rows} == {
        ("ads", f"{run}-u0"),
        ("ads", f"{run}-u2"),
        ("ads", f"{run}-u1"),
        ("search", f"{run}-u1"),
        ("search", f"{run}-u0"),
        ("search", f"{run}-u2"),
    }
    assert sum(Decimal(str(r["cost_usd"])) for r in user_rows) == pytest.approx(want_total, abs=Decimal("1e-12"))
    # The API returns the same rows as the CLI, dimension fields included (null where a record has no user).
    api = admin(gw, "GET", "/admin/reports", params={"from": TODAY, "to": TODAY, "by": "team,user"}).json()
    assert api == json.loads(by_user.stdout)
    assert any(r["user"] is None for r in api)

    by_tag = cli(
        gw, "report", "--from", TODAY, "--to", TODAY, "--by", "tag.customer,tag.project,model", "--format", "json"
    )
    assert by_tag.returncode == 0, by_tag.stderr
    tag_rows = [r for r in json.loads(by_tag.stdout) if r["tag.customer"] == customer]
    assert {(r["tag.project"], r["model"]) for r in tag_rows} == {
        ("p0", "gpt-4o-mini"),
        ("p0", "gpt-4o"),
        ("p1", "gpt-4o-mini"),
        ("p1", "gpt-4o"),
    }
    assert sum(r["requests"] for r in tag_rows) == 6
    tag_total = sum(Decimal(str(r["cost_usd"])) for r in tag_rows)
    assert tag_total == pytest.approx(want_total, abs=Decimal("1e-12"))
    # Every report's total is the ledger's total, whatever it is grouped by.
    totals = set()
    for by in ("team", "user", "tag.customer", "team,user,tag.project,model"):
        out = cli(gw, "report", "--from", TODAY, "--to", TODAY, "--by", by, "--format", "csv").stdout
        table = list(csv.DictReader(io.StringIO(out)))
        assert table[-1][by.split(",")[0]] == "TOTAL"
        totals.add((int(table[-1]["requests"]), Decimal(table[-1]["cost_usd"])))
    assert len(totals) == 1
    csv_users = cli(gw, "report", "--from", TODAY, "--to", TODAY, "--by", "user", "--format", "csv").stdout
    assert f"'=HYPERLINK({run})" in csv_users and f"\n=HYPERLINK({run})" not in csv_users

    # A customer's chargeback: by team, app and model across teams, totals equal to the report's.
    md = cli(gw, "chargeback", "--tag", f"customer={customer}", "--month", MONTH)
    assert md.returncode == 0, md.stderr
    assert md.stdout.startswith(f"# LLM chargeback statement: customer={customer}, {MONTH}")
    assert "| team | app | model | requests |" in md.stdout
    statement = cli(gw, "chargeback", "--tag", f"customer={customer}", "--month", MONTH, "--format", "csv").stdout
    lines = list(csv.DictReader(io.StringIO(statement)))
    assert Decimal(lines[-1]["cost_usd"]) == want_total
    assert {line["team"] for line in lines[:-1]} == {"ads", "search"}
    within = cli(
        gw, "chargeback", "--team", "ads", "--tag", f"customer={customer}", "--month", MONTH, "--format", "csv"
    )
    ads = sent[0::2]  # even requests were sent with the ads key
    assert Decimal(list(csv.DictReader(io.StringIO(within.stdout)))[-1]["cost_usd"]) == sum(
        (cost(b.model, b.reported) for b in ads), Decimal(0)
    )
    api_md = admin(gw, "GET", "/admin/reports/chargeback", params={"tag": f"customer={customer}", "month": MONTH})
    assert api_md.status_code == 200 and api_md.text == md.stdout
    # Filters on the report too, and clear refusals.
    only = cli(
        gw,
        "report",
        "--from",
        TODAY,
        "--to",
        TODAY,
        "--by",
        "team",
        "--tag",
        f"customer={customer}",
        "--format",
        "json",
    )
    assert sum(Decimal(str(r["cost_usd"])) for r in json.loads(only.stdout)) == pytest.approx(
        want_total, abs=Decimal("1e-12")
    )
    for args, says in [
        (["report", "--from", TODAY, "--to", TODAY, "--by", "tag.Customer"], "cannot group or filter by"),
        (["report", "--from", TODAY, "--to", TODAY, "--by", "tag.x;drop"], "cannot group or filter by"),
        (["chargeback", "--month", MONTH], "give --team, --tag KEY=VALUE, or both"),
        (["chargeback", "--tag", "customer", "--month", MONTH], "KEY=VALUE"),
    ]:
        result = cli(gw, *args)
        assert result.returncode == 1 and says in result.stderr and "Traceback" not in result.stderr, args
    assert admin(gw, "GET", "/admin/reports/chargeback", params={"month": MONTH}).status_code == 400


def test_ten_thousand_users_leave_the_series_count_unchanged(gw: Gateway) -> None:
    run = uuid.uuid4().hex[:8]

    def series() -> set[tuple[str, frozenset[tuple[str, str]]]]:
        return set(gw.metrics().samples)

    # Warm every series this traffic touches (first request of the team/app/model), then count.
    httpx.post(
        f"{gw.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {KEYS['support/assistant']}"},
        json={"model": "gpt-4o-mini", "messages": MESSAGES, "user": f"{run}-warm"},
    ).raise_for_status()
    before = series()

    async def send() -> None:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=gw.url, limits=limits, timeout=60) as client:
            gate = asyncio.Semaphore(32)

            async def one(i: int) -> None:
                async with gate:
                    r = await client.post(
                        "/v1/chat/completions",
                        headers={
                            "authorization": f"Bearer {KEYS['support/assistant']}",
                            "x-metergate-tags": f"customer=c{i % 500}-{run}",
                        },
                        json={"model": "gpt-4o-mini", "messages": MESSAGES, "user": f"{run}-{i}"},
                    )
                    r.raise_for_status()

            await asyncio.gather(*(one(i) for i in range(10_000)))

    started = time.perf_counter()
    asyncio.run(send())
    elapsed = time.perf_counter() - started
    after = series()
    assert after == before, sorted(after ^ before)[:5]
    counted = wait_for(
        lambda: (
            ledger_rows(gw, "end_user LIKE ?", (f"{run}-%",))
            if len(ledger_rows(gw, "end_user LIKE ? AND end_user != ?", (f"{run}-%", f"{run}-warm"))) >= 10_000
            else None
        ),
        timeout=30,
    )
    assert counted, "not every request reached the ledger"
    users = {r["end_user"] for r in counted} - {f"{run}-warm"}
    assert len(users) == 10_000
    print(f"10,000 requests with distinct users in {elapsed:.1f} s")


# --- the stores: both dialects group and filter alike -----------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/ledger.db"
        return
    from tests.conftest import create_pg_database, drop_pg_database

    url = create_pg_database()
    yield url
    drop_pg_database(url)


def test_both_databases_group_and_filter_by_user_and_tag(store_url: str) -> None:
    def rec(i: int, user: str | None, tags: tuple[tuple[str, str], ...], usd: str) -> UsageRecord:
        r = UsageRecord(
            request_id=f"a-{i}",
            started_at=time.time(),
            team="search" if i % 2 else "ads",
            app="ranker",
            key_id="k",
            provider="openai",
            model="gpt-4o-mini",
            upstream_model="gpt-4o-mini",
            endpoint="/v1/chat/completions",
            code=200,
            stream=False,
            usage=Usage(input_tokens=10 + i, output_tokens=i),
            user=user,
            tags=tags,
        )
        r.set_cost(Decimal(usd))
        return r

    records = [
        rec(0, "u1", (("customer", "acme"),), "0.000001"),
        rec(1, "u1", (("customer", "acme"), ("project", "x")), "0.000002"),
        rec(2, "u2", (("customer", "globex"),), "0.000004"),
        rec(3, None, (), "0.000008"),
        rec(4, 'o\'brien "q" | \\', (("customer", "a'b"),), "0.000016"),
    ]

    async def write() -> None:
        ledger = Ledger(LedgerConfig(url=store_url, flush_interval_s=0.05), replica="t")
        await ledger.start()
        for r in records:
            ledger.submit(r)
        await ledger.stop()

    asyncio.run(write())
    store = open_store(store_url)
    now = time.time() + 60
    by_tag = {a.group: (a.requests, a.cost_pusd) for a in store.aggregate(0, now, ["tag.customer"])}
    assert by_tag == {
        ("acme",): (2, 3_000_000),
        ("globex",): (1, 4_000_000),
        (None,): (1, 8_000_000),
        ("a'b",): (1, 16_000_000),
    }
    by_user = {a.group: a.cost_pusd for a in store.aggregate(0, now, ["team", "user"])}
    assert by_user[("search", "u1")] == 2_000_000 and by_user[("ads", 'o\'brien "q" | \\')] == 16_000_000
    assert by_user[("search", None)] == 8_000_000
    filtered = store.aggregate(0, now, ["user"], {"tag.customer": "acme", "team": "ads"})
    assert [(a.group, a.cost_pusd) for a in filtered] == [(("u1",), 1_000_000)]
    assert [a.cost_pusd for a in store.aggregate(0, now, [], {"tag.customer": "a'b"})] == [16_000_000]
    with pytest.raises(ValueError, match="cannot group or filter by"):
        store.aggregate(0, now, ["tag.x') OR 1=1 --"])
