"""Azure OpenAI: deployment paths, api-version, api-key, and pricing by the deployment's model."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import KEYS, Gateway, assert_metered

MESSAGES = [{"role": "user", "content": "hello azure"}]


@pytest.mark.parametrize("stream", [False, True])
def test_azure_sdk_through_the_gateway(gateway: Gateway, simulator, tag: str, stream: bool) -> None:
    before = gateway.metrics()
    az = openai.AzureOpenAI(
        azure_endpoint=gateway.url,
        api_version="2024-10-21",
        api_key=KEYS["search/ranker"],
        max_retries=0,
        default_headers={"x-sim-tag": tag},
    )
    result = az.chat.completions.create(model="prod-4o-mini", messages=MESSAGES, stream=stream)
    if stream:
        chunks = list(result)
        # Azure's prompt-filter chunk has empty choices and no usage: it is relayed, not hidden.
        assert any(getattr(ch, "prompt_filter_results", None) for ch in chunks)
        assert not any(ch.usage for ch in chunks)
    bill = simulator.app.billed(tag)[0]
    assert bill.api == "azure.chat/completions"
    assert bill.headers["api-key"] == "sim-azure-key" and "authorization" not in bill.headers
    # Priced and labelled as the model the deployment runs.
    assert_metered(gateway, before, [bill], "gpt-4o-mini", team="search", app="ranker", provider="azure")


def test_openai_style_request_to_an_azure_deployment(gateway: Gateway, simulator, tag: str) -> None:
    before = gateway.metrics()
    r = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        headers={**gateway.headers("ads/bidder"), "x-sim-tag": tag},
        json={"model": "prod-4o-mini", "messages": MESSAGES},
    )
    assert r.status_code == 200, r.text
    bill = simulator.app.billed(tag)[0]
    assert bill.api == "azure.chat/completions" and bill.model == "gpt-4o-mini"
    assert_metered(gateway, before, [bill], "gpt-4o-mini", team="ads", provider="azure")


def test_azure_embeddings(gateway: Gateway, simulator, tag: str) -> None:
    before = gateway.metrics()
    az = openai.AzureOpenAI(
        azure_endpoint=gateway.url,
        api_version="2024-10-21",
        api_key=KEYS["ads/bidder"],
        max_retries=0,
        default_headers={"x-sim-tag": tag},
    )
    with pytest.raises(openai.NotFoundError):
        az.embeddings.create(model="text-embedding-3-small", input="x")  # not an Azure deployment route
    after = gateway.metrics()
    assert after.delta(before, "llm_errors_total", team="ads", error_type="unknown_model") == 1
