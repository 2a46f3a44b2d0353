"""Keys (CLI and admin API), the admin API itself, reports and chargeback statements that reconcile."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import KEYS, Gateway, admin, cli, make_gateway, wait_for
from tests.pricesheet import cost

TOKEN = "test-admin-token"
MESSAGES = [{"role": "user", "content": "admin"}]


@pytest.fixture(scope="module")
def gw(simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("admin")
    gateway = make_gateway(
        tmp,
        simulator.url,
        env={"METERGATE_ADMIN_TOKEN": TOKEN},
        extra=(
            f'ledger: {{url: "sqlite:///{tmp}/ledger.db", flush_interval_s: 0.1}}\n'
            "budgets:\n  - {team: ads, period: month, limit_usd: 100, action: alert}\n"
        ),
    ).start()
    yield gateway
    gateway.stop()


def works(gw: Gateway, key: str) -> bool:
    c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0)
    try:
        c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    except openai.AuthenticationError:
        return False
    return True


def test_admin_api_needs_the_token(gw: Gateway, simulator, tmp_path: Path) -> None:
    assert httpx.get(f"{gw.url}/admin/keys").status_code == 401
    assert httpx.get(f"{gw.url}/admin/keys", headers={"authorization": "Bearer nope"}).status_code == 401
    assert admin(gw, "GET", "/admin/keys").status_code == 200
    off = make_gateway(tmp_path, simulator.url).start()  # no METERGATE_ADMIN_TOKEN in its environment
    try:
        r = httpx.get(f"{off.url}/admin/keys", headers={"authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 404 and "METERGATE_ADMIN_TOKEN" in r.json()["error"]["message"]
    finally:
        off.stop()


def test_keys_created_with_the_cli_work_on_the_running_gateway_and_revoke(gw: Gateway) -> None:
    made = cli(gw, "keys", "create", "--team", "platform", "--app", "batch", "--name", "nightly jobs")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    assert key.startswith("mg-")
    assert wait_for(lambda: works(gw, key), timeout=15)  # picked up without a restart
    listed = cli(gw, "keys", "list")
    assert "nightly jobs" in listed.stdout and key not in listed.stdout  # only hash prefixes are shown
    key_id = next(line.split()[1] for line in listed.stdout.splitlines() if "nightly jobs" in line)
    assert cli(gw, "keys", "revoke", key_id).returncode == 0
    assert wait_for(lambda: not works(gw, key), timeout=15)
    assert cli(gw, "keys", "revoke", key_id).returncode == 1  # already revoked
    # Its traffic was attributed to its own team, not to `other`.
    assert gw.metrics().sum("llm_requests_total", team="platform", app="batch") >= 1


def test_keys_through_the_admin_api(gw: Gateway) -> None:
    created = admin(gw, "POST", "/admin/keys", json={"team": "ml", "app": "eval"})
    assert created.status_code == 201
    body = created.json()
    assert works(gw, body["key"])  # effective at once on the replica that created it
    keys = admin(gw, "GET", "/admin/keys").json()
    assert any(k["id"] == body["id"] and "key" not in k for k in keys)
    assert admin(gw, "DELETE", f"/admin/keys/{body['id']}").status_code == 200
    assert not works(gw, body["key"])
    assert admin(gw, "DELETE", f"/admin/keys/{body['id']}").status_code == 404
    bad = admin(gw, "POST", "/admin/keys", json={"team": "has spaces", "app": "x"})
    assert bad.status_code == 400 and "team: String should match pattern" in bad.json()["error"]["message"]
    # Names metergate uses itself for what it cannot attribute are not anyone's.
    reserved = admin(gw, "POST", "/admin/keys", json={"team": "ml", "app": "unauthenticated"})
    assert reserved.status_code == 400 and "app: 'unauthenticated' is reserved" in reserved.json()["error"]["message"]


@pytest.mark.parametrize(
    ("team", "app", "says"),
    [
        ("bad team", "x", "team: String should match pattern"),
        ("other", "x", "team: 'other' is reserved by metergate"),
        ("ml", "unauthenticated", "app: 'unauthenticated' is reserved by metergate"),
    ],
)
def test_cli_refuses_keys_it_could_not_attribute(gw: Gateway, team: str, app: str, says: str) -> None:
    result = cli(gw, "keys", "create", "--team", team, "--app", app)
    assert result.returncode == 1 and says in result.stderr and "Traceback" not in result.stderr


def test_openapi_schema_describes_every_route(gw: Gateway) -> None:
    from metergate.admin import AdminApi

    doc = httpx.get(f"{gw.url}/admin/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    routes = {(m.lower(), p) for m, p, _ in AdminApi(None, None, lambda *_: None).routes}  # type: ignore[arg-type]
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert routes - {("get", "/admin/openapi.json")} == documented
    for name in ("KeyCreate", "KeyCreated", "BudgetStatus", "ReportRow"):
        assert name in doc["components"]["schemas"]


def test_budgets_and_spend_endpoints(gw: Gateway) -> None:
    budgets = admin(gw, "GET", "/admin/budgets").json()
    assert budgets[0]["id"] == "ads/*/month" and budgets[0]["resets_at"].startswith(
        (date.today().replace(day=28) + timedelta(days=4)).replace(day=1).isoformat()
    )
    spend = admin(gw, "GET", "/admin/spend", params={"period": "day"}).json()
    assert {"team", "app", "period", "spent_usd", "forecast_usd"} <= set(spend[0])
    assert admin(gw, "GET", "/admin/spend", params={"period": "decade"}).status_code == 400


def test_reports_reconcile_with_the_provider_and_the_counters(gw: Gateway, simulator, tag: str) -> None:
    before = gw.metrics()
    for i, scope in enumerate(["search/ranker", "search/indexer", "ads/bidder", "support/assistant"] * 3):
        c = openai.OpenAI(
            base_url=f"{gw.url}/v1",
            api_key=KEYS[scope],
            max_retries=0,
            default_headers={"x-sim-tag": f"{tag}|{scope}", "x-sim-cached-tokens": str(i)},
        )
        c.chat.completions.create(model="gpt-4o" if i % 2 else "gpt-4o-mini", messages=MESSAGES, stream=i % 3 == 0)
    after = gw.metrics()
    today = date.today().isoformat()
    out = cli(gw, "report", "--from", today, "--to", today, "--by", "team,app,model", "--format", "json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    api_rows = admin(gw, "GET", "/admin/reports", params={"from": today, "to": today, "by": "team,app,model"}).json()
    assert rows == api_rows
    want: dict[tuple[str, str, str], Decimal] = {}
    for b in simulator.app.billed():
        if b.tag and b.tag.startswith(tag):
            team, app = b.tag.split("|")[1].split("/")
            want[(team, app, b.model)] = want.get((team, app, b.model), Decimal(0)) + cost(b.model, b.reported)
    for (team, app, model), money in want.items():
        row = next(r for r in rows if (r["team"], r["app"], r["model"]) == (team, app, model))
        delta = after.delta(before, "llm_total_cost_usd", team=team, app=app, model=model)
        # Rows span other tests' traffic too; the part this test sent is exactly the counters' delta.
        assert row["cost_usd"] >= float(money) - 1e-12
        assert abs(Decimal(repr(delta)) - money) <= Decimal("1e-12")
    total = cli(gw, "report", "--from", today, "--to", today, "--by", "team", "--format", "csv")
    table = list(csv.DictReader(io.StringIO(total.stdout)))
    assert table[-1]["team"] == "TOTAL"
    assert Decimal(table[-1]["cost_usd"]) == sum(Decimal(r["cost_usd"]) for r in table[:-1])
    # The report's totals are the gateway's counters' totals: everything this gateway served to a key is in the
    # ledger (requests without a valid key are counted in the metrics only).
    assert abs(float(table[-1]["cost_usd"]) - after.sum("llm_total_cost_usd")) < 1e-9
    keyed = after.sum("llm_requests_total") - after.sum("llm_requests_total", team="unauthenticated")
    assert int(table[-1]["requests"]) == keyed


def test_chargeback_statement_totals_match_the_report(gw: Gateway, simulator, tag: str) -> None:
    c = openai.OpenAI(
        base_url=f"{gw.url}/v1", api_key=KEYS["search/indexer"], max_retries=0, default_headers={"x-sim-tag": tag}
    )
    c.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    month = date.today().strftime("%Y-%m")
    md = cli(gw, "chargeback", "--team", "search", "--month", month)
    assert md.returncode == 0, md.stderr
    assert md.stdout.startswith(f"# LLM chargeback statement: team search, {month}")
    as_csv = cli(gw, "chargeback", "--team", "search", "--month", month, "--format", "csv").stdout
    rows = list(csv.DictReader(io.StringIO(as_csv)))
    total = Decimal(rows[-1]["cost_usd"])
    assert f"**Total: ${total:,.6f}**" in md.stdout
    report = cli(
        gw, "report", "--from", f"{month}-01", "--to", date.today().isoformat(), "--by", "team", "--format", "json"
    )
    search = next(r for r in json.loads(report.stdout) if r["team"] == "search")
    assert abs(search["cost_usd"] - float(total)) < 1e-12
    api = admin(gw, "GET", "/admin/reports/chargeback", params={"team": "search", "month": month})
    assert api.text == md.stdout


def test_report_refuses_bad_arguments(gw: Gateway) -> None:
    assert cli(gw, "report", "--from", "2026-13-01", "--to", "2026-12-01").returncode == 1
    bad = cli(gw, "report", "--from", "2026-11-02", "--to", "2026-11-01")
    assert bad.returncode == 1 and "before" in bad.stderr
    assert cli(gw, "report", "--from", "2026-11-01", "--to", "2026-11-02", "--by", "color").returncode == 1
    empty = cli(gw, "report", "--from", "2026-11-01", "--to", "2026-11-02", "--by", ",")
    assert empty.returncode == 1 and "--by needs at least one" in empty.stderr
    far = cli(gw, "report", "--from", "2026-01-01", "--to", "9999-12-31")
    assert far.returncode == 1 and "outside the dates" in far.stderr and "Traceback" not in far.stderr
    assert admin(gw, "GET", "/admin/reports?from=2026-01-01&to=9999-12-31").status_code == 400


def test_admin_reports_refuse_unknown_formats(gw: Gateway) -> None:
    r = admin(gw, "GET", "/admin/reports?from=2026-11-01&to=2026-11-02&format=table")
    assert r.status_code == 400 and "format must be json or csv" in r.json()["error"]["message"]
    r = admin(gw, "GET", "/admin/reports/chargeback?team=ads&month=2026-11&format=json")
    assert r.status_code == 400 and "format must be markdown or csv" in r.json()["error"]["message"]


def test_cli_never_starts_a_new_sqlite_ledger(gw: Gateway, tmp_path: Path) -> None:
    # The same config with a relative path, run from a directory without that database: a key stored there
    # would never reach the gateway, so the CLI refuses and says where it looked.
    config = tmp_path / "relative.yaml"
    text = gw.config_path.read_text()
    config.write_text(re.sub(r'url: "sqlite:///[^"]+"', 'url: "sqlite:///ledger.db"', text))
    for args in (["keys", "create", "--team", "ads", "--app", "bidder"], ["keys", "list"], ["forecast"]):
        result = subprocess.run(
            [sys.executable, "-m", "metergate", *args, "--config", str(config)],
            env=gw.env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 1, args
        assert f"{tmp_path / 'ledger.db'} does not exist" in result.stderr, result.stderr
    assert not (tmp_path / "ledger.db").exists()


def test_chargeback_refuses_bad_arguments(gw: Gateway, tmp_path: Path) -> None:
    for args, says in [
        (("--month", "9999-12"), "expected a month like 2026-11"),
        (("--month", "2026-1"), "expected a month like 2026-11"),
        (("--month", "2026-11", "--format", "json"), "choose markdown or csv"),
        (("--month", "2026-11", "--output", str(tmp_path / "missing" / "x.md")), "cannot write --output"),
    ]:
        result = cli(gw, "chargeback", "--team", "ads", *args)
        assert result.returncode == 1, args
        assert says in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
