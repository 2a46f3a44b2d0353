"""The Gemini API through the gateway (plain httpx, as the brief allows for Gemini)."""

from __future__ import annotations

import json
from decimal import Decimal

import httpx
import pytest

from metergate.simulator import Bill, SimulatorThread
from tests.conftest import KEYS, Gateway, assert_metered, wait_for
from tests.pricesheet import cost

MODEL = "gemini-2.5-flash"
BODY = {"contents": [{"role": "user", "parts": [{"text": "Why do budgets matter?"}]}]}


def post(
    gw: Gateway, path: str, tag: str, body: object = BODY, query_key: bool = False, **headers: str
) -> httpx.Response:
    key = KEYS["ads/bidder"]
    hdrs = {"x-sim-tag": tag, **headers}
    url = f"{gw.url}{path}"
    if query_key:
        url += ("&" if "?" in url else "?") + f"key={key}"
    else:
        hdrs["x-goog-api-key"] = key
    return httpx.post(url, json=body, headers=hdrs, timeout=30)


@pytest.mark.parametrize("query_key", [False, True])
def test_generate_content_with_cache_and_thoughts(gateway: Gateway, simulator, tag: str, query_key: bool) -> None:
    before = gateway.metrics()
    r = post(
        gateway,
        f"/v1beta/models/{MODEL}:generateContent",
        tag,
        query_key=query_key,
        **{
            "x-sim-input-tokens": "2000",
            "x-sim-cached-tokens": "1200",
            "x-sim-reasoning-tokens": "150",
            "x-sim-output-tokens": "400",
        },
    )
    assert r.status_code == 200
    meta = r.json()["usageMetadata"]
    assert meta["candidatesTokenCount"] == 250 and meta["thoughtsTokenCount"] == 150
    bill = simulator.app.billed(tag)[0]
    assert Decimal(r.headers["x-metergate-cost-usd"]) == cost(MODEL, bill.reported)
    # The gateway key never travels upstream, in a header or in the URL.
    assert bill.headers["x-goog-api-key"] == "sim-gemini-key"
    assert_metered(gateway, before, [bill], MODEL, team="ads", app="bidder")


@pytest.mark.parametrize("sse", [True, False])
def test_stream_generate_content_counts_the_last_running_total(
    gateway: Gateway, simulator, tag: str, sse: bool
) -> None:
    before = gateway.metrics()
    path = f"/v1beta/models/{MODEL}:streamGenerateContent" + ("?alt=sse" if sse else "")
    with httpx.stream(
        "POST",
        f"{gateway.url}{path}",
        json=BODY,
        headers={
            "x-goog-api-key": KEYS["ads/bidder"],
            "x-sim-tag": tag,
            "x-sim-chunks": "8",
            "x-sim-reasoning-tokens": "40",
            "x-sim-output-tokens": "200",
        },
    ) as r:
        body = b"".join(r.iter_raw())
    if sse:
        chunks = [json.loads(line[6:]) for line in body.decode().split("\r\n\r\n") if line.startswith("data: ")]
    else:
        chunks = json.loads(body)
    assert len(chunks) == 9  # a thinking chunk, then 8 content chunks, each with running totals
    assert_metered(gateway, before, simulator.app.billed(tag), MODEL, team="ads", app="bidder")


def embed_both(gw: Gateway, tag: str, **headers: str) -> tuple[httpx.Response, httpx.Response]:
    """One `:embedContent` and one `:batchEmbedContents` of three documents."""
    one = post(
        gw,
        "/v1beta/models/gemini-embedding-001:embedContent",
        tag,
        body={"content": {"parts": [{"text": "a document to embed"}]}},
        **headers,
    )
    batch = post(
        gw,
        "/v1beta/models/gemini-embedding-001:batchEmbedContents",
        tag,
        body={
            "requests": [
                {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": t}]}}
                for t in ("first", "second", "third document")
            ]
        },
        **headers,
    )
    assert one.status_code == batch.status_code == 200
    return one, batch


def embedding_bills(simulator: SimulatorThread, tag: str) -> list[Bill]:
    bills = [
        b
        for b in simulator.app.billed()
        if b.api in ("gemini.embedContent", "gemini.batchEmbedContents") and b.tag == tag
    ]
    assert len(bills) == 2
    return bills


def count_tokens_calls(simulator: SimulatorThread) -> int:
    return sum(1 for b in simulator.app.billed() if b.api == "gemini.countTokens")


def test_embeddings_are_counted_from_their_usage_metadata(gateway: Gateway, simulator, tag: str) -> None:
    before, counted = gateway.metrics(), count_tokens_calls(simulator)
    one, batch = embed_both(gateway, tag)
    assert one.json()["usageMetadata"]["promptTokenCount"] > 0  # relayed untouched
    bills = embedding_bills(simulator, tag)
    assert wait_for(lambda: gateway.metrics().delta(before, "llm_requests_total", model="gemini-embedding-001") == 2)
    assert_metered(gateway, before, bills, "gemini-embedding-001", team="ads")
    assert count_tokens_calls(simulator) == counted  # the reported figure is used; no extra call upstream
    # Known at once, so the response says what it cost, like every other priced response.
    for response, bill in zip((one, batch), sorted(bills, key=lambda b: b.api != "gemini.embedContent"), strict=True):
        assert Decimal(response.headers["x-metergate-cost-usd"]) == cost("gemini-embedding-001", bill.reported)


def test_embeddings_without_usage_are_counted_with_count_tokens(gateway: Gateway, simulator, tag: str) -> None:
    # Responses from before EmbeddingUsageMetadata existed: the free countTokens measures the same content.
    before, counted = gateway.metrics(), count_tokens_calls(simulator)
    one, batch = embed_both(gateway, tag, **{"x-sim-fail": "no-usage"})
    assert "usageMetadata" not in one.json() and "usageMetadata" not in batch.json()
    bills = embedding_bills(simulator, tag)
    assert wait_for(lambda: gateway.metrics().delta(before, "llm_requests_total", model="gemini-embedding-001") == 2)
    assert_metered(gateway, before, bills, "gemini-embedding-001", team="ads")
    assert count_tokens_calls(simulator) == counted + 2


def test_upstream_error_keeps_gemini_shape(gateway: Gateway, simulator, tag: str) -> None:
    before = gateway.metrics()
    r = post(gateway, f"/v1beta/models/{MODEL}:generateContent", tag, **{"x-sim-fail": "status:429"})
    assert r.status_code == 429 and r.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
    after = gateway.metrics()
    assert after.delta(before, "llm_errors_total", team="ads", code="429", error_type="upstream_rate_limited") == 1


def test_client_disconnect_mid_stream(gateway: Gateway, simulator, tag: str) -> None:
    before = gateway.metrics()
    headers = {
        "x-goog-api-key": KEYS["ads/bidder"],
        "x-sim-tag": tag,
        "x-sim-chunks": "20",
        "x-sim-chunk-delay-ms": "25",
        "x-sim-output-tokens": "400",
    }
    with httpx.stream(
        "POST",
        f"{gateway.url}/v1beta/models/{MODEL}:streamGenerateContent?alt=sse",
        json=BODY,
        headers=headers,
    ) as r:
        next(r.iter_raw())
    assert wait_for(lambda: gateway.metrics().delta(before, "llm_requests_total", team="ads", code="499") == 1)
    bill = simulator.app.billed(tag)[0]
    assert bill.completed and bill.reported.output == 400
    assert_metered(gateway, before, [bill], MODEL, team="ads", code="499")
