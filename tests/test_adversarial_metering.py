"""Attacks with a valid key that try to use a provider without being metered or charged against a budget.

The rule every test here checks: what the gateway classifies, routes, prices and budgets is exactly what the
provider receives. A request the gateway cannot read the way the provider will is refused (400, in the caller's
API shape) and never reaches the provider. Each attack was reproduced against the gateway before issue 8.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from metergate.simulator import Billed, SimulatorThread
from tests.conftest import KEYS, Gateway, create_pg_database, drop_pg_database, make_gateway, wait_for
from tests.pricesheet import cost

KEY = KEYS["search/ranker"]
AUTH = {"authorization": f"Bearer {KEY}"}
GEMINI_AUTH = {"x-goog-api-key": KEY}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def post(gw: Gateway, path: str, body: Any, headers: dict[str, str], target: str | None = None) -> httpx.Response:
    """POST `body`; `target` sends that request target exactly as written (httpx would normalise a path)."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with httpx.Client(timeout=30) as client:
        extensions = {"target": target.encode()} if target is not None else None
        request = client.build_request(
            "POST", f"{gw.url}{path}", content=content, headers=headers, extensions=extensions
        )
        return client.send(request)


def refused(r: httpx.Response, family: str, error_type: str, gw: Gateway, before: Any) -> None:
    """A 400 in the API's own error shape, counted under its error_type."""
    assert r.status_code == 400, r.text
    body = r.json()
    if family == "gemini":
        assert body["error"]["status"] == "INVALID_ARGUMENT"
    elif family == "anthropic":
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    else:
        assert body["error"]["type"] == "invalid_request_error"
    assert wait_for(lambda: gw.metrics().delta(before, "llm_errors_total", error_type=error_type) == 1)


# --- 1. paths: never decoded, never re-encoded -----------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        # Classified as the free countTokens; the provider decodes it into a billed generateContent.
        "/v1beta/models/gemini-2.5-pro%253AgenerateContent%23:countTokens",
        # The same with a query string smuggled into the path.
        "/v1beta/models/gemini-2.5-pro%253AgenerateContent%253F:countTokens",
        # Priced as the unknown model `gemini-2.5-pr%6F` ($0), run upstream as gemini-2.5-pro.
        "/v1beta/models/gemini-2.5-pr%256F:generateContent",
        "/v1beta/models/gemini-2.5-pr%6F:generateContent",
        # Dot segments and empty segments a server may normalise into another route.
        "/v1beta/models/x/../gemini-2.5-pro:generateContent",
        "/v1beta/models/gemini-2.5-pro:countTokens/..",
        "/v1//chat/completions",
        "/v1/chat/completions/",
        "/v1/chat/completion%73",
        "/openai/deployments/prod-4o-mini%2F..%2Fx/chat/completions",
    ],
)
def test_ambiguous_paths_are_refused_and_never_reach_the_provider(
    gateway: Gateway, simulator: SimulatorThread, tag: str, path: str
) -> None:
    family = "gemini" if path.startswith("/v1beta") else "openai"
    headers = {**(GEMINI_AUTH if family == "gemini" else AUTH), "x-sim-tag": tag}
    body = {"contents": [{"parts": [{"text": "hi"}]}]} if family == "gemini" else CHAT
    before = gateway.metrics()
    r = post(gateway, "", body, headers, target=path)
    refused(r, family, "invalid_path", gateway, before)
    assert simulator.app.billed(tag) == []


def test_a_budget_cannot_be_passed_by_spelling_the_model_differently(
    simulator: SimulatorThread, tmp_path: Path, tag: str
) -> None:
    """Before issue 8, 20 of 20 such requests were admitted past a $0.05 block budget, each priced at $0."""
    gw = make_gateway(
        tmp_path,
        simulator.url,
        extra=(
            f'ledger: {{url: "sqlite:///{tmp_path}/ledger.db"}}\n'
            "budgets:\n  - {team: search, period: day, limit_usd: 0.05, action: block}\n"
        ),
    ).start()
    try:
        headers = {**GEMINI_AUTH, "x-sim-tag": tag, "x-sim-input-tokens": "10000", "x-sim-output-tokens": "2000"}
        statuses = [
            post(
                gw,
                "",
                {"contents": []},
                headers,
                target="/v1beta/models/gemini-2.5-flas%2568:generateContent",
            ).status_code
            for _ in range(20)
        ]
        assert statuses == [400] * 20
        # The honest spelling is metered, priced and stopped by the budget.
        honest = [
            post(gw, "/v1beta/models/gemini-2.5-flash:generateContent", {"contents": []}, headers).status_code
            for _ in range(20)
        ]
        one = cost("gemini-2.5-flash", Billed(input=10000, output=2000))
        admitted = honest.count(200)
        assert admitted == int(Decimal("0.05") / one) + 1, honest
        assert set(honest) == {200, 429}
        assert len(simulator.app.billed(tag)) == admitted
    finally:
        gw.stop()


def test_query_items_are_forwarded_byte_for_byte(gateway: Gateway, simulator: SimulatorThread, tag: str) -> None:
    r = post(gateway, f"/v1/chat/completions?foo=%41&bar=a+b%2Fc&key={KEY}", CHAT, {"x-sim-tag": tag})
    assert r.status_code == 200
    [bill] = simulator.app.billed(tag)
    assert bill.query == "foo=%41&bar=a+b%2Fc"


def test_an_escaped_key_parameter_never_reaches_the_provider(
    gateway: Gateway, simulator: SimulatorThread, tag: str
) -> None:
    """`?k%65y=` authenticates like `?key=` (servers decode parameter names); it must be removed like it too."""
    r = post(
        gateway,
        f"/v1beta/models/gemini-2.5-flash:generateContent?k%65y={KEY}&alt=json",
        {"contents": []},
        {"x-sim-tag": tag},
    )
    assert r.status_code == 200
    [bill] = simulator.app.billed(tag)
    assert KEY not in bill.query and bill.query == "alt=json"


# --- 2. fields the gateway relies on are read strictly ---------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/v1/chat/completions", "stream", "true"),
        ("/v1/chat/completions", "stream", 1),
        ("/v1/completions", "stream", "1"),
        ("/v1/chat/completions", "stream_options", {"include_usage": "true"}),
        ("/v1/chat/completions", "stream_options", "yes"),
        ("/v1/chat/completions", "n", "3"),
        ("/v1/chat/completions", "n", 2.0),
        ("/v1/chat/completions", "max_tokens", "100"),
        ("/v1/chat/completions", "max_completion_tokens", 1e3),
        ("/v1/chat/completions", "max_tokens", -5),
        ("/v1/completions", "best_of", True),
        ("/v1/responses", "stream", "true"),
        ("/v1/responses", "max_output_tokens", [1]),
        ("/v1/responses", "background", "true"),
        ("/v1/responses", "background", True),
        ("/v1/chat/completions", "model", "x" * 300),
        ("/v1/chat/completions", "model", "gpt-4o-mini\u0000"),
        ("/v1/chat/completions", "model", 42),
    ],
)
def test_loose_openai_fields_are_refused(
    gateway: Gateway, simulator: SimulatorThread, tag: str, path: str, field: str, value: Any
) -> None:
    """A lenient server (vLLM, pydantic) streams on `"stream": "true"`; the gateway, reading it as false, did not ask
    for the usage chunk: the whole answer went unmetered. Now every field the gateway reads is read strictly."""
    body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": CHAT["messages"], "input": "hi", "prompt": "hi"}
    if field == "stream_options":
        body["stream"] = True
    body[field] = value
    before = gateway.metrics()
    r = post(gateway, path, body, {**AUTH, "x-sim-tag": tag, "x-sim-lenient": "1"})
    background = field == "background" and value is True
    expected = "missing_model" if value == 42 else "unsupported_feature" if background else "invalid_field"
    refused(r, "openai", expected, gateway, before)
    assert simulator.app.billed(tag) == []


@pytest.mark.parametrize(("field", "value"), [("stream", "true"), ("stream", 1), ("max_tokens", "1024")])
def test_loose_anthropic_fields_are_refused(
    gateway: Gateway, simulator: SimulatorThread, tag: str, field: str, value: Any
) -> None:
    body = {"model": "claude-haiku-4-5", "max_tokens": 100, "messages": CHAT["messages"], field: value}
    before = gateway.metrics()
    r = post(gateway, "/v1/messages", body, {"x-api-key": KEY, "x-sim-tag": tag, "x-sim-lenient": "1"})
    refused(r, "anthropic", "invalid_field", gateway, before)
    assert simulator.app.billed(tag) == []


def test_strict_values_still_pass(gateway: Gateway, simulator: SimulatorThread, tag: str) -> None:
    body = {**CHAT, "stream": False, "n": None, "max_tokens": 50, "stream_options": None}
    assert post(gateway, "/v1/chat/completions", body, {**AUTH, "x-sim-tag": tag}).status_code == 200
    assert len(simulator.app.billed(tag)) == 1


@pytest.mark.parametrize(
    ("query", "headers"),
    [
        ("alt=sse&fields=candidates", {}),  # a field mask that drops usageMetadata
        ("alt=sse&%66ields=candidates", {}),
        ("alt=sse", {"x-goog-fieldmask": "candidates"}),
        ("alt=proto", {}),
        ("alt=json&callback=f", {}),
        ("alt=sse&alt=json", {}),
    ],
)
def test_gemini_parameters_that_hide_usage_are_refused(
    gateway: Gateway, simulator: SimulatorThread, tag: str, query: str, headers: dict[str, str]
) -> None:
    before = gateway.metrics()
    r = post(
        gateway,
        f"/v1beta/models/gemini-2.5-flash:streamGenerateContent?{query}",
        {"contents": [{"parts": [{"text": "hi"}]}]},
        {**GEMINI_AUTH, **headers, "x-sim-tag": tag},
    )
    refused(r, "gemini", "invalid_query", gateway, before)
    assert simulator.app.billed(tag) == []


def test_method_override_headers_are_refused(gateway: Gateway, simulator: SimulatorThread, tag: str) -> None:
    before = gateway.metrics()
    r = post(gateway, "/v1/chat/completions", CHAT, {**AUTH, "x-http-method-override": "GET", "x-sim-tag": tag})
    refused(r, "openai", "invalid_header", gateway, before)
    assert simulator.app.billed(tag) == []


# --- 3. budgets fail closed for bad input ----------------------------------------------------------------------


def test_an_enormous_max_tokens_cannot_pass_a_shared_block_budget(
    simulator: SimulatorThread, tmp_path: Path, tag: str
) -> None:
    """max_tokens 2**64-1 overflowed the PostgreSQL reservation, which was then treated like an outage (fail open):
    20 of 20 admitted. Now it is admitted exactly as often as an ordinary request."""
    url = create_pg_database()
    gw = make_gateway(
        tmp_path,
        simulator.url,
        extra=(
            f'ledger: {{url: "{url}", flush_interval_s: 0.05}}\n'
            "budgets:\n"
            "  - {team: search, period: day, limit_usd: 0.05, action: block}\n"
            "  - {team: ads, period: day, limit_usd: 0.05, action: block}\n"
        ),
    ).start()
    try:
        headers = {"x-sim-tag": tag, "x-sim-input-tokens": "1200", "x-sim-output-tokens": "1000"}

        def run(scope: str, max_tokens: int) -> list[int]:
            body = {**CHAT, "model": "gpt-4o", "max_tokens": max_tokens}
            auth = {"authorization": f"Bearer {KEYS[scope]}", **headers}
            return [post(gw, "/v1/chat/completions", body, auth).status_code for _ in range(20)]

        huge, ordinary = run("search/ranker", 2**64 - 1), run("ads/bidder", 1000)
        one = cost("gpt-4o", Billed(input=1200, output=1000))
        fits = int(Decimal("0.05") / one) + 1  # admitted while the spend is under the limit
        # A huge request holds the whole budget until it settles, so it may be refused more, never admitted more.
        assert 1 <= huge.count(200) <= fits and ordinary.count(200) <= fits, (huge, ordinary)
        assert set(huge) <= {200, 429} and set(ordinary) <= {200, 429}
        assert "not enforced" not in gw.log()
    finally:
        gw.stop()
        drop_pg_database(url)


# --- 6. redirects are never followed ---------------------------------------------------------------------------


class Capture:
    """A TCP listener that records whatever is sent to it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    self.received.append(conn.recv(65536))
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                except OSError:
                    pass


@pytest.fixture
def capture() -> Iterator[Capture]:
    c = Capture()
    yield c
    c.sock.close()


@pytest.mark.parametrize(
    ("path", "body", "headers"),
    [
        ("/v1/chat/completions", CHAT, AUTH),
        (
            "/v1/messages",
            {"model": "claude-haiku-4-5", "max_tokens": 5, "messages": CHAT["messages"]},
            {"x-api-key": KEY},
        ),
        ("/v1beta/models/gemini-2.5-flash:generateContent", {"contents": []}, GEMINI_AUTH),
        ("/openai/deployments/prod-4o-mini/chat/completions?api-version=2024-10-21", CHAT, {"api-key": KEY}),
    ],
)
def test_a_redirect_never_carries_the_provider_key_anywhere(
    gateway: Gateway, capture: Capture, tag: str, path: str, body: Any, headers: dict[str, str]
) -> None:
    before = gateway.metrics()
    for location in (f"http://127.0.0.1:{capture.port}/steal", f"{gateway.metrics_url}"):
        r = post(gateway, path, body, {**headers, "x-sim-tag": tag, "x-sim-fail": f"redirect:{location}"})
        assert r.status_code == 502, r.text
        assert "llm_requests_total" not in r.text and "location" not in r.headers
    assert capture.received == []
    assert gateway.metrics().delta(before, "llm_errors_total", error_type="upstream_redirect") == 2


# --- 12. smaller findings --------------------------------------------------------------------------------------


def test_a_deeply_nested_body_that_needs_a_rewrite_is_a_400(
    gateway: Gateway, simulator: SimulatorThread, tag: str
) -> None:
    nested: Any = "x"
    for _ in range(300):
        nested = [nested]
    before = gateway.metrics()
    # `fast` is an alias: the gateway must rewrite the model, and cannot write 300 levels.
    r = post(gateway, "/v1/chat/completions", {**CHAT, "model": "fast", "metadata": nested}, {**AUTH, "x-sim-tag": tag})
    refused(r, "openai", "invalid_json", gateway, before)
    assert "Traceback" not in gateway.log()
    assert simulator.app.billed(tag) == []


def test_non_utf8_header_bytes_are_refused_not_altered(gateway: Gateway, simulator: SimulatorThread, tag: str) -> None:
    host, port = gateway.listen.split(":")
    body = json.dumps(CHAT).encode()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
        + f"Authorization: Bearer {KEY}\r\nx-sim-tag: {tag}\r\n".encode()
        + b"X-Note: caf\xe9\r\n"
        + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    )
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head + body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
    assert b"invalid_header" in reply
    assert simulator.app.billed(tag) == []


def test_usage_null_written_with_spaces_is_hidden_from_a_client_that_did_not_ask(
    gateway: Gateway, simulator: SimulatorThread, tag: str
) -> None:
    with httpx.stream(
        "POST",
        f"{gateway.url}/v1/chat/completions",
        json={**CHAT, "stream": True},
        headers={**AUTH, "x-sim-tag": tag, "x-sim-spaced-json": "1"},
        timeout=30,
    ) as r:
        text = r.read().decode()
    assert r.status_code == 200
    assert '"choices"' in text and "usage" not in text
    [bill] = simulator.app.billed(tag)
    assert wait_for(lambda: gateway.metrics().sum("llm_tokens_out", model="gpt-4o-mini") >= bill.reported.output)


# --- found by the second review: hang-ups, stalled readers, repeated keys, compressed bodies ---------------------


def _hang_up_after_headers(gw: Gateway, path: str, body: dict[str, Any], headers: dict[str, str]) -> None:
    """Send a streaming request, read the status line, and leave."""
    host, port = gw.listen.split(":")
    payload = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode() + payload)
        assert sock.recv(64).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_hanging_up_on_long_streams_cannot_pass_a_block_budget(
    simulator: SimulatorThread, tmp_path: Path, tag: str, api: str
) -> None:
    """A client that leaves before the usage arrives, with a drain shorter than the generation, left a $0 record and
    a released reservation: 10 of 10 admitted past a $0.01 budget. The worst case now stays reserved."""
    gw = make_gateway(
        tmp_path,
        simulator.url,
        server_extra=", drain_timeout_s: 0.5",
        extra=(
            f'ledger: {{url: "sqlite:///{tmp_path}/ledger.db", flush_interval_s: 0.05}}\n'
            "budgets:\n  - {team: search, period: day, limit_usd: 0.01, action: block}\n"
        ),
    ).start()
    try:
        sim = {"x-sim-tag": tag, "x-sim-output-tokens": "20000", "x-sim-chunks": "40", "x-sim-chunk-delay-ms": "100"}
        if api == "openai":
            path, body, auth = "/v1/chat/completions", {**CHAT, "stream": True, "max_tokens": 20000}, AUTH
        else:
            path = "/v1/messages"
            body = {"model": "claude-haiku-4-5", "max_tokens": 20000, "messages": CHAT["messages"], "stream": True}
            auth = {"x-api-key": KEY}
        _hang_up_after_headers(gw, path, body, {**auth, **sim})
        time.sleep(1.5)  # past the drain: the provider's closing figures were never read
        refused = post(gw, path, {**body, "stream": False}, {**auth, **sim})
        assert refused.status_code == 429, refused.text
        assert len(simulator.app.billed(tag)) == 1
        labels = {"team": "search", "code": "499"}
        assert wait_for(lambda: gw.metrics().sum("llm_unmetered_requests_total", **labels) == 1)
    finally:
        gw.stop()


def test_a_client_that_stops_reading_is_let_go_and_its_request_recorded(
    simulator: SimulatorThread, tmp_path: Path, tag: str
) -> None:
    """A reader that keeps its connection open but never reads stalled the relay forever: no record, the provider
    unread. Past write_timeout_s the client is treated as gone and the provider's answer is drained and metered."""
    gw = make_gateway(tmp_path, simulator.url, server_extra=", write_timeout_s: 1")
    gw.start()
    try:
        host, port = gw.listen.split(":")
        payload = json.dumps({**CHAT, "stream": True}).encode()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {KEY}\r\n"
            f"x-sim-tag: {tag}\r\nx-sim-output-tokens: 3000000\r\nx-sim-chunks: 1500\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        sock.sendall(head.encode() + payload)
        sock.recv(200)  # then never read again
        [bill] = wait_for(lambda: simulator.app.billed(tag))
        labels = {"team": "search", "app": "ranker", "model": "gpt-4o-mini", "code": "499"}
        assert wait_for(lambda: gw.metrics().sum("llm_requests_total", **labels) == 1, timeout=20)
        assert gw.metrics().sum("llm_tokens_out", **labels) == bill.reported.output == 3000000
        sock.close()
    finally:
        gw.stop()


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"model":"gpt-4o-mini"}',
        b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"mod\\u0065l":"gpt-4o-mini"}',
        b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"stream":false,"stream":true}',
    ],
)
def test_a_key_the_gateway_reads_given_twice_is_refused(
    gateway: Gateway, simulator: SimulatorThread, tag: str, body: bytes
) -> None:
    """Which of two values counts differs between parsers (last here, first in some): such a body could be priced
    as one model and run as another."""
    before = gateway.metrics()
    r = post(gateway, "/v1/chat/completions", body, {**AUTH, "x-sim-tag": tag})
    refused(r, "openai", "invalid_json", gateway, before)
    assert simulator.app.billed(tag) == []


def test_escaped_keys_and_repeated_nested_keys_are_fine(gateway: Gateway, simulator: SimulatorThread, tag: str) -> None:
    once = b'{"mod\\u0065l":"gpt-4o-mini","messages":[{"role":"user","content":"caf\\u00e9 <\\u003c>"}]}'
    nested = (
        b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],'
        b'"metadata":{"model":"x"},"tools":[{"type":"function","function":{"name":"f","model":"y"}}]}'
    )
    for body in (once, nested):
        assert post(gateway, "/v1/chat/completions", body, {**AUTH, "x-sim-tag": tag}).status_code == 200
    assert len(simulator.app.billed(tag)) == 2


def test_a_compressed_body_is_refused(gateway: Gateway, simulator: SimulatorThread, tag: str) -> None:
    import gzip

    r = post(
        gateway,
        "/v1/chat/completions",
        gzip.compress(json.dumps(CHAT).encode()),
        {**AUTH, "content-encoding": "gzip", "x-sim-tag": tag},
    )
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_encoding"
    assert simulator.app.billed(tag) == []
