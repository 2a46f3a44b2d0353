"""Prices: genai-prices (pinned, offline), the dated table of what it lacks (price_table.py), and config overrides.

genai-prices is the source of truth, but its general calculation costs ~50 µs, too much for every request of a
gateway that promises almost no added latency. A model's price is linear in each usage count between tier
thresholds (genai-prices splits a usage into leaves, parent minus its parts, and prices each leaf), so `RateCard`
asks genai-prices once per model, price period and tier for the cost of each unit and then prices a request with
a dot product. `tests/test_pricing.py` proves both give the same figures for every catalogue model.

`PriceBook.quote` prices a whole `Usage`: each separately billed pass at its own model and tier, the service tier
and batch variants, regional and fast-mode modifiers, per-unit fees; what it could not price makes the quote
incomplete (counted in llm_unpriced_requests_total), never silently free.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Context, Decimal, localcontext
from typing import Any

from genai_prices import Usage as PriceUsage
from genai_prices import data_snapshot
from genai_prices.data_units import unit_data
from genai_prices.types import ModelInfo, ModelPrice, Provider, TieredPrices

from metergate.config import PriceConfig
from metergate.price_table import (
    BATCH,
    FastPrice,
    Uplift,
    anthropic_fast_price,
    regional_uplift,
    table_model,
    tier_multiplier,
    unit_price,
)
from metergate.usage import Usage

log = logging.getLogger("metergate.pricing")
_MAX_CACHED = 10_000
_MAX_WARNED = 1_000  # distinct unpriced models logged once each; past that, llm_unpriced_requests_total tells

# Usage fields and the genai-prices usage keys they are reported as. Reasoning tokens are not listed: they are
# part of output_tokens and billed at the output rate by every provider metergate speaks.
TOKEN_FIELDS: tuple[tuple[str, str], ...] = (
    ("input_tokens", "input_tokens"),
    ("output_tokens", "output_tokens"),
    ("cache_read_tokens", "cache_read_tokens"),
    ("cache_write_tokens", "cache_write_tokens"),
    ("cache_write_1h_tokens", "cache_write_1h_tokens"),
    ("input_audio_tokens", "input_audio_tokens"),
    ("cache_audio_read_tokens", "cache_audio_read_tokens"),
    ("input_image_tokens", "input_image_tokens"),
    ("cache_image_read_tokens", "cache_image_read_tokens"),
    ("output_audio_tokens", "output_audio_tokens"),
    ("output_image_tokens", "output_image_tokens"),
)
# metergate units genai-prices prices for some models, and the usage keys each is reported as (a unit with a
# parent key, such as input audio seconds under audio seconds, reports both).
UNIT_KEYS: dict[str, tuple[str, ...]] = {
    "web_search": ("web_searches",),
    "file_search": ("storage_searches",),
    "character": ("input_characters",),
    "audio_second": ("audio_seconds", "input_audio_seconds"),
}
_TOKEN_KEYS = tuple(key for _, key in TOKEN_FIELDS)
_UNIT_USAGE_KEYS = tuple(dict.fromkeys(key for keys in UNIT_KEYS.values() for key in keys))
_ALL_KEYS = (*_TOKEN_KEYS, *_UNIT_USAGE_KEYS)


def _dimensions(key: str) -> frozenset[tuple[str, str]]:
    return frozenset(unit_data[key].get("dimensions", {}).items())


def _descendants_or_self(key: str) -> tuple[str, ...]:
    """The reported keys that are parts of `key` (their dimensions include all of its own), itself included."""
    mine = _dimensions(key)
    return tuple(other for other in _ALL_KEYS if mine <= _dimensions(other))


_PARTS_OF = {key: _descendants_or_self(key) for key in _ALL_KEYS}
_FEMTO = Decimal("1e-15")
_LEAF = 10  # every leaf of the base usage: positive, so each count can be raised by one and stay valid


def _base_values(input_floor: int) -> dict[str, int]:
    """A usage whose every leaf is positive: each key is the sum of the leaves of its parts."""
    leaves = dict.fromkeys(_ALL_KEYS, _LEAF)
    leaves["input_tokens"] += input_floor
    return {key: sum(leaves[part] for part in _PARTS_OF[key]) for key in _ALL_KEYS}


def genai_usage(values: dict[str, int]) -> PriceUsage:
    return PriceUsage(**values)


def usage_values(usage: Usage) -> dict[str, int]:
    """The genai-prices usage key values of a metergate usage (every key, zeros included)."""
    values = {key: getattr(usage, field) for field, key in TOKEN_FIELDS}
    for key in _UNIT_USAGE_KEYS:
        values[key] = 0
    if usage.units:
        for unit, n in usage.units.items():
            for key in UNIT_KEYS.get(unit, ()):
                values[key] += n
    return values


def reference_price(model_price: ModelPrice, usage: Usage) -> Decimal:
    """genai-prices' own calculation, used to build rate cards and to check them in tests."""
    return model_price.calc_price(genai_usage(usage_values(usage)))["total_price"]


def prices_unit(model_price: ModelPrice, unit: str) -> bool:
    """Whether genai-prices prices this unit for this model."""
    keys = UNIT_KEYS.get(unit, ())
    return any(getattr(model_price, unit_data[key]["price_key"], None) is not None for key in keys)


class RateCard:
    """A model price compiled into per-unit rates, one set per input-size tier."""

    __slots__ = ("_rates", "_starts")

    def __init__(self, model_price: ModelPrice) -> None:
        starts = sorted(
            {
                tier.start
                for value in model_price.__dict__.values()
                if isinstance(value, TieredPrices)
                for tier in value.tiers
            }
        )
        self._starts = starts
        self._rates: list[tuple[Decimal, tuple[tuple[str, Decimal], ...], dict[str, Decimal]]] = []
        # Exact arithmetic: at the default 28 digits, the constant term picks up rounding residue (7E-29).
        with localcontext(Context(prec=100)):
            self._compile(model_price, starts)

    def _compile(self, model_price: ModelPrice, starts: list[int]) -> None:
        for region in range(len(starts) + 1):
            # genai-prices applies a tier when the request's input tokens are strictly above the tier's start.
            base = _base_values(starts[region - 1] + 1 if region else 0)
            at_base = self._calc(model_price, base)
            rates: dict[str, Decimal] = {}
            for key in _ALL_KEYS:
                bumped = dict(base)
                bumped[key] += 1
                rates[key] = self._calc(model_price, bumped) - at_base
            # genai-prices divides per-hour and per-thousand prices at 28 digits: what is left of the constant below
            # a femto-dollar is that rounding, not a price (real constants are per-request fees).
            constant = (at_base - sum((rates[k] * base[k] for k in _ALL_KEYS), Decimal(0))).quantize(_FEMTO)
            token_rates = tuple((field, rates[key]) for field, key in TOKEN_FIELDS if rates[key])
            unit_rates = {unit: sum((rates[k] for k in keys), Decimal(0)) for unit, keys in UNIT_KEYS.items()}
            self._rates.append((constant, token_rates, unit_rates))

    @staticmethod
    def _calc(model_price: ModelPrice, values: dict[str, int]) -> Decimal:
        return model_price.calc_price(genai_usage(values))["total_price"]

    def region(self, usage: Usage) -> int:
        return bisect.bisect_left(self._starts, usage.input_tokens)

    def tier_start(self, region: int) -> int | None:
        return self._starts[region - 1] if region else None

    def token_price(self, usage: Usage, region: int | None = None) -> Decimal:
        constant, token_rates, _ = self._rates[self.region(usage) if region is None else region]
        total = constant
        for field, rate in token_rates:
            n = getattr(usage, field)
            if n:
                total += rate * n
        return total

    def unit_rate(self, unit: str, region: int) -> Decimal:
        return self._rates[region][2].get(unit, Decimal(0))

    def price(self, usage: Usage) -> Decimal:
        """Tokens and the units genai-prices prices, as genai-prices would."""
        region = self.region(usage)
        total = self.token_price(usage, region)
        for unit, n in (usage.units or {}).items():
            total += self.unit_rate(unit, region) * n
        return total


_PROBE_TOKENS = 1000  # below every long-context tier threshold
# One usage per kind of token whose price is that kind's unit price (cache reads and writes are within input).
_UNIT_PROBES = {
    "input": Usage(input_tokens=_PROBE_TOKENS),
    "cached_input": Usage(input_tokens=_PROBE_TOKENS, cache_read_tokens=_PROBE_TOKENS),
    "cache_write": Usage(input_tokens=_PROBE_TOKENS, cache_write_tokens=_PROBE_TOKENS),
    "cache_write_1h": Usage(
        input_tokens=_PROBE_TOKENS, cache_write_tokens=_PROBE_TOKENS, cache_write_1h_tokens=_PROBE_TOKENS
    ),
    "output": Usage(output_tokens=_PROBE_TOKENS),
}


@dataclass(frozen=True, slots=True)
class CatalogueEntry:
    provider: Provider
    model: ModelInfo


@dataclass(frozen=True, slots=True)
class Quote:
    """What a usage cost. `complete` is False when a charge had no known price (that part is not in `usd`);
    `notes` say which modifiers applied, for the ledger row."""

    usd: Decimal
    complete: bool
    notes: tuple[str, ...] = ()


_UNPRICED = Quote(Decimal(0), False)


def _table_quote(pricing_provider: str | None, model: str, usage: Usage, at: datetime) -> Quote:
    """A model billed per unit only (DALL-E, Imagen): each unit at the table's price; tokens have no price."""
    cost, complete, notes = Decimal(0), usage.input_tokens == 0 and usage.output_tokens == 0, ["unit table"]
    for unit, n in (usage.units or {}).items():
        entry = unit_price(pricing_provider, model, unit, at)
        if entry is None:
            complete = False
            notes.append(f"unpriced:{unit}")
        else:
            cost += entry.usd * n
    factor = BATCH.factor if usage.batch else Decimal(1)
    if usage.batch:
        notes.append(BATCH.note)
    return Quote(cost * factor, complete, tuple(notes))


@dataclass(frozen=True, slots=True)
class _Card:
    card: RateCard
    model_price: ModelPrice
    unit_overrides: dict[str, Decimal]  # from the config


class PriceBook:
    """Answers "what did this usage cost" for a (provider, model) at a point in time."""

    def __init__(self, overrides: list[PriceConfig]) -> None:
        self._overrides = overrides
        self._override_cards: dict[tuple[str, str], _Card | None] = {}
        self._catalogue: dict[tuple[str | None, str], CatalogueEntry | None] = {}
        # (id of the standard price, active variants, tag) -> (standard price, the price in force, its card)
        self._cards: dict[tuple[int, tuple[int, ...], str], tuple[ModelPrice, ModelPrice, RateCard]] = {}
        self._warned: set[tuple[str, str]] = set()
        self._resolved: dict[tuple[int, str | None, bool, str | None, int], tuple[Any, Any, tuple[str, ...]]] = {}

    # --- lookups ---------------------------------------------------------------------------------------------

    def lookup(self, pricing_provider: str | None, model: str) -> CatalogueEntry | None:
        key = (pricing_provider, model)
        if key not in self._catalogue:
            if len(self._catalogue) >= _MAX_CACHED:
                self._catalogue.clear()  # model names come from clients: the cache must not grow with them
            try:
                provider, info = data_snapshot.get_snapshot().find_provider_model(model, None, pricing_provider, None)
                self._catalogue[key] = CatalogueEntry(provider, info)
            except LookupError:
                self._catalogue[key] = None
        return self._catalogue[key]

    def catalogue_models(self, pricing_provider: str | None) -> list[str]:
        """Model ids the catalogue prices for a provider (empty when the provider is not in the catalogue)."""
        for provider in data_snapshot.get_snapshot().providers:
            if provider.id == pricing_provider:
                return [m.id for m in provider.models]
        return []

    def override_card(self, provider_name: str, model: str) -> _Card | None:
        key = (provider_name, model)
        if key not in self._override_cards:
            if len(self._override_cards) >= _MAX_CACHED:
                self._override_cards.clear()
            card = None
            for override in self._overrides:
                if override.matches(provider_name, model):
                    price = override_price(override)
                    units = {u: Decimal(str(v)) for u, v in override.unit_prices().items()}
                    card = _Card(RateCard(price), price, units)
                    break
            self._override_cards[key] = card
        return self._override_cards[key]

    def is_priced(self, provider_name: str, pricing_provider: str | None, model: str) -> bool:
        return (
            self.override_card(provider_name, model) is not None
            or self.lookup(pricing_provider, model) is not None
            or table_model(pricing_provider, model) is not None
        )

    # --- prices ----------------------------------------------------------------------------------------------

    def per_mtok(
        self, provider_name: str, pricing_provider: str | None, model: str, at: datetime
    ) -> dict[str, Decimal] | None:
        """USD per million tokens of each kind (`input` uncached, `cached_input`, `cache_write`, `cache_write_1h`,
        `output`) for one ordinary request (below long-context tiers), or None when the model has no price. For
        setting beside a provider's bill or pricing a day's tokens at list price, not for pricing requests."""
        out: dict[str, Decimal] = {}
        for kind, usage in _UNIT_PROBES.items():
            usd = self.price(provider_name, pricing_provider, model, usage, at)
            if usd is None:
                return None
            out[kind] = usd * (1_000_000 // _PROBE_TOKENS)
        return out

    def price(
        self,
        provider_name: str,
        pricing_provider: str | None,
        model: str,
        usage: Usage,
        at: datetime,
        service_tier: str | None = None,
    ) -> Decimal | None:
        """The cost in USD, or None when neither the config nor the catalogue prices this model."""
        if service_tier is not None:
            usage = _with_tier(usage, service_tier)
        if not self.is_priced(provider_name, pricing_provider, model):
            self._warn_unpriced(provider_name, model)
            return None
        return self.quote(provider_name, pricing_provider, model, usage, at).usd

    def quote(self, provider_name: str, pricing_provider: str | None, model: str, usage: Usage, at: datetime) -> Quote:
        """The cost of a whole usage: each billed pass at its own model and tier, with every modifier."""
        if not usage.parts:
            return self._quote_one(provider_name, pricing_provider, model, usage, at)
        total, complete, notes = Decimal(0), True, [f"parts={len(usage.parts)}"]
        for part in usage.parts:
            quote = self._quote_one(provider_name, pricing_provider, part.model or model, part.usage, at)
            total += quote.usd
            complete = complete and quote.complete
            notes.extend(n for n in quote.notes if n not in notes)
            if part.model and part.model != model:
                notes.append(f"{part.kind}@{part.model}")
        return Quote(total, complete, tuple(notes))

    def _quote_one(
        self, provider_name: str, pricing_provider: str | None, model: str, usage: Usage, at: datetime
    ) -> Quote:
        notes: list[str] = []
        override = self.override_card(provider_name, model)
        uplift = None
        if override is not None:
            card, model_price, unit_overrides = override.card, override.model_price, override.unit_overrides
            complete = True
        else:
            entry = self.lookup(pricing_provider, model)
            if entry is None:
                if table_model(pricing_provider, model) is not None:
                    return _table_quote(pricing_provider, model, usage, at)
                self._warn_unpriced(provider_name, model)
                return _UNPRICED
            # The price in force is the same for every request of a model served the same way in the same minute
            # (genai-prices' finest constraint is a time of day): resolved once, then reused.
            key = (id(entry.model), usage.service_tier, usage.batch, usage.speed, int(at.timestamp()) // 60)
            cached = self._resolved.get(key)
            if cached is None or cached[0] is not entry.model:
                found_notes: list[str] = []
                resolved = self._resolve(entry, usage, at, found_notes)
                if len(self._resolved) >= _MAX_CACHED:
                    self._resolved.clear()
                cached = self._resolved[key] = (entry.model, resolved, tuple(found_notes))
            resolved = cached[1]
            notes.extend(cached[2])
            if resolved is None:
                return Quote(Decimal(0), False, tuple(notes))
            model_price, card, complete, uplift = resolved
            unit_overrides = {}
            found = regional_uplift(entry.provider.id, entry.model.id, usage.region, at)
            if found is not None:
                uplift = found if uplift is None else uplift
                notes.append(found.note)
        region = card.region(usage)
        if region:
            notes.append(f"long_context>{card.tier_start(region)}")
        cost = card.token_price(usage, region)
        if uplift is not None:
            cost *= uplift.factor
        for unit, n in (usage.units or {}).items():
            base = unit.split("/", 1)[0]  # `image/1024x1024/hd` falls back to a flat `image` price
            if unit in unit_overrides or base in unit_overrides:
                cost += unit_overrides.get(unit, unit_overrides.get(base, Decimal(0))) * n
            elif prices_unit(model_price, unit):
                cost += card.unit_rate(unit, region) * n
            else:
                table = unit_price(pricing_provider, model, unit, at) if override is None else None
                if table is None:
                    complete = False
                    notes.append(f"unpriced:{unit}")
                else:
                    cost += table.usd * n
        return Quote(cost, complete, tuple(notes))

    def _resolve(
        self, entry: CatalogueEntry, usage: Usage, at: datetime, notes: list[str]
    ) -> tuple[ModelPrice, RateCard, bool, Uplift | None]:
        """The price in force for how the request was served: its period, tier and batch variants, fast mode."""
        complete = True
        uplift: Uplift | None = None
        standard = entry.model.get_prices(at)
        if usage.speed == "fast" and entry.provider.id == "anthropic":
            fast = anthropic_fast_price(entry.model.id, at)
            if fast is not None:
                notes.append("speed=fast")
                price, card = self._card(standard, (), "fast", lambda: _anthropic_fast_model_price(standard, fast))
                return price, card, complete, None
            notes.append("speed=fast (no list price)")
            complete = False
        context: dict[str, str] = {}
        if usage.service_tier:
            context["service_tier"] = usage.service_tier
        if usage.batch:
            context["processing"] = "batch"
        active = self._active_variants(entry, at, context)
        variants = entry.model.price_variants or []
        if usage.service_tier:
            if any("service_tier" in variants[i].when for i in active):
                notes.append(f"service_tier={usage.service_tier}")
            elif (rule := tier_multiplier(entry.provider.id, usage.service_tier, at)) is not None:
                uplift = rule
                notes.append(rule.note)
            else:
                notes.append(f"service_tier={usage.service_tier} (no list price)")
                complete = False
        if usage.batch:
            if any("processing" in variants[i].when for i in active):
                notes.append("batch")
            else:
                uplift = BATCH if uplift is None else Uplift(uplift.factor * BATCH.factor, uplift.note)
                notes.append(BATCH.note)
        price, card = self._card(standard, active, "", lambda: entry.model.get_prices(at, context))
        return price, card, complete, uplift

    def _card(
        self, standard: ModelPrice, active: tuple[int, ...], tag: str, resolve: Callable[[], ModelPrice]
    ) -> tuple[ModelPrice, RateCard]:
        """The rate card of a price variant, compiled once per price period (keyed by the standard price object,
        which genai-prices keeps for the period)."""
        key = (id(standard), active, tag)
        cached = self._cards.get(key)
        if cached is None or cached[0] is not standard:
            price = resolve() if (active or tag) else standard
            if len(self._cards) >= _MAX_CACHED:
                self._cards.clear()
            cached = self._cards[key] = (standard, price, RateCard(price))
        return cached[1], cached[2]

    def _warn_unpriced(self, provider_name: str, model: str) -> None:
        if (provider_name, model) not in self._warned and len(self._warned) < _MAX_WARNED:
            self._warned.add((provider_name, model))
            log.warning(
                "no price for model %r of provider %r: its requests are counted in llm_unpriced_requests_total; "
                "add a `prices` entry to the config to price it",
                model,
                provider_name,
            )

    @staticmethod
    def _active_variants(entry: CatalogueEntry, at: datetime, context: dict[str, str]) -> tuple[int, ...]:
        """Which of the model's price variants apply to this request (by service tier and processing, now).

        Like genai-prices, variants only apply when the provider lists the model itself, not when the model was
        found through another provider's catalogue.
        """
        variants = entry.model.price_variants
        if not context or not variants or not any(entry.model is m for m in entry.provider.models):
            return ()
        return tuple(
            i
            for i, v in enumerate(variants)
            if (v.constraint is None or v.constraint.active(at)) and all(context.get(k) == w for k, w in v.when.items())
        )


# What `coverage` asks about: the served variants and units each provider type can bill.
_PROBES: dict[str, tuple[tuple[str, Usage], ...]] = {
    "openai": (
        ("service_tier=flex", Usage(1, 1, service_tier="flex")),
        ("service_tier=priority", Usage(1, 1, service_tier="priority")),
        ("web_search", Usage(1, 1, units={"web_search": 1})),
        ("file_search", Usage(1, 1, units={"file_search": 1})),
    ),
    "anthropic": (
        ("service_tier=priority", Usage(1, 1, service_tier="priority")),
        ("speed=fast", Usage(1, 1, speed="fast")),
        ("web_search", Usage(1, 1, units={"web_search": 1})),
    ),
    "gemini": (
        ("service_tier=priority", Usage(1, 1, service_tier="priority")),
        ("web_search", Usage(1, 1, units={"web_search": 1})),
    ),
}


@dataclass(frozen=True, slots=True)
class Coverage:
    priced: bool
    priced_as: str  # the catalogue id, "config", or "" when unpriced
    unpriced: tuple[str, ...]  # modifiers and units with no price for this model


def coverage(book: PriceBook, family: str, provider_name: str, pricing_provider: str | None, model: str) -> Coverage:
    """Which of a model's possible charges metergate can price, for check-config: before traffic arrives."""
    at = datetime.now(UTC)
    override = book.override_card(provider_name, model)
    entry = book.lookup(pricing_provider, model) if override is None else None
    if override is None and entry is None:
        return Coverage(False, "", ())
    missing = tuple(
        name
        for name, probe in _PROBES.get(family, ())
        if not book.quote(provider_name, pricing_provider, model, probe, at).complete
    )
    return Coverage(True, "config" if override is not None else entry.model.id if entry else "", missing)


def _with_tier(usage: Usage, service_tier: str) -> Usage:
    return replace(usage, service_tier=service_tier)


def _anthropic_fast_model_price(standard: ModelPrice, fast: FastPrice) -> ModelPrice:
    """Anthropic fast mode: its own input and output rates, the prompt-caching multipliers on top."""
    prices: dict[str, Any] = {
        "input_mtok": fast.input_mtok,
        "output_mtok": fast.output_mtok,
        "cache_read_mtok": fast.input_mtok * Decimal("0.1"),
        "cache_write_mtok": fast.input_mtok * Decimal("1.25"),
        "cache_write_1h_mtok": fast.input_mtok * 2,
    }
    searches = getattr(standard, "web_searches_kcount", None)
    if searches is not None:
        prices["web_searches_kcount"] = searches
    return ModelPrice(**prices)


def override_price(override: PriceConfig) -> ModelPrice:
    prices: dict[str, Any] = {
        "input_mtok": Decimal(str(override.input_mtok)),
        "output_mtok": Decimal(str(override.output_mtok)),
    }
    if override.cache_read_mtok is not None:
        prices["cache_read_mtok"] = Decimal(str(override.cache_read_mtok))
    if override.cache_write_mtok is not None:
        prices["cache_write_mtok"] = Decimal(str(override.cache_write_mtok))
    return ModelPrice(**prices)


def utcnow() -> datetime:
    return datetime.now(UTC)
