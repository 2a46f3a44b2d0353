"""What reaches the provider: the client's request as sent, minus the gateway's own credential, and nothing at all
when the client hung up before its body was complete."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from metergate.simulator import SimulatorThread
from tests.conftest import KEYS, Gateway, wait_for

KEY = KEYS["search/ranker"]
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def raw_request(gw: Gateway, head: bytes, body: bytes = b"", close_early: bool = False) -> bytes:
    """Sends bytes as they are (no client library normalises them); returns what came back, if anything."""
    host, port = gw.listen.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head + b"\r\n" + body)
        if close_early:
            return b""
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", CHAT),
        ("/v1/messages", {"model": "claude-haiku-4-5", "max_tokens": 5, "messages": CHAT["messages"]}),
        ("/openai/deployments/prod-4o-mini/chat/completions?api-version=2024-10-21", CHAT),
        ("/v1beta/models/gemini-2.5-flash:generateContent?alt=json", {"contents": []}),
    ],
)
def test_a_query_string_key_never_reaches_the_provider(
    gateway: Gateway, simulator: SimulatorThread, tag: str, path: str, body: dict[str, object]
) -> None:
    url = f"{gateway.url}{path}{'&' if '?' in path else '?'}key={KEY}"
    assert httpx.post(url, json=body, headers={"x-sim-tag": tag}, timeout=30).status_code == 200
    [bill] = simulator.app.billed(tag)
    assert KEY not in bill.query and "key=" not in bill.query
    assert KEY not in json.dumps(bill.headers)
    # The rest of the query arrives as sent.
    if "?" in path:
        assert path.split("?", 1)[1] in bill.query


def test_repeated_and_utf8_headers_arrive_as_sent(gateway: Gateway, simulator: SimulatorThread, tag: str) -> None:
    body = json.dumps(CHAT).encode()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
        + b"Authorization: Bearer "
        + KEY.encode()
        + b"\r\nx-sim-tag: "
        + tag.encode()
        + b"\r\nanthropic-beta: a-1\r\nanthropic-beta: b-2\r\nX-Note: caf\xc3\xa9\r\n"
        + b"Content-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n"
    )
    assert raw_request(gateway, head, body).startswith(b"HTTP/1.1 200")
    [bill] = simulator.app.billed(tag)
    assert bill.headers["anthropic-beta"] == "a-1, b-2"
    assert bill.headers["x-note"].encode("latin-1") == b"caf\xc3\xa9"  # the client's bytes, not re-encoded


@pytest.mark.parametrize("framing", ["short-content-length", "unfinished-chunked"])
def test_a_body_cut_off_by_a_hang_up_is_never_forwarded(
    gateway: Gateway, simulator: SimulatorThread, tag: str, framing: str
) -> None:
    # The part that arrived is complete JSON, so only the framing tells that the client did not finish.
    body = json.dumps(CHAT).encode()
    before = gateway.metrics()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "
        + KEY.encode()
        + b"\r\nx-sim-tag: "
        + tag.encode()
        + b"\r\nContent-Type: application/json\r\n"
    )
    if framing == "short-content-length":
        raw_request(gateway, head + b"Content-Length: " + str(len(body) + 50).encode() + b"\r\n", body, True)
    else:
        chunk = f"{len(body):x}\r\n".encode() + body + b"\r\n"  # no final 0-length chunk
        raw_request(gateway, head + b"Transfer-Encoding: chunked\r\n", chunk, True)
    labels = {"team": "search", "app": "ranker", "code": "499", "error_type": "client_disconnected"}
    assert wait_for(lambda: gateway.metrics().delta(before, "llm_errors_total", **labels) == 1)
    time.sleep(0.2)
    assert simulator.app.billed(tag) == []
    assert gateway.metrics().delta(before, "llm_requests_total", team="search", code="499") == 1
