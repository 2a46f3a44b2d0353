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
