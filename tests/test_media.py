"""Images and audio through the gateway with the official SDKs (issue 10): tokens, units and dollars checked
against what the simulated provider billed, priced with the independent figures in tests/pricesheet.py."""

from __future__ import annotations

import base64
import sqlite3
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest

from metergate.simulator import Bill, SimulatorThread
from tests.conftest import KEYS, Gateway, make_gateway, wait_for
from tests.pricesheet import media_cost

SCOPE = "ads/bidder"
LABELS = {"team": "ads", "app": "bidder"}


@pytest.fixture(scope="module")
def gw(simulator: SimulatorThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("media")
    gateway = make_gateway(
        tmp,
        simulator.url,
        routes_first=(
            '  - {model: "dall-e-*", provider: openai}\n'
            '  - {model: "whisper-*", provider: openai}\n'
            '  - {model: "tts-*", provider: openai}\n'
            '  - {model: "imagen-*", provider: gemini}\n'
            '  - {model: "painter", provider: openai, upstream_model: gpt-image-1}\n'
        ),
        extra=f'ledger: {{url: "sqlite:///{tmp / "ledger.db"}", flush_interval_s: 0.05}}\n',
    ).start()
    yield gateway
    gateway.stop()


def oai(gw: Gateway, tag: str, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{gw.url}/v1",
        api_key=KEYS[SCOPE],
        max_retries=0,
        default_headers={"x-sim-tag": tag, **headers},
    )


def rows(gw: Gateway, endpoint: str) -> list[sqlite3.Row]:
    db = Path(gw.config_path).parent / "ledger.db"
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        return conn.execute(
            "SELECT * FROM usage_records WHERE endpoint = ? ORDER BY started_at", (endpoint,)
        ).fetchall()


def assert_billed(gw: Gateway, before, bills: list[Bill], endpoint: str, model: str, unit: str | None = None) -> None:  # type: ignore[no-untyped-def]
    """Metrics moved by exactly what the simulator billed: tokens, units, dollars."""
    labels = {**LABELS, "endpoint": endpoint, "model": model}
    want_in = sum(b.reported.input for b in bills)
    want_out = sum(b.reported.output for b in bills)
    want_cost = sum((media_cost(b) for b in bills), Decimal(0))
    assert wait_for(lambda: gw.metrics().delta(before, "llm_requests_total", **labels) == len(bills))
    after = gw.metrics()
    assert after.delta(before, "llm_tokens_in", **labels) == want_in
    assert after.delta(before, "llm_tokens_out", **labels) == want_out
    if unit is not None:
        want_units = sum(sum(n for u, n in b.units.items() if u.split("/")[0] == unit) for b in bills)
        assert after.delta(before, "llm_billed_units_total", unit=unit, **labels) == want_units
    got = Decimal(repr(after.delta(before, "llm_total_cost_usd", **labels)))
    assert abs(got - want_cost) <= Decimal("1e-9"), (got, want_cost)
    assert after.delta(before, "llm_unmetered_requests_total", **labels) == 0


# --- images --------------------------------------------------------------------------------------------------------


def test_gpt_image_generation_tokens_exact(gw: Gateway, simulator: SimulatorThread, tag: str) -> None:
    before = gw.metrics()
    result = oai(gw, tag, **{"x-sim-output-tokens": "1056"}).images.generate(
        model="gpt-image-1", prompt="a lighthouse", n=2, size="1024x1024"
    )
    assert len(result.data) == 2 and result.usage is not None and result.usage.output_tokens == 2112
    bills = simulator.app.billed(tag)
    assert_billed(gw, before, bills, "/v1/images/generations", "gpt-image-1")
    row = rows(gw, "/v1/images/generations")[-1]
    assert row["tokens_out"] == 2112 and Decimal(row["cost_pusd"]) / 10**12 == media_cost(bills[0])


def test_dalle_priced_per_image_by_size_and_quality(gw: Gateway, simulator: SimulatorThread, tag: str) -> None:
    before = gw.metrics()
    client = oai(gw, tag)
    client.images.generate(model="dall-e-3", prompt="a fox", size="1792x1024", quality="hd")
    client.images.generate(model="dall-e-2", prompt="a fox", n=3, size="256x256")
    bills = simulator.app.billed(tag)
    assert [b.units for b in bills] == [{"image/1792x1024/hd": 1}, {"image/256x256/standard": 3}]
    # $0.12 + 3 x $0.016: the prices in force when DALL-E was retired
    assert sum(media_cost(b) for b in bills) == Decimal("0.168")
    assert_billed(gw, before, bills[:1], "/v1/images/generations", "dall-e-3", unit="image")
    assert_billed(gw, before, bills[1:], "/v1/images/generations", "dall-e-2", unit="image")
    details = rows(gw, "/v1/images/generations")[-1]["details"]
    assert "image/256x256/standard" in details


def test_image_edit_multipart_forwarded_byte_for_byte(gw: Gateway, simulator: SimulatorThread, tag: str) -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8
    before = gw.metrics()
    result = oai(gw, tag, **{"x-sim-output-tokens": "1056"}).images.edit(
        model="gpt-image-1", image=[("a.png", png, "image/png"), ("b.png", png, "image/png")], prompt="merge", n=1
    )
    assert result.usage is not None and result.usage.input_tokens_details.image_tokens == 388
    bills = simulator.app.billed(tag)
    assert bills[0].planned.input_image == 388
    assert bills[0].body.count(png) == 2 and bills[0].headers["content-type"].startswith("multipart/form-data")
    assert_billed(gw, before, bills, "/v1/images/edits", "gpt-image-1")


def test_multipart_body_reaches_the_provider_unchanged(gw: Gateway, simulator: SimulatorThread, tag: str) -> None:
    """The exact bytes a client sent (its boundary, part order, file bytes) are what the provider receives."""
    request = httpx.Request(
        "POST",
        f"{gw.url}/v1/audio/transcriptions",
        files=[("file", ("x.wav", bytes(range(256)) * 16, "audio/wav"))],
        data={"model": "whisper-1", "response_format": "json"},
    )
    body = request.read()
    r = httpx.post(
        request.url,
        content=body,
        headers={**gw.headers(SCOPE), "content-type": request.headers["content-type"], "x-sim-tag": tag},
    )
    assert r.status_code == 200
    assert simulator.app.billed(tag)[0].body == body


def test_image_edit_alias_rewrites_only_the_model_field(gw: Gateway, simulator: SimulatorThread, tag: str) -> None:
    png = bytes(range(256)) * 4
    before = gw.metrics()
    oai(gw, tag).images.edit(model="painter", image=("a.png", png, "image/png"), prompt="x")
    bills = simulator.app.billed(tag)
    assert bills[0].model == "gpt-image-1"
    assert_billed(gw, before, bills, "/v1/images/edits", "gpt-image-1")


def test_image_stream_usage_from_completed_events(gw: Gateway, simulator: SimulatorThread, tag: str) -> None:
    before = gw.metrics()
    events = list(
        oai(gw, tag, **{"x-sim-output-tokens": "272"}).images.generate(
            model="gpt-image-1", prompt="a kite", n=2, stream=True, partial_images=1
        )
    )
    assert [e.type for e in events].count("image_generation.completed") == 2
    assert_billed(gw, before, simulator.app.billed(tag), "/v1/images/generations", "gpt-image-1")


@pytest.mark.parametrize(
    ("field", "value"),
    [("model", "dall-e-2"), ("n", "1"), ("size", "256x256")],
)
def test_image_edit_with_a_read_field_twice_is_refused(gw: Gateway, simulator, field: str, value: str) -> None:  # type: ignore[no-untyped-def]
    """Two `model` parts could be priced as one model and run as the other: refused before anything is sent."""
    seen = len(simulator.app.bills)
    files = [("image", ("a.png", b"png", "image/png"))]
    data = {"model": "gpt-image-1", "prompt": "x", "n": "1", "size": "1024x1024"}
    request = httpx.Request("POST", f"{gw.url}/v1/images/edits", data=data, files=files, headers=gw.headers(SCOPE))
    body = request.read()
    boundary = request.headers["content-type"].split("boundary=")[1].encode()
    extra = (
        b"--"
        + boundary
        + b'\r\nContent-Disposition: form-data; name="'
        + field.encode()
        + b'"\r\n\r\n'
        + value.encode()
        + b"\r\n"
    )
    r = httpx.post(
        f"{gw.url}/v1/images/edits",
        content=extra + body,
        headers={**gw.headers(SCOPE), "content-type": request.headers["content-type"]},
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "given twice" in r.json()["error"]["message"]
    assert len(simulator.app.bills) == seen


# --- audio ---------------------------------------------------------------------------------------------------------


def test_whisper_transcription_per_second(gw: Gateway, simulator: SimulatorThread, tag: str) -> None:
    before = gw.metrics()
    result = oai(gw, tag, **{"x-sim-audio-seconds": "61"}).audio.transcriptions.create(
        model="whisper-1", file=("a.wav", b"RIFF" + b"\x00" * 4000)
    )
    assert result.text
    bills = simulator.app.billed(tag)
    assert media_cost(bills[0]) == Decimal("0.0061")  # 61 s at $0.006 a minute
    assert_billed(gw, before, bills, "/v1/audio/transcriptions", "whisper-1", unit="audio_second")


def test_transcription_tokens_audio_priced_as_audio(gw: Gateway, simulator: SimulatorThread, tag: str) -> None:
    before = gw.metrics()
    client = oai(gw, tag, **{"x-sim-input-tokens": "17", "x-sim-output-tokens": "11"})
    client.audio.transcriptions.create(model="gpt-4o-mini-transcribe", file=("a.wav", b"RIFF" + b"\x01" * 2000))
    bills = simulator.app.billed(tag)
    assert media_cost(bills[0]) == Decimal("0.000106")  # 17 audio tokens at $3/M, 11 out at $5/M
    assert_billed(gw, before, bills, "/v1/audio/transcriptions", "gpt-4o-mini-transcribe")


def test_streamed_transcription_usage_from_done_event(gw: Gateway, simulator: SimulatorThread, tag: str) -> None:
    before = gw.metrics()
    stream = oai(gw, tag).audio.transcriptions.create(
        model="gpt-4o-mini-transcribe", file=("a.wav", b"RIFF" + b"\x02" * 3000), stream=True
    )
    kinds = [event.type for event in stream]
    assert kinds[-1] == "transcript.text.done"
    assert_billed(gw, before, simulator.app.billed(tag), "/v1/audio/transcriptions", "gpt-4o-mini-transcribe")


def test_text_format_transcription_relayed_and_counted_unmetered(gw: Gateway, simulator, tag: str) -> None:  # type: ignore[no-untyped-def]
    """whisper-1 answers text, srt and vtt without usage: the client gets its transcript, and the request shows in
    llm_unmetered_requests_total (what the provider billed is not in the response)."""
    before = gw.metrics()
    text = oai(gw, tag).audio.transcriptions.create(model="whisper-1", file=("a.wav", b"RIFF"), response_format="text")
    assert text.startswith("Hello")
    labels = {**LABELS, "endpoint": "/v1/audio/transcriptions", "model": "whisper-1"}
    assert wait_for(lambda: gw.metrics().delta(before, "llm_unmetered_requests_total", **labels) == 1)
    assert gw.metrics().delta(before, "llm_errors_total", **labels) == 0


def test_tts_per_character_and_audio_relayed_untouched(gw: Gateway, simulator: SimulatorThread, tag: str) -> None:
    text = "Metering every token, and every character: naïve café ☕"
    before = gw.metrics()
    response = oai(gw, tag).audio.speech.create(model="tts-1-hd", voice="alloy", input=text, response_format="opus")
    audio = response.read()
    assert response.response.headers["content-type"] == "audio/opus" and len(audio) == 64 * len(text)
    bills = simulator.app.billed(tag)
    assert bills[0].units == {"character": len(text)}
    assert_billed(gw, before, bills, "/v1/audio/speech", "tts-1-hd", unit="character")


def test_gpt_tts_sse_tokens_exact(gw: Gateway, simulator: SimulatorThread, tag: str) -> None:
    before = gw.metrics()
    response = oai(gw, tag, **{"x-sim-input-tokens": "10", "x-sim-output-tokens": "93"}).audio.speech.create(
        model="gpt-4o-mini-tts", voice="alloy", input="Hello, world!", stream_format="sse"
    )
    body = response.read()
    assert b"speech.audio.done" in body and b"\r\n\r\n" in body
    bills = simulator.app.billed(tag)
    assert media_cost(bills[0]) == Decimal("0.001122")
    assert_billed(gw, before, bills, "/v1/audio/speech", "gpt-4o-mini-tts")


def test_translation_without_usage_counted_unmetered(gw: Gateway, tag: str) -> None:
    before = gw.metrics()
    # openai 3.x marks translations deprecated; the API still serves them.
    with pytest.warns(DeprecationWarning, match="deprecated"):
        oai(gw, tag).audio.translations.create(model="whisper-1", file=("a.wav", b"RIFF"))
    labels = {**LABELS, "endpoint": "/v1/audio/translations"}
    assert wait_for(lambda: gw.metrics().delta(before, "llm_unmetered_requests_total", **labels) == 1)


# --- Imagen --------------------------------------------------------------------------------------------------------


def test_imagen_predict_per_image(gw: Gateway, simulator: SimulatorThread, tag: str) -> None:
    """google-genai 3.6 refuses `generate_images` on the Gemini Developer API ("only supported in Gemini
    Enterprise Agent Platform mode"), so the wire call older SDKs make is sent directly."""
    before = gw.metrics()
    r = httpx.post(
        f"{gw.url}/v1beta/models/imagen-4.0-generate-001:predict",
        headers={"x-goog-api-key": KEYS[SCOPE], "x-sim-tag": tag},
        json={"instances": [{"prompt": "a robot"}], "parameters": {"sampleCount": 3}},
    )
    assert r.status_code == 200 and len(r.json()["predictions"]) == 3
    base64.b64decode(r.json()["predictions"][0]["bytesBase64Encoded"])
    bills = simulator.app.billed(tag)
    assert media_cost(bills[0]) == Decimal("0.12")
    assert_billed(gw, before, bills, "/v1beta/models/{model}:predict", "imagen-4.0-generate", unit="image")


# --- adversarial review of the media surface -----------------------------------------------------------------------


def test_image_request_without_a_model_is_refused(gw: Gateway, simulator: SimulatorThread) -> None:
    """The API's default model depends on the other parameters (DALL-E 2, or a GPT image model when one of theirs
    is present): the gateway does not guess, it asks for the model."""
    seen = len(simulator.app.bills)
    r = httpx.post(
        f"{gw.url}/v1/images/generations",
        headers=gw.headers(SCOPE),
        json={"prompt": "a stop sign", "quality": "high", "size": "1024x1536"},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_model"
    assert len(simulator.app.bills) == seen


@pytest.mark.parametrize(
    "content_type",
    [
        "multipart/form-data; boundary=A; boundary=B",
        "multipart/form-data; boundary=A; BOUNDARY=B",
        "multipart/form-data; boundary=A; boundary*=utf-8''B",
    ],
)
def test_multipart_whose_boundary_parsers_could_disagree_on_is_refused(gw: Gateway, content_type: str) -> None:
    body = (
        b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\ndall-e-2\r\n--B--\r\n'
        b'--A\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-image-1\r\n'
        b'--A\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n--A--\r\n'
    )
    r = httpx.post(
        f"{gw.url}/v1/images/edits", content=body, headers={**gw.headers(SCOPE), "content-type": content_type}
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_multipart_with_text_around_its_parts_is_refused(gw: Gateway) -> None:
    request = httpx.Request(
        "POST", f"{gw.url}/v1/audio/transcriptions", files={"file": ("a.wav", b"RIFF")}, data={"model": "whisper-1"}
    )
    body = request.read()
    for tampered in (b"preamble\r\n" + body, body + b"\r\n--x\r\nmore"):
        r = httpx.post(
            request.url,
            content=tampered,
            headers={**gw.headers(SCOPE), "content-type": request.headers["content-type"]},
        )
        assert r.status_code == 400, tampered[:40]
