"""Realtime sessions over WebSocket with the official openai SDK (issue 10): each `response.done` metered while the
session runs, transcriptions at their own model, abandoned sessions still recorded, budgets enforced mid-session."""

from __future__ import annotations

import base64
import sqlite3
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest
import websockets.exceptions
import websockets.sync.client

from metergate.simulator import Bill, SimulatorThread
from tests.conftest import KEYS, Gateway, make_gateway, wait_for

SCOPE = "search/ranker"
LABELS = {"team": "search", "app": "ranker", "endpoint": "/v1/realtime"}
MTOK = Decimal(1_000_000)

# developers.openai.com/api/docs/models/gpt-realtime: text in $4, cached $0.40, audio in $32, cached audio $0.40,
# text out $16, audio out $64 per million tokens; gpt-realtime-whisper $1.02 an hour of audio.
REALTIME = {
    "text_in": "4",
    "cached": "0.40",
    "audio_in": "32",
    "cached_audio": "0.40",
    "text_out": "16",
    "audio_out": "64",
}


def realtime_cost(bill: Bill) -> Decimal:
    if bill.api == "openai.transcription":
        return Decimal("1.02") * bill.units["audio_second"] / 3600
    b = bill.planned
    p = {k: Decimal(v) for k, v in REALTIME.items()}
    text_in = b.input - b.input_audio
    cached_text = b.cached - b.cached_audio
    return (
        (text_in - cached_text) * p["text_in"]
        + cached_text * p["cached"]
        + (b.input_audio - b.cached_audio) * p["audio_in"]
        + b.cached_audio * p["cached_audio"]
        + (b.output - b.output_audio) * p["text_out"]
        + b.output_audio * p["audio_out"]
    ) / MTOK


@pytest.fixture(scope="module")
def gw(simulator: SimulatorThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("realtime")
    gateway = make_gateway(
        tmp,
        simulator.url,
        server_extra=", drain_timeout_s: 5",
        extra=f'ledger: {{url: "sqlite:///{tmp / "ledger.db"}", flush_interval_s: 0.05}}\n',
    ).start()
    yield gateway
    gateway.stop()


def client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEYS[SCOPE], max_retries=0)


def turn(conn, text: str) -> list[str]:  # type: ignore[no-untyped-def]
    conn.conversation.item.create(
        item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    )
    conn.response.create()
    kinds = []
    for event in conn:
        kinds.append(event.type)
        if event.type == "response.done":
            return kinds
    raise AssertionError(f"the session ended before response.done: {kinds}")


def assert_realtime_billed(gw: Gateway, before, bills: list[Bill]) -> None:  # type: ignore[no-untyped-def]
    want_in = sum(b.reported.input for b in bills)
    want_cost = sum((realtime_cost(b) for b in bills), Decimal(0))
    assert wait_for(lambda: gw.metrics().delta(before, "llm_tokens_in", **LABELS) == want_in), (
        gw.metrics().delta(before, "llm_tokens_in", **LABELS),
        want_in,
    )
    after = gw.metrics()
    assert after.delta(before, "llm_tokens_out", **LABELS) == sum(b.reported.output for b in bills)
    assert after.delta(before, "llm_tokens_in_cached", **LABELS) == sum(b.reported.cached for b in bills)
    got = Decimal(repr(after.delta(before, "llm_total_cost_usd", **LABELS)))
    assert abs(got - want_cost) <= Decimal("1e-9"), (got, want_cost)


def test_each_response_metered_while_the_session_runs(gw: Gateway, simulator: SimulatorThread, tag: str) -> None:
    before = gw.metrics()
    open_before = before.sum("metergate_connections_open", listener="api")
    headers = {"x-sim-tag": tag, "x-sim-cached-tokens": "64"}
    with client(gw).realtime.connect(model="gpt-realtime", extra_headers=headers) as conn:
        for i in range(3):
            kinds = turn(conn, f"turn {i}")
            assert "response.created" in kinds and kinds[-1] == "response.done"
            # Recorded as it happened: the metrics already show this turn while the session is still open.
            assert_realtime_billed(gw, before, simulator.app.billed(tag))
        assert gw.metrics().delta(before, "llm_requests_in_flight", **LABELS) in (0, 1)
    bills = simulator.app.billed(tag)
    assert len(bills) == 3 and all(b.reported.cached_audio for b in bills)
    # The upgraded connection is not left counted as an open HTTP connection.
    assert wait_for(lambda: gw.metrics().sum("metergate_connections_open", listener="api") <= open_before)
    assert_realtime_billed(gw, before, bills)
    db = Path(gw.config_path).parent / "ledger.db"
    with sqlite3.connect(db) as conn:
        n = conn.execute(
            "SELECT COUNT(*) FROM usage_records WHERE endpoint = '/v1/realtime' AND team = 'search' AND tokens_in > 0"
        ).fetchone()[0]
    assert n >= 3


def test_input_transcription_billed_at_its_own_model(gw: Gateway, simulator: SimulatorThread, tag: str) -> None:
    before = gw.metrics()
    with client(gw).realtime.connect(model="gpt-realtime", extra_headers={"x-sim-tag": tag}) as conn:
        conn.session.update(
            session={"type": "realtime", "audio": {"input": {"transcription": {"model": "gpt-realtime-whisper"}}}}
        )
        pcm = b"\x00\x01" * 24000 * 3  # three seconds of 24 kHz 16-bit audio
        conn.input_audio_buffer.append(audio=base64.b64encode(pcm).decode())
        conn.input_audio_buffer.commit()
        for event in conn:
            if event.type == "conversation.item.input_audio_transcription.completed":
                break
    bills = simulator.app.billed(tag)
    assert [b.api for b in bills] == ["openai.transcription"] and bills[0].units == {"audio_second": 3}
    labels = {**LABELS, "model": "gpt-realtime-whisper"}
    assert wait_for(lambda: gw.metrics().delta(before, "llm_billed_units_total", unit="audio_second", **labels) == 3)
    got = Decimal(repr(gw.metrics().delta(before, "llm_total_cost_usd", **labels)))
    assert abs(got - realtime_cost(bills[0])) <= Decimal("1e-9")


def test_abandoned_session_still_records_the_response_in_progress(
    gw: Gateway, simulator: SimulatorThread, tag: str
) -> None:
    """The client hangs up while a response is being generated: the provider finishes and bills it, and the
    gateway reads on until that response's usage arrives."""
    before = gw.metrics()
    url = gw.url.replace("http", "ws") + "/v1/realtime?model=gpt-realtime"
    headers = {**gw.headers(SCOPE), "x-sim-tag": tag, "x-sim-chunk-delay-ms": "100", "x-sim-chunks": "6"}
    with websockets.sync.client.connect(url, additional_headers=headers) as ws:
        assert '"session.created"' in str(ws.recv())
        ws.send('{"type": "response.create"}')
        assert '"response.created"' in str(ws.recv())
    assert wait_for(lambda: len(simulator.app.billed(tag)) == 1, timeout=5)
    assert_realtime_billed(gw, before, simulator.app.billed(tag))


def test_sessions_refused_and_closed_past_a_block_budget(simulator: SimulatorThread, tmp_path: Path, tag: str) -> None:
    gateway = make_gateway(
        tmp_path,
        simulator.url,
        extra="budgets:\n  - {team: search, app: ranker, period: day, limit_usd: 0.000001, action: block}\n",
    ).start()
    try:
        with client(gateway).realtime.connect(model="gpt-realtime", extra_headers={"x-sim-tag": tag}) as conn:
            conn.response.create()
            kinds = []
            for event in conn:
                kinds.append(event.type)
                if event.type == "error":
                    assert event.error.code == "budget_exceeded"
                    break
            assert "response.done" in kinds and kinds[-1] == "error"
            with pytest.raises(websockets.exceptions.ConnectionClosedError, match="1008"):
                conn.response.create()
                next(iter(conn))
        assert len(simulator.app.billed(tag)) == 1
        # A new session is refused before the upgrade, with the API's error body.
        r = httpx.get(
            f"{gateway.url}/v1/realtime?model=gpt-realtime",
            headers={
                **gateway.headers(SCOPE),
                "connection": "upgrade",
                "upgrade": "websocket",
                "sec-websocket-version": "13",
                "sec-websocket-key": base64.b64encode(b"0123456789abcdef").decode(),
            },
        )
        assert r.status_code == 429 and r.json()["error"]["code"] == "budget_exceeded"
    finally:
        gateway.stop()


def test_wrong_key_refused_before_the_upgrade(gw: Gateway) -> None:
    with pytest.raises(websockets.exceptions.InvalidStatus) as info:  # type: ignore[attr-defined]
        websockets.sync.client.connect(
            gw.url.replace("http", "ws") + "/v1/realtime?model=gpt-realtime",
            additional_headers={"authorization": "Bearer nope"},
        )
    assert info.value.response.status_code == 401


def test_browser_subprotocol_key_is_accepted_and_never_forwarded(gw: Gateway, simulator, tag: str) -> None:  # type: ignore[no-untyped-def]
    url = gw.url.replace("http", "ws") + "/v1/realtime?model=gpt-realtime"
    with websockets.sync.client.connect(
        url,
        subprotocols=["realtime", f"openai-insecure-api-key.{KEYS[SCOPE]}"],  # type: ignore[list-item]
        additional_headers={"x-sim-tag": tag},
    ) as ws:
        assert '"session.created"' in str(ws.recv())
        assert ws.subprotocol == "realtime"
    seen = simulator.app.handshakes[-1]
    assert seen["subprotocols"] == ["realtime"] and KEYS[SCOPE] not in str(seen)
    assert seen["headers"]["authorization"] == "Bearer sk-sim-openai"


def test_oversized_frames_and_too_many_sessions_are_refused(
    simulator: SimulatorThread, tmp_path: Path, tag: str
) -> None:
    gateway = make_gateway(
        tmp_path, simulator.url, server_extra=", max_ws_message_bytes: 65536, max_sessions_per_key: 2"
    ).start()
    try:
        url = gateway.url.replace("http", "ws") + "/v1/realtime?model=gpt-realtime"
        headers = {**gateway.headers(SCOPE), "x-sim-tag": tag}
        with websockets.sync.client.connect(url, additional_headers=headers, max_size=None) as ws:
            ws.recv()
            ws.send('{"type": "input_audio_buffer.append", "audio": "' + "A" * 100_000 + '"}')
            with pytest.raises(websockets.exceptions.ConnectionClosed) as info:
                ws.recv(timeout=5)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1009  # message too big
        with (
            websockets.sync.client.connect(url, additional_headers=headers),
            websockets.sync.client.connect(url, additional_headers=headers),
        ):
            with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
                websockets.sync.client.connect(url, additional_headers=headers)
            assert refused.value.response.status_code == 429
        # Closed sessions free their slots.
        with websockets.sync.client.connect(url, additional_headers=headers) as ws:
            assert '"session.created"' in str(ws.recv())
    finally:
        gateway.stop()
