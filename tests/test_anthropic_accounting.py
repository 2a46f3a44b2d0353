"""The Anthropic Messages API through the gateway with the official SDK."""

from __future__ import annotations

from decimal import Decimal

import anthropic
import pytest

from tests.conftest import KEYS, Gateway, assert_metered, wait_for
from tests.pricesheet import cost

MODEL = "claude-haiku-4-5"
MESSAGES = [{"role": "user", "content": "Summarise our cache strategy."}]


def client(gw: Gateway, scope: str, tag: str, x_api_key: bool = False, **headers: str) -> anthropic.Anthropic:
    extra: dict[str, object] = {"x-sim-tag": tag, **headers}
    if x_api_key:  # older SDK releases send x-api-key instead of a Bearer token
        extra |= {"x-api-key": KEYS[scope], "Authorization": anthropic.Omit()}
    return anthropic.Anthropic(base_url=gw.url, api_key=KEYS[scope], max_retries=0, default_headers=extra)  # type: ignore[arg-type]


CACHE = {
    "x-sim-input-tokens": "5000",
    "x-sim-cached-tokens": "3000",
    "x-sim-cache-write-tokens": "1500",
    "x-sim-cache-write-1h-tokens": "500",
}


@pytest.mark.parametrize("x_api_key", [False, True])
def test_non_streaming_with_cache_reads_and_writes(gateway: Gateway, simulator, tag: str, x_api_key: bool) -> None:
    before = gateway.metrics()
    c = client(gateway, "support/assistant", tag, x_api_key, **CACHE)
    raw = c.messages.with_raw_response.create(model=MODEL, max_tokens=500, messages=MESSAGES)
    message = raw.parse()
    # Anthropic reports the uncached remainder as input_tokens...
    assert message.usage.input_tokens == 500
    bill = simulator.app.billed(tag)[0]
    # ...and the gateway counts all 5000 input tokens, each at its own rate.
    assert bill.reported.input == 5000
    assert Decimal(raw.headers["x-metergate-cost-usd"]) == cost(MODEL, bill.reported)
    assert_metered(gateway, before, [bill], MODEL, team="support", app="assistant")


@pytest.mark.parametrize("legacy_delta", [False, True])
def test_streaming_counts_message_start_and_delta_once(
    gateway: Gateway, simulator, tag: str, legacy_delta: bool
) -> None:
    before = gateway.metrics()
    headers = dict(CACHE, **({"x-sim-legacy-delta": "1"} if legacy_delta else {}))
    c = client(gateway, "support/assistant", tag, **headers)
    for _ in range(3):
        with c.messages.stream(model=MODEL, max_tokens=800, messages=MESSAGES) as s:
            for _ in s:
                pass
            final = s.get_final_message()
        assert final.usage.cache_read_input_tokens == 3000
    bills = simulator.app.billed(tag)
    assert len(bills) == 3 and all(b.completed for b in bills)
    assert_metered(gateway, before, bills, MODEL, team="support", app="assistant")


def test_count_tokens_is_passed_through_not_billed(gateway: Gateway, simulator, tag: str) -> None:
    before = gateway.metrics()
    result = client(gateway, "support/assistant", tag).messages.count_tokens(model=MODEL, messages=MESSAGES)
    assert result.input_tokens > 0
    after = gateway.metrics()
    assert after.delta(before, "llm_requests_total", endpoint="/v1/messages/count_tokens", team="support") == 1
    assert after.delta(before, "llm_tokens_in", team="support") == 0
    assert after.delta(before, "llm_total_cost_usd", team="support") == 0


@pytest.mark.parametrize("status", [429, 529])
def test_upstream_errors_keep_anthropic_shape(gateway: Gateway, simulator, tag: str, status: int) -> None:
    before = gateway.metrics()
    c = client(gateway, "support/assistant", tag, **{"x-sim-fail": f"status:{status}"})
    with pytest.raises(anthropic.APIStatusError) as info:
        c.messages.create(model=MODEL, max_tokens=100, messages=MESSAGES)
    assert info.value.status_code == status
    assert info.value.body["type"] == "error"
    after = gateway.metrics()
    assert after.delta(before, "llm_errors_total", team="support", code=str(status)) == 1


def test_overloaded_mid_stream_counts_what_was_reported(gateway: Gateway, simulator, tag: str) -> None:
    before = gateway.metrics()
    c = client(gateway, "support/assistant", tag, **{"x-sim-fail": "stream-error", "x-sim-input-tokens": "900"})
    with pytest.raises(anthropic.APIStatusError) as info:
        with c.messages.stream(model=MODEL, max_tokens=300, messages=MESSAGES) as s:
            for _ in s:
                pass
    assert "overloaded_error" in str(info.value)
    bill = simulator.app.billed(tag)[0]
    assert bill.reported.input == 900 and bill.reported.output == 1  # message_start's figures
    assert_metered(gateway, before, [bill], MODEL, team="support")
    after = gateway.metrics()
    assert after.delta(before, "llm_errors_total", team="support", error_type="upstream_stream_error") == 1


def test_client_disconnect_mid_stream(gateway: Gateway, simulator, tag: str) -> None:
    before = gateway.metrics()
    c = client(
        gateway,
        "support/assistant",
        tag,
        **{"x-sim-chunks": "25", "x-sim-chunk-delay-ms": "20", "x-sim-output-tokens": "250"},
    )
    with c.messages.stream(model=MODEL, max_tokens=1000, messages=MESSAGES) as s:
        for i, _ in enumerate(s):
            if i == 3:
                break
    assert wait_for(lambda: gateway.metrics().delta(before, "llm_requests_total", team="support", code="499") == 1)
    bill = simulator.app.billed(tag)[0]
    assert bill.completed and bill.reported.output == 250
    assert_metered(gateway, before, [bill], MODEL, team="support", code="499")
