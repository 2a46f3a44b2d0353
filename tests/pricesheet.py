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
