"""Issue 10's parsers on responses recorded against the live APIs (tests/corpus, sources in SOURCES.jsonl):
images, audio, speech, batch results, Realtime sessions and Imagen, each priced against a hand-written invoice
(the provider's published prices, typed here) to the pico-dollar."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from metergate.batches import FORMATS, BatchMeter, MemoryBatchStore, ResultLines
from metergate.config import parse_config
from metergate.endpoints import match_endpoint
from metergate.exchange import Recorder, UpstreamClients
from metergate.labels import LabelPolicy
from metergate.ledger import BatchRow
from metergate.metrics import Meter
from metergate.pricing import PriceBook
from metergate.providers import build_upstream
from metergate.providers.gemini import imagen_usage
from metergate.providers.openai_media import MediaStreamMeter, media_request_facts, media_usage
from metergate.realtime import parse_realtime_usage
from metergate.usage import Usage, UsageNotReported, UsageRecord

CORPUS = Path(__file__).parent / "corpus"
AT = datetime(2026, 11, 29, tzinfo=UTC)  # prices as of this day (batch rates in force since 2026-10-14)
BOOK = PriceBook([])


def read(name: str) -> bytes:
    return (CORPUS / name).read_bytes()


def price(model: str, usage: Usage, provider: str = "openai") -> Decimal:
    return BOOK.quote(provider, provider, model, usage, AT).usd


def endpoint(path: str):  # type: ignore[no-untyped-def]
    return match_endpoint("POST", path).endpoint


# --- images ------------------------------------------------------------------------------------------------------

GENERATIONS = endpoint("/v1/images/generations")
EDITS = endpoint("/v1/images/edits")


@pytest.mark.parametrize(
    ("name", "op", "tokens", "invoice"),
    [
        # gpt-image-1: text $5, image input $10, output $40 per million tokens
        ("images-generations-gpt-image-1-n2-1024", GENERATIONS, (22, 0, 2112), "0.08459"),  # 22*5 + 2112*40
        ("images-generations-gpt-image-1-default", GENERATIONS, (11, 0, 6240), "0.249655"),
        ("images-edits-gpt-image-1-n2", EDITS, (478, 388, 8320), "0.33713"),  # 90*5 + 388*10 + 8320*40
        # recorded in 2025 without output_tokens_details: every output token is an image token
        ("images-edits-gpt-image-1-multi-b64", EDITS, (432, 388, 4160), "0.1705"),  # 44*5 + 388*10 + 4160*40
    ],
)
def test_gpt_image_usage(name: str, op, tokens: tuple[int, int, int], invoice: str) -> None:  # type: ignore[no-untyped-def]
    facts = media_request_facts(op, {"model": "gpt-image-1"}, None)
    usage = media_usage(op, read(f"openai/{name}.response.json"), "application/json", facts)
    assert (usage.input_tokens, usage.input_image_tokens, usage.output_tokens) == tokens
    assert usage.output_image_tokens == usage.output_tokens
    assert price("gpt-image-1", usage) == Decimal(invoice)


@pytest.mark.parametrize(
    ("name", "op", "unit", "invoice"),
    [
        ("images-generations-dalle3-1024x1792-hd-url", GENERATIONS, "image/1024x1792/hd", "0.12"),
        ("images-generations-dalle3-1024x1792-standard-url", GENERATIONS, "image/1024x1792/standard", "0.08"),
        ("images-generations-dalle2-256-url", GENERATIONS, "image/256x256/standard", "0.016"),
    ],
)
def test_dalle_priced_per_image_from_the_request(name: str, op, unit: str, invoice: str) -> None:  # type: ignore[no-untyped-def]
    request = orjson.loads(read(f"openai/{name}.request.json"))
    facts = media_request_facts(op, request, None)
    usage = media_usage(op, read(f"openai/{name}.response.json"), "application/json", facts)
    assert usage.units == {unit: 1}
    assert price(request["model"], usage) == Decimal(invoice)


# --- audio -------------------------------------------------------------------------------------------------------

TRANSCRIPTIONS = endpoint("/v1/audio/transcriptions")


@pytest.mark.parametrize(
    ("name", "model", "invoice"),
    [
        ("audio-transcriptions-whisper-1-json-usage-duration", "whisper-1", "0.0002"),  # 2 s at $0.006 a minute
        ("audio-transcriptions-whisper-1-verbose-json", "whisper-1", "0.0002"),
        # audio input $3, output $5 per million tokens: 17*3 + 11*5
        ("audio-transcriptions-gpt-4o-mini-transcribe-json-usage-tokens", "gpt-4o-mini-transcribe", "0.000106"),
        # gpt-4o-transcribe rates (text $2.50, audio $6, output $10): 13*2.5 + 81*6 + 240*10
        ("audio-transcriptions-gpt-4o-transcribe-diarize-known-speakers", "gpt-4o-transcribe-diarize", "0.0029185"),
    ],
)
def test_transcription_usage(name: str, model: str, invoice: str) -> None:
    facts = media_request_facts(TRANSCRIPTIONS, {"model": model}, None)
    usage = media_usage(TRANSCRIPTIONS, read(f"openai/{name}.response.json"), "application/json", facts)
    assert price(model, usage) == Decimal(invoice)


@pytest.mark.parametrize("fmt", ["text", "srt", "vtt"])
def test_plain_text_transcriptions_report_no_usage(fmt: str) -> None:
    facts = media_request_facts(TRANSCRIPTIONS, {"model": "whisper-1", "response_format": fmt}, None)
    body = read(f"openai/audio-transcriptions-whisper-1-{fmt}.response.txt")
    with pytest.raises(UsageNotReported):
        media_usage(TRANSCRIPTIONS, body, "text/plain; charset=utf-8", facts)


def sse_usage(name: str) -> Usage:
    meter = MediaStreamMeter()
    for i in range(0, len(data := read(name)), 1000):  # fed in arbitrary pieces, as the network delivers it
        meter.feed(data[i : i + 1000])
    assert meter.finished
    return meter.usage()


def test_speech_sse_usage() -> None:
    usage = sse_usage("openai/audio-speech-gpt-4o-mini-tts-sse.response.sse")
    assert (usage.input_tokens, usage.output_tokens) == (10, 93)
    assert price("gpt-4o-mini-tts", usage) == Decimal("0.001122")  # 10*0.60 + 93*12


def test_streamed_transcription_usage_crlf_framed() -> None:
    usage = sse_usage("openai/audio-transcriptions-gpt-4o-mini-transcribe-stream.response.sse")
    assert (usage.input_audio_tokens, usage.output_tokens) == (17, 10)
    assert price("gpt-4o-mini-transcribe", usage) == Decimal("0.000101")  # 17*3 + 10*5


# --- Imagen ------------------------------------------------------------------------------------------------------


def test_imagen_predict_counts_returned_images() -> None:
    usage = imagen_usage(orjson.loads(read("gemini/imagen-predict.response.json")))
    assert usage.units == {"image": 1}
    assert price("imagen-4.0-generate-001", usage, "google") == Decimal("0.04")


# --- Realtime ----------------------------------------------------------------------------------------------------


def test_realtime_session_usage_per_response() -> None:
    lines = read("openai/realtime-audio-cached-3turns-1.response.ws.jsonl").splitlines()
    done = [orjson.loads(line) for line in lines if b'"response.done"' in line[:100]]
    usages = [parse_realtime_usage(event["response"]["usage"]) for event in done]
    assert [u.input_tokens for u in usages] == [42, 139, 187]
    second = usages[1]
    assert (second.cache_read_tokens, second.cache_audio_read_tokens, second.input_audio_tokens) == (64, 64, 96)
    # gpt-realtime: text in $4, audio in $32, cached audio $0.40, text out $16, audio out $64 per million tokens:
    # 43*4 + (96-64)*32 + 64*0.40 + 18*16 + 43*64
    assert price("gpt-realtime", second) == Decimal("0.0042616")


# --- batch results -----------------------------------------------------------------------------------------------

CONFIG = parse_config(
    """\
providers:
  openai: {type: openai, base_url: "http://127.0.0.1:9"}
  anthropic: {type: anthropic, base_url: "http://127.0.0.1:9"}
  gemini: {type: gemini, base_url: "http://127.0.0.1:9"}
routes: [{model: "*", provider: openai}]
teams: [{name: search, apps: [batch]}]
""",
    source="test.yaml",
)


def batch_meter(records: list[UsageRecord]) -> BatchMeter:
    """A batch meter whose records land in `records` (no network: nothing is polled)."""
    labels = LabelPolicy(CONFIG, BOOK)
    recorder = Recorder(labels, BOOK, Meter(), sinks=[records.append])
    upstreams = {name: build_upstream(name, p) for name, p in CONFIG.providers.items()}
    clients = UpstreamClients(CONFIG, upstreams)
    return BatchMeter(recorder, labels, clients, upstreams, MemoryBatchStore(), clock=lambda: AT.timestamp())


def bill_batch(family: str, name: str) -> list[UsageRecord]:
    """The records a batch's recorded results produce, fed through the meter in small pieces, read twice."""
    records: list[UsageRecord] = []
    meter = batch_meter(records)
    row = BatchRow(family, "batch_1", family, "search", "batch", "key1", "/v1/batches", "", AT.timestamp())
    reader = ResultLines(FORMATS[family])
    data = read(name)
    for i in range(0, len(data), 777):
        reader.feed(data[i : i + 777])
    reader.end()
    items = reader.take()
    asyncio.run(meter.bill(row, items))
    asyncio.run(meter.bill(row, items))  # read again: billed once
    return records


@pytest.mark.parametrize(
    ("name", "tokens", "invoice"),
    [
        # gpt-4o-mini at the batch price: $0.075 in, $0.30 out per million tokens
        ("openai/batch-output-chat-1.response.jsonl", (26, 170), "0.00005295"),
        ("openai/batch-output-responses-1.response.jsonl", (18, 46), "0.00001515"),
        ("openai/batch-output-responses-2lines-1.response.jsonl", (28, 228), "0.0000705"),
        # text-embedding-3-small at the batch price: $0.01 per million tokens
        ("openai/batch-output-embeddings-1.response.jsonl", (10, 0), "0.0000001"),
    ],
)
def test_openai_batch_output_lines(name: str, tokens: tuple[int, int], invoice: str) -> None:
    records = bill_batch("openai", name)
    assert (sum(r.usage.input_tokens for r in records), sum(r.usage.output_tokens for r in records)) == tokens
    assert sum((r.cost_usd for r in records), Decimal(0)) == Decimal(invoice)
    assert all(r.usage.batch and r.priced and "batch" in " ".join(r.price_notes) for r in records)


def test_anthropic_batch_results_at_the_batch_price() -> None:
    records = bill_batch("anthropic", "anthropic/batch-results.response.jsonl")
    assert [(r.usage.input_tokens, r.usage.output_tokens) for r in records] == [(10, 12), (11, 19)]
    # claude-sonnet-4-5 at the batch price, $1.50 in and $7.50 out per million tokens: the results say
    # service_tier "batch", which is the batch discount, not a tier of its own
    assert sum((r.cost_usd for r in records), Decimal(0)) == Decimal("0.000264")
    assert all(r.priced for r in records)


def test_gemini_inline_batch_responses() -> None:
    obj = orjson.loads(read("gemini/batch-generatecontent-succeeded-inlined.response.json"))
    items = FORMATS["gemini"].inline_items(obj)
    assert items is not None and len(items) == 3
    records: list[UsageRecord] = []
    meter = batch_meter(records)
    label = "/v1beta/models/{model}:batchGenerateContent"
    row = BatchRow("gemini", "batches/x", "gemini", "search", "batch", "k", label, "", 0)
    asyncio.run(meter.bill(row, items))
    # gemini-2.5-flash-lite at the batch price, $0.05 in and $0.20 out per million: 24*0.05 + (8+8+9)*0.20
    assert [r.usage.output_tokens for r in records] == [8, 8, 9]
    assert sum((r.cost_usd for r in records), Decimal(0)) == Decimal("0.0000062")


def test_config_prices_per_image_second_and_character() -> None:
    """`prices:` entries set media prices: per image (flat or by size/quality), per second, per million
    characters; they override the table and genai-prices."""
    config = parse_config(
        """\
providers: {openai: {type: openai, base_url: "http://127.0.0.1:9"}}
routes: [{model: "*", provider: openai}]
prices:
  - {model: "dall-e-3", per_image: {1024x1024/hd: 0.5, 1792x1024: 0.25}}
  - {model: "my-painter", per_image: 0.03}
  - {model: "whisper-1", per_second: 0.001}
  - {model: "tts-1", per_million_characters: 20}
""",
        source="prices.yaml",
    )
    book = PriceBook(config.prices)

    def quote(model: str, unit: str, n: int) -> Decimal:
        usage = Usage()
        usage.add_units(unit, n)
        return book.quote("openai", "openai", model, usage, AT).usd

    assert quote("dall-e-3", "image/1024x1024/hd", 2) == Decimal("1.0")
    assert quote("dall-e-3", "image/1792x1024/standard", 1) == Decimal("0.25")
    assert quote("my-painter", "image/1024x1024/standard", 3) == Decimal("0.09")
    assert quote("whisper-1", "audio_second", 61) == Decimal("0.061")
    assert quote("tts-1", "character", 1000) == Decimal("0.02")


@pytest.mark.parametrize(
    ("prices", "error"),
    [
        ("{model: x, per_image: {huge: 1}}", "per_image keys"),
        ("{model: x, per_image: {1024x1024/HD: 1}}", "per_image keys"),
        ("{model: x, per_second: -1}", "greater than or equal"),
        ("{model: x, units: {imagez: 1}}", "unknown unit"),
    ],
)
def test_config_media_prices_validated(prices: str, error: str) -> None:
    from metergate.config import ConfigError

    text = (
        'providers: {openai: {type: openai, base_url: "http://127.0.0.1:9"}}\n'
        'routes: [{model: "*", provider: openai}]\n'
        f"prices: [{prices}]\n"
    )
    with pytest.raises(ConfigError, match=error):
        parse_config(text, source="prices.yaml")
