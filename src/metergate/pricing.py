"""Prices: genai-prices (pinned, offline) plus per-model overrides from the config.

genai-prices is the source of truth, but its general calculation costs ~50 µs, too much for every request of a
gateway that promises almost no added latency. A model's price is linear in each token count between tier
thresholds, so `RateCard` asks genai-prices once per model, price period and tier for the cost of each unit
and then prices a request with a dot product. `tests/test_pricing.py` proves both give the same figures.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from genai_prices import Usage as PriceUsage
from genai_prices import data_snapshot
from genai_prices.types import ModelInfo, ModelPrice, Provider, TieredPrices

from metergate.config import PriceConfig
from metergate.usage import Usage

log = logging.getLogger("metergate.pricing")
_MAX_CACHED = 10_000
_MAX_WARNED = 1_000  # distinct unpriced models logged once each; past that, llm_unpriced_requests_total tells

# Usage fields as genai-prices usage keys. Reasoning tokens are not listed: they are part of output_tokens and
# billed at the output rate by every provider metergate speaks.
_KEYS: tuple[tuple[str, str], ...] = (
    ("input_tokens", "input_tokens"),
    ("output_tokens", "output_tokens"),
    ("cache_read_tokens", "cache_read_tokens"),
    ("cache_write_tokens", "cache_write_tokens"),
    ("cache_write_1h_tokens", "cache_write_1h_tokens"),
    ("input_audio_tokens", "input_audio_tokens"),
    ("output_audio_tokens", "output_audio_tokens"),
    ("web_searches", "web_searches"),
)
# genai-prices refuses a usage that reports both audio input and cache reads without saying how many cached
# tokens were audio; metergate learns no such split from any provider, so it reports none.
_ALL_KEYS = (*(key for _, key in _KEYS), "cache_audio_read_tokens")
# A point inside every tier at which each count can be raised by one without breaking the key hierarchy
# (children never exceed their parents): finite differences there are the exact per-unit prices.
_BASE = {
    "input_tokens": 100,
    "output_tokens": 40,
    "cache_read_tokens": 20,
    "cache_write_tokens": 20,
    "cache_write_1h_tokens": 10,
    "input_audio_tokens": 20,
    "output_audio_tokens": 10,
    "web_searches": 2,
    "cache_audio_read_tokens": 0,
}


def _price_usage(values: dict[str, int]) -> PriceUsage:
    return PriceUsage(**values)


def reference_price(model_price: ModelPrice, usage: Usage) -> Decimal:
    """genai-prices' own calculation, used to build rate cards and to check them in tests."""
    values = {key: getattr(usage, field) for field, key in _KEYS}
    values["cache_audio_read_tokens"] = 0
    return model_price.calc_price(_price_usage(values))["total_price"]


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
        self._rates: list[tuple[Decimal, tuple[Decimal, ...]]] = []
        for region in range(len(starts) + 1):
            lower = starts[region - 1] if region else 0
            base = dict(_BASE)
            base["input_tokens"] = lower + _BASE["input_tokens"]
            at_base = self._calc(model_price, base)
            unit_rates = []
            for key in _ALL_KEYS:
                bumped = dict(base)
                bumped[key] += 1
                unit_rates.append(self._calc(model_price, bumped) - at_base)
            constant = at_base - sum((r * base[k] for r, k in zip(unit_rates, _ALL_KEYS, strict=True)), Decimal(0))
            self._rates.append((constant, tuple(unit_rates[: len(_KEYS)])))

    @staticmethod
    def _calc(model_price: ModelPrice, values: dict[str, int]) -> Decimal:
        return model_price.calc_price(_price_usage(values))["total_price"]

    def price(self, usage: Usage) -> Decimal:
        # genai-prices applies a tier when the request's input tokens are strictly above the tier's start.
        region = bisect.bisect_left(self._starts, usage.input_tokens)
        constant, rates = self._rates[region]
        total = constant
        counts = (
            usage.input_tokens,
            usage.output_tokens,
            usage.cache_read_tokens,
            usage.cache_write_tokens,
            usage.cache_write_1h_tokens,
            usage.input_audio_tokens,
            usage.output_audio_tokens,
            usage.web_searches,
        )
        for n, rate in zip(counts, rates, strict=True):
            if n:
                total += rate * n
        return total


@dataclass(frozen=True, slots=True)
class CatalogueEntry:
    provider: Provider
    model: ModelInfo


class PriceBook:
    """Answers "what did this usage cost" for a (provider, model) at a point in time."""

    def __init__(self, overrides: list[PriceConfig]) -> None:
        self._overrides = overrides
        self._override_cards: dict[tuple[str, str], RateCard | None] = {}
        self._catalogue: dict[tuple[str | None, str], CatalogueEntry | None] = {}
        self._cards: dict[tuple[int, tuple[int, ...]], tuple[ModelPrice, RateCard]] = {}
        self._warned: set[tuple[str, str]] = set()

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

    def override_card(self, provider_name: str, model: str) -> RateCard | None:
        key = (provider_name, model)
        if key not in self._override_cards:
            if len(self._override_cards) >= _MAX_CACHED:
                self._override_cards.clear()
            card = None
            for override in self._overrides:
                if override.matches(provider_name, model):
                    card = RateCard(override_price(override))
                    break
            self._override_cards[key] = card
        return self._override_cards[key]

    def is_priced(self, provider_name: str, pricing_provider: str | None, model: str) -> bool:
        return self.override_card(provider_name, model) is not None or self.lookup(pricing_provider, model) is not None

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
        card = self.override_card(provider_name, model)
        if card is not None:
            return card.price(usage)
        entry = self.lookup(pricing_provider, model)
        if entry is None:
            if (provider_name, model) not in self._warned and len(self._warned) < _MAX_WARNED:
                self._warned.add((provider_name, model))
                log.warning(
                    "no price for model %r of provider %r: its requests are counted in llm_unpriced_requests_total; "
                    "add a `prices` entry to the config to price it",
                    model,
                    provider_name,
                )
            return None
        standard = entry.model.get_prices(at)
        variants = self._active_variants(entry, at, service_tier)
        cache_key = (id(standard), variants)
        cached = self._cards.get(cache_key)
        if cached is None or cached[0] is not standard:
            resolved = entry.model.get_prices(at, {"service_tier": service_tier or ""}) if variants else standard
            cached = (standard, RateCard(resolved))
            self._cards[cache_key] = cached
        return cached[1].price(usage)

    @staticmethod
    def _active_variants(entry: CatalogueEntry, at: datetime, service_tier: str | None) -> tuple[int, ...]:
        """Which of the model's price variants apply to this request (by service tier, at this time).

        Like genai-prices, variants only apply when the provider lists the model itself, not when the model was
        found through another provider's catalogue.
        """
        variants = entry.model.price_variants
        if not service_tier or not variants or not any(entry.model is m for m in entry.provider.models):
            return ()
        context: dict[str, str] = {"service_tier": service_tier}
        return tuple(
            i
            for i, v in enumerate(variants)
            if (v.constraint is None or v.constraint.active(at)) and all(context.get(k) == w for k, w in v.when.items())
        )


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
