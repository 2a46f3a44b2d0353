"""Denial of service, most of it without a key: what one client can make the gateway parse, hold, store or log.

Each attack here stalled, exhausted or flooded the gateway before issue 8. The limits are nginx-like defaults,
documented in the README ("Limits"); the tests use the defaults unless they need a shorter timeout.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from metergate.pricing import PriceBook
from metergate.simulator import SimulatorThread
from tests.conftest import KEYS, Gateway, make_gateway, wait_for

KEY = KEYS["search/ranker"]
CHAT = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()


def connect(gw: Gateway, timeout: float = 10) -> socket.socket:
    host, port = gw.listen.split(":")
    return socket.create_connection((host, int(port)), timeout=timeout)


def read_reply(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def keyed_request(gw: Gateway, timeout: float = 5) -> int:
    return httpx.post(
        f"{gw.url}/v1/chat/completions",
        content=CHAT,
        headers={"authorization": f"Bearer {KEY}"},
        timeout=timeout,
    ).status_code


@pytest.fixture(scope="module")
def gw(simulator: SimulatorThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("dos")
    gateway = make_gateway(
        tmp,
        simulator.url,
        server_extra=", header_timeout_s: 1, body_timeout_s: 1",
        extra=f'ledger: {{url: "sqlite:///{tmp}/ledger.db", flush_interval_s: 0.05}}\n',
    ).start()
    yield gateway
    gateway.stop()


# --- 7. header count and size ----------------------------------------------------------------------------------


def test_200000_repeated_headers_are_refused_without_stalling_anyone(gw: Gateway) -> None:
    """2.8 MB of `X-A: b` lines were joined in quadratic time on the event loop: 43 s of nothing for everyone."""
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n" + b"X-A: b\r\n" * 200_000 + b"\r\n"
    replies: list[bytes] = []

    def attack() -> None:
        with connect(gw) as sock:
            with contextlib.suppress(OSError):  # the gateway answers and closes before taking it all
                sock.sendall(head)
            replies.append(read_reply(sock))

    thread = threading.Thread(target=attack)
    thread.start()
    slowest = 0.0
    while thread.is_alive():
        start = time.perf_counter()
        assert httpx.get(f"http://{gw.metrics_listen}/healthz", timeout=5).status_code == 200
        slowest = max(slowest, time.perf_counter() - start)
        time.sleep(0.05)
    thread.join()
    assert replies[0].startswith(b"HTTP/1.1 431"), replies[0][:100]
    assert slowest < 1.0
    assert keyed_request(gw) == 200


def test_a_16_mib_header_block_is_refused_after_the_limit(gw: Gateway) -> None:
    with connect(gw) as sock:
        sent = 0
        try:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nX-Big: ")
            chunk = b"a" * 65536
            while sent < 16 * 1024 * 1024:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
        reply = read_reply(sock)
    assert reply.startswith(b"HTTP/1.1 431"), reply[:100]
    assert sent < 4 * 1024 * 1024  # cut off near the 32 KiB limit, not after the whole block
    assert gw.metrics().sum("metergate_connections_refused_total", reason="headers_too_large") >= 1


# --- 8. bodies are read only after the key is checked ----------------------------------------------------------


def test_unauthenticated_bodies_are_answered_unread(gw: Gateway) -> None:
    """20 connections each declaring 32 MiB without a key took the gateway from 63 MB to 705 MB before."""
    before = gw.rss_bytes()
    socks = [connect(gw) for _ in range(20)]
    try:
        for sock in socks:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer not-a-key\r\n"
                b"Content-Type: application/json\r\nContent-Length: 33554432\r\n\r\n" + b"{" * 65536
            )
        for sock in socks:
            sock.settimeout(5)
            reply = read_reply(sock)  # arrives, and the connection closes, without the rest of the body
            assert reply.startswith(b"HTTP/1.1 401"), reply[:100]
            assert b"connection: close" in reply.lower()
    finally:
        for sock in socks:
            sock.close()
    assert gw.rss_bytes() - before < 20 * 1024 * 1024


def test_a_keyed_body_that_stops_arriving_times_out(gw: Gateway) -> None:
    before = gw.metrics()
    with connect(gw) as sock:
        sock.sendall(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Length: {len(CHAT)}\r\n\r\n".encode()
            + CHAT[:10]
        )
        sock.settimeout(10)
        reply = read_reply(sock)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:100]
    # The request is recorded, attributed to the key's team.
    labels = {"team": "search", "app": "ranker", "code": "408", "error_type": "body_timeout"}
    assert wait_for(lambda: gw.metrics().delta(before, "llm_errors_total", **labels) == 1)


# --- 9. idle connections, half-sent requests, the connection cap -----------------------------------------------


def test_idle_and_half_sent_connections_are_closed(gw: Gateway) -> None:
    idle = [connect(gw) for _ in range(25)]
    half = [connect(gw) for _ in range(25)]
    for sock in half:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthori")
    time.sleep(2.5)  # header_timeout_s is 1 in this gateway
    for sock in idle + half:
        sock.settimeout(1)
        reply = read_reply(sock)  # EOF (possibly after a 408): the gateway closed it
        assert reply in (b"",) or reply.startswith(b"HTTP/1.1 408"), reply[:100]
        sock.close()
    assert gw.metrics().sum("metergate_connections_refused_total", reason="header_timeout") >= 50


def test_a_flood_of_idle_sockets_cannot_lock_out_keyed_clients(simulator: SimulatorThread, tmp_path: Path) -> None:
    """With a 256-file limit, 400 idle sockets used to leave no descriptor for a client with a key."""
    gw = make_gateway(tmp_path, simulator.url)
    gw.max_open_files = 256
    gw.start()
    flood: list[socket.socket] = []
    try:
        for _ in range(400):
            try:
                flood.append(connect(gw, timeout=2))
            except OSError:
                break
        time.sleep(0.5)
        assert [keyed_request(gw) for _ in range(5)] == [200] * 5
        assert httpx.get(f"http://{gw.metrics_listen}/healthz", timeout=5).status_code == 200
        assert gw.metrics().sum("metergate_connections_refused_total", reason="evicted_idle") >= 1
    finally:
        for sock in flood:
            sock.close()
        gw.stop()


# --- 10. client strings are bounded where they are stored, cached and logged -----------------------------------


def test_long_model_names_are_refused_not_stored_cached_or_logged(gw: Gateway, tmp_path: Path) -> None:
    import sqlite3

    log_before = len(gw.log())
    statuses = []
    for i in range(40):
        name = (f"gpt-{i}-" + "x" * 200_000) if i % 2 else "m" * (1 << 20)
        body = json.dumps({"model": name, "messages": [{"role": "user", "content": "hi"}]})
        r = httpx.post(
            f"{gw.url}/v1/chat/completions", content=body, headers={"authorization": f"Bearer {KEY}"}, timeout=30
        )
        statuses.append(r.status_code)
        assert len(r.content) < 1000  # the error does not echo the name back
    assert statuses == [400] * 40
    assert len(gw.log()) - log_before < 20_000
    db = Path(gw.config_path.parent / "ledger.db")
    assert wait_for(lambda: db.exists())
    with sqlite3.connect(db) as conn:
        longest = wait_for(lambda: conn.execute("SELECT MAX(LENGTH(upstream_model)) FROM usage_records").fetchone())
    assert longest[0] is not None and longest[0] <= 256
    assert db.stat().st_size < 2 * 1024 * 1024


def test_price_and_label_caches_do_not_grow_with_client_model_names() -> None:
    prices = PriceBook([])
    for i in range(25_000):
        prices.lookup("openai", f"made-up-model-{i}")
        prices.is_priced("openai", "openai", f"made-up-model-{i}")
    assert len(prices._catalogue) <= 10_000 and len(prices._override_cards) <= 10_000


# --- 12. malformed requests do not flood the log ---------------------------------------------------------------


def test_malformed_requests_are_answered_and_logged_a_bounded_number_of_times(gw: Gateway) -> None:
    lines_before = gw.log().lower().count("invalid http request")
    for _ in range(300):
        with connect(gw) as sock:
            sock.sendall(b"GARBAGE \x01\x02 NOT HTTP\r\n\r\n")
            assert read_reply(sock).startswith(b"HTTP/1.1 400")
    assert wait_for(lambda: keyed_request(gw) == 200)
    logged = gw.log().lower().count("invalid http request") - lines_before
    assert 1 <= logged <= 11, logged


# --- found by the second review ----------------------------------------------------------------------------------


def test_pipelined_requests_are_capped_per_connection(gw: Gateway) -> None:
    """9,362 pipelined requests in one 256 KB write each held a parsed request: 22 MB per connection, 1.2 GB for 50."""
    before = gw.rss_bytes()
    socks = []
    for _ in range(20):
        sock = connect(gw)
        sock.sendall(b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n" * 9000)
        socks.append(sock)
    for sock in socks:
        sock.settimeout(5)
        reply = read_reply(sock)  # a few answers, then the connection is closed
        assert 1 <= reply.count(b"HTTP/1.1 ") <= 18, reply.count(b"HTTP/1.1 ")
        sock.close()
    assert gw.rss_bytes() - before < 60 * 1024 * 1024
    assert gw.metrics().sum("metergate_connections_refused_total", reason="pipelined") >= 20
    assert keyed_request(gw) == 200


def test_a_header_line_past_the_limit_in_one_read_is_refused(gw: Gateway) -> None:
    with connect(gw) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nX-Big: "
            + b"a" * 100_000
            + b"\r\nContent-Length: 0\r\n\r\n"
        )
        assert read_reply(sock).startswith(b"HTTP/1.1 431")


def test_requests_without_a_key_are_counted_but_never_stored(gw: Gateway) -> None:
    """172,195 rows in 10 s from one client without a key; in an outage they filled the spool and pushed out billed
    records. Requests that reached no provider for no one are metrics, not ledger rows."""
    import sqlite3

    db = Path(gw.config_path.parent / "ledger.db")
    assert keyed_request(gw) == 200
    time.sleep(0.3)  # written: the ledger flushes every 0.05 s
    before = gw.metrics()
    with sqlite3.connect(db) as conn:
        rows_before = wait_for(lambda: conn.execute("SELECT COUNT(*) FROM usage_records").fetchone()[0])
    with httpx.Client() as client:
        for _ in range(200):
            client.get(f"{gw.url}/v1/models", headers={"authorization": "Bearer nope"})
    assert keyed_request(gw) == 200
    assert gw.metrics().delta(before, "llm_requests_total", team="unauthenticated") == 200
    time.sleep(0.3)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM usage_records").fetchone()[0] == rows_before + 1


def test_a_body_of_millions_of_empty_objects_is_refused_before_it_is_parsed(gw: Gateway) -> None:
    """A 32 MiB body of `{}` took the gateway to 1 GB; eight of them to 5.3 GB."""
    before = gw.rss_bytes()
    body = b'{"model":"gpt-4o-mini","messages":[' + b"{}," * 2_700_000 + b"{}]}"
    r = httpx.post(
        f"{gw.url}/v1/chat/completions", content=body, headers={"authorization": f"Bearer {KEY}"}, timeout=60
    )
    assert r.status_code == 400 and "JSON objects and arrays" in r.text
    assert gw.rss_bytes() - before < 150 * 1024 * 1024
