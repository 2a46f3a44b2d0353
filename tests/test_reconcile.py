"""`metergate reconcile` end to end: the gateway's ledger against the simulated providers' admin APIs (OpenAI Usage
and Costs, Anthropic usage and cost reports), which answer from what the simulator actually billed: traffic through
the gateway and traffic sent around it with another key."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import anthropic
import openai
import pytest

from metergate.reconcile.bill import model_key
from metergate.simulator import SimulatorThread
from metergate.simulator.admin import presented_key
from metergate.simulator.billing import PriceList, billed, key_id
from tests.conftest import KEYS, PROVIDER_ENV, Gateway, cli, make_gateway, sqlite_ledger, wait_for

BYPASS_OPENAI = "sk-bypass-team-laptop-0001"
BYPASS_ANTHROPIC = "sk-ant-bypass-notebook-0002"
ADMIN_ENV = {"OPENAI_ADMIN_KEY": "sk-admin-sim", "ANTHROPIC_ADMIN_KEY": "sk-ant-admin01-sim"}
SCOPE = "search/ranker"
TODAY = datetime.now(UTC).date()


def reconcile_yaml(extra: str = "") -> str:
    return (
        "reconcile:\n"
        f"  openai: {{admin_key_env: OPENAI_ADMIN_KEY{extra}}}\n"
        f"  anthropic: {{admin_key_env: ANTHROPIC_ADMIN_KEY{extra}}}\n"
    )


# gpt-4.1 is priced below the provider's list price in the config: a negotiated price that drifted from the bill.
PRICE_OVERRIDE = 'prices:\n  - {provider: openai, model: "gpt-4.1", input_mtok: 1.5, output_mtok: 6.0}\n'


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorThread]:
    s = SimulatorThread().start()  # its own: the admin APIs report every request it ever billed
    s.app.accept_key("openai", BYPASS_OPENAI)
    s.app.accept_key("anthropic", BYPASS_ANTHROPIC)
    # A fine-tuned model the catalogue cannot know: the provider bills it, the gateway leaves it unpriced.
    s.app.price_list.set("self-hosted-ft", input=3, cached_input=1.5, output=12)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def gw(sim: SimulatorThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("reconcile")
    g = make_gateway(tmp, sim.url, env=ADMIN_ENV, extra=sqlite_ledger(tmp) + PRICE_OVERRIDE + reconcile_yaml()).start()
    yield g
    g.stop()


def chat(client: openai.OpenAI, model: str, **headers: str) -> None:
    client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=200, extra_headers=headers
    )


@pytest.fixture(scope="module")
def traffic(gw: Gateway, sim: SimulatorThread) -> None:
    """Through the gateway: priced models (streamed and not, cached), an unpriced one, a drifted price, a stream
    cut after the provider billed it; around it: the same models under other keys."""
    oa = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEYS[SCOPE], max_retries=0)
    for i in range(3):
        chat(oa, "gpt-4o-mini", **{"x-sim-input-tokens": str(300 + i), "x-sim-cached-tokens": "128"})
    stream = oa.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=200,
        stream=True,
        stream_options={"include_usage": True},
    )
    for _ in stream:
        pass
    oa.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    chat(oa, "self-hosted-ft", **{"x-sim-input-tokens": "1000", "x-sim-output-tokens": "90"})
    chat(oa, "gpt-4.1", **{"x-sim-input-tokens": "2000", "x-sim-output-tokens": "150"})
    with pytest.raises(openai.APIError):
        cut = oa.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=200,
            stream=True,
            extra_headers={"x-sim-fail": "reset-after:3", "x-sim-input-tokens": "700", "x-sim-output-tokens": "120"},
        )
        for _ in cut:
            pass
    an = anthropic.Anthropic(base_url=gw.url, api_key=KEYS[SCOPE], max_retries=0)
    for i in range(2):
        an.messages.create(
            model="claude-sonnet-4-5",
            max_tokens=300,
            messages=[{"role": "user", "content": "hello"}],
            extra_headers={
                "x-sim-input-tokens": "2400",
                "x-sim-cached-tokens": str(1000 * i),
                "x-sim-cache-write-tokens": "600",
                "x-sim-cache-write-1h-tokens": "200",
            },
        )
    # a client that hangs up mid-stream: the gateway reads the rest for its usage and records a 499 with it
    cut_short = anthropic.Anthropic(
        base_url=gw.url,
        api_key=KEYS[SCOPE],
        max_retries=0,
        default_headers={"x-sim-chunks": "25", "x-sim-chunk-delay-ms": "20", "x-sim-output-tokens": "250"},
    )
    with cut_short.messages.stream(
        model="claude-haiku-4-5", max_tokens=1000, messages=[{"role": "user", "content": "hello"}]
    ) as events:
        for i, _ in enumerate(events):
            if i == 3:
                break
    direct = openai.OpenAI(base_url=sim.url + "/v1", api_key=BYPASS_OPENAI, max_retries=0)
    chat(direct, "gpt-4o-mini", **{"x-sim-input-tokens": "5000"})
    direct_an = anthropic.Anthropic(base_url=sim.url, api_key=BYPASS_ANTHROPIC, max_retries=0)
    direct_an.messages.create(model="claude-sonnet-4-5", max_tokens=100, messages=[{"role": "user", "content": "x"}])
    time.sleep(0.3)  # the ledger flushes every 50 ms


def run(gw: Gateway, *args: str, env: dict[str, str] | None = None) -> dict:
    r = cli(gw, "reconcile", "--from", TODAY.isoformat(), "--to", TODAY.isoformat(), "--format", "json", *args, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def provider_cost(sim: SimulatorThread, family: str, key: str) -> Decimal:
    """What the simulator charged under a key: its own arithmetic, as the bill's ground truth."""
    prices = PriceList()
    prices.set("self-hosted-ft", input=3, cached_input=1.5, output=12)
    return sum(
        (
            usd
            for b in sim.app.billed()
            if billed(b) and b.api.startswith(family) and key_id(family, presented_key(family, b.headers)) == key
            for _, usd in prices.charges(b).values()
        ),
        Decimal(0),
    )


def row(doc: dict, provider: str, model: str, through: bool = True) -> dict:
    """The row of a model as the gateway sent it; the provider names the dated snapshot it ran on."""
    found = [
        r
        for r in doc["rows"]
        if r["provider"] == provider and model_key(r["model"]) == model and r["through_gateway"] == through
    ]
    assert len(found) == 1, (provider, model, through, doc["rows"])
    return found[0]


def test_priced_traffic_through_the_gateway_matches_the_bill_exactly(
    gw: Gateway, sim: SimulatorThread, traffic: None
) -> None:
    doc = run(gw)
    assert doc["complete"] is True
    gateway_key = key_id("openai", PROVIDER_ENV["SIM_OPENAI_KEY"])
    for provider, model in (
        ("openai", "gpt-4o-mini"),
        ("openai", "text-embedding-3-small"),
        ("anthropic", "claude-sonnet-4-5"),
    ):
        r = row(doc, provider, model)
        assert r["causes"] == ["match"], r
        assert r["gap_usd"] == "0"
        assert r["gateway_cost_usd"] == r["provider_cost_usd"] != "0"
        for f in ("tokens_in", "tokens_out", "tokens_cached", "tokens_cache_write"):
            assert r[f"gateway_{f}"] == r[f"provider_{f}"], (f, r)
    mini = row(doc, "openai", "gpt-4o-mini")
    assert mini["api_key_id"] == gateway_key  # found by the key's redacted form, with no api_key_ids configured
    assert mini["gateway_requests"] == mini["provider_requests"] == 4
    assert mini["provider_tokens_cached"] == 3 * 128
    claude = row(doc, "anthropic", "claude-sonnet-4-5")
    assert claude["provider_requests"] is None  # Anthropic's report counts no requests
    assert claude["provider_tokens_cache_write"] == 1200 and claude["provider_tokens_cached"] == 1000
    totals = {t["provider"]: t for t in doc["providers"]}
    assert totals["anthropic"]["ratio"] == 1.0 and totals["anthropic"]["gap_usd"] == "0"


def test_a_client_gone_mid_stream_is_billed_and_metered_alike(gw: Gateway, traffic: None) -> None:
    r = wait_for(lambda: (x := row(run(gw), "anthropic", "claude-haiku-4-5")) and x["gateway_tokens_out"] and x)
    assert r["causes"] == ["match"], r
    assert r["gateway_requests"] == 1 and r["gateway_failed_requests"] == 0  # a 499 whose usage was read
    assert r["gateway_tokens_out"] == r["provider_tokens_out"] == 250
    assert r["gap_usd"] == "0" and r["gateway_cost_usd"] != "0"


def test_traffic_around_the_gateway_is_bypass_on_its_own_key(gw: Gateway, sim: SimulatorThread, traffic: None) -> None:
    doc = run(gw)
    for family, model, secret in (
        ("openai", "gpt-4o-mini", BYPASS_OPENAI),
        ("anthropic", "claude-sonnet-4-5", BYPASS_ANTHROPIC),
    ):
        r = row(doc, family, model, through=False)
        assert r["api_key_id"] == key_id(family, secret)
        assert r["causes"] == ["bypass"]
        assert r["gateway_cost_usd"] == "0" and r["gateway_tokens_in"] == 0
        assert (
            Decimal(r["provider_cost_usd"]) == Decimal(r["gap_usd"]) == provider_cost(sim, family, r["api_key_id"]) > 0
        )
    totals = {t["provider"]: t for t in doc["providers"]}
    assert Decimal(totals["openai"]["bypass_cost_usd"]) == provider_cost(sim, "openai", key_id("openai", BYPASS_OPENAI))


def test_unpriced_model_shows_the_providers_cost_as_its_gap(gw: Gateway, sim: SimulatorThread, traffic: None) -> None:
    r = row(run(gw), "openai", "self-hosted-ft")
    assert r["causes"] == ["unpriced"]
    assert r["gateway_cost_usd"] == "0"
    # 1000 input at $3/M and 90 output at $12/M, the simulator's price for the fine-tuned model
    assert Decimal(r["provider_cost_usd"]) == Decimal(r["gap_usd"]) == Decimal("0.00408")
    assert r["gateway_tokens_in"] == r["provider_tokens_in"] == 1000


def test_price_override_shows_as_a_price_difference_with_both_unit_prices(gw: Gateway, traffic: None) -> None:
    r = row(run(gw), "openai", "gpt-4.1")
    assert r["causes"] == ["price_difference"]
    assert r["gateway_tokens_in"] == r["provider_tokens_in"] == 2000
    assert r["provider_usd_per_mtok"] == {"input": "2", "output": "8"}  # gpt-4.1's list price
    assert r["gateway_usd_per_mtok"] == {"input": "1.5", "output": "6"}
    assert Decimal(r["gap_usd"]) == Decimal(2000 * 0.5 + 150 * 2) / 1_000_000
    assert "input $2/M at the provider vs $1.5/M at the gateway" in r["explanation"]


def test_request_cut_after_billing_is_failed_but_billed(gw: Gateway, traffic: None) -> None:
    r = row(run(gw), "openai", "gpt-4o")
    assert r["causes"] == ["failed_but_billed"]
    assert r["gateway_failed_requests"] == 1 and r["gateway_requests"] == 0 and r["provider_requests"] == 1
    assert r["provider_tokens_in"] == 700 and r["provider_tokens_out"] == 120
    assert Decimal(r["gap_usd"]) == Decimal(r["provider_cost_usd"]) > 0


def test_every_format_carries_the_same_rows(gw: Gateway, traffic: None) -> None:
    doc = run(gw)
    day = TODAY.isoformat()
    csv_out = cli(gw, "reconcile", "--from", day, "--to", day, "--format", "csv")
    assert csv_out.returncode == 0, csv_out.stderr
    lines = csv_out.stdout.strip().splitlines()
    assert lines[0].startswith("date,provider,model,api_key_id,through_gateway,")
    assert len(lines) == 1 + len(doc["rows"])
    md = cli(gw, "reconcile", "--from", day, "--to", day)
    assert md.returncode == 0, md.stderr
    assert "| openai | gpt-4.1-2025-04-14 |" in md.stdout and "price difference" in md.stdout


def test_days_past_one_page_are_all_read(gw: Gateway, sim: SimulatorThread, traffic: None) -> None:
    """40 days: the daily reports come in pages of at most 31 buckets, followed with next_page."""
    sim.app.admin_calls.clear()
    first = (TODAY - timedelta(days=39)).isoformat()
    r = cli(gw, "reconcile", "--from", first, "--to", TODAY.isoformat(), "--format", "json")
    assert r.returncode == 0, r.stderr
    paged = [c for c in sim.app.admin_calls if "page=page_" in c]
    assert {c.split("?")[0] for c in paged} >= {
        "GET /v1/organization/usage/completions",
        "GET /v1/organization/costs",
        "GET /v1/organizations/usage_report/messages",
        "GET /v1/organizations/cost_report",
    }
    today_rows = [x for x in json.loads(r.stdout)["rows"] if x["date"] == TODAY.isoformat()]
    assert today_rows == run(gw)["rows"]


def test_rate_limited_admin_api_is_retried_then_refused_without_a_partial_report(
    gw: Gateway, sim: SimulatorThread, traffic: None
) -> None:
    sim.app.admin_failures.extend([429, 429, 503])
    assert run(gw)["complete"] is True  # retried after retry-after
    assert not sim.app.admin_failures
    sim.app.admin_failures.extend([429] * 20)
    day = TODAY.isoformat()
    r = cli(gw, "reconcile", "--from", day, "--to", day, "--format", "json")
    sim.app.admin_failures.clear()
    assert r.returncode == 1
    assert r.stdout == ""
    assert "reconciliation failed, no report written" in r.stderr and "HTTP 429" in r.stderr


def test_unreachable_admin_api_and_missing_or_wrong_admin_keys_are_clear_errors(
    gw: Gateway, sim: SimulatorThread, tmp_path: Path, traffic: None
) -> None:
    day = TODAY.isoformat()
    r = cli(gw, "reconcile", "--from", day, "--to", day, env={"OPENAI_ADMIN_KEY": ""})
    assert r.returncode == 1 and r.stdout == ""
    assert "reconcile.openai.admin_key_env: environment variable OPENAI_ADMIN_KEY is not set" in r.stderr
    r = cli(gw, "reconcile", "--from", day, "--to", day, env={"OPENAI_ADMIN_KEY": PROVIDER_ENV["SIM_OPENAI_KEY"]})
    assert r.returncode == 1 and "HTTP 401" in r.stderr and "admin key" in r.stderr
    config = gw.config_path.read_text().replace(
        "openai: {admin_key_env: OPENAI_ADMIN_KEY}",
        "openai: {admin_key_env: OPENAI_ADMIN_KEY, base_url: 'http://127.0.0.1:9', timeout_s: 2, max_retries: 1}",
    )
    path = tmp_path / "unreachable.yaml"
    path.write_text(config)
    r = cli(
        Gateway(path, gw.env, gw.listen, gw.metrics_listen),
        "reconcile",
        "--from",
        day,
        "--to",
        day,
        "--provider",
        "openai",
    )
    assert r.returncode == 1 and r.stdout == ""
    assert "openai: GET /v1/organization/" in r.stderr and "ClientConnectorError" in r.stderr


def test_rounded_provider_amounts_are_explained_as_rounding(gw: Gateway, sim: SimulatorThread, traffic: None) -> None:
    sim.app.cost_places = 1  # Anthropic states amounts to a tenth of a cent
    try:
        r = row(run(gw), "anthropic", "claude-sonnet-4-5")
    finally:
        sim.app.cost_places = None
    assert r["gap_usd"] != "0"
    assert r["causes"] == ["rounding"], r
    assert abs(Decimal(r["gap_usd"])) <= Decimal("0.0005") * 5  # half a tenth of a cent per cost line


def test_gemini_and_unknown_providers_cannot_be_reconciled(gw: Gateway, tmp_path: Path) -> None:
    from metergate.config import ConfigError, load_config

    for name, says in (("gemini", "Cloud Billing exports"), ("nope", "unknown provider")):
        path = tmp_path / f"{name}.yaml"
        path.write_text(gw.config_path.read_text() + f"  {name}: {{admin_key_env: X}}\n")
        with pytest.raises(ConfigError, match=says):
            load_config(path)


def test_serve_reconciles_finished_days_into_gauges(
    sim: SimulatorThread, tmp_path: Path, gw: Gateway, traffic: None
) -> None:
    """A replica with every_s set reconciles the finished days at start: yesterday's traffic (moved back a day on
    both sides) gives ratio and gap per provider, the bypass cost, and the configured tolerance."""
    db = tmp_path / "ledger.db"
    src = sqlite3.connect(str(gw.config_path.parent / "ledger.db"))
    src.backup(dst := sqlite3.connect(str(db)))
    src.close()
    dst.execute("UPDATE usage_records SET started_at = started_at - 86400")
    dst.commit()
    dst.close()
    for b in sim.app.billed():
        b.at -= 86400
    try:
        g = make_gateway(
            tmp_path,
            sim.url,
            env=ADMIN_ENV,
            extra=f'ledger: {{url: "sqlite:///{db}"}}\n'
            + PRICE_OVERRIDE
            + reconcile_yaml(", every_s: 3600, settle_s: 0, lookback_days: 2, tolerance_ratio: 0.05"),
        ).start()
        try:
            m = wait_for(
                lambda: (
                    (x := g.metrics()).sum("llm_reconciliation_last_success_timestamp_seconds", provider="anthropic")
                    and x
                ),
                timeout=20,
            )
            m = wait_for(
                lambda: (
                    (x := g.metrics()).sum("llm_reconciliation_last_success_timestamp_seconds", provider="openai") and x
                ),
                timeout=20,
            )
            assert m.sum("llm_reconciliation_ratio", provider="anthropic") == 1.0
            assert m.sum("llm_reconciliation_gap_usd", provider="anthropic") == 0.0
            assert m.sum("llm_reconciliation_tolerance_ratio", provider="openai") == 0.05
            assert m.sum("llm_reconciliation_ratio", provider="openai") > 1.05  # unpriced, drifted and cut requests
            assert m.sum("llm_reconciliation_bypass_usd", provider="openai") == pytest.approx(
                float(provider_cost(sim, "openai", key_id("openai", BYPASS_OPENAI))), rel=1e-12
            )
            assert m.sum("llm_reconciliation_errors_total", provider="openai") == 0
        finally:
            g.stop()
    finally:
        for b in sim.app.billed():
            b.at += 86400


def test_check_config_shows_what_is_reconciled(gw: Gateway) -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "metergate", "check-config", str(gw.config_path)],
        env={**gw.env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "Reconciled with the provider's bill" in out.stdout
    assert "$OPENAI_ADMIN_KEY" in out.stdout and "$ANTHROPIC_ADMIN_KEY" in out.stdout
