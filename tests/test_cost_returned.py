"""The request's cost returned to the caller on opt-in (issue 11): in the final usage of each API's own shape,
streamed and not, read through the official SDKs as an extra field; without the opt-in the body is untouched."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal

import anthropic
import httpx
import openai
import pytest

from tests.conftest import KEYS, Gateway, make_gateway, wait_for
from tests.pricesheet import cost

OPT_IN = {"x-metergate-include-cost": "true"}
MESSAGES = [{"role": "user", "content": "what did that cost"}]


@pytest.fixture(scope="module")
def gw(simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("cost")
    gateway = make_gateway(
        tmp,
        simulator.url,
        env={"METERGATE_ADMIN_TOKEN": "cost-token"},
        extra=f'ledger: {{url: "sqlite:///{tmp}/ledger.db", flush_interval_s: 0.05}}\n',
    ).start()
    yield gateway
    gateway.stop()


def billed_cost(simulator, tag: str) -> Decimal:  # type: ignore[no-untyped-def]
    (bill,) = simulator.app.billed(tag)
    return cost(bill.model, bill.reported)


def exact(value: object, want: Decimal) -> bool:
    return isinstance(value, float) and abs(Decimal(repr(value)) - want) <= Decimal("1e-15")


def oa(gw: Gateway, headers: dict[str, str] | None = None, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{gw.url}/v1", api_key=key or KEYS["search/ranker"], max_retries=0, default_headers=headers or {}
    )


def test_openai_chat_and_responses_carry_the_cost(gw: Gateway, simulator, tag: str) -> None:
    c = oa(gw, {**OPT_IN, "x-sim-tag": f"{tag}-chat", "x-sim-cached-tokens": "3"})
    done = c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert done.usage is not None and exact(done.usage.cost_usd, billed_cost(simulator, f"{tag}-chat"))  # type: ignore[attr-defined]
    stream = oa(gw, {**OPT_IN, "x-sim-tag": f"{tag}-stream"}).chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    usage = [ch.usage for ch in chunks if ch.usage is not None]
    assert len(usage) == 1 and exact(usage[0].cost_usd, billed_cost(simulator, f"{tag}-stream"))  # type: ignore[attr-defined]
    # A caller that did not ask for the usage chunk but asked for the cost gets the chunk that carries it.
    plain = oa(gw, {**OPT_IN, "x-sim-tag": f"{tag}-plain"}).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True
    )
    usage = [ch.usage for ch in plain if ch.usage is not None]
    assert len(usage) == 1 and exact(usage[0].cost_usd, billed_cost(simulator, f"{tag}-plain"))  # type: ignore[attr-defined]
    r = oa(gw, {**OPT_IN, "x-sim-tag": f"{tag}-resp"}).responses.create(model="gpt-4o-mini", input="hi")
    assert r.usage is not None and exact(r.usage.cost_usd, billed_cost(simulator, f"{tag}-resp"))  # type: ignore[attr-defined]
    events = list(
        oa(gw, {**OPT_IN, "x-sim-tag": f"{tag}-rstream"}).responses.create(model="gpt-4o-mini", input="hi", stream=True)
    )
    completed = [e for e in events if e.type == "response.completed"]
    assert completed and exact(completed[0].response.usage.cost_usd, billed_cost(simulator, f"{tag}-rstream"))  # type: ignore[union-attr]


def test_without_the_opt_in_nothing_changes(gw: Gateway, tag: str) -> None:
    raw = oa(gw, {"x-sim-tag": tag}).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    assert b"cost_usd" not in raw.http_response.content and "x-metergate-cost-usd" in raw.headers
    text = httpx.post(
        f"{gw.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {KEYS['search/ranker']}", "x-sim-tag": tag},
        json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}},
    ).text
    assert "cost_usd" not in text
    # An opt-in with any other value is no opt-in.
    off = oa(gw, {"x-metergate-include-cost": "no"}).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert off.usage is not None and not (off.usage.model_extra or {})


def test_anthropic_messages_carry_the_cost(gw: Gateway, simulator, tag: str) -> None:
    c = anthropic.Anthropic(
        base_url=gw.url,
        api_key=KEYS["support/assistant"],
        max_retries=0,
        default_headers={**OPT_IN, "x-sim-tag": f"{tag}-m"},
    )
    msg = c.messages.create(model="claude-haiku-4-5", max_tokens=100, messages=MESSAGES)
    assert exact(msg.usage.cost_usd, billed_cost(simulator, f"{tag}-m"))  # type: ignore[attr-defined]
    s = anthropic.Anthropic(
        base_url=gw.url,
        api_key=KEYS["support/assistant"],
        max_retries=0,
        default_headers={**OPT_IN, "x-sim-tag": f"{tag}-s"},
    )
    events = list(s.messages.create(model="claude-haiku-4-5", max_tokens=100, messages=MESSAGES, stream=True))
    deltas = [e for e in events if e.type == "message_delta"]
    assert len(deltas) == 1 and exact(deltas[0].usage.cost_usd, billed_cost(simulator, f"{tag}-s"))  # type: ignore[attr-defined]


def test_gemini_usage_metadata_carries_the_cost(gw: Gateway, simulator, tag: str) -> None:
    headers = {"x-goog-api-key": KEYS["ads/bidder"], **OPT_IN}
    body = {"contents": [{"parts": [{"text": "hi"}]}]}
    r = httpx.post(
        f"{gw.url}/v1beta/models/gemini-2.5-flash:generateContent",
        headers={**headers, "x-sim-tag": f"{tag}-g"},
        json=body,
    )
    assert exact(r.json()["usageMetadata"]["cost_usd"], billed_cost(simulator, f"{tag}-g"))
    s = httpx.post(
        f"{gw.url}/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
        headers={**headers, "x-sim-tag": f"{tag}-gs"},
        json=body,
    )
    chunks = [json.loads(line[6:]) for line in s.text.splitlines() if line.startswith("data: ")]
    # Every chunk reporting usage carries the cost so far; the last one, the request's.
    with_usage = [c for c in chunks if "usageMetadata" in c]
    assert with_usage and all("cost_usd" in c["usageMetadata"] for c in with_usage)
    assert exact(with_usage[-1]["usageMetadata"]["cost_usd"], billed_cost(simulator, f"{tag}-gs"))


def test_a_key_can_opt_in_for_all_its_requests(gw: Gateway, simulator, tag: str) -> None:
    made = subprocess.run(
        [
            sys.executable,
            "-m",
            "metergate",
            "keys",
            "create",
            "--team",
            "search",
            "--app",
            "ranker",
            "--include-cost",
            "--config",
            str(gw.config_path),
        ],
        env=gw.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    c = oa(gw, {"x-sim-tag": tag}, key=key)

    def answered() -> openai.types.chat.ChatCompletion | None:
        try:
            return c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        except openai.AuthenticationError:
            return None

    done = wait_for(answered, timeout=15)
    assert done is not None and exact(done.usage.cost_usd, billed_cost(simulator, tag))  # type: ignore[union-attr]


# --- the rewrite itself, without a network ----------------------------------------------------------------------


def test_a_body_nested_too_deep_to_rewrite_is_left_as_it_is() -> None:
    from metergate.costfield import body_with_cost

    deep = b'{"usageMetadata": {"totalTokenCount": 3}, "args": ' + b"[" * 300 + b"]" * 300 + b"}"
    assert body_with_cost(deep, ("usageMetadata",), 0.5) is None  # the header still carries the cost


def test_only_the_data_line_of_an_event_changes() -> None:
    from metergate.costfield import event_with_cost
    from metergate.sse import SSEEvent

    raw = b'event: message_delta\r\nid: 7\r\n: a comment\r\ndata: {"usage":{"output_tokens":3}}\r\n\r\n'
    event = SSEEvent(raw, "message_delta", b'{"usage":{"output_tokens":3}}')
    out = event_with_cost(event, ("usage",), 0.25)
    assert out == (
        b'event: message_delta\r\nid: 7\r\n: a comment\r\ndata: {"usage":{"output_tokens":3,"cost_usd":0.25}}\r\n\r\n'
    )


def test_a_last_event_without_its_blank_line_is_still_relayed() -> None:
    from metergate.providers.gemini import GeminiSSEMeter

    meter = GeminiSSEMeter("gemini-2.5-flash")
    meter.include_cost(lambda usage: 0.001)
    first = (
        b'data: {"candidates":[{"content":{"parts":[{"text":"a"}]}}],"usageMetadata":{"promptTokenCount":2}}\r\n\r\n'
    )
    last = (
        b'data: {"candidates":[{"finishReason":"STOP"}],'
        b'"usageMetadata":{"promptTokenCount":2,"candidatesTokenCount":1}}\n'
    )
    relayed = meter.feed(first) + meter.feed(last)
    assert b'"cost_usd":0.001' in relayed
    assert relayed + meter.flush() == relayed + last  # the unterminated last event, as it came
