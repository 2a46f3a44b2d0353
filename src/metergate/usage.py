"""Token usage in one provider-neutral shape, and the record of one metered request.

Every adapter normalises its provider's usage fields into `Usage` so that pricing, metrics and the ledger never
need to know which API a request used. The normalisation rules (PRODUCT.md, "Metrics contract"):

- `input_tokens` is every input token billed, cached reads and cache writes included;
- `output_tokens` is every output token billed, reasoning/thinking included;
- the other fields are subsets of those two, kept for pricing and sub-counters.
"""

from __future__ import annotations

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


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    # Subset of cache_write_tokens written with Anthropic's 1-hour TTL, priced higher than the 5-minute default.
    cache_write_1h_tokens: int = 0
    reasoning_tokens: int = 0
    input_audio_tokens: int = 0
    output_audio_tokens: int = 0
    web_searches: int = 0
    # The provider's service tier for this request (OpenAI "flex"/"priority", Gemini "priority"...), which selects
    # the price variant; None for the standard tier or when the provider does not say.
    service_tier: str | None = None

    def is_empty(self) -> bool:
        return self.input_tokens == 0 and self.output_tokens == 0 and self.web_searches == 0


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

    def set_cost(self, cost: Decimal | None) -> None:
        """Record the price (None: the model has no price); keeps both units in step."""
        self.priced = cost is not None
        self.cost_usd = cost if cost is not None else _ZERO
        self.cost_pusd = to_pusd(self.cost_usd) if cost else 0


def tier_of(value: object) -> str | None:
    """A provider's non-standard service tier ("flex", "priority"...), which selects a price variant; the
    standard tier, whatever a provider calls it, is None."""
    if isinstance(value, str) and value.lower() not in ("", "default", "auto", "standard"):
        return value.lower()
    return None
