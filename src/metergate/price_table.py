"""Charges and price modifiers that the pinned genai-prices (0.2.3) does not carry, each dated and sourced.

genai-prices prices tokens per modality, cache reads and writes, web searches, file searches, service tiers and
batch processing for most models. What it lacks is kept here, in one place, so that each figure can be checked
against its source and changed when the provider changes it. The config's `prices:` entries override both.

Sources (checked 2026-11, research notes kept with issue 9):
- Anthropic pricing, platform.claude.com/docs/en/about-claude/pricing: web fetch "no additional charges beyond
  standard token costs"; US-only inference (`inference_geo: "us"`, reported in `usage.inference_geo`) "incurs a
  1.1x multiplier on all token pricing categories" for Claude Opus 4.6, Sonnet 4.6 and later; fast mode
  (`usage.speed: "fast"`) for Claude Opus 4.6 at $30 / $150 per million input / output tokens across the whole
  context window, with the prompt-caching multipliers applied on top.
- OpenAI pricing, developers.openai.com/api/docs/pricing: containers (Code Interpreter, hosted shell) "1 GB $0.03 ...
  per 20-minute session per container"; file search "$2.50 / 1k calls"; web search "$10.00 / 1k calls";
  "Regional processing (data residency) endpoints are charged a 10% uplift for models released on or after March
  5, 2026" (gpt-5.4 and later).
- Gemini flex inference, ai.google.dev/gemini-api/docs/flex-inference: "a 50% cost reduction compared to standard
  rates". Batch mode (all three providers): 50% of the standard rates, where genai-prices has no batch variant.

Per-image prices of models genai-prices does not list (checked 2026-11, research notes kept with issue 10):
- DALL-E (openai.com/api/pricing as of 2023-11-06, the prices in force until the models were retired on
  2026-05-12): dall-e-2 256x256 $0.016, 512x512 $0.018, 1024x1024 $0.020 per image; dall-e-3 standard 1024x1024
  $0.040, 1024x1792 and 1792x1024 $0.080; hd 1024x1024 $0.080, 1024x1792 and 1792x1024 $0.120.
- Imagen on the Gemini API (ai.google.dev/gemini-api/docs/pricing, "Imagen 4"): Fast $0.02, Standard $0.04,
  Ultra $0.06 per image; Imagen 3 $0.03 per image.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from fnmatch import fnmatchcase


@dataclass(frozen=True, slots=True)
class UnitPrice:
    pricing_provider: str
    model: str  # glob on the catalogue model id
    unit: str
    usd: Decimal  # per one unit
    since: date
    source: str


UNIT_PRICES: tuple[UnitPrice, ...] = (
    UnitPrice("anthropic", "*", "web_fetch", Decimal(0), date(2025, 9, 10), "Anthropic pricing: web fetch"),
    UnitPrice("openai", "*", "web_search", Decimal("0.010"), date(2025, 3, 11), "OpenAI pricing: web search"),
    UnitPrice("openai", "*", "file_search", Decimal("0.0025"), date(2025, 3, 11), "OpenAI pricing: file search"),
    UnitPrice(
        "openai", "*", "code_interpreter_session", Decimal("0.03"), date(2025, 5, 21), "OpenAI pricing: containers"
    ),
)

_DALLE = "OpenAI pricing (2023-11-06): DALL-E"
_IMAGEN = "Gemini API pricing: Imagen"
_DALLE_SINCE = date(2023, 11, 6)
# Models priced only by this table (per image): the `image/<size>/<quality>` unit of a DALL-E request.
UNIT_PRICES += (
    UnitPrice("openai", "dall-e-2*", "image/256x256/standard", Decimal("0.016"), _DALLE_SINCE, _DALLE),
    UnitPrice("openai", "dall-e-2*", "image/512x512/standard", Decimal("0.018"), _DALLE_SINCE, _DALLE),
    UnitPrice("openai", "dall-e-2*", "image/1024x1024/standard", Decimal("0.020"), _DALLE_SINCE, _DALLE),
    UnitPrice("openai", "dall-e-3*", "image/1024x1024/standard", Decimal("0.040"), _DALLE_SINCE, _DALLE),
    UnitPrice("openai", "dall-e-3*", "image/1024x1792/standard", Decimal("0.080"), _DALLE_SINCE, _DALLE),
    UnitPrice("openai", "dall-e-3*", "image/1792x1024/standard", Decimal("0.080"), _DALLE_SINCE, _DALLE),
    UnitPrice("openai", "dall-e-3*", "image/1024x1024/hd", Decimal("0.080"), _DALLE_SINCE, _DALLE),
    UnitPrice("openai", "dall-e-3*", "image/1024x1792/hd", Decimal("0.120"), _DALLE_SINCE, _DALLE),
    UnitPrice("openai", "dall-e-3*", "image/1792x1024/hd", Decimal("0.120"), _DALLE_SINCE, _DALLE),
    UnitPrice("google", "imagen-4.0-fast-generate*", "image", Decimal("0.02"), date(2025, 6, 24), _IMAGEN),
    UnitPrice("google", "imagen-4.0-generate*", "image", Decimal("0.04"), date(2025, 6, 24), _IMAGEN),
    UnitPrice("google", "imagen-4.0-ultra-generate*", "image", Decimal("0.06"), date(2025, 6, 24), _IMAGEN),
    UnitPrice("google", "imagen-3.0-generate*", "image", Decimal("0.03"), date(2025, 2, 6), _IMAGEN),
)
# Model-name globs the table alone prices (genai-prices has no entry for them).
TABLE_MODELS: tuple[tuple[str, str], ...] = tuple(
    dict.fromkeys((u.pricing_provider, u.model) for u in UNIT_PRICES if u.model != "*")
)


def table_model(pricing_provider: str | None, model: str) -> str | None:
    """The table's name for a model it prices on its own (billed per unit, not per token), or None. The name is
    the glob without its wildcard, so any number of client-chosen suffixes share one metric label."""
    for provider, glob in TABLE_MODELS:
        if provider == pricing_provider and fnmatchcase(model, glob):
            return glob.rstrip("*")
    return None


def unit_price(pricing_provider: str | None, model: str, unit: str, at: datetime) -> UnitPrice | None:
    """The table's price of one `unit` for a model at a time, or None."""
    found = None
    for entry in UNIT_PRICES:
        matches = entry.pricing_provider == pricing_provider and entry.unit == unit and fnmatchcase(model, entry.model)
        if matches and entry.since <= at.date() and (found is None or entry.since > found.since):
            found = entry
    return found


# Anthropic model ids name a family and a version: claude-opus-4-6, claude-sonnet-5, claude-haiku-4-5-20251001.
_CLAUDE_VERSION = re.compile(r"^claude-[a-z]+-(\d+)(?:-(\d{1,2}))?(?:-|$)")


def claude_version(model: str) -> tuple[int, int] | None:
    found = _CLAUDE_VERSION.match(model)
    if found is None:
        return None
    return int(found.group(1)), int(found.group(2) or 0)


@dataclass(frozen=True, slots=True)
class Uplift:
    """A multiplier on every token charge (not on per-unit fees) when the response says how it was served."""

    factor: Decimal
    note: str


def regional_uplift(pricing_provider: str | None, model: str, region: str | None, at: datetime) -> Uplift | None:
    if region is None:
        return None
    if pricing_provider == "anthropic" and region == "us" and at.date() >= date(2026, 2, 5):
        version = claude_version(model)
        if version is not None and version >= (4, 6):
            return Uplift(Decimal("1.1"), "inference_geo=us x1.1")
    residency = pricing_provider == "openai" and region in ("us", "eu", "ae") and at.date() >= date(2026, 3, 5)
    if residency and re.match(r"^gpt-(5\.[4-9]|[6-9])", model):
        return Uplift(Decimal("1.1"), f"data_residency={region} x1.1")
    return None


@dataclass(frozen=True, slots=True)
class FastPrice:
    input_mtok: Decimal
    output_mtok: Decimal
    since: date


# Anthropic fast mode: the prompt-caching multipliers apply on top (reads 0.1x, 5-minute writes 1.25x, 1-hour
# writes 2x the fast input rate).
ANTHROPIC_FAST: dict[str, FastPrice] = {
    "claude-opus-4-6": FastPrice(Decimal(30), Decimal(150), date(2026, 2, 7)),
}


def anthropic_fast_price(model: str, at: datetime) -> FastPrice | None:
    entry = ANTHROPIC_FAST.get(model)
    return entry if entry is not None and entry.since <= at.date() else None


def tier_multiplier(pricing_provider: str | None, service_tier: str, at: datetime) -> Uplift | None:
    """A service tier genai-prices has no variant for, priced by a documented rule."""
    if pricing_provider == "google" and service_tier == "flex":
        return Uplift(Decimal("0.5"), "service_tier=flex x0.5")
    return None


BATCH = Uplift(Decimal("0.5"), "batch x0.5")
