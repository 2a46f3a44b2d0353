"""Usage shapes beyond plain tokens, through a real gateway: streams whose usage never comes, cut streams.

Every figure is checked against what the simulated provider billed.
"""

from __future__ import annotations

import httpx
import openai

from metergate.simulator import SimulatorThread
from tests.conftest import KEYS, Gateway, wait_for

MESSAGES = [{"role": "user", "content": "shapes"}]


def oai(gw: Gateway, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEYS["search/ranker"], max_retries=0, default_headers=headers)


def test_a_server_that_ignores_include_usage_gets_an_undamaged_stream(
    gateway: Gateway, simulator: SimulatorThread, tag: str
) -> None:
    """Some OpenAI-compatible servers never send the usage chunk. The stream reaches the client whole, ending in
    [DONE] with no error event; the request is recorded as served with unknown usage."""
    before = gateway.metrics()
    with httpx.stream(
        "POST",
        f"{gateway.url}/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True},
        headers={
            "authorization": f"Bearer {KEYS['search/ranker']}",
            "x-sim-tag": tag,
            "x-sim-ignore-include-usage": "1",
        },
        timeout=30,
    ) as r:
        text = r.read().decode()
    assert r.status_code == 200
    assert text.endswith("data: [DONE]\n\n") and '"error"' not in text
    [bill] = simulator.app.billed(tag)
    assert bill.planned.output > 0  # the provider billed tokens it never reported
    labels = {"team": "search", "app": "ranker", "code": "200"}
    assert wait_for(lambda: gateway.metrics().delta(before, "llm_unmetered_requests_total", **labels) == 1)
    after = gateway.metrics()
    assert after.delta(before, "llm_errors_total", error_type="usage_missing", **labels) == 1
    assert after.delta(before, "llm_tokens_out", **labels) == 0


def test_the_official_sdk_reads_such_a_stream_to_the_end(gateway: Gateway, tag: str) -> None:
    chunks = list(
        oai(gateway, **{"x-sim-tag": tag, "x-sim-ignore-include-usage": "1"}).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True
        )
    )
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)


def test_a_stream_cut_after_its_first_figures_is_a_lower_bound_and_keeps_its_reservation(
    simulator: SimulatorThread, tmp_path, tag: str
) -> None:
    """Anthropic `message_start` seen, no `message_delta`: the input is known, the output is not. The row is
    recorded with what was reported, flagged incomplete and unmetered, and the block budget keeps the rest of the
    reservation (the output the provider may have billed) until the period ends."""
    import json
    import sqlite3

    import anthropic

    from tests.conftest import make_gateway

    gw = make_gateway(
        tmp_path,
        simulator.url,
        env={"METERGATE_ADMIN_TOKEN": "admin-token"},
        extra=(
            f'ledger: {{url: "sqlite:///{tmp_path}/ledger.db", flush_interval_s: 0.05}}\n'
            "budgets:\n  - {team: search, period: day, limit_usd: 100, action: block}\n"
        ),
    ).start()
    try:
        client = anthropic.Anthropic(
            base_url=gw.url,
            api_key=KEYS["search/ranker"],
            max_retries=0,
            default_headers={"x-sim-tag": tag, "x-sim-fail": "reset-after:2", "x-sim-input-tokens": "900"},
        )
        try:
            with client.messages.stream(model="claude-haiku-4-5", max_tokens=4000, messages=MESSAGES) as s:
                for _ in s:
                    pass
        except anthropic.APIError:
            pass
        admin = {"authorization": "Bearer admin-token"}
        budget = wait_for(
            lambda: next(
                (b for b in httpx.get(f"{gw.url}/admin/budgets", headers=admin).json() if b["reserved_usd"] > 0), None
            )
        )
        # The worst case was 4000 output tokens of claude-haiku-4-5 ($5/M) plus the estimated input; what stays
        # reserved is that worst case minus the known cost: 900 input tokens ($1/M), 1 output token so far.
        assert budget is not None and budget["reserved_usd"] >= (4000 * 5 - 900 - 5) / 1e6
        with sqlite3.connect(tmp_path / "ledger.db") as conn:
            row = wait_for(lambda: conn.execute("SELECT tokens_in, metered, details FROM usage_records").fetchone())
        assert row[0] == 900 and row[1] == 0 and "incomplete" in json.loads(row[2])["flags"]
    finally:
        gw.stop()
