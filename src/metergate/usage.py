"""Token usage in one provider-neutral shape, and the record of one metered request.

Every adapter normalises its provider's usage fields into `Usage` so that pricing, metrics and the ledger never
need to know which API a request used. The normalisation rules (PRODUCT.md, "Metrics contract"):

- `input_tokens` is every input token billed, cached reads and cache writes included;
- `output_tokens` is every output token billed, reasoning/thinking included;
- the other fields are subsets of those two, kept for pricing and sub-counters.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from decimal import Decimal

_ZERO = Decimal(0)
_PICO = Decimal(10) ** 12


def to_pusd(cost: Decimal) -> int:
    """USD as an exact integer count of pico-dollars (prices have at most 6 decimals per million tokens)."""
    return int((cost * _PICO).to_integral_value())


def from_pusd(pusd: int) -> Decimal:
    return Decimal(pusd) / _PICO


class UsageError(ValueError):
    """The provider's usage figures are missing or not numbers; the request cannot be priced from them."""


class UsageMissing(UsageError):
    """The provider reported no usage at all (an OpenAI-compatible server that ignores `include_usage`...)."""


class UsageNotReported(UsageMissing):
    """A response of a kind that never carries usage (a plain-text transcription, binary speech audio): relayed as
    it is and recorded as unmetered, never turned into an error."""


# Non-token charges, the `unit` label of llm_billed_units_total. A closed set: a client cannot add series.
UNITS = frozenset(
    {
        "web_search",  # one billed search (Gemini 2.x: one grounded prompt, Google's billing unit)
        "web_fetch",
        "file_search",
        "code_interpreter_session",
        "image_generation_call",
        "image",
        "audio_second",
        "character",
    }
)
# Flags that say the figures are not the provider's plain report (llm_usage_anomalies_total and the ledger row).
INCONSISTENT = "inconsistent"  # the provider's figures contradicted each other: recorded, priced conservatively
INCOMPLETE = "incomplete"  # the stream was cut after the first usage report: a lower bound


@dataclass(slots=True)
class Usage:
    """What one request was billed. The modality and cache fields are subsets of the input or output totals."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    # Subset of cache_write_tokens written with Anthropic's 1-hour TTL, priced higher than the 5-minute default.
    cache_write_1h_tokens: int = 0
    reasoning_tokens: int = 0
    input_audio_tokens: int = 0  # subset of input_tokens (cached audio included)
    cache_audio_read_tokens: int = 0  # subset of cache_read_tokens and of input_audio_tokens
    input_image_tokens: int = 0  # subset of input_tokens (Gemini documents too: Google prices them as images)
    cache_image_read_tokens: int = 0  # subset of cache_read_tokens and of input_image_tokens
    output_audio_tokens: int = 0
    output_image_tokens: int = 0
    # Non-token billed units by name (UNITS); None when there are none, which is almost always.
    units: dict[str, int] | None = None
    # How the provider served the request, which selects or modifies the price (as the response reports it):
    # service tier ("flex", "priority"...; None for standard), batch processing, regional inference, speed.
    service_tier: str | None = None
    batch: bool = False
    region: str | None = None  # e.g. "us" for Anthropic US-only inference, "eu" for OpenAI data residency
    speed: str | None = None  # "fast": Anthropic fast mode
    # Passes billed separately (Anthropic usage.iterations: compaction, advisor...): each priced on its own (its
    # model, its long-context tier); the totals above are their sum and are never priced a second time.
    parts: tuple[UsagePart, ...] = ()
    flags: tuple[str, ...] = ()

    def is_empty(self) -> bool:
        return self.input_tokens == 0 and self.output_tokens == 0 and not self.units

    def add_units(self, unit: str, n: int) -> None:
        if n:
            units = self.units if self.units is not None else {}
            units[unit] = units.get(unit, 0) + n
            self.units = units

    def flag(self, flag: str) -> None:
        if flag not in self.flags:
            self.flags = (*self.flags, flag)


@dataclass(frozen=True, slots=True)
class UsagePart:
    """One separately billed pass of a request: `model` None means the request's own model."""

    kind: str  # "message", "compaction", "advisor_message"... (bounded by the adapter)
    model: str | None
    usage: Usage


def settle(usage: Usage) -> Usage:
    """Every part within its total, so no price component is ever negative; a usage that needed repair is flagged
    INCONSISTENT. Totals are the provider's billing figures and are kept; what gives way is the split the provider
    reported inside them, in the order that prices the request higher (a discount is dropped before a surcharge):
    cached reads first, then image, then audio detail."""
    u = usage
    if (
        # The usual report (text in and out, cached reads within the input): nothing to repair.
        not (
            u.cache_write_tokens
            or u.input_audio_tokens
            or u.input_image_tokens
            or u.output_audio_tokens
            or u.output_image_tokens
            or u.cache_audio_read_tokens
            or u.cache_image_read_tokens
            or u.cache_write_1h_tokens
        )
        and u.cache_read_tokens <= u.input_tokens
        and u.reasoning_tokens <= u.output_tokens
    ):
        return u
    before = _counts(u)
    u.cache_write_1h_tokens = min(u.cache_write_1h_tokens, u.cache_write_tokens)
    u.cache_write_tokens = min(u.cache_write_tokens, u.input_tokens)
    u.cache_read_tokens = min(u.cache_read_tokens, u.input_tokens - u.cache_write_tokens)
    u.input_audio_tokens = min(u.input_audio_tokens, u.input_tokens)
    u.input_image_tokens = min(u.input_image_tokens, u.input_tokens - u.input_audio_tokens)
    u.cache_audio_read_tokens = min(u.cache_audio_read_tokens, u.cache_read_tokens, u.input_audio_tokens)
    u.cache_image_read_tokens = min(
        u.cache_image_read_tokens, u.cache_read_tokens - u.cache_audio_read_tokens, u.input_image_tokens
    )
    # The rest of the input (uncached text) must not be negative: cached reads, then image, then audio give way.
    excess = (
        u.cache_write_tokens
        + u.cache_read_tokens
        + u.input_audio_tokens
        - u.cache_audio_read_tokens
        + u.input_image_tokens
        - u.cache_image_read_tokens
        - u.input_tokens
    )
    if excess > 0:
        plain_cached = u.cache_read_tokens - u.cache_audio_read_tokens - u.cache_image_read_tokens
        cut = min(excess, plain_cached)
        u.cache_read_tokens -= cut
        excess -= cut
    if excess > 0:
        cut = min(excess, u.input_image_tokens - u.cache_image_read_tokens)
        u.input_image_tokens -= cut
        excess -= cut
    if excess > 0:
        cut = min(excess, u.input_audio_tokens - u.cache_audio_read_tokens)
        u.input_audio_tokens -= cut
    u.reasoning_tokens = min(u.reasoning_tokens, u.output_tokens)
    u.output_image_tokens = min(u.output_image_tokens, u.output_tokens)
    u.output_audio_tokens = min(u.output_audio_tokens, u.output_tokens - u.output_image_tokens)
    after = _counts(u)
    if after != before:
        u.flag(INCONSISTENT)
    return u


_COUNT_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cache_write_1h_tokens",
    "reasoning_tokens",
    "input_audio_tokens",
    "cache_audio_read_tokens",
    "input_image_tokens",
    "cache_image_read_tokens",
    "output_audio_tokens",
    "output_image_tokens",
)


_counts = operator.attrgetter(*_COUNT_FIELDS)


def total_of(parts: list[Usage] | tuple[Usage, ...]) -> Usage:
    """The field-by-field sum of separately billed passes."""
    total = Usage()
    for part in parts:
        for f in _COUNT_FIELDS:
            setattr(total, f, getattr(total, f) + getattr(part, f))
    return total


# No request is billed ten billion tokens (or units) of anything; a figure past this is a broken or hostile
# upstream, and taking it would overflow the ledger's 64-bit columns once priced in pico-dollars.
MAX_COUNT = 10**10


def count(value: object, name: str) -> int:
    """A token count from a provider payload: absent means 0, anything but a non-negative integer is an error.

    Floats with an integral value are accepted because some OpenAI-compatible servers serialise counts that way.
    """
    if type(value) is int and 0 <= value <= MAX_COUNT:  # the usual case, first
        return value
    if value is None:
        return 0
    if isinstance(value, bool):
        raise UsageError(f"usage field {name} is a boolean")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        if value < 0:
            raise UsageError(f"usage field {name} is negative: {value}")
        if value > MAX_COUNT:
            raise UsageError(f"usage field {name} is implausibly large: {value}")
        return value
    raise UsageError(f"usage field {name} is not a token count: {str(value)[:40]!r}")


@dataclass(slots=True)
class UsageRecord:
    """One request as metergate saw it: who sent it, where it went, what the provider billed, what it cost."""

    request_id: str
    started_at: float  # unix seconds
    team: str
    app: str
    key_id: str
    provider: str
    model: str  # bounded label value (see labels.py)
    upstream_model: str  # the model name actually sent upstream, for the ledger
    endpoint: str
    code: int
    stream: bool
    usage: Usage = field(default_factory=Usage)
    cost_usd: Decimal = _ZERO  # exact, as genai-prices computes it
    cost_pusd: int = 0  # the same in pico-dollars, for the ledger and budgets (see set_cost)
    priced: bool = True
    metered: bool = True  # False when the request reached a provider but its usage could not be read
    error_type: str | None = None
    latency_s: float = 0.0
    ttft_s: float | None = None
    price_notes: tuple[str, ...] = ()  # the price modifiers that applied (service tier, batch, regional...)
    # Attribution kept in the ledger only (unbounded sets, never labels): the end user and the tags, sorted by key.
    user: str | None = None
    tags: tuple[tuple[str, str], ...] = ()

    def set_cost(self, cost: Decimal | None, complete: bool = True, notes: tuple[str, ...] = ()) -> None:
        """Record the price: None, or `complete` False, when some charge had no known price (then `cost` is what
        could be priced); keeps both units in step."""
        self.priced = cost is not None and complete
        self.cost_usd = cost if cost is not None else _ZERO
        self.cost_pusd = to_pusd(self.cost_usd) if cost else 0
        self.price_notes = notes


def tier_of(value: object) -> str | None:
    """A provider's non-standard service tier ("flex", "priority"...), which selects a price variant; the
    standard tier, whatever a provider calls it, is None."""
    if isinstance(value, str) and value.lower() not in ("", "default", "auto", "standard"):
        return value.lower()
    return None
