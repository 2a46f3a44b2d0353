"""Attribution modes, self-hosted models priced from the config, and models nobody priced."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest

from metergate.simulator import Billed, free_port
from tests.conftest import KEYS, Gateway, Metrics, make_gateway, wait_for

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def gw(simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = make_gateway(
        tmp_path_factory.mktemp("attr"),
        simulator.url,
        server_extra=", trusted_headers: true",
        providers_extra=(
            f'  vllm: {{type: openai-compatible, base_url: "{simulator.url}", api_key_env: SIM_OPENAI_KEY}}\n'
        ),
        routes_first='  - {model: "llama-*", provider: vllm}\n  - {model: "qwen-*", provider: vllm}\n',
        extra=(
            "teams:\n  - {name: platform, apps: [batch-jobs]}\n"
            "prices:\n"
            "  - {model: llama-3.1-70b, input_mtok: 0.60, output_mtok: 0.80}\n"
            "  - {model: gpt-4o, provider: openai, input_mtok: 2.00, output_mtok: 8.00}  # negotiated\n"
        ),
    ).start()
    yield gateway
    gateway.stop()


def test_self_hosted_model_priced_from_config(gw: Gateway, simulator, tag: str) -> None:
    before = gw.metrics()
    c = openai.OpenAI(
        base_url=f"{gw.url}/v1",
        api_key=KEYS["search/ranker"],
        max_retries=0,
        default_headers={"x-sim-tag": tag, "x-sim-input-tokens": "1000", "x-sim-output-tokens": "500"},
    )
    raw = c.chat.completions.with_raw_response.create(model="llama-3.1-70b", messages=MESSAGES)
    assert Decimal(raw.headers["x-metergate-cost-usd"]) == Decimal("0.001")  # 1000 * 0.6/M + 500 * 0.8/M
    after = gw.metrics()
    assert after.delta(before, "llm_total_cost_usd", model="llama-3.1-70b", provider="vllm") == pytest.approx(0.001)
    assert after.delta(before, "llm_unpriced_requests_total") == 0


def test_override_wins_over_the_catalogue(gw: Gateway, simulator, tag: str) -> None:
    c = openai.OpenAI(
        base_url=f"{gw.url}/v1",
        api_key=KEYS["search/ranker"],
        max_retries=0,
        default_headers={"x-sim-tag": tag, "x-sim-input-tokens": "1000000", "x-sim-output-tokens": "0"},
    )
    raw = c.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    assert Decimal(raw.headers["x-metergate-cost-usd"]) == Decimal("2")  # not the catalogue's 2.50


def test_unpriced_model_is_counted_apart_and_logged_once(gw: Gateway, simulator, tag: str) -> None:
    before = gw.metrics()
    c = openai.OpenAI(
        base_url=f"{gw.url}/v1", api_key=KEYS["ads/bidder"], max_retries=0, default_headers={"x-sim-tag": tag}
    )
    for _ in range(3):
        c.chat.completions.create(model="qwen-unlisted-7b", messages=MESSAGES)
    after = gw.metrics()
    # A client-chosen name is not a label value; the series says `other` and the tokens are still counted.
    assert after.delta(before, "llm_unpriced_requests_total", team="ads", model="other", provider="vllm") == 3
    want = sum(b.reported.input for b in simulator.app.billed(tag))
    assert after.delta(before, "llm_tokens_in", team="ads", model="other") == want
    assert after.delta(before, "llm_total_cost_usd", team="ads", model="other") == 0
    assert wait_for(lambda: gw.log().count("no price for model 'qwen-unlisted-7b'") == 1)


def test_trusted_headers_attribute_requests_without_a_key(gw: Gateway, simulator, tag: str) -> None:
    before = gw.metrics()
    r = httpx.post(
        f"{gw.url}/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": MESSAGES},
        headers={"x-metergate-team": "platform", "x-metergate-app": "batch-jobs", "x-sim-tag": tag},
    )
    assert r.status_code == 200
    unknown = httpx.post(
        f"{gw.url}/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": MESSAGES},
        headers={"x-metergate-team": "made-up-team", "x-sim-tag": tag},
    )
    assert unknown.status_code == 200
    after = gw.metrics()
    assert after.delta(before, "llm_requests_total", team="platform", app="batch-jobs") == 1
    assert after.delta(before, "llm_requests_total", team="other") == 1  # bounded: not a config team
    # The attribution headers are the gateway's: they do not travel upstream.
    assert all("x-metergate-team" not in b.headers for b in simulator.app.billed(tag))


def test_trusted_headers_are_off_by_default(gateway: Gateway) -> None:
    r = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": MESSAGES},
        headers={"x-metergate-team": "search"},
    )
    assert r.status_code == 401


def test_demo_serves_attributed_priced_metrics_within_seconds(tmp_path) -> None:  # type: ignore[no-untyped-def]
    listen, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    started = time.time()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "metergate",
            "demo",
            "--listen",
            listen,
            "--metrics-listen",
            metrics,
            "--rate",
            "20",
            "--duration",
            "20",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "METERGATE_ADMIN_TOKEN"},
    )
    try:

        def teams_with_cost() -> set[str]:
            try:
                m = Metrics.parse(httpx.get(f"http://{metrics}/metrics", timeout=1).text)
            except httpx.HTTPError:
                return set()
            return {dict(ls)["team"] for (n, ls), v in m.samples.items() if n == "llm_total_cost_usd" and v > 0}

        teams = wait_for(lambda: len(teams_with_cost()) >= 3 and teams_with_cost(), timeout=15)
        assert teams, "the demo produced no priced traffic"
        assert time.time() - started < 15
        # Anyone can use the printed key.
        key = "mg-demo-search-ranker"
        reply = openai.OpenAI(base_url=f"http://{listen}/v1", api_key=key, max_retries=0).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES
        )
        assert reply.usage.total_tokens > 0
        # Its traffic names end users and customers: reports split by them (the ledger only, never labels).
        from metergate.demo import DEMO_ADMIN_TOKEN, DEMO_CUSTOMERS

        today = datetime.now(UTC).date().isoformat()

        def customers() -> set[str]:
            rows = httpx.get(
                f"http://{listen}/admin/reports",
                params={"from": today, "to": today, "by": "tag.customer,user"},
                headers={"authorization": f"Bearer {DEMO_ADMIN_TOKEN}"},
                timeout=5,
            ).json()
            return {r["tag.customer"] for r in rows if r["user"]}

        assert wait_for(lambda: set(DEMO_CUSTOMERS) <= customers(), timeout=15)
        assert "customer" not in httpx.get(f"http://{metrics}/metrics", timeout=5).text
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert f"http://{metrics}/metrics" in out and "mg-demo-search-ranker" in out
    # It says where its ledger is, and takes it away when it stops.
    ledger = re.search(r"Ledger: (\S+metergate-demo\.db)", out)
    assert ledger is not None, out
    assert not Path(ledger.group(1)).parent.exists()


def test_billed_dataclass_copy_is_independent() -> None:
    b = Billed(1, 2)
    c = b.copy()
    c.input = 5
    assert b.input == 1
