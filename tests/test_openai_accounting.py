"""OpenAI APIs through the gateway with the official SDK: every token and cent checked against the provider."""

from __future__ import annotations

from decimal import Decimal

import httpx
import openai
import pytest

from tests.conftest import KEYS, Gateway, assert_metered, expected, wait_for
from tests.pricesheet import cost


def client(gw: Gateway, scope: str, tag: str, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{gw.url}/v1",
        api_key=KEYS[scope],
        max_retries=0,
        default_headers={"x-sim-tag": tag, **headers},
    )


MESSAGES = [{"role": "user", "content": "Write a haiku about metering."}]


def test_chat_non_streaming_tokens_cached_reasoning_and_cost(gateway: Gateway, simulator, tag: str) -> None:
    before = gateway.metrics()
    c = client(gateway, "search/ranker", tag, **{"x-sim-cached-tokens": "1024", "x-sim-input-tokens": "3000"})
    raw = c.chat.completions.with_raw_response.create(
        model="o4-mini",
        messages=MESSAGES,
        extra_headers={"x-sim-reasoning-tokens": "200", "x-sim-output-tokens": "400"},
    )
    completion = raw.parse()
    assert completion.usage.prompt_tokens == 3000
    bills = simulator.app.billed(tag)
    assert len(bills) == 1 and bills[0].reported.cached == 1024 and bills[0].reported.reasoning == 200
    # The cost header is this request's own price.
    assert Decimal(raw.headers["x-metergate-cost-usd"]) == cost("o4-mini", bills[0].reported)
    for _ in range(4):
        c.chat.completions.create(model="o4-mini", messages=MESSAGES)
    assert_metered(gateway, before, simulator.app.billed(tag), "o4-mini", team="search", app="ranker")
    after = gateway.metrics()
    assert after.delta(before, "llm_requests_total", model="o4-mini", team="search", code="200") == 5


def test_chat_streaming_hides_the_usage_it_asked_for(gateway: Gateway, simulator, tag: str) -> None:
    before = gateway.metrics()
    c = client(gateway, "ads/bidder", tag, **{"x-sim-cached-tokens": "64"})
    chunks = list(c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
    # The client did not ask for usage: no usage chunk reaches it.
    assert chunks and all(ch.choices for ch in chunks)
    assert all(ch.usage is None for ch in chunks)
    # ...but the gateway asked the provider for it.
    bill = simulator.app.billed(tag)[0]
    assert bill.stream and bill.completed
    # And on the wire the client sees no trace of it, not even `"usage":null`.
    body = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        headers={**gateway.headers("ads/bidder"), "x-sim-tag": tag},
        json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True},
    ).text
    assert '"usage"' not in body and body.rstrip().endswith("data: [DONE]")
    assert_metered(gateway, before, simulator.app.billed(tag), "gpt-4o-mini", team="ads", app="bidder")
    after = gateway.metrics()
    assert after.delta(before, "llm_time_to_first_token_seconds_count", team="ads", model="gpt-4o-mini") == 2


def test_chat_streaming_client_that_asked_for_usage_gets_it(gateway: Gateway, simulator, tag: str) -> None:
    before = gateway.metrics()
    c = client(gateway, "ads/bidder", tag)
    chunks = list(
        c.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    usage_chunks = [ch for ch in chunks if not ch.choices]
    assert len(usage_chunks) == 1
    bill = simulator.app.billed(tag)[0]
    assert usage_chunks[0].usage.prompt_tokens == bill.reported.input
    assert_metered(gateway, before, [bill], "gpt-4o-mini", team="ads", app="bidder")


@pytest.mark.parametrize("stream", [False, True])
def test_legacy_completions(gateway: Gateway, simulator, tag: str, stream: bool) -> None:
    before = gateway.metrics()
    c = client(gateway, "support/assistant", tag)
    result = c.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi", max_tokens=50, stream=stream)
    if stream:
        chunks = list(result)
        assert all(ch.choices for ch in chunks)
    assert_metered(gateway, before, simulator.app.billed(tag), "gpt-3.5-turbo-instruct", team="support")


@pytest.mark.parametrize("stream", [False, True])
def test_responses_api(gateway: Gateway, simulator, tag: str, stream: bool) -> None:
    before = gateway.metrics()
    c = client(gateway, "search/indexer", tag, **{"x-sim-cached-tokens": "10", "x-sim-reasoning-tokens": "30"})
    if stream:
        with c.responses.stream(model="o4-mini", input="Explain prompt caching") as s:
            for _ in s:
                pass
            final = s.get_final_response()
    else:
        final = c.responses.create(model="o4-mini", input="Explain prompt caching")
    bill = simulator.app.billed(tag)[0]
    assert final.usage.input_tokens == bill.reported.input
    assert_metered(gateway, before, [bill], "o4-mini", team="search", app="indexer")


def test_embeddings_base64_default(gateway: Gateway, simulator, tag: str) -> None:
    before = gateway.metrics()
    c = client(gateway, "search/indexer", tag)
    result = c.embeddings.create(model="text-embedding-3-small", input=["first document", "second document"])
    assert len(result.data) == 2 and len(result.data[0].embedding) == 8
    assert_metered(gateway, before, simulator.app.billed(tag), "text-embedding-3-small", team="search")
    after = gateway.metrics()
    # Embeddings have no output, but the output series exists so `llm_tokens_in + llm_tokens_out` matches.
    assert (
        "llm_tokens_out",
        frozenset(
            {
                ("team", "search"),
                ("app", "indexer"),
                ("endpoint", "/v1/embeddings"),
                ("model", "text-embedding-3-small"),
                ("provider", "openai"),
                ("code", "200"),
            }
        ),
    ) in after.samples


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("status", [429, 500, 400])
def test_upstream_error_passed_through_and_counted(
    gateway: Gateway, simulator, tag: str, stream: bool, status: int
) -> None:
    before = gateway.metrics()
    c = client(gateway, "search/ranker", tag, **{"x-sim-fail": f"status:{status}"})
    with pytest.raises(openai.APIStatusError) as info:
        c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=stream)
    assert info.value.status_code == status
    # The provider's own error body reaches the client unchanged.
    assert info.value.body["message"].startswith(("Rate limit", "The server had an error", "Invalid request"))
    after = gateway.metrics()
    error_type = {429: "upstream_rate_limited", 500: "upstream_server_error", 400: "upstream_client_error"}[status]
    assert after.delta(before, "llm_errors_total", team="search", code=str(status), error_type=error_type) == 1
    assert after.delta(before, "llm_requests_total", team="search", code=str(status)) == 1
    assert after.delta(before, "llm_tokens_in", team="search") == 0


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_client_disconnect_mid_stream_still_bills_everything(gateway: Gateway, simulator, tag: str, api: str) -> None:
    before = gateway.metrics()
    c = client(
        gateway,
        "search/ranker",
        tag,
        **{"x-sim-chunks": "30", "x-sim-chunk-delay-ms": "20", "x-sim-output-tokens": "300"},
    )
    if api == "chat":
        stream = c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    else:
        stream = c.responses.create(model="gpt-4o-mini", input="long answer please", stream=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    assert wait_for(lambda: gateway.metrics().delta(before, "llm_requests_total", team="search", code="499") == 1)
    bill = simulator.app.billed(tag)[0]
    assert bill.completed and bill.reported == bill.planned and bill.reported.output == 300
    assert_metered(gateway, before, [bill], "gpt-4o-mini", team="search", code="499")
    after = gateway.metrics()
    assert after.delta(before, "llm_errors_total", team="search", error_type="client_disconnected") == 1


def test_alias_is_sent_upstream_as_its_target(gateway: Gateway, simulator, tag: str) -> None:
    before = gateway.metrics()
    c = client(gateway, "search/ranker", tag)
    c.chat.completions.create(model="fast", messages=MESSAGES)
    bill = simulator.app.billed(tag)[0]
    assert bill.model == "gpt-4o-mini"
    assert_metered(gateway, before, [bill], "gpt-4o-mini", team="search")


def test_models_lists_what_routes_allow(gateway: Gateway) -> None:
    before = gateway.metrics()
    models = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=KEYS["search/ranker"], max_retries=0).models.list()
    # Counted like every request that reaches a route, and free.
    labels = {"team": "search", "app": "ranker", "endpoint": "/v1/models", "code": "200"}
    assert wait_for(lambda: gateway.metrics().delta(before, "llm_requests_total", **labels) == 1)
    assert gateway.metrics().delta(before, "llm_total_cost_usd", team="search") == 0
    ids = {m.id for m in models.data}
    assert {"fast", "gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "o4-mini"} <= ids
    assert not any(i.startswith("claude") for i in ids)  # Anthropic models are not served on the OpenAI API


def test_models_retrieve(gateway: Gateway) -> None:
    c = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=KEYS["search/ranker"], max_retries=0)
    assert c.models.retrieve("gpt-4o-mini").id == "gpt-4o-mini"
    with pytest.raises(openai.NotFoundError, match="claude-haiku-4-5"):
        c.models.retrieve("claude-haiku-4-5")  # served, but not on the OpenAI API


def test_no_client_key_reaches_the_provider(gateway: Gateway, simulator, tag: str) -> None:
    client(gateway, "search/ranker", tag).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    bill = simulator.app.billed(tag)[0]
    assert bill.headers["authorization"] == "Bearer sk-sim-openai"
    assert KEYS["search/ranker"] not in str(bill.headers)


def test_expected_helper_counts_only_readable(simulator) -> None:
    assert expected([], "gpt-4o-mini")[0].input == 0
