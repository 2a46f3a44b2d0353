"""Bad input from clients and from upstreams: a clear error in the caller's API shape, counted, process alive."""

from __future__ import annotations

import json
from collections.abc import Iterator

import anthropic
import httpx
import openai
import pytest

from metergate.simulator import free_port
from tests.conftest import KEYS, Gateway, make_gateway, wait_for

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def gw(simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    gateway = make_gateway(
        tmp_path_factory.mktemp("bad"),
        simulator.url,
        server_extra=", max_body_bytes: 20000, upstream_timeout_s: 0.5",
        providers_extra=f'  refusing: {{type: openai-compatible, base_url: "{dead}"}}\n',
        routes_first='  - {model: "refused-*", provider: refusing}\n',
    ).start()
    yield gateway
    gateway.stop()


def oai(gw: Gateway, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEYS["search/ranker"], max_retries=0, default_headers=headers)


def raw(gw: Gateway, path: str, content: bytes, family: str = "openai", **headers: str) -> httpx.Response:
    auth = {"openai": "authorization", "anthropic": "x-api-key", "gemini": "x-goog-api-key"}[family]
    value = f"Bearer {KEYS['search/ranker']}" if family == "openai" else KEYS["search/ranker"]
    return httpx.post(
        f"{gw.url}{path}",
        content=content,
        headers={auth: value, "content-type": "application/json", **headers},
    )


def errors(gw: Gateway, before, error_type: str) -> float:  # type: ignore[no-untyped-def]
    return gw.metrics().delta(before, "llm_errors_total", error_type=error_type)


@pytest.mark.parametrize(
    ("family", "path", "shape"),
    [
        ("openai", "/v1/chat/completions", lambda b: b["error"]["type"] == "invalid_request_error"),
        (
            "anthropic",
            "/v1/messages",
            lambda b: b["type"] == "error" and b["error"]["type"] == "invalid_request_error",
        ),
        (
            "gemini",
            "/v1beta/models/gemini-2.5-flash:generateContent",
            lambda b: b["error"]["status"] == "INVALID_ARGUMENT",
        ),
    ],
)
@pytest.mark.parametrize("body", [b'{"model": "gpt-4o-mini", "messages": [', b"hello, not json", b"[1, 2, 3]", b""])
def test_malformed_or_non_json_body(gw: Gateway, family: str, path: str, shape, body: bytes) -> None:  # type: ignore[no-untyped-def]
    before = gw.metrics()
    r = raw(gw, path, body, family)
    assert r.status_code == 400
    assert shape(r.json())
    assert errors(gw, before, "invalid_json") == 1


@pytest.mark.parametrize(("family", "path"), [("openai", "/v1/chat/completions"), ("anthropic", "/v1/messages")])
def test_body_without_model(gw: Gateway, family: str, path: str) -> None:
    before = gw.metrics()
    r = raw(gw, path, json.dumps({"messages": MESSAGES}).encode(), family)
    assert r.status_code == 400
    assert "model" in json.dumps(r.json())
    assert errors(gw, before, "missing_model") == 1


def test_body_over_the_limit_is_413_with_and_without_content_length(gw: Gateway) -> None:
    before = gw.metrics()
    big = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 50_000}]}).encode()
    with pytest.raises(openai.APIStatusError) as info:
        oai(gw).chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x" * 50_000}])
    assert info.value.status_code == 413

    def chunks() -> Iterator[bytes]:  # no content-length: the gateway must stop reading at the limit
        for i in range(0, len(big), 4096):
            yield big[i : i + 4096]

    r = httpx.post(f"{gw.url}/v1/chat/completions", content=chunks(), headers=gw.headers("search/ranker"))
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert errors(gw, before, "body_too_large") == 2


@pytest.mark.parametrize(
    ("call", "exc"),
    [
        (
            lambda gw: oai(gw).chat.completions.create(model="llama-unknown", messages=MESSAGES),
            openai.NotFoundError,
        ),
        (
            lambda gw: anthropic.Anthropic(
                base_url=gw.url, api_key=KEYS["search/ranker"], max_retries=0
            ).messages.create(model="mistral-unknown", max_tokens=10, messages=MESSAGES),
            anthropic.NotFoundError,
        ),
    ],
)
def test_unknown_model_is_404_in_the_api_shape(gw: Gateway, call, exc) -> None:  # type: ignore[no-untyped-def]
    before = gw.metrics()
    with pytest.raises(exc):
        call(gw)
    assert errors(gw, before, "unknown_model") == 1
    # The client-chosen model name does not become a label value.
    assert gw.metrics().delta(before, "llm_requests_total", model="other", code="404") == 1


def test_gemini_unknown_model(gw: Gateway) -> None:
    r = raw(gw, "/v1beta/models/palm-2:generateContent", b'{"contents": []}', "gemini")
    assert r.status_code == 404 and r.json()["error"]["status"] == "NOT_FOUND"


def test_unknown_key_is_401_and_attributed_to_no_team(gw: Gateway) -> None:
    before = gw.metrics()
    bad = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="sk-not-a-gateway-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=gw.url, api_key="nope", max_retries=0).messages.create(
            model="claude-haiku-4-5", max_tokens=5, messages=MESSAGES
        )
    after = gw.metrics()
    assert after.delta(before, "llm_errors_total", team="unauthenticated", error_type="unauthorized") == 2
    assert after.delta(before, "llm_requests_total", team="search") == 0


UNKNOWN_ROUTES = [
    ("POST", "/v2/whatever", lambda b: b["error"]["type"] == "invalid_request_error"),
    ("PUT", "/v1/chat/completions", lambda b: b["error"]["type"] == "invalid_request_error"),
    ("OPTIONS", "/v1/messages", lambda b: b["type"] == "error" and b["error"]["type"] == "not_found_error"),
    ("POST", "/v1beta/models/gemini-2.5-flash:fooContent", lambda b: b["error"]["status"] == "NOT_FOUND"),
]


@pytest.mark.parametrize(("method", "path", "shape"), UNKNOWN_ROUTES)
def test_unknown_route_is_forwarded_and_counted_under_endpoint_other(
    gw: Gateway, method: str, path: str, shape
) -> None:  # type: ignore[no-untyped-def]
    """Paths the gateway does not know go to the provider of the API they look like (`server.unknown_paths:
    forward`, the default), counted under endpoint `other`: here the provider itself answers 404."""
    before = gw.metrics()
    r = httpx.request(method, f"{gw.url}{path}", json={}, headers=gw.headers("search/ranker"))
    assert r.status_code == 404 and shape(r.json())
    assert r.headers["x-metergate-request-id"]
    labels = {"team": "search", "app": "ranker", "endpoint": "other", "code": "404"}
    assert wait_for(
        lambda: gw.metrics().delta(before, "llm_errors_total", error_type="upstream_client_error", **labels) == 1
    )
    assert gw.metrics().delta(before, "llm_requests_total", **labels) == 1


@pytest.fixture(scope="module")
def strict(simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = make_gateway(
        tmp_path_factory.mktemp("strict"),
        simulator.url,
        server_extra=", unknown_paths: refuse, unmetered_routes: refuse",
        routes_first='  - {model: "whisper-*", provider: openai}\n',
    ).start()
    yield gateway
    gateway.stop()


@pytest.mark.parametrize(("method", "path", "shape"), UNKNOWN_ROUTES)
def test_unknown_route_is_404_when_unknown_paths_are_refused(strict: Gateway, method: str, path: str, shape) -> None:  # type: ignore[no-untyped-def]
    before = strict.metrics()
    r = httpx.request(method, f"{strict.url}{path}", json={}, headers=strict.headers("search/ranker"))
    assert r.status_code == 404 and shape(r.json())
    labels = {"team": "search", "app": "ranker", "endpoint": "other", "code": "404"}
    assert wait_for(
        lambda: strict.metrics().delta(before, "llm_errors_total", error_type="unknown_route", **labels) == 1
    )
    assert strict.metrics().delta(before, "llm_requests_total", **labels) == 1


def test_unmetered_routes_refused_when_configured(strict: Gateway) -> None:
    """A fine-tuning job is billed by the provider in a way the gateway cannot read: a gateway configured with
    `unmetered_routes: refuse` answers 403 in the caller's shape and never forwards it."""
    client = oai(strict)
    with pytest.raises(openai.PermissionDeniedError) as info:
        client.fine_tuning.jobs.create(model="gpt-4o-mini-2024-07-18", training_file="file-abc")
    assert "cannot meter" in info.value.message
    assert client.fine_tuning.jobs.list().data == []  # listing is free: forwarded


def test_upstream_refuses_connection_is_502(gw: Gateway) -> None:
    before = gw.metrics()
    with pytest.raises(openai.APIStatusError) as info:
        oai(gw).chat.completions.create(model="refused-model", messages=MESSAGES)
    assert info.value.status_code == 502
    assert errors(gw, before, "upstream_unreachable") == 1


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_timeout_is_504(gw: Gateway, stream: bool) -> None:
    before = gw.metrics()
    with pytest.raises(openai.APIStatusError) as info:
        oai(gw, **{"x-sim-delay-ms": "2000"}).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=stream
        )
    assert info.value.status_code == 504
    assert errors(gw, before, "upstream_timeout") == 1


def test_upstream_timeout_mid_stream(gw: Gateway, simulator, tag: str) -> None:
    before = gw.metrics()
    c = oai(gw, **{"x-sim-tag": tag, "x-sim-chunk-delay-ms": "1500", "x-sim-chunks": "3"})
    with pytest.raises(openai.APIError, match="timed out"):
        list(c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
    assert errors(gw, before, "upstream_timeout") == 1


@pytest.mark.parametrize("api", ["chat", "anthropic", "gemini"])
def test_upstream_resets_mid_stream(gw: Gateway, simulator, tag: str, api: str) -> None:
    before = gw.metrics()
    headers = {"x-sim-tag": tag, "x-sim-fail": "reset-after:3", "x-sim-input-tokens": "700"}
    if api == "chat":
        with pytest.raises(openai.APIError):
            list(oai(gw, **headers).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
        model, expected_in = "gpt-4o-mini", 0  # OpenAI reports usage only at the end: nothing was reported
    elif api == "anthropic":
        c = anthropic.Anthropic(base_url=gw.url, api_key=KEYS["search/ranker"], max_retries=0, default_headers=headers)
        with pytest.raises(anthropic.APIStatusError, match="upstream stream broke"):
            with c.messages.stream(model="claude-haiku-4-5", max_tokens=100, messages=MESSAGES) as s:
                for _ in s:
                    pass
        model, expected_in = "claude-haiku-4-5", 700  # message_start already reported the input
    else:
        r = raw(
            gw,
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
            b'{"contents": []}',
            "gemini",
            **{**headers, "x-sim-chunks": "8"},
        )
        assert r.status_code == 200 and '"status":"UNAVAILABLE"' in r.text  # the gateway's error event ends the stream
        model, expected_in = "gemini-2.5-flash", 700
    after = gw.metrics()
    assert after.delta(before, "llm_errors_total", error_type="upstream_reset", code="502") == 1
    assert after.delta(before, "llm_tokens_in", model=model) == expected_in


@pytest.mark.parametrize("fail", ["bad-usage", "malformed-json"])
def test_upstream_malformed_usage_or_json(gw: Gateway, simulator, tag: str, fail: str) -> None:
    before = gw.metrics()
    c = oai(gw, **{"x-sim-tag": tag, "x-sim-fail": fail})
    with pytest.raises(openai.APIError) as info:
        c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert "could not be metered" in str(info.value) or "not JSON" in str(info.value)
    expected_type = "upstream_malformed" if fail == "malformed-json" else "upstream_malformed_usage"
    assert errors(gw, before, expected_type) == 1
    assert gw.metrics().delta(before, "llm_unmetered_requests_total") == 1


@pytest.mark.parametrize("fail", ["bad-usage", "malformed-json"])
def test_a_finished_stream_with_unreadable_usage_is_not_damaged(gw: Gateway, simulator, tag: str, fail: str) -> None:
    """The client has its whole answer: the gateway never appends an error to a stream that finished normally. The
    request is recorded as unmetered, with the provider's status."""
    before = gw.metrics()
    c = oai(gw, **{"x-sim-tag": tag, "x-sim-fail": fail})
    chunks = list(c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
    assert chunks and chunks[-1].choices[0].finish_reason == "stop"
    assert gw.metrics().delta(before, "llm_errors_total", error_type="upstream_malformed_usage", code="200") == 1
    assert gw.metrics().delta(before, "llm_unmetered_requests_total", code="200") == 1


# The SDK warns while it builds its message from the garbled usage the simulator relays on purpose.
@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings:UserWarning")
def test_anthropic_malformed_usage_in_stream(gw: Gateway, simulator, tag: str) -> None:
    before = gw.metrics()
    c = anthropic.Anthropic(
        base_url=gw.url,
        api_key=KEYS["search/ranker"],
        max_retries=0,
        default_headers={"x-sim-tag": tag, "x-sim-fail": "bad-usage"},
    )
    # The stream finished normally, so it reaches the client undamaged; the request is recorded as unmetered.
    with c.messages.stream(model="claude-haiku-4-5", max_tokens=100, messages=MESSAGES) as s:
        for _ in s:
            pass
    assert errors(gw, before, "upstream_malformed_usage") == 1
    assert gw.metrics().delta(before, "llm_unmetered_requests_total", code="200") == 1


def test_still_serving_after_all_that(gw: Gateway, simulator, tag: str) -> None:
    assert gw.proc is not None and gw.proc.poll() is None
    reply = oai(gw, **{"x-sim-tag": tag}).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert reply.usage.total_tokens > 0
    assert wait_for(lambda: httpx.get(f"http://{gw.metrics_listen}/healthz").status_code == 200)
    assert "Traceback" not in gw.log()


def test_calls_answered_without_usage_refused_when_unmetered_routes_are(strict: Gateway, simulator) -> None:  # type: ignore[no-untyped-def]
    """A whisper transcription asked for as text, or binary gpt-4o-mini-tts audio, carries no usage: known from the
    request, so `unmetered_routes: refuse` refuses them like any unmetered route."""
    seen = len(simulator.app.bills)
    client = oai(strict)
    with pytest.raises(openai.PermissionDeniedError):
        client.audio.transcriptions.create(model="whisper-1", file=("a.wav", b"RIFF"), response_format="text")
    with pytest.raises(openai.PermissionDeniedError):
        client.audio.speech.create(model="gpt-4o-mini-tts", voice="alloy", input="hi")
    assert len(simulator.app.bills) == seen
    # The same calls in a form that reports usage go through.
    client.audio.transcriptions.create(model="whisper-1", file=("a.wav", b"RIFF"))


def test_background_responses_refused_streamed_too(gw: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai(gw).responses.create(model="gpt-4o-mini", input="hi", background=True, stream=True)
    assert info.value.code == "unsupported_feature"


@pytest.mark.parametrize("key", ["max_tokens", "n", "stream_options"])
def test_a_read_field_given_twice_is_refused(gw: Gateway, key: str) -> None:
    value = b'{"include_usage": true}' if key == "stream_options" else b"1"
    body = (
        b'{"model": "gpt-4o-mini", "messages": [], "'
        + key.encode()
        + b'": '
        + value
        + b', "'
        + key.encode()
        + b'": '
        + value
        + b"}"
    )
    r = raw(gw, "/v1/chat/completions", body)
    assert r.status_code == 400 and "twice" in r.json()["error"]["message"]
