"""Budget overrides that expire and manual resets (issue 11), from the CLI and the admin API, recorded in the
ledger with who and when, applied by every replica."""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import openai
import pytest

from metergate.simulator import Billed
from tests.conftest import KEYS, Gateway, admin, cli, make_gateway, wait_for
from tests.pricesheet import cost

TOKEN = "adjust-admin-token"
MESSAGES = [{"role": "user", "content": "budget"}]
ONE = cost("gpt-4o", Billed(input=20, output=1000))
HEADERS = {"x-sim-input-tokens": "20", "x-sim-output-tokens": "1000"}
BUDGETS = (
    f"  - {{team: search, period: day, limit_usd: {ONE * 2}, action: block}}\n"
    f"  - {{team: ads, user: '*', period: day, limit_usd: {ONE}, action: block}}\n"
)


def adjusted_gateway(simulator, tmp_path: Path, ledger: str | None = None) -> Gateway:  # type: ignore[no-untyped-def]
    return make_gateway(
        tmp_path,
        simulator.url,
        env={"METERGATE_ADMIN_TOKEN": TOKEN},
        extra=(
            f'ledger: {{url: "{ledger or f"sqlite:///{tmp_path}/ledger.db"}", flush_interval_s: 0.05}}\n'
            "budgets:\n" + BUDGETS
        ),
    ).start()


def admitted(gw: Gateway, scope: str = "search/ranker", user: str | None = None) -> bool:
    c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEYS[scope], max_retries=0)
    try:
        c.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            max_tokens=1000,
            extra_headers=HEADERS,
            **({"user": user} if user else {}),
        )
    except openai.RateLimitError:
        return False
    return True


def status(gw: Gateway, budget_id: str) -> dict:  # type: ignore[type-arg]
    return next(r for r in admin(gw, "GET", "/admin/budgets").json() if r["id"] == budget_id)


def test_override_from_the_cli_reaches_the_running_gateway_and_expires(simulator, tmp_path: Path) -> None:
    gw = adjusted_gateway(simulator, tmp_path)
    try:
        assert admitted(gw) and admitted(gw) and not admitted(gw)
        until = (datetime.now().astimezone() + timedelta(seconds=25)).isoformat(timespec="seconds")
        made = cli(
            gw,
            "budgets",
            "override",
            "--team",
            "search",
            "--period",
            "day",
            "--limit-usd",
            str(ONE * 4),
            "--until",
            until,
            "--reason",
            "launch day",
            env={"USER": "dana"},
        )
        assert made.returncode == 0, made.stderr
        assert "override adj_" in made.stdout and "search/*/day" in made.stdout
        # The gateway reads overrides from the ledger at its next refresh (every 15 s).
        assert wait_for(lambda: status(gw, "search/*/day")["override"] is not None, timeout=20)
        row = status(gw, "search/*/day")
        assert row["limit_usd"] == pytest.approx(float(ONE * 4)) and row["configured_limit_usd"] == pytest.approx(
            float(ONE * 2)
        )
        assert row["override"]["by"] == "dana" and row["override"]["reason"] == "launch day"
        assert admitted(gw) and admitted(gw)
        refused = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEYS["search/ranker"], max_retries=0)
        with pytest.raises(openai.RateLimitError) as info:
            refused.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=1000, extra_headers=HEADERS)
        assert "(overridden until" in info.value.message
        # The override ends at its time: the configured limit is back, without anyone doing anything.
        assert wait_for(lambda: status(gw, "search/*/day")["override"] is None, timeout=30)
        assert status(gw, "search/*/day")["limit_usd"] == pytest.approx(float(ONE * 2))
        assert not admitted(gw)
        # The ledger keeps the record: who, when, why, until when.
        db = sqlite3.connect(tmp_path / "ledger.db")
        (kind, counter, by, reason, limit) = db.execute(
            "SELECT kind, counter, created_by, reason, limit_usd FROM budget_adjustments"
        ).fetchone()
        assert (kind, counter, by, reason) == ("override", "search/*/day", "dana", "launch day")
        assert Decimal(limit) == ONE * 4
    finally:
        gw.stop()


def test_reset_and_override_through_the_admin_api_apply_at_once(simulator, tmp_path: Path) -> None:
    gw = adjusted_gateway(simulator, tmp_path)
    try:
        assert admitted(gw) and admitted(gw) and not admitted(gw)
        reset = admin(gw, "POST", "/admin/budgets/resets", json={"budget": "search/*/day", "by": "ops", "reason": "x"})
        assert reset.status_code == 201, reset.text
        assert reset.json()["set_aside_usd"] == pytest.approx(float(ONE * 2))
        # Counts from zero for the rest of the day: two more, then spent again.
        assert admitted(gw) and admitted(gw) and not admitted(gw)
        row = status(gw, "search/*/day")
        assert row["spent_usd"] == pytest.approx(float(ONE * 2)) and row["reset"]["by"] == "ops"
        # Per-user budgets: one user's override leaves the others at the configured limit.
        assert admitted(gw, "ads/bidder", "ann") and not admitted(gw, "ads/bidder", "ann")
        assert admitted(gw, "ads/bidder", "bob") and not admitted(gw, "ads/bidder", "bob")
        until = (datetime.now().astimezone() + timedelta(hours=1)).isoformat()
        made = admin(
            gw,
            "POST",
            "/admin/budgets/overrides",
            json={"budget": "ads/*/day;user=*|ann", "limit_usd": float(ONE * 3), "until": until},
        )
        assert made.status_code == 201, made.text
        assert admitted(gw, "ads/bidder", "ann") and admitted(gw, "ads/bidder", "ann")
        assert not admitted(gw, "ads/bidder", "ann") and not admitted(gw, "ads/bidder", "bob")
        # A second override replaces the first; ending it early brings back the first, still running.
        later = admin(
            gw,
            "POST",
            "/admin/budgets/overrides",
            json={"budget": "ads/*/day;user=*|ann", "limit_usd": float(ONE * 9), "until": until},
        )
        assert status(gw, "ads/*/day;user=*|ann")["limit_usd"] == pytest.approx(float(ONE * 9))
        assert admin(gw, "DELETE", f"/admin/budgets/overrides/{later.json()['id']}").status_code == 200
        assert status(gw, "ads/*/day;user=*|ann")["limit_usd"] == pytest.approx(float(ONE * 3))
        # Ended early: the configured limit is back at once.
        assert admin(gw, "DELETE", f"/admin/budgets/overrides/{made.json()['id']}").status_code == 200
        assert admin(gw, "DELETE", f"/admin/budgets/overrides/{made.json()['id']}").status_code == 404
        listed = admin(gw, "GET", "/admin/budgets/adjustments").json()
        assert [a["kind"] for a in listed] == ["reset", "override", "override"]
        assert all(a["ended_at"] is not None for a in listed[1:])
        # Clear refusals: no such budget, a whole per-user budget, an override in the past, a bad limit.
        for path, body, says in [
            ("resets", {"budget": "nobody/*/day"}, "no budget 'nobody/*/day'"),
            ("resets", {"budget": "ads/*/day;user=*"}, "reset one user at a time"),
            ("overrides", {"budget": "search/*/day", "limit_usd": 1, "until": "2001-01-01T00:00"}, "in the future"),
            ("overrides", {"budget": "search/*/day", "limit_usd": -1, "until": until}, "limit_usd"),
            ("overrides", {"budget": "search/*/day", "limit_usd": 1, "until": "2100-01-01T00:00"}, "within a year"),
        ]:
            r = admin(gw, "POST", f"/admin/budgets/{path}", json=body)
            assert r.status_code == 400 and says in r.json()["error"]["message"], (body, r.text)
    finally:
        gw.stop()


def test_cli_refuses_what_it_cannot_do(simulator, tmp_path: Path) -> None:
    gw = adjusted_gateway(simulator, tmp_path)
    try:
        later = (datetime.now() + timedelta(hours=1)).isoformat()
        for args, says in [
            (
                ["override", "--team", "nobody", "--period", "day", "--limit-usd", "5", "--until", later],
                "no day budget",
            ),
            (["override", "--team", "search", "--limit-usd", "5", "--until", later], "--period"),
            (["override", "--team", "search", "--period", "day", "--limit-usd", "5", "--until", "soon"], "--until"),
            (["reset", "--team", "ads", "--user", "*", "--period", "day"], "reset one user at a time"),
        ]:
            result = cli(gw, "budgets", *args)
            assert result.returncode == 1 and says in result.stderr and "Traceback" not in result.stderr, (args, result)
        ok = cli(gw, "budgets", "reset", "--team", "ads", "--user", "zoe", "--period", "day", "--by", "lee")
        assert ok.returncode == 0 and "ads/*/day;user=*|zoe" in ok.stdout, ok.stderr
        listed = cli(gw, "budgets", "list")
        assert listed.returncode == 0 and "search/*/day" in listed.stdout
    finally:
        gw.stop()


def test_replicas_share_overrides_and_resets(simulator, tmp_path: Path, pg_url: str) -> None:
    gateways = [adjusted_gateway(simulator, tmp_path, ledger=pg_url) for _ in range(2)]
    a, b = gateways
    try:
        assert admitted(a) and admitted(b) and not admitted(a) and not admitted(b)
        reset = admin(a, "POST", "/admin/budgets/resets", json={"budget": "search/*/day", "by": "ops"})
        assert reset.status_code == 201 and reset.json()["set_aside_usd"] == pytest.approx(float(ONE * 2))
        # The other replica applies it at its next refresh; then the two together admit exactly two more.
        assert wait_for(lambda: status(b, "search/*/day")["reset"] is not None, timeout=20)
        admits = [admitted(g) for g in (a, b, a, b)]
        assert admits == [True, True, False, False]
        time.sleep(0.2)
        spent = {round(status(g, "search/*/day")["spent_usd"], 9) for g in gateways}
        assert wait_for(
            lambda: {round(status(g, "search/*/day")["spent_usd"], 9) for g in gateways} == {round(float(ONE * 2), 9)},
            timeout=20,
        ), spent
        print(json.dumps(status(a, "search/*/day")["reset"]))
    finally:
        for g in gateways:
            g.stop()
