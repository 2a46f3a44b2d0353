"""Responses recorded against the live provider APIs, replayed byte for byte through a real gateway.

`tests/corpus/` holds them, each with its source repository, path, commit and licence in `SOURCES.jsonl` (see
`tests/corpus/README.md`). The simulated provider answers each request with one recording (`x-sim-replay`); the
gateway meters it as it would the real provider's answer; the ledger row must equal what
`tests/corpus_reference.py` computes from the same bytes, token for token and to the pico-dollar, and a few of
them equal invoices worked out by hand below.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from metergate.simulator import DEFAULT_KEYS, SimulatedProvider, SimulatorThread
from metergate.usage import from_pusd
from tests import corpus_reference as ref
from tests.conftest import KEYS, Gateway, make_gateway, wait_for

CORPUS = Path(__file__).parent / "corpus"
SOURCES = [json.loads(line) for line in (CORPUS / "SOURCES.jsonl").read_text().splitlines() if line.strip()]
KEY = KEYS["search/ranker"]

# Endpoints the gateway meters today (issue 10 adds images, realtime, batches, the Interactions API...).
REPLAYED = {
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/embeddings",
    "/v1beta/models/MODEL:batchEmbedContents",
    "/v1/chat/completions",
    "/v1/responses",
    "/v1beta/models/MODEL:generateContent",
    "/v1beta/models/MODEL:streamGenerateContent",
    "/v1beta/models/MODEL:streamGenerateContent?alt=sse",
    "/v1beta1/projects/P/locations/L/publishers/google/models/MODEL:generateContent",
    "/v1beta1/projects/P/locations/L/publishers/google/models/MODEL:streamGenerateContent?alt=sse",
    "/v1/projects/P/locations/L/publishers/google/models/MODEL:streamGenerateContent?alt=sse",
}


def recordings() -> list[dict[str, Any]]:
    # Background responses are refused until their read-back is metered (issue 10).
    return [
        s
        for s in SOURCES
        if s["kind"] == "response" and s["endpoint"] in REPLAYED and "/responses-background-" not in s["file"]
    ]


def request_file(response_file: str) -> Path:
    return CORPUS / re.sub(r"\.response\..*$", ".request.json", response_file)


def recorded_model(body: bytes, provider: str) -> str:
    if provider == "gemini":
        found = re.search(rb'"modelVersion"\s*:\s*"([^"]+)"', body)
        return found.group(1).decode() if found else "gemini-2.5-flash"
    found = re.search(rb'"model"\s*:\s*"([^"]+)"', body)
    return found.group(1).decode() if found else {"anthropic": "claude-sonnet-4-5", "openai": "gpt-4o"}[provider]


@pytest.fixture(scope="module")
def replay() -> Iterator[SimulatorThread]:
    sim = SimulatorThread(SimulatedProvider(DEFAULT_KEYS, corpus=CORPUS)).start()
    yield sim
    sim.stop()


@pytest.fixture(scope="module")
def gw(replay: SimulatorThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("corpus")
    gateway = make_gateway(
        tmp,
        replay.url,
        routes_first=(
            '  - {model: "*", provider: openai}\n  - {model: "*", provider: anthropic}\n'
            '  - {model: "*", provider: gemini}\n'
        ),
        extra=f'ledger: {{url: "sqlite:///{tmp}/ledger.db", flush_interval_s: 0.02}}\n',
    ).start()
    yield gateway
    gateway.stop()


def send(gw: Gateway, source: dict[str, Any]) -> tuple[httpx.Response, str, str, str]:
    """Replays one recording through the gateway; returns the response, its request id, the model priced, and
    the image model (Responses image generation)."""
    provider, endpoint, stream, file = source["provider"], source["endpoint"], source["stream"], source["file"]
    recorded = (CORPUS / file).read_bytes()
    request_path = request_file(file)
    body: dict[str, Any] = json.loads(request_path.read_bytes()) if request_path.exists() else {}
    if provider == "gemini" and endpoint.endswith(":batchEmbedContents"):
        model = body["requests"][0]["model"].removeprefix("models/")
        path = f"/v1beta/models/{model}:batchEmbedContents"
        auth = {"x-goog-api-key": KEY}
    elif provider == "gemini":
        model = recorded_model(recorded, provider).removeprefix("models/")
        method = "streamGenerateContent" if stream else "generateContent"
        query = "?alt=sse" if file.endswith((".sse", ".chunks.jsonl")) else ""
        path = f"/v1beta/models/{model}:{method}{query}"
        body = {k: v for k, v in body.items() if k in ("contents", "generationConfig", "tools")} or {"contents": []}
        auth = {"x-goog-api-key": KEY}
    else:
        model = body.get("model") or recorded_model(recorded, provider)
        path = endpoint
        body = {**body, "model": model, "stream": stream}
        body.pop("background", None)
        if provider == "anthropic":
            body.setdefault("max_tokens", 1024)
            body.setdefault("messages", [{"role": "user", "content": "replay"}])
            auth = {"x-api-key": KEY}
        else:
            auth = {"authorization": f"Bearer {KEY}"}
            if endpoint == "/v1/chat/completions":
                body.setdefault("messages", [{"role": "user", "content": "replay"}])
            else:
                body.setdefault("input", "replay")
            if endpoint == "/v1/embeddings":
                body.pop("stream")
    image_model = next(
        (
            t.get("model")
            for t in body.get("tools") or []
            if isinstance(t, dict) and t.get("type") == "image_generation"
        ),
        None,
    )
    response = httpx.post(f"{gw.url}{path}", json=body, headers={**auth, "x-sim-replay": file}, timeout=60)
    return response, response.headers.get("x-metergate-request-id", ""), model, image_model or "gpt-image-1"


def expected(source: dict[str, Any], model: str, image_model: str) -> ref.Expected:
    provider, stream, file = source["provider"], source["stream"], source["file"]
    recorded = (CORPUS / file).read_bytes()
    if file.endswith(".chunks.jsonl"):
        from metergate.simulator.app import replay_sse

        recorded = replay_sse(provider, recorded)
    at = ref.now()
    endpoint = source["endpoint"]
    if endpoint == "/v1/messages/count_tokens":
        return ref.Expected()  # free
    if endpoint == "/v1/embeddings":
        return ref.openai_embeddings(recorded, model, at)
    if endpoint.endswith(":batchEmbedContents"):
        return ref.gemini_embeddings(recorded, model, at)
    if provider == "anthropic":
        return ref.anthropic(recorded, stream, model, at)
    if provider == "gemini":
        return ref.gemini(recorded, stream, file.endswith(".stream.json"), model, at)
    if source["endpoint"] == "/v1/responses":
        return ref.openai_responses(recorded, stream, model, at, image_model)
    return ref.openai_chat(recorded, stream, model, at)


def ledger_row(gw: Gateway, request_id: str) -> dict[str, Any]:
    db = gw.config_path.parent / "ledger.db"

    def fetch() -> dict[str, Any] | None:
        with sqlite3.connect(db) as conn:
            conn.row_factory = sqlite3.Row
            row = conn.execute("SELECT * FROM usage_records WHERE request_id = ?", (request_id,)).fetchone()
            return dict(row) if row else None

    row = wait_for(fetch)
    assert row is not None, request_id
    return row


@pytest.mark.parametrize("source", recordings(), ids=lambda s: s["file"])
def test_a_recorded_response_is_metered_exactly(gw: Gateway, source: dict[str, Any]) -> None:
    response, request_id, model, image_model = send(gw, source)
    assert response.status_code == 200, response.text[:500]
    row = ledger_row(gw, request_id)
    want = expected(source, model, image_model)
    details = json.loads(row["details"]) if row["details"] else {}
    got = {
        "tokens_in": row["tokens_in"],
        "tokens_out": row["tokens_out"],
        "tokens_cached": row["tokens_cached"],
        "tokens_cache_write": row["tokens_cache_write"],
        "tokens_reasoning": row["tokens_reasoning"],
        "units": details.get("units", {}),
    }
    assert got == {
        "tokens_in": want.tokens_in,
        "tokens_out": want.tokens_out,
        "tokens_cached": want.tokens_cached,
        "tokens_cache_write": want.tokens_cache_write,
        "tokens_reasoning": want.tokens_reasoning,
        "units": want.units,
    }
    assert from_pusd(row["cost_pusd"]) == want.cost_usd.quantize(Decimal("1e-12")), details
    assert row["metered"] == 1 and row["code"] == 200


def test_every_replayable_recording_is_replayed() -> None:
    replayed = recordings()
    assert len(replayed) >= 60
    assert {s["provider"] for s in replayed} == {"openai", "anthropic", "gemini"}
    for source in SOURCES:
        assert (CORPUS / source["file"]).exists(), source["file"]
        assert re.fullmatch(r"[0-9a-f]{40}", source["commit"]), source
        assert source["license"] in ("MIT", "Apache-2.0"), source


# --- invoices worked out by hand from the providers' price pages -------------------------------------------------


@pytest.mark.parametrize(
    ("file", "usd"),
    [
        # gemini-2.5-flash, YouTube video, implicit cache. Prompt: TEXT 16, VIDEO 15780, AUDIO 1917 (17713);
        # cached: AUDIO 1881, TEXT 15, VIDEO 15483 (17379); candidates 68, thoughts 821.
        # Uncached text+video 298 x $0.30/M + uncached audio 36 x $1.00/M + cached text+video 15498 x $0.03/M
        # + cached audio 1881 x $0.10/M + output 889 x $2.50/M = $0.00300094
        ("gemini/video-audio-implicit-cache-1.response.json", "0.00300094"),
        # claude-sonnet-4-6 compaction: the compaction pass wrote 55,096 cache tokens (5-minute) that the top level
        # leaves out. Compaction: 100 in, 55096 written, 131 out; message: 229 in, 5 out. $3/M in, $3.75/M 5m write,
        # $15/M out: 329 x 3 + 55096 x 3.75 + 136 x 15 = 987 + 206610 + 2040 -> $0.209637
        ("anthropic/compaction-1.response.json", "0.209637"),
    ],
)
def test_hand_computed_invoices(gw: Gateway, file: str, usd: str) -> None:
    source = next(s for s in SOURCES if s["file"] == file)
    response, request_id, _, _ = send(gw, source)
    assert response.status_code == 200
    assert from_pusd(ledger_row(gw, request_id)["cost_pusd"]) == Decimal(usd)
