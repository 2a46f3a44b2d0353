"""The web console at /console/, driven in Debian's Chromium by Playwright: login, every page, figures that equal
`metergate report`, keys created and revoked in the browser (and the official SDK's view of them), live refresh,
the security headers, CSRF, and phone-width rendering. Screenshots land in tests/console-screenshots/."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from datetime import time as dtime
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import openai
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from metergate.console import CSP
from tests.conftest import KEYS, Gateway, cli, make_gateway, sqlite_ledger, system_tool

TOKEN = "console-test-admin-token-5f1c2e"
TZ = "Europe/Paris"
SHOTS = Path(__file__).parent / "console-screenshots"
VENDORED = {  # tests/../src/metergate/console/static/vendor/VENDORED.md
    "uplot-1.6.32/uPlot.iife.min.js": "19c8d4c6ad88929a79f4ae49d6f7161566dfd0ba3d15cc495e974f787eb78f1f",
    "uplot-1.6.32/uPlot.min.css": "df630c6a8d6f8eeaff264b50f73ce5b114f646ffd9a0bb74f049b0a00135fa04",
    "uplot-1.6.32/LICENSE": "8f989229699b4fe2f1a0432d0e9edc338a8a911e250e2d1b01ecd770a5f5b1bd",
}


@pytest.fixture(scope="module")
def gw(simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("console")
    extra = (
        sqlite_ledger(tmp) + "attribution: {tags: [customer]}\n"
        "budgets:\n"
        "  - {team: search, period: month, limit_usd: 50, action: alert}\n"
        "  - {team: ads, period: day, limit_usd: 0.05, action: block}\n"
    )
    g = make_gateway(
        tmp, simulator.url, env={"METERGATE_ADMIN_TOKEN": TOKEN}, server_extra=f', timezone: "{TZ}"', extra=extra
    ).start()
    clients = {scope: openai.OpenAI(base_url=g.url + "/v1", api_key=key, max_retries=0) for scope, key in KEYS.items()}
    for i, (scope, model, tokens) in enumerate(
        [
            ("search/ranker", "gpt-4o", 120_000),
            ("search/indexer", "gpt-4o-mini", 90_000),
            ("ads/bidder", "gpt-4o", 15_000),
            ("support/assistant", "gpt-4.1", 64_000),
            ("search/ranker", "gpt-4o", 33_333),
        ]
    ):
        clients[scope].chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=500,
            extra_headers={
                "x-sim-input-tokens": str(tokens),
                "x-metergate-user": f"user-{i % 2}",
                "x-metergate-tags": f"customer=c{i % 2}",
            },
        )
    time.sleep(0.3)
    yield g
    g.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=system_tool("chromium"), args=["--no-sandbox"])
        yield b
        b.close()


def login(browser: Browser, gw: Gateway, width: int = 1280, height: int = 800) -> Page:
    page = browser.new_page(viewport={"width": width, "height": height})
    page.goto(gw.url + "/console/")
    page.fill("#token", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_selector("#team-spend")
    return page


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(exist_ok=True)
    page.wait_for_timeout(300)  # the chart draws on the next animation frame
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def cents(value: float) -> str:
    return f"${Decimal(str(value)).quantize(Decimal('0.01'), ROUND_HALF_EVEN):,}"


def test_wrong_token_is_refused_and_the_right_one_opens_the_console(gw: Gateway, browser: Browser) -> None:
    page = browser.new_page()
    page.goto(gw.url + "/console/")
    shot(page, "login")
    page.fill("#token", "not-the-token")
    page.click("button[type=submit]")
    assert page.locator("[role=alert]").inner_text() == "That is not the admin token."
    assert not page.context.cookies()
    page.fill("#token", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_selector("#team-spend")
    (cookie,) = page.context.cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert TOKEN not in cookie["value"] and TOKEN not in page.url
    assert page.evaluate("JSON.stringify(localStorage) + JSON.stringify(sessionStorage) + document.cookie") == "{}{}"
    page.close()


def test_each_teams_month_spend_is_in_one_row_and_equals_the_report(gw: Gateway, browser: Browser) -> None:
    page = login(browser, gw)
    today = datetime.now(ZoneInfo(TZ)).date()
    r = cli(
        gw,
        "report",
        "--from",
        today.replace(day=1).isoformat(),
        "--to",
        today.isoformat(),
        "--by",
        "team",
        "--format",
        "json",
    )
    assert r.returncode == 0, r.stderr
    report = {row["team"]: row["cost_usd"] for row in json.loads(r.stdout)}
    assert set(report) == {"search", "ads", "support"}
    for team, cost in report.items():
        row = page.locator(f'#team-spend tr[data-team="{team}"]')
        cells = row.locator("td").all_inner_texts()
        assert cells[0] == team
        assert cells[3] == cents(cost), (team, cells)  # month to date, to the cent
    budget = page.locator('#team-spend tr[data-team="search"] td').nth(5).inner_text()
    assert budget == "$50.00 (alert)"
    assert "Error rate" in page.locator(".cards").inner_text()
    shot(page, "overview")
    page.close()


def test_every_page_renders_and_is_reachable_by_keyboard(gw: Gateway, browser: Browser) -> None:
    page = login(browser, gw)
    requests: list[str] = []
    page.on("request", lambda req: requests.append(req.url))
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.select_option("#chart-controls select[name=by]", "model")
    page.select_option("#chart-controls select[name=bucket]", "hour")
    page.wait_for_selector("figcaption >> text=Hourly spend today, stacked by model")
    legend = page.locator(".u-legend").inner_text()
    assert "gpt-4o-mini" in legend and "gpt-4.1" in legend
    shot(page, "overview-hourly-by-model")
    # Tab through the header to "Budgets" and press Enter: the page changes without a mouse.
    page.locator('nav a[data-page="overview"]').focus()
    for _ in range(2):
        page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.dataset.page") == "budgets"
    page.keyboard.press("Enter")
    page.wait_for_selector("#budgets")
    assert page.locator('nav a[aria-current="page"]').inner_text() == "Budgets"
    ads = page.locator("#budgets tr", has_text="hard limit (blocks)")
    assert ads.count() == 1 and "ads" in ads.inner_text()
    shot(page, "budgets")
    page.goto(gw.url + "/console/#/team/search")
    page.wait_for_selector("#team-by-app")
    assert page.locator("#team-by-app").inner_text().count("ranker") == 1
    assert page.locator("#team-by-tag-customer").is_visible()
    csv_link = page.locator("a.download").first.get_attribute("href")
    assert csv_link is not None and csv_link.startswith("/console/admin/reports?") and "format=csv" in csv_link
    download = page.request.get(gw.url + csv_link)  # the browser's own cookie, as the link sends it
    assert download.status == 200 and download.text().startswith("app,requests,")
    # sortable: the cost column, highest first on the first click
    page.locator("#team-by-model th", has_text="Cost (USD)").click()
    costs = page.locator("#team-by-model tbody td:last-child").all_inner_texts()
    assert costs == sorted(costs, key=lambda c: -float(c.strip("$").replace(",", "")))
    shot(page, "team")
    page.goto(gw.url + "/console/#/requests")
    page.wait_for_selector("#requests")
    assert page.locator("#requests tbody tr").count() >= 5
    page.select_option("select[name=status]", "error")
    page.click("form.controls button[type=submit]")
    page.wait_for_selector("p.empty")
    shot(page, "requests")
    page.goto(gw.url + "/console/#/keys")
    page.wait_for_selector("#create-key")
    shot(page, "keys")
    assert not errors
    assert all(u.startswith(gw.url) or u.startswith("data:") for u in requests), requests
    page.close()


def test_a_key_made_in_the_browser_works_and_is_refused_once_revoked_there(gw: Gateway, browser: Browser) -> None:
    page = login(browser, gw)
    page.goto(gw.url + "/console/#/keys")
    page.fill("input[name=team]", "console")
    page.fill("input[name=app]", "browser")
    page.fill("input[name=name]", "made in the test")
    page.click("#create-key button[type=submit]")
    key = page.locator("#new-key").inner_text()
    assert key.startswith("mg-")
    assert key in page.locator(".notice pre").inner_text()  # the SDK snippet carries it
    shot(page, "key-created")
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
    assert client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], max_tokens=5
    )
    key_id = page.locator("#keys tr", has_text="made in the test").get_attribute("data-key")
    row = page.locator(f'#keys tr[data-key="{key_id}"]')
    row.locator("button", has_text="Revoke").click()
    row.locator(f'[data-confirm="{key_id}"]').click()
    page.wait_for_selector(f'#keys tr[data-key="{key_id}"] >> text=revoked')
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], max_tokens=5)
    page.close()


def test_figures_refresh_while_the_page_is_open(gw: Gateway, browser: Browser) -> None:
    page = login(browser, gw)
    assert page.locator('#team-spend tr[data-team="late"]').count() == 0
    key = httpx.post(
        gw.url + "/admin/keys", headers={"authorization": f"Bearer {TOKEN}"}, json={"team": "late", "app": "comer"}
    ).json()["key"]
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
    client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=5,
        extra_headers={"x-sim-input-tokens": "50000"},
    )
    page.wait_for_selector('#team-spend tr[data-team="late"]', timeout=20_000)  # no reload, no navigation
    page.close()


def test_phone_width_keeps_the_page_inside_the_screen(gw: Gateway, browser: Browser) -> None:
    page = login(browser, gw, 390, 844)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    shot(page, "overview-phone")
    page.close()


def test_headers_csrf_and_origin(gw: Gateway) -> None:
    page = httpx.get(gw.url + "/console/")
    assert page.headers["content-security-policy"] == CSP
    assert "script-src 'self'" in CSP and "unsafe-inline" not in CSP and "frame-ancestors 'none'" in CSP
    assert page.headers["x-content-type-options"] == "nosniff" and page.headers["x-frame-options"] == "DENY"
    assert page.headers["cache-control"] == "no-store"
    login = httpx.post(gw.url + "/console/login", data={"token": TOKEN}, headers={"origin": gw.url})
    assert login.status_code == 303
    cookie = login.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "Path=/console/" in cookie  # never sent with the LLM traffic forwarded to providers
    jar = {"metergate_console": login.cookies["metergate_console"]}
    # the cookie reads the admin API under /console/admin/, and only there
    assert httpx.get(gw.url + "/console/admin/overview", cookies=jar).status_code == 200
    assert httpx.get(gw.url + "/admin/overview", cookies=jar).status_code == 401
    # ...and changes nothing without the session's CSRF token, or from another origin
    no_csrf = httpx.post(gw.url + "/console/admin/keys", cookies=jar, json={"team": "x", "app": "y"})
    assert no_csrf.status_code == 403
    shell = httpx.get(gw.url + "/console/", cookies=jar).text
    csrf = shell.split('name="csrf-token" content="')[1].split('"')[0]
    other = httpx.post(
        gw.url + "/console/admin/keys",
        cookies=jar,
        json={"team": "x", "app": "y"},
        headers={"x-csrf-token": csrf, "origin": "https://evil.example"},
    )
    assert other.status_code == 403
    ok = httpx.post(
        gw.url + "/console/admin/keys", cookies=jar, json={"team": "x", "app": "y"}, headers={"x-csrf-token": csrf}
    )
    assert ok.status_code == 201
    assert ok.headers["cache-control"] == "no-store" and ok.headers["x-content-type-options"] == "nosniff"
    forged = httpx.post(gw.url + "/console/login", data={"token": TOKEN}, headers={"origin": "https://evil.example"})
    assert forged.status_code == 403 and "set-cookie" not in forged.headers
    tampered = jar["metergate_console"][:-1] + ("0" if jar["metergate_console"][-1] != "0" else "1")
    assert httpx.get(gw.url + "/console/admin/overview", cookies={"metergate_console": tampered}).status_code == 401
    odd = httpx.get(gw.url + "/console/admin/overview", headers={"cookie": 'metergate_console="\\351x"'})
    assert odd.status_code == 401  # a malformed cookie is just not a session
    # logging out ends the session on the server too, not only in the browser
    out = httpx.post(gw.url + "/console/logout", cookies=jar, data={"csrf": csrf})
    assert out.status_code == 303
    assert httpx.get(gw.url + "/console/admin/overview", cookies=jar).status_code == 401


def test_vendored_assets_are_the_pinned_release() -> None:
    root = Path(__file__).parent.parent / "src" / "metergate" / "console" / "static" / "vendor"
    for name, digest in VENDORED.items():
        assert hashlib.sha256((root / name).read_bytes()).hexdigest() == digest, name
    assert "uplot-1.6.32" in (root / "VENDORED.md").read_text()


def test_series_and_requests_agree_with_the_ledger(gw: Gateway) -> None:
    """The chart's points add up to the report's totals; the requests table is the ledger's newest rows."""
    auth = {"authorization": f"Bearer {TOKEN}"}
    today = datetime.now(ZoneInfo(TZ)).date()
    span = {"from": today.replace(day=1).isoformat(), "to": today.isoformat()}
    report = httpx.get(gw.url + "/admin/reports", params={**span, "by": "team"}, headers=auth).json()
    for bucket in ("day", "hour"):
        if bucket == "hour":
            span = {"from": today.isoformat(), "to": today.isoformat()}
        series = httpx.get(gw.url + "/admin/series", params={**span, "bucket": bucket, "by": "team"}, headers=auth)
        assert series.status_code == 200, series.text
        doc = series.json()
        tz = ZoneInfo(TZ)
        midnight = datetime.combine(today, dtime(0), tzinfo=tz)
        hours = int(
            (datetime.combine(today + timedelta(days=1), dtime(0), tzinfo=tz) - midnight).total_seconds() // 3600
        )
        assert len(doc["buckets"]) == (hours if bucket == "hour" else today.day)  # every bucket, spend or not
        per_team: dict[str, float] = {}
        for p in doc["points"]:
            assert p["ts"] in doc["buckets"]
            per_team[p["team"]] = per_team.get(p["team"], 0.0) + p["cost_usd"]
        for row in report:
            assert per_team[row["team"]] == pytest.approx(row["cost_usd"], abs=1e-9)
    rows = httpx.get(gw.url + "/admin/requests", params={"team": "search", "limit": 2}, headers=auth).json()
    assert len(rows) == 2 and {r["team"] for r in rows} == {"search"}
    assert rows[0]["started_at"] >= rows[1]["started_at"]
    assert {"cost_usd", "tokens_in", "latency_s", "error_type", "model", "code"} <= set(rows[0])
    bad = httpx.get(gw.url + "/admin/requests", params={"limit": "99999"}, headers=auth)
    assert bad.status_code == 400


# Last: it leaves this address locked out of the admin API for a minute.
def test_guessing_tokens_is_slowed_per_address_not_for_everyone(gw: Gateway) -> None:
    tries = [httpx.post(gw.url + "/console/login", data={"token": "guess"}).status_code for _ in range(21)]
    assert tries[0] == 401 and tries[-1] == 429 and set(tries) == {401, 429}  # 20 wrong tries a minute at most
    assert httpx.post(gw.url + "/console/login", data={"token": TOKEN}).status_code == 429  # this address waits
    bad = [httpx.get(gw.url + "/admin/keys", headers={"authorization": "Bearer guess"}).status_code for _ in range(21)]
    assert bad[:20] == [401] * 20 and bad[20] == 429
