"""What a simulated provider will bill for a request, decided before it answers.

The simulator is the ground truth the gateway is tested against, so it shares no code with the gateway's usage
parsers: it decides token counts in plain terms (`Billed`), then writes them in each API's own usage fields.
Callers steer it with `x-sim-*` request headers, which the gateway forwards like any other header.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

# Request headers that steer the simulator.
TAG = "x-sim-tag"  # groups requests in the bill log, e.g. "team-a/app-1"
INPUT = "x-sim-input-tokens"
OUTPUT = "x-sim-output-tokens"
CACHED = "x-sim-cached-tokens"  # prompt-cache reads (within input)
CACHE_WRITE = "x-sim-cache-write-tokens"  # Anthropic cache writes (within input)
CACHE_WRITE_1H = "x-sim-cache-write-1h-tokens"  # the part of the writes with a 1-hour TTL
REASONING = "x-sim-reasoning-tokens"  # within output
CHUNKS = "x-sim-chunks"  # content events in a stream
DELAY_MS = "x-sim-delay-ms"  # before the response starts
CHUNK_DELAY_MS = "x-sim-chunk-delay-ms"  # between stream events
FAIL = "x-sim-fail"  # see Plan.fail
RESPONSE_HEADER = "x-sim-response-header"  # "name=percent-encoded value": added to the response (UTF-8)
LEGACY_DELTA = "x-sim-legacy-delta"  # "1": Anthropic message_delta carries output_tokens only (older API versions)
IGNORE_INCLUDE_USAGE = "x-sim-ignore-include-usage"  # "1": like servers that never send the usage chunk
LENIENT = "x-sim-lenient"  # "1": read booleans the way pydantic-based servers (vLLM...) do: "true" and 1 are true
REPLAY = "x-sim-replay"  # a recorded response file (relative to the simulator's corpus) to answer with
AUDIO_SECONDS = "x-sim-audio-seconds"  # the length of an uploaded audio file (transcriptions)
SPACED_JSON = "x-sim-spaced-json"  # "1": stream chunks written like Python's json.dumps ('"usage": null')


@dataclass(slots=True)
class Billed:
    """Tokens in provider-neutral terms: input includes cache reads and writes, output includes reasoning."""

    input: int = 0
    output: int = 0
    cached: int = 0
    cache_write: int = 0
    cache_write_1h: int = 0
    reasoning: int = 0
    # Modality subsets (media endpoints): image and audio tokens within input, image and audio within output.
    input_image: int = 0
    input_audio: int = 0
    output_image: int = 0
    output_audio: int = 0
    cached_audio: int = 0  # subset of cached and of input_audio

    def copy(self) -> Billed:
        return Billed(
            self.input,
            self.output,
            self.cached,
            self.cache_write,
            self.cache_write_1h,
            self.reasoning,
            self.input_image,
            self.input_audio,
            self.output_image,
            self.output_audio,
            self.cached_audio,
        )


@dataclass(slots=True)
class Bill:
    """One request as the simulated provider saw and billed it."""

    api: str  # e.g. "openai.chat", "anthropic.messages", "gemini.stream_generate"
    model: str
    tag: str | None
    stream: bool
    status: int = 200
    planned: Billed = field(default_factory=Billed)
    # What the provider reported on the wire; less than planned only when the stream was cut or usage garbled.
    reported: Billed = field(default_factory=Billed)
    usage_readable: bool = True  # False when the provider sent garbled usage on purpose
    completed: bool = False
    headers: dict[str, str] = field(default_factory=dict)  # as received (bytes as Latin-1)
    query: str = ""
    batch: str | None = None  # the batch this request ran in (billed at the batch price)
    custom_id: str | None = None  # its id within the batch
    units: dict[str, int] = field(default_factory=dict)  # non-token charges: {"image": 2}, {"audio_second": 61}
    body: bytes = b""  # the request body as received (kept for uploads: multipart requests)
    at: float = field(default_factory=time.time)  # when it was billed (the admin APIs' buckets)


@dataclass(slots=True)
class Plan:
    billed: Billed
    chunks: int
    delay_s: float
    chunk_delay_s: float
    # None, "status:<code>", "reset-after:<events>", "malformed-json", "bad-usage", "no-usage", "stream-error",
    # "hang", "redirect:<percent-encoded location>"
    fail: str | None
    tag: str | None
    legacy_delta: bool = False
    spaced_json: bool = False
    lenient: bool = False
    ignore_include_usage: bool = False

    def flag(self, value: object) -> bool:
        """A boolean request field as this server reads it."""
        if self.lenient:
            return value is True or value == 1 or (isinstance(value, str) and value.lower() in ("true", "1", "yes"))
        return value is True

    @property
    def redirect_to(self) -> str | None:
        if self.fail and self.fail.startswith("redirect:"):
            return unquote(self.fail.split(":", 1)[1])
        return None

    @property
    def fail_status(self) -> int | None:
        if self.fail and self.fail.startswith("status:"):
            return int(self.fail.split(":", 1)[1])
        return None

    @property
    def reset_after(self) -> int | None:
        if self.fail and self.fail.startswith("reset-after:"):
            return int(self.fail.split(":", 1)[1])
        return None


def _int(headers: dict[str, str], name: str) -> int | None:
    value = headers.get(name)
    return int(value) if value is not None and value.strip().isdigit() else None


def _seeded(body: bytes, salt: str, low: int, high: int) -> int:
    digest = hashlib.blake2b(body + salt.encode(), digest_size=4).digest()
    return low + int.from_bytes(digest, "big") % (high - low + 1)


def make_plan(headers: dict[str, str], body: bytes, max_output: int | None, *, embedding: bool = False) -> Plan:
    """Token counts come from the headers when given, else from the body deterministically."""
    inp = _int(headers, INPUT)
    if inp is None:
        inp = 8 + len(body) // 4
    out = _int(headers, OUTPUT)
    if embedding:
        out = 0
    elif out is None:
        out = _seeded(body, "out", 12, 400)
        if max_output:
            out = min(out, max_output)
    cached = min(_int(headers, CACHED) or 0, inp)
    cache_write = min(_int(headers, CACHE_WRITE) or 0, inp - cached)
    cache_write_1h = min(_int(headers, CACHE_WRITE_1H) or 0, cache_write)
    reasoning = min(_int(headers, REASONING) or 0, out)
    chunks = _int(headers, CHUNKS) or max(1, min(out, 16))
    return Plan(
        billed=Billed(inp, out, cached, cache_write, cache_write_1h, reasoning),
        chunks=max(1, chunks),
        delay_s=(_int(headers, DELAY_MS) or 0) / 1000,
        chunk_delay_s=(_int(headers, CHUNK_DELAY_MS) or 0) / 1000,
        fail=headers.get(FAIL),
        tag=headers.get(TAG),
        legacy_delta=headers.get(LEGACY_DELTA) == "1",
        spaced_json=headers.get(SPACED_JSON) == "1",
        lenient=headers.get(LENIENT) == "1",
        ignore_include_usage=headers.get(IGNORE_INCLUDE_USAGE) == "1",
    )


# Text written per delta at most: a usage figure far beyond it (a hostile-upstream test) needs no text to match.
_MAX_WORDS_PER_DELTA = 2000


def split_text(tokens: int, pieces: int) -> list[tuple[str, int]]:
    """`tokens` words of filler text in `pieces` roughly equal deltas, with each delta's token count."""
    pieces = max(1, min(pieces, max(tokens, 1)))
    base, extra = divmod(tokens, pieces)
    out = []
    for i in range(pieces):
        n = base + (1 if i < extra else 0)
        words = min(n, _MAX_WORDS_PER_DELTA)
        out.append((" ".join(_WORDS[(i + j) % len(_WORDS)] for j in range(words)) + (" " if n else ""), n))
    return out


_WORDS = [
    "metered",
    "tokens",
    "flow",
    "through",
    "the",
    "gateway",
    "while",
    "every",
    "team",
    "sees",
    "what",
    "it",
    "spends",
    "and",
    "why",
    "the",
    "bill",
    "grew",
    "so",
    "budgets",
    "hold",
    "and",
    "forecasts",
    "stay",
    "honest",
]


def json_number_or_text(value: int, garble: bool) -> Any:
    return str(value) + "tok" if garble else value
