"""Prices typed from the providers' public price pages, independently of metergate's pricing code.

USD per million tokens. Tests price what the simulated provider billed with these figures and compare with what
the gateway reports, so a wrong price lookup, a wrong field mapping or a double-counted cache shows up as a
difference. genai-prices is pinned (pyproject.toml), so these figures must match its data exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from metergate.simulator import Billed


@dataclass(frozen=True)
class Price:
    input: str
    output: str = "0"
    cache_read: str | None = None
    cache_write: str | None = None  # 5-minute TTL writes (Anthropic)
    cache_write_1h: str | None = None


PRICES: dict[str, Price] = {
    # OpenAI, platform.openai.com/docs/pricing
    "gpt-4o-mini": Price("0.15", "0.60", cache_read="0.075"),
    "gpt-4o": Price("2.50", "10.00", cache_read="1.25"),
    "o4-mini": Price("1.10", "4.40", cache_read="0.275"),
    "gpt-3.5-turbo-instruct": Price("1.50", "2.00"),
    "text-embedding-3-small": Price("0.02"),
    # Anthropic, claude.com/pricing
    "claude-haiku-4-5": Price("1.00", "5.00", cache_read="0.10", cache_write="1.25", cache_write_1h="2.00"),
    # Google, ai.google.dev/gemini-api/docs/pricing (text input)
    "gemini-2.5-flash": Price("0.30", "2.50", cache_read="0.03"),
    "gemini-2.5-flash-lite": Price("0.10", "0.40", cache_read="0.01"),
    "gemini-embedding-001": Price("0.15"),
}

MTOK = Decimal(1_000_000)


def cost(model: str, billed: Billed) -> Decimal:
    """What `billed` costs: cache reads and writes are parts of the input, billed at their own rates."""
    p = PRICES[model]
    cache_read = Decimal(p.cache_read if p.cache_read is not None else p.input)
    cache_write = Decimal(p.cache_write if p.cache_write is not None else p.input)
    cache_write_1h = Decimal(p.cache_write_1h if p.cache_write_1h is not None else cache_write)
    fresh = billed.input - billed.cached - billed.cache_write
    total = (
        fresh * Decimal(p.input)
        + billed.cached * cache_read
        + (billed.cache_write - billed.cache_write_1h) * cache_write
        + billed.cache_write_1h * cache_write_1h
        + billed.output * Decimal(p.output)
    )
    return total / MTOK


@dataclass(frozen=True)
class MediaPrice:
    """USD per million tokens by modality, as the model pages list them."""

    text_in: str = "0"
    image_in: str = "0"
    audio_in: str = "0"
    output: str = "0"


# developers.openai.com/api/docs/models/<model>: gpt-image-1 (text $5, image $10, output $40), gpt-4o-mini-transcribe
# (text $1.25, audio $3, output $5), gpt-4o-mini-tts (text $0.60, audio output $12).
MEDIA_PRICES: dict[str, MediaPrice] = {
    "gpt-image-1": MediaPrice(text_in="5", image_in="10", output="40"),
    "gpt-4o-mini-transcribe": MediaPrice(text_in="1.25", audio_in="3", output="5"),
    "gpt-4o-mini-tts": MediaPrice(text_in="0.60", output="12"),
}
# USD per unit: DALL-E per image (openai.com/api/pricing, 2023-11), whisper-1 $0.006 a minute, tts-1 $15 and
# tts-1-hd $30 per million characters, Imagen 4 $0.04 per image (ai.google.dev/gemini-api/docs/pricing).
UNIT_PRICES: dict[tuple[str, str], str] = {
    ("dall-e-2", "image/256x256/standard"): "0.016",
    ("dall-e-2", "image/512x512/standard"): "0.018",
    ("dall-e-2", "image/1024x1024/standard"): "0.020",
    ("dall-e-3", "image/1024x1024/standard"): "0.040",
    ("dall-e-3", "image/1792x1024/hd"): "0.120",
    ("whisper-1", "audio_second"): "0.0001",
    ("tts-1", "character"): "0.000015",
    ("tts-1-hd", "character"): "0.00003",
    ("imagen-4.0-generate-001", "image"): "0.04",
}


def media_cost(bill: object) -> Decimal:
    """What one simulated media bill costs: tokens per modality, then units."""
    b = bill.planned  # type: ignore[attr-defined]
    model = bill.model  # type: ignore[attr-defined]
    total = Decimal(0)
    price = MEDIA_PRICES.get(model)
    if price is not None:
        text = b.input - b.input_image - b.input_audio
        total += (
            text * Decimal(price.text_in)
            + b.input_image * Decimal(price.image_in)
            + b.input_audio * Decimal(price.audio_in)
            + b.output * Decimal(price.output)
        ) / MTOK
    for unit, n in bill.units.items():  # type: ignore[attr-defined]
        total += Decimal(UNIT_PRICES[(model, unit)]) * n
    return total
