"""Pricing: the compiled `RateCard` against genai-prices' own calculation, and `PriceBook` lookups and overrides.

`RateCard` prices a request with a dot product instead of genai-prices' general calculation. These tests prove
the two give exactly the same Decimal for thousands of random usages across the catalogue: flat and tiered
prices, prices that change over time and service-tier variants. They also check a few figures computed by hand
from the providers' public price pages, so a catalogue or field-mapping mistake cannot hide behind agreement.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal

import genai_prices
import pytest
from genai_prices import Usage as PriceUsage
from genai_prices.data import providers as CATALOGUE
from genai_prices.types import (
    ModelInfo,
    ModelPrice,
    Provider,
    StartDateConstraint,
    TieredPrices,
    TimeOfDateConstraint,
)

from metergate.config import PriceConfig
from metergate.price_table import unit_price
from metergate.pricing import PriceBook, RateCard, override_price, prices_unit, reference_price
from metergate.usage import Usage

MTOK = Decimal(1_000_000)
# A fixed request time, so the tests do not depend on the day they run (the catalogue has dated prices).
AT = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
CORE_PROVIDERS = ("openai", "anthropic", "google")
USAGES_PER_PRICE = 24
# genai-prices refuses a few usages the gateway can see (audio input overlapping cached input, with no split
# reported); those are skipped, and must stay rare.
MAX_SKIPPED_FRACTION = 0.05


# --- helpers ---------------------------------------------------------------------------------------------------


def provider(provider_id: str) -> Provider:
    return next(p for p in CATALOGUE if p.id == provider_id)


def catalogue_model(provider_id: str, model_id: str) -> ModelInfo:
    return next(m for m in provider(provider_id).models if m.id == model_id)


def random_usage(rng: random.Random, max_input: int = 600_000) -> Usage:
    """A usage that respects the hierarchy: the input is cut into disjoint pieces (cache writes; cached text, audio
    and image reads; uncached audio and image; the rest), and the modality and reasoning counts are parts of output."""
    scale = rng.choice((100, 5_000, 150_000, max_input))
    input_tokens = rng.randint(0, scale)
    pieces = {}
    left = input_tokens
    for name, chance in (
        ("cache_write", 0.4),
        ("cache_text", 0.6),
        ("cache_audio", 0.1),
        ("cache_image", 0.1),
        ("audio", 0.15),
        ("image", 0.15),
    ):
        pieces[name] = rng.randint(0, left) if rng.random() < chance else 0
        left -= pieces[name]
    cache_write = pieces["cache_write"]
    output_tokens = rng.randint(0, rng.choice((50, 4_000, 64_000)))
    output_audio = rng.randint(0, output_tokens) if rng.random() < 0.15 else 0
    output_image = rng.randint(0, output_tokens - output_audio) if rng.random() < 0.15 else 0
    web_searches = rng.randint(1, 12) if rng.random() < 0.2 else 0
    return Usage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_read_tokens=pieces["cache_text"] + pieces["cache_audio"] + pieces["cache_image"],
        cache_write_tokens=cache_write,
        cache_write_1h_tokens=rng.randint(0, cache_write) if rng.random() < 0.5 else 0,
        reasoning_tokens=rng.randint(0, output_tokens) if rng.random() < 0.4 else 0,
        input_audio_tokens=pieces["audio"] + pieces["cache_audio"],
        cache_audio_read_tokens=pieces["cache_audio"],
        input_image_tokens=pieces["image"] + pieces["cache_image"],
        cache_image_read_tokens=pieces["cache_image"],
        output_audio_tokens=output_audio,
        output_image_tokens=output_image,
        units={"web_search": web_searches},
    )


def assert_valid_hierarchy(u: Usage) -> None:
    assert u.cache_read_tokens + u.cache_write_tokens <= u.input_tokens
    assert u.cache_write_1h_tokens <= u.cache_write_tokens
    assert u.cache_audio_read_tokens <= min(u.cache_read_tokens, u.input_audio_tokens)
    assert u.cache_image_read_tokens <= min(u.cache_read_tokens, u.input_image_tokens)
    uncached_media = u.input_audio_tokens - u.cache_audio_read_tokens + u.input_image_tokens - u.cache_image_read_tokens
    assert u.cache_read_tokens + u.cache_write_tokens + uncached_media <= u.input_tokens
    assert u.reasoning_tokens <= u.output_tokens
    assert u.output_audio_tokens + u.output_image_tokens <= u.output_tokens


def genai_usage(u: Usage) -> PriceUsage:
    """The same usage for genai-prices' public API (reasoning is part of output, as in metergate)."""
    return PriceUsage(
        input_tokens=u.input_tokens,
        output_tokens=u.output_tokens,
        cache_read_tokens=u.cache_read_tokens,
        cache_write_tokens=u.cache_write_tokens,
        cache_write_1h_tokens=u.cache_write_1h_tokens,
        input_audio_tokens=u.input_audio_tokens,
        cache_audio_read_tokens=u.cache_audio_read_tokens,
        input_image_tokens=u.input_image_tokens,
        cache_image_read_tokens=u.cache_image_read_tokens,
        output_audio_tokens=u.output_audio_tokens,
        output_image_tokens=u.output_image_tokens,
        web_searches=(u.units or {}).get("web_search", 0),
    )


def table_units(
    book: PriceBook, provider_id: str, model_id: str, usage: Usage, at: datetime, context: dict[str, str] | None = None
) -> Decimal:
    """What metergate's dated table (price_table.py) adds for the units genai-prices does not price for a model."""
    entry = book.lookup(provider_id, model_id)
    assert entry is not None
    price = entry.model.get_prices(at, context)
    total = Decimal(0)
    for unit, n in (usage.units or {}).items():
        found = unit_price(provider_id, model_id, unit, at)
        if n and not prices_unit(price, unit) and found is not None:
            total += found.usd * n
    return total


def price_sets(model: ModelInfo) -> Iterator[tuple[str, ModelPrice]]:
    """Every distinct price a model can have: each price period, and each variant resolved in each period."""
    if isinstance(model.prices, ModelPrice):
        yield "standard", model.prices
    else:
        for i, conditional in enumerate(model.prices):
            yield f"period {i} ({conditional.constraint})", conditional.prices
    contexts = [variant.when for variant in model.price_variants or ()]
    # Before, between and after every date on which a price or a variant starts.
    dates = {datetime(2020, 1, 1, tzinfo=UTC), datetime(2035, 1, 1, tzinfo=UTC)}
    constraints = [v.constraint for v in model.price_variants or ()]
    if not isinstance(model.prices, ModelPrice):
        constraints += [c.constraint for c in model.prices]
    for constraint in constraints:
        if isinstance(constraint, StartDateConstraint):
            start = datetime.combine(constraint.start_date, time(), UTC)
            dates.update({start, start - timedelta(seconds=1)})
    for context in contexts:
        for at in sorted(dates):
            yield f"{context} at {at:%Y-%m-%d}", model.get_prices(at, context)


@dataclass
class Tally:
    checked: int = 0
    skipped: int = 0
    mismatches: list[str] = field(default_factory=list)

    def compare(self, label: str, card: RateCard, price: ModelPrice, usage: Usage) -> None:
        try:
            want = reference_price(price, usage)
        except ValueError:
            self.skipped += 1
            return
        self.checked += 1
        got = card.price(usage)
        if got != want:
            self.mismatches.append(f"{label}: {usage} -> RateCard {got} != genai-prices {want}")

    def assert_ok(self, min_checked: int) -> None:
        assert not self.mismatches, f"{len(self.mismatches)} mismatches, e.g.\n" + "\n".join(self.mismatches[:8])
        assert self.checked >= min_checked, (self.checked, self.skipped)
        assert self.skipped <= MAX_SKIPPED_FRACTION * (self.checked + self.skipped), (self.checked, self.skipped)


def check_models(models: list[tuple[str, ModelInfo]], rng: random.Random, per_price: int = USAGES_PER_PRICE) -> Tally:
    tally = Tally()
    for provider_id, model in models:
        for label, price in price_sets(model):
            card = RateCard(price)  # must never raise for a catalogue price
            for _ in range(per_price):
                usage = random_usage(rng)
                assert_valid_hierarchy(usage)
                tally.compare(f"{provider_id}/{model.id} [{label}]", card, price, usage)
            tally.compare(f"{provider_id}/{model.id} [{label}]", card, price, Usage())
    return tally


def sample_of_other_models(rng: random.Random, per_provider: int = 4) -> list[tuple[str, ModelInfo]]:
    picked: list[tuple[str, ModelInfo]] = []
    for p in CATALOGUE:
        if p.id in CORE_PROVIDERS:
            continue
        for m in rng.sample(p.models, min(per_provider, len(p.models))):
            picked.append((p.id, m))
    return picked


def is_tiered(price: ModelPrice) -> bool:
    return any(isinstance(v, TieredPrices) for v in price.__dict__.values())


def tier_starts(price: ModelPrice) -> set[int]:
    return {t.start for v in price.__dict__.values() if isinstance(v, TieredPrices) for t in v.tiers}


# --- RateCard == genai-prices ----------------------------------------------------------------------------------


@pytest.mark.parametrize("provider_id", CORE_PROVIDERS)
def test_rate_card_matches_genai_prices_for_every_model_of(provider_id: str) -> None:
    models = [(provider_id, m) for m in provider(provider_id).models]
    tally = check_models(models, random.Random(f"core-{provider_id}"))
    tally.assert_ok(min_checked=1_000)


def test_rate_card_matches_genai_prices_for_a_sample_of_other_providers() -> None:
    rng = random.Random(20261127)
    models = sample_of_other_models(rng)
    assert len({p for p, _ in models}) >= 30
    tally = check_models(models, rng)
    tally.assert_ok(min_checked=3_000)


def test_rate_card_matches_genai_prices_for_every_tiered_model_in_the_catalogue() -> None:
    rng = random.Random(200_000)
    models = [(p.id, m) for p in CATALOGUE for m in p.models if any(is_tiered(price) for _, price in price_sets(m))]
    assert len(models) >= 50
    tally = check_models(models, rng, per_price=8)
    tally.assert_ok(min_checked=2_000)


@pytest.mark.parametrize(
    ("provider_id", "model_id"), [("anthropic", "claude-sonnet-4-5"), ("google", "gemini-2.5-pro")]
)
def test_rate_card_at_the_200k_tier_boundary(provider_id: str, model_id: str) -> None:
    model = catalogue_model(provider_id, model_id)
    price = model.get_prices(AT)
    assert tier_starts(price) == {200_000}
    card = RateCard(price)
    rng = random.Random(model_id)
    tally = Tally()
    for input_tokens in (0, 1, 199_999, 200_000, 200_001, 200_002, 200_099, 200_100, 200_101, 400_000, 2_000_000):
        for _ in range(40):
            cache_read = rng.randint(0, input_tokens)
            cache_write = rng.randint(0, input_tokens - cache_read)
            output = rng.randint(0, 30_000)
            usage = Usage(
                input_tokens=input_tokens,
                output_tokens=output,
                cache_read_tokens=cache_read,
                cache_write_tokens=cache_write,
                cache_write_1h_tokens=rng.randint(0, cache_write),
                reasoning_tokens=rng.randint(0, output),
                units={"web_search": rng.randint(0, 3)},
            )
            tally.compare(f"{model_id} input={input_tokens}", card, price, usage)
    tally.assert_ok(min_checked=400)
    assert tally.skipped == 0


def test_tier_boundary_by_hand() -> None:
    """genai-prices applies the >200k tier to all tokens once input is strictly above 200,000."""
    book = PriceBook([])
    at_limit = Usage(input_tokens=200_000, output_tokens=1_000)
    over = Usage(input_tokens=200_001, output_tokens=1_000)
    # claude-sonnet-4-5: $3 in / $15 out, above 200k $6 in / $22.50 out.
    assert book.price("anthropic", "anthropic", "claude-sonnet-4-5", at_limit, AT) == Decimal("0.615")
    assert book.price("anthropic", "anthropic", "claude-sonnet-4-5", over, AT) == Decimal("1.222506")
    # gemini-2.5-pro: $1.25 in / $10 out, above 200k $2.50 in / $15 out.
    assert book.price("gemini", "google", "gemini-2.5-pro", at_limit, AT) == Decimal("0.26")
    assert book.price("gemini", "google", "gemini-2.5-pro", over, AT) == Decimal("0.5150025")
    # Cache reads switch tier with the request's whole input, not with their own count.
    cached = Usage(input_tokens=200_001, cache_read_tokens=200_000)
    # 1 fresh token at $6 + 200,000 cached at $0.60 (the >200k cache-read price).
    assert book.price("anthropic", "anthropic", "claude-sonnet-4-5", cached, AT) == Decimal("0.120006")


def test_rate_card_for_config_overrides_matches_genai_prices() -> None:
    rng = random.Random(7)
    overrides = [
        PriceConfig(model="a", input_mtok=0.5, output_mtok=1.5),
        PriceConfig(model="b", input_mtok=0.1, output_mtok=0.3, cache_read_mtok=0.01),
        PriceConfig(model="c", input_mtok=3, output_mtok=15, cache_read_mtok=0.3, cache_write_mtok=3.75),
        PriceConfig(model="d", input_mtok=0.0),
        PriceConfig(model="e", input_mtok=1e-07, output_mtok=123.456789),
    ]
    tally = Tally()
    for override in overrides:
        price = override_price(override)
        card = RateCard(price)
        for _ in range(200):
            tally.compare(override.model, card, price, random_usage(rng))
    tally.assert_ok(min_checked=900)


# --- prices over time and service tiers --------------------------------------------------------------------------


def dated_models(provider_ids: tuple[str, ...]) -> list[tuple[str, ModelInfo, date]]:
    found = []
    for p in CATALOGUE:
        if p.id not in provider_ids:
            continue
        for m in p.models:
            if isinstance(m.prices, ModelPrice):
                continue
            for conditional in m.prices:
                if isinstance(conditional.constraint, StartDateConstraint):
                    found.append((p.id, m, conditional.constraint.start_date))
    return found


def test_price_book_follows_start_date_constraints() -> None:
    """Before and after every dated price change of the core providers (and deepseek, mistral), one PriceBook
    gives genai-prices' figure for the date of the request."""
    rng = random.Random(2025_06_10)
    cases = dated_models((*CORE_PROVIDERS, "deepseek", "mistral"))
    assert {(p, m.id) for p, m, _ in cases} >= {
        ("openai", "o3"),
        ("anthropic", "claude-sonnet-4-6"),
        ("google", "gemini-3-pro-preview"),
    }
    book = PriceBook([])
    changed = set()
    tally = Tally()
    for provider_id, model, start in cases:
        start_at = datetime.combine(start, time(), UTC)
        for _ in range(12):
            usage = random_usage(rng)
            figures = []
            # The last second before the start date, its first second, and well after it.
            for at in (start_at - timedelta(seconds=1), start_at, start_at + timedelta(days=40)):
                got = book.price(provider_id, provider_id, model.id, usage, at)
                price = model.get_prices(at)
                tally.compare(f"{provider_id}/{model.id} at {at}", RateCard(price), price, usage)
                try:
                    want = genai_prices.calc_price(
                        genai_usage(usage), model.id, provider_id=provider_id, genai_request_timestamp=at
                    ).total_price
                except ValueError:
                    continue
                assert got == want + table_units(book, provider_id, model.id, usage, at), (provider_id, model.id, at)
                figures.append(got)
            if len(figures) == 3 and figures[0] != figures[1]:
                changed.add((provider_id, model.id))
    tally.assert_ok(min_checked=500)
    assert {("openai", "o3"), ("anthropic", "claude-sonnet-4-6")} <= changed


def test_o3_price_cut_by_hand() -> None:
    """o3 went from $10/$40 to $2/$8 per Mtok on 2025-06-10."""
    book = PriceBook([])
    usage = Usage(input_tokens=1_000_000, output_tokens=100_000)
    before = datetime(2025, 6, 9, 23, 59, 59, tzinfo=UTC)
    after = datetime(2025, 6, 10, 0, 0, tzinfo=UTC)
    assert book.price("openai", "openai", "o3", usage, before) == Decimal("14")
    assert book.price("openai", "openai", "o3", usage, after) == Decimal("2.8")
    # The date is the UTC date: 2025-06-10 01:00 in UTC+02:00 is still 2025-06-09 in UTC.
    plus_two = datetime(2025, 6, 10, 1, 0, tzinfo=timezone(timedelta(hours=2)))
    assert book.price("openai", "openai", "o3", usage, plus_two) == Decimal("14")


def test_price_book_follows_time_of_day_prices() -> None:
    """deepseek-chat is cheaper outside 00:30-16:30 UTC."""
    book = PriceBook([])
    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000, cache_read_tokens=500_000)
    day = date(2026, 11, 2)
    for clock in (time(0, 29), time(0, 30), time(12, 0), time(16, 29), time(16, 30), time(23, 0)):
        at = datetime.combine(day, clock, UTC)
        want = genai_prices.calc_price(
            genai_usage(usage), "deepseek-chat", provider_id="deepseek", genai_request_timestamp=at
        ).total_price
        assert book.price("deepseek", "deepseek", "deepseek-chat", usage, at) == want, clock
    peak = datetime.combine(day, time(12, 0), UTC)
    off_peak = datetime.combine(day, time(23, 0), UTC)
    # 0.5M fresh + 0.5M cached in, 1M out: $0.27/$0.07/$1.10 peak, $0.135/$0.035/$0.55 off peak.
    assert book.price("deepseek", "deepseek", "deepseek-chat", usage, peak) == Decimal("1.27")
    assert book.price("deepseek", "deepseek", "deepseek-chat", usage, off_peak) == Decimal("0.635")
    prices = catalogue_model("deepseek", "deepseek-chat").prices
    assert isinstance(prices, list)
    assert isinstance(prices[1].constraint, TimeOfDateConstraint)


def service_tier_models() -> list[ModelInfo]:
    return [
        m
        for m in provider("openai").models
        if any(v.when.get("service_tier") in ("flex", "priority") for v in m.price_variants or ())
    ]


VARIANTS_START = datetime(2026, 10, 12, tzinfo=UTC)  # openai's flex/priority variants start on this date


@pytest.mark.parametrize("tier", ["flex", "priority", "default", "scale", None])
def test_price_book_service_tier_variants_match_genai_prices(tier: str | None) -> None:
    rng = random.Random(f"tier-{tier}")
    models = service_tier_models()
    assert len(models) >= 10
    tally = Tally()
    for at in (VARIANTS_START - timedelta(days=1), VARIANTS_START, AT):
        book = PriceBook([])  # one book per date: see test_price_book_service_tier_cache_follows_the_date
        for model in models:
            context = {"service_tier": tier} if tier else None
            price = model.get_prices(at, context)
            card = RateCard(price)
            for _ in range(8):
                usage = random_usage(rng)
                tally.compare(f"{model.id} {tier} at {at:%Y-%m-%d}", card, price, usage)
                want = genai_prices.calc_price(
                    genai_usage(usage),
                    model.id,
                    provider_id="openai",
                    genai_request_timestamp=at,
                    price_context=context,
                ).total_price
                want += table_units(book, "openai", model.id, usage, at, context)
                assert book.price("openai", "openai", model.id, usage, at, service_tier=tier) == want, (model.id, at)
    tally.assert_ok(min_checked=300)


def test_service_tier_by_hand() -> None:
    """gpt-5.4: $2.50 in / $0.25 cached / $15 out; flex halves it; priority doubles it (flat)."""
    usage = Usage(input_tokens=100_000, output_tokens=10_000, cache_read_tokens=20_000)
    # standard: 80k*2.5 + 20k*0.25 + 10k*15 = 0.2 + 0.005 + 0.15
    assert PriceBook([]).price("openai", "openai", "gpt-5.4", usage, AT) == Decimal("0.355")
    # flex: 80k*1.25 + 20k*0.13 + 10k*7.5 = 0.1 + 0.0026 + 0.075
    assert PriceBook([]).price("openai", "openai", "gpt-5.4", usage, AT, service_tier="flex") == Decimal("0.1776")
    # priority: 80k*5 + 20k*0.5 + 10k*30 = 0.4 + 0.01 + 0.3
    assert PriceBook([]).price("openai", "openai", "gpt-5.4", usage, AT, service_tier="priority") == Decimal("0.71")
    # Before the variants existed in the catalogue, flex was priced as standard.
    before = VARIANTS_START - timedelta(days=1)
    assert PriceBook([]).price("openai", "openai", "gpt-5.4", usage, before, service_tier="flex") == Decimal("0.355")
    # A tier the model has no variant for, and a model without variants, are priced as standard.
    assert PriceBook([]).price("openai", "openai", "gpt-5.4", usage, AT, service_tier="scale") == Decimal("0.355")
    assert PriceBook([]).price(
        "anthropic", "anthropic", "claude-haiku-4-5", usage, AT, service_tier="priority"
    ) == PriceBook([]).price("anthropic", "anthropic", "claude-haiku-4-5", usage, AT)


def test_price_book_service_tier_cache_follows_the_date() -> None:
    """One long-lived PriceBook (as in the gateway) must price flex by the variant in force at each request."""
    usage = Usage(input_tokens=100_000, output_tokens=10_000, cache_read_tokens=20_000)
    before = VARIANTS_START - timedelta(days=1)
    book = PriceBook([])
    assert book.price("openai", "openai", "gpt-5.4", usage, before, service_tier="flex") == Decimal("0.355")
    # Regression: PriceBook.price cached the resolved card under (id(standard price), service_tier). gpt-5.4's standard
    # price is the same object on both dates, but its flex variant only starts on 2026-10-12, so the card resolved
    # for the earlier date (no variant: standard $0.355) was reused after it: 0.355 where genai-prices says 0.1776.
    assert book.price("openai", "openai", "gpt-5.4", usage, AT, service_tier="flex") == Decimal("0.1776")


def test_price_book_service_tier_for_a_model_priced_through_a_fallback_provider() -> None:
    """azure prices gpt-5.4 through its fallback to openai; genai-prices applies a model's price variants only
    for the provider that lists the model, so azure flex traffic is priced at the standard price."""
    usage = Usage(input_tokens=100_000, output_tokens=10_000, cache_read_tokens=20_000)
    want = genai_prices.calc_price(
        genai_usage(usage),
        "gpt-5.4",
        provider_id="azure",
        genai_request_timestamp=AT,
        price_context={"service_tier": "flex"},
    ).total_price
    assert want == Decimal("0.355")
    # Regression: PriceBook.price resolved variants with entry.model.get_prices(at, {"service_tier": ...}) without the
    # check genai-prices' ModelInfo.calc_price makes (`any(self is model for model in provider.models)`), so
    # PriceBook.price("azure", "azure", "gpt-5.4", usage, AT, service_tier="flex") returned openai's flex price
    # 0.1776 (and 0.71 for "priority") instead of genai-prices' 0.355.
    assert PriceBook([]).price("azure", "azure", "gpt-5.4", usage, AT, service_tier="flex") == want


def test_price_book_matches_genai_prices_public_api_for_core_models() -> None:
    """End to end: lookup + price period + RateCard equals genai_prices.calc_price for the core providers."""
    rng = random.Random(99)
    book = PriceBook([])
    checked = skipped = 0
    unmatched: set[tuple[str, str]] = set()
    for provider_id in (*CORE_PROVIDERS, "azure"):
        for model in provider(provider_id).models:
            for _ in range(6):
                usage = random_usage(rng)
                got = book.price(provider_id, provider_id, model.id, usage, AT)
                try:
                    want = genai_prices.calc_price(
                        genai_usage(usage), model.id, provider_id=provider_id, genai_request_timestamp=AT
                    ).total_price
                except LookupError:
                    # A few catalogue ids are not references that match their own model (e.g. "ft:gpt-4o").
                    unmatched.add((provider_id, model.id))
                    assert got is None, (provider_id, model.id)
                    continue
                except ValueError:
                    skipped += 1
                    continue
                checked += 1
                assert got == want + table_units(book, provider_id, model.id, usage, AT), (provider_id, model.id)
    assert checked >= 1_000
    assert skipped <= MAX_SKIPPED_FRACTION * (checked + skipped)
    assert len(unmatched) <= 5, unmatched


# --- hand-computed figures from the providers' price pages -------------------------------------------------------


def test_gpt_4o_mini_by_hand() -> None:
    """gpt-4o-mini: $0.15 input, $0.075 cached input, $0.60 output per Mtok."""
    book = PriceBook([])
    # 1,000,000 input of which 400,000 cached, 100,000 output:
    # 600,000 * 0.15 + 400,000 * 0.075 + 100,000 * 0.60 = 0.09 + 0.03 + 0.06
    usage = Usage(input_tokens=1_000_000, output_tokens=100_000, cache_read_tokens=400_000, reasoning_tokens=50_000)
    assert book.price("openai", "openai", "gpt-4o-mini", usage, AT) == Decimal("0.18")
    # A dated snapshot id is priced as its model.
    assert book.price("openai", "openai", "gpt-4o-mini-2024-07-18", usage, AT) == Decimal("0.18")
    # 1,234 in, 567 out, nothing cached: 1234*0.15e-6 + 567*0.60e-6 = 0.0001851 + 0.0003402
    assert book.price("openai", "openai", "gpt-4o-mini", Usage(1_234, 567), AT) == Decimal("0.0005253")
    # And through azure, which falls back to openai's price.
    assert book.price("azure", "azure", "gpt-4o-mini", usage, AT) == Decimal("0.18")


def test_claude_haiku_4_5_by_hand() -> None:
    """claude-haiku-4-5: $1 input, $0.10 cache read, $1.25 5-minute cache write, $2 1-hour cache write, $5 output."""
    book = PriceBook([])
    # 100,000 input = 20,000 fresh + 50,000 cache reads + 30,000 cache writes (10,000 of them 1h); 2,000 output:
    # 20,000*1 + 50,000*0.10 + 20,000*1.25 + 10,000*2 + 2,000*5 = 0.02 + 0.005 + 0.025 + 0.02 + 0.01
    usage = Usage(
        input_tokens=100_000,
        output_tokens=2_000,
        cache_read_tokens=50_000,
        cache_write_tokens=30_000,
        cache_write_1h_tokens=10_000,
    )
    assert book.price("anthropic", "anthropic", "claude-haiku-4-5", usage, AT) == Decimal("0.08")
    assert book.price("anthropic", "anthropic", "claude-haiku-4-5-20251001", usage, AT) == Decimal("0.08")
    # Web searches: $10 per thousand.
    searched = Usage(input_tokens=1_000, output_tokens=100, units={"web_search": 3})
    # 1,000*1e-6 + 100*5e-6 + 3*0.01 = 0.001 + 0.0005 + 0.03
    assert book.price("anthropic", "anthropic", "claude-haiku-4-5", searched, AT) == Decimal("0.0315")


def test_gemini_2_5_flash_by_hand() -> None:
    """gemini-2.5-flash: $0.30 input (text), $0.03 cached, $2.50 output (thinking included)."""
    book = PriceBook([])
    # 10,000 input of which 4,000 cached; 1,000 output of which 600 thinking:
    # 6,000*0.30 + 4,000*0.03 + 1,000*2.50 = 0.0018 + 0.00012 + 0.0025
    usage = Usage(input_tokens=10_000, output_tokens=1_000, cache_read_tokens=4_000, reasoning_tokens=600)
    assert book.price("gemini", "google", "gemini-2.5-flash", usage, AT) == Decimal("0.00442")
    # Audio input is $1.00 per Mtok: 6,000 text*0.30 + 4,000 audio*1.00 = 0.0018 + 0.004
    audio = Usage(input_tokens=10_000, input_audio_tokens=4_000)
    assert book.price("gemini", "google", "gemini-2.5-flash", audio, AT) == Decimal("0.0058")


def test_an_empty_usage_costs_nothing() -> None:
    book = PriceBook([])
    for provider_id, model in (
        ("openai", "gpt-4o-mini"),
        ("anthropic", "claude-sonnet-4-5"),
        ("google", "gemini-2.5-pro"),
    ):
        assert book.price(provider_id, provider_id, model, Usage(), AT) == 0


# --- PriceBook: overrides, lookups, unpriced models ------------------------------------------------------------------


def test_config_override_wins_over_the_catalogue() -> None:
    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000, cache_read_tokens=500_000)
    catalogue = PriceBook([]).price("openai", "openai", "gpt-4o-mini", usage, AT)
    assert catalogue == Decimal("0.7125")  # 0.5M*0.15 + 0.5M*0.075 + 1M*0.60
    book = PriceBook([PriceConfig(model="gpt-4o-mini", input_mtok=1, output_mtok=2)])
    # No cache_read_mtok in the override: cached tokens are billed as input. 1M*1 + 1M*2
    assert book.price("openai", "openai", "gpt-4o-mini", usage, AT) == Decimal("3")
    # The override names the model as the client does: a dated snapshot id is not covered by it.
    assert book.price("openai", "openai", "gpt-4o-mini-2024-07-18", usage, AT) == catalogue
    # It also wins at the tier boundary: an override has no tiers.
    tiered = PriceBook([PriceConfig(model="claude-sonnet-4-5", input_mtok=1, output_mtok=1)])
    assert tiered.price("anthropic", "anthropic", "claude-sonnet-4-5", Usage(300_000, 0), AT) == Decimal("0.3")
    # And over service-tier variants.
    assert book.price("openai", "openai", "gpt-4o-mini", usage, AT, service_tier="priority") == Decimal("3")


def test_glob_override_with_cache_prices() -> None:
    book = PriceBook(
        [
            PriceConfig(
                model="self-hosted-*", input_mtok=0.5, output_mtok=1.5, cache_read_mtok=0.05, cache_write_mtok=0.6
            )
        ]
    )
    usage = Usage(
        input_tokens=1_000_000,
        output_tokens=200_000,
        cache_read_tokens=300_000,
        cache_write_tokens=100_000,
        cache_write_1h_tokens=40_000,
    )
    # 600k*0.5 + 300k*0.05 + 100k*0.6 (1h writes at the one write price) + 200k*1.5 = 0.3 + 0.015 + 0.06 + 0.3
    for model in ("self-hosted-llama", "self-hosted-", "self-hosted-qwen-72b"):
        assert book.price("vllm", None, model, usage, AT) == Decimal("0.675"), model
        assert book.is_priced("vllm", None, model)
    assert not book.is_priced("vllm", None, "llama-self-hosted")
    assert book.price("vllm", None, "llama-self-hosted", usage, AT) is None
    # Globs are case-sensitive, like route globs.
    assert not book.is_priced("vllm", None, "Self-Hosted-llama")


def test_first_matching_override_wins() -> None:
    book = PriceBook(
        [
            PriceConfig(model="gpt-4o-mini", input_mtok=1),
            PriceConfig(model="gpt-*", input_mtok=2),
        ]
    )
    usage = Usage(input_tokens=1_000_000)
    assert book.price("openai", "openai", "gpt-4o-mini", usage, AT) == Decimal("1")
    assert book.price("openai", "openai", "gpt-4o", usage, AT) == Decimal("2")
    assert book.price("openai", "openai", "o4-mini", usage, AT) == Decimal("1.1")  # catalogue


def test_provider_scoped_override() -> None:
    book = PriceBook([PriceConfig(model="gpt-4o-mini", provider="internal", input_mtok=0.01, output_mtok=0.02)])
    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000)
    # The override applies to the config provider named "internal" only...
    assert book.price("internal", "openai", "gpt-4o-mini", usage, AT) == Decimal("0.03")
    # ...not to another provider pricing the same model, even with the same pricing provider.
    assert book.price("openai", "openai", "gpt-4o-mini", usage, AT) == Decimal("0.75")
    # ...and is matched on the config name, not the catalogue provider id.
    scoped_by_catalogue_id = PriceBook([PriceConfig(model="gpt-4o-mini", provider="openai", input_mtok=9)])
    assert scoped_by_catalogue_id.price("internal", "openai", "gpt-4o-mini", usage, AT) == Decimal("0.75")
    # A provider-scoped override prices a model the catalogue does not know, for that provider only.
    local = PriceBook([PriceConfig(model="llama-3-8b", provider="vllm", input_mtok=0.2, output_mtok=0.2)])
    assert local.is_priced("vllm", None, "llama-3-8b")
    assert not local.is_priced("other", None, "llama-3-8b")
    assert local.price("vllm", None, "llama-3-8b", usage, AT) == Decimal("0.4")


def test_unknown_model_is_unpriced_and_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    book = PriceBook([])
    usage = Usage(input_tokens=10, output_tokens=10)
    with caplog.at_level(logging.WARNING, logger="metergate.pricing"):
        for _ in range(5):
            assert book.price("openai", "openai", "no-such-model-xyz", usage, AT) is None
    warnings = [r for r in caplog.records if r.name == "metergate.pricing" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "no-such-model-xyz" in message and "openai" in message
    # Another unknown model, or the same model from another provider, gets its own warning, once.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="metergate.pricing"):
        for _ in range(3):
            assert book.price("openai", "openai", "another-unknown", usage, AT) is None
            assert book.price("mirror", "openai", "no-such-model-xyz", usage, AT) is None
            assert book.price("openai", "openai", "gpt-4o-mini", usage, AT) is not None
    warned = [r.getMessage() for r in caplog.records if r.name == "metergate.pricing"]
    assert len(warned) == 2, warned
    assert sum("another-unknown" in m for m in warned) == 1
    assert sum("'mirror'" in m and "no-such-model-xyz" in m for m in warned) == 1


def test_unknown_pricing_provider_is_unpriced(caplog: pytest.LogCaptureFixture) -> None:
    book = PriceBook([])
    with caplog.at_level(logging.WARNING, logger="metergate.pricing"):
        assert book.price("x", "no-such-provider", "gpt-4o-mini", Usage(10, 10), AT) is None
        assert book.price("x", "no-such-provider", "gpt-4o-mini", Usage(10, 10), AT) is None
    assert len([r for r in caplog.records if r.name == "metergate.pricing"]) == 1
    assert book.lookup("no-such-provider", "gpt-4o-mini") is None
    assert not book.is_priced("x", "no-such-provider", "gpt-4o-mini")


def test_is_priced() -> None:
    book = PriceBook([PriceConfig(model="house-model", input_mtok=1)])
    assert book.is_priced("openai", "openai", "gpt-4o-mini")
    assert book.is_priced("openai", "openai", "gpt-4o-mini-2024-07-18")
    assert book.is_priced("anthropic", "anthropic", "claude-haiku-4-5")
    assert book.is_priced("gemini", "google", "gemini-2.5-flash")
    assert book.is_priced("azure", "azure", "gpt-4o")  # via azure's fallback to openai
    assert book.is_priced("compat", None, "house-model")
    assert not book.is_priced("openai", "openai", "no-such-model-xyz")
    assert not book.is_priced("compat", None, "no-such-model-xyz")
    # A model of another provider is not priced under the wrong pricing provider.
    assert not book.is_priced("openai", "openai", "claude-haiku-4-5")


@pytest.mark.parametrize(
    ("pricing_provider", "model", "provider_id", "canonical"),
    [
        ("openai", "gpt-4o-mini", "openai", "gpt-4o-mini"),
        ("openai", "gpt-4o-mini-2024-07-18", "openai", "gpt-4o-mini"),
        ("openai", "GPT-4o-mini", "openai", "gpt-4o-mini"),
        (None, "gpt-4o-mini-2024-07-18", "openai", "gpt-4o-mini"),
        ("anthropic", "claude-haiku-4-5-20251001", "anthropic", "claude-haiku-4-5"),
        ("anthropic", "claude-sonnet-4-5-20250929", "anthropic", "claude-sonnet-4-5"),
        ("google", "gemini-2.5-flash", "google", "gemini-2.5-flash"),
        ("google", "gemini-2.5-pro", "google", "gemini-2.5-pro"),
        ("azure", "gpt-4o-mini", "azure", "gpt-4o-mini"),
    ],
)
def test_lookup_canonical_ids(pricing_provider: str | None, model: str, provider_id: str, canonical: str) -> None:
    entry = PriceBook([]).lookup(pricing_provider, model)
    assert entry is not None
    assert entry.provider.id == provider_id
    assert entry.model.id == canonical


def test_lookup_unknown_and_catalogue_models() -> None:
    book = PriceBook([])
    assert book.lookup("openai", "no-such-model-xyz") is None
    assert book.lookup(None, "no-such-model-xyz") is None
    # Cached answers stay the same.
    first = book.lookup("openai", "gpt-4o-mini-2024-07-18")
    assert first is not None and book.lookup("openai", "gpt-4o-mini-2024-07-18") is first
    openai_models = book.catalogue_models("openai")
    assert "gpt-4o-mini" in openai_models and "o3" in openai_models
    assert openai_models == [m.id for m in provider("openai").models]
    assert book.catalogue_models("no-such-provider") == []
    assert book.catalogue_models(None) == []
