"""What the simulated providers charged: each bill's tokens at the provider's list price, by token type.

The prices are the public list prices (the genai-prices catalogue, as the real providers publish them), plus
`PriceList.set` for models the catalogue lacks. This is the simulator's own arithmetic, kept apart from the
gateway's pricing code so that a reconciliation test compares two independent computations.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from genai_prices import Usage as CatalogueUsage
from genai_prices import calc_price

from metergate.simulator.plan import Bill

BATCH_DISCOUNT = Decimal("0.5")  # both providers bill batched requests at half price
# The token types of each provider's cost report (OpenAI line items; Anthropic token_type values).
OPENAI_TYPES = ("input", "cached input", "output")
ANTHROPIC_TYPES = (
    "uncached_input_tokens",
    "cache_read_input_tokens",
    "cache_creation.ephemeral_5m_input_tokens",
    "cache_creation.ephemeral_1h_input_tokens",
    "output_tokens",
)
_CATALOGUE_PROVIDER = {"openai": "openai", "anthropic": "anthropic"}
_PROBE = 1000


def family_of(bill: Bill) -> str:
    return bill.api.split(".", 1)[0]


def tokens_by_type(family: str, bill: Bill) -> dict[str, int]:
    """The billed tokens of a request in the provider's own token types (they add up to its input and output)."""
    b = bill.planned
    if family == "anthropic":
        return {
            "uncached_input_tokens": b.input - b.cached - b.cache_write,
            "cache_read_input_tokens": b.cached,
            "cache_creation.ephemeral_5m_input_tokens": b.cache_write - b.cache_write_1h,
            "cache_creation.ephemeral_1h_input_tokens": b.cache_write_1h,
            "output_tokens": b.output,
        }
    return {"input": b.input - b.cached, "cached input": b.cached, "output": b.output}


def billed(bill: Bill) -> bool:
    """Whether the provider charged for the request: it ran (a cut stream or a gone client still ran)."""
    return bill.status == 200 and family_of(bill) in _CATALOGUE_PROVIDER and not bill.api.startswith("replay")


@dataclass
class PriceList:
    """USD per million tokens by (model, token type): the catalogue's, or what `set` gave."""

    def __init__(self) -> None:
        self._set: dict[str, dict[str, Decimal]] = {}
        self._cache: dict[tuple[str, str, int], dict[str, Decimal]] = {}

    def set(self, model: str, **per_mtok: float | str) -> None:
        """Prices for a model, by the token types of its provider (`input=`, `cached_input=`, `output=`...)."""
        self._set[model] = {k: Decimal(str(v)) for k, v in per_mtok.items()}

    def per_token(self, family: str, model: str, at: float) -> dict[str, Decimal]:
        day = int(at // 86400)
        key = (family, model, day)
        if key not in self._cache:
            self._cache[key] = self._per_token(family, model, datetime.fromtimestamp(day * 86400 + 43200, UTC))
        return self._cache[key]

    def _per_token(self, family: str, model: str, when: datetime) -> dict[str, Decimal]:
        types = ANTHROPIC_TYPES if family == "anthropic" else OPENAI_TYPES
        if model in self._set:
            given = {k.replace("_", " ") if family == "openai" else k: v for k, v in self._set[model].items()}
            return {t: given.get(t, Decimal(0)) / 1_000_000 for t in types}

        def cost(**tokens: int) -> Decimal:
            usage = CatalogueUsage(**tokens)
            result = calc_price(usage, model, provider_id=_CATALOGUE_PROVIDER[family], genai_request_timestamp=when)
            return Decimal(result.total_price)

        n = _PROBE
        try:
            plain = cost(input_tokens=n) / n
            out = {
                types[0]: plain,
                types[1]: cost(input_tokens=n, cache_read_tokens=n) / n,
                types[-1]: cost(output_tokens=n) / n,
            }
            if family == "anthropic":
                write_5m = cost(input_tokens=n, cache_write_tokens=n) / n
                out["cache_creation.ephemeral_5m_input_tokens"] = write_5m
                # 1-hour writes cost twice the base input price, 5-minute ones 1.25 times it.
                out["cache_creation.ephemeral_1h_input_tokens"] = write_5m * Decimal("1.6")
        except LookupError:
            out = {t: Decimal(0) for t in types}
        return out

    def charges(self, bill: Bill) -> dict[str, tuple[int, Decimal]]:
        """(tokens, USD) by token type for one billed request."""
        family = family_of(bill)
        prices = self.per_token(family, bill.model, bill.at)
        factor = BATCH_DISCOUNT if bill.batch else Decimal(1)
        return {t: (n, n * prices.get(t, Decimal(0)) * factor) for t, n in tokens_by_type(family, bill).items() if n}


def key_id(family: str, secret: str) -> str:
    """The provider-side id of an API key, stable for a secret."""
    digest = hashlib.sha256(secret.encode()).hexdigest()
    return ("apikey_01" + digest[:22]) if family == "anthropic" else ("key_" + digest[:16])


def redacted(secret: str) -> str:
    """How the providers list a key: its first and last characters around an elision."""
    head, tail = max(1, min(8, len(secret) // 3)), max(1, min(4, len(secret) // 4))
    return f"{secret[:head]}...{secret[-tail:]}"
