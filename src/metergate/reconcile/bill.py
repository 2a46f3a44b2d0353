"""A provider's own account of a date range, in provider-neutral terms: token usage per day, model and API key,
and charges in USD per day and line (model and token type where the provider says)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

# Token types both sides are compared in. Input tokens split so that each type has one unit price.
INPUT, CACHED_INPUT, OUTPUT = "input", "cached_input", "output"
CACHE_WRITE, CACHE_WRITE_1H = "cache_write", "cache_write_1h"  # Anthropic's 5-minute and 1-hour cache writes
TOKEN_TYPES = (INPUT, CACHED_INPUT, CACHE_WRITE, CACHE_WRITE_1H, OUTPUT)
# Counted like tokens to share a charge among keys, but not tokens: Anthropic's web searches (its usage report
# counts them per key and model; its cost report states their cost per day only).
WEB_SEARCH = "web_search"

_SNAPSHOT = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8}|\d{4})$")
MAX_TOKENS = 2**62  # a count past this is not a real report; refused rather than summed
_EPOCH = date(1970, 1, 1)


class ReconcileError(Exception):
    """The provider's reports could not be read in full: nothing is reported rather than a partial figure."""


def model_key(model: str) -> str:
    """The model a row is matched on: without a dated snapshot suffix, because providers report the snapshot
    (`gpt-4o-mini-2024-07-18`, `claude-sonnet-4-5-20250929`, `gpt-3.5-turbo-0125`) where the ledger keeps the name
    that was sent. Both sides are merged the same way, so a day's sums stay exact when snapshots share a row."""
    return _SNAPSHOT.sub("", model)


def day_number(d: date) -> int:
    return (d - _EPOCH).days


def day_of(n: int) -> date:
    return date.fromordinal(_EPOCH.toordinal() + n)


def day_of_timestamp(ts: float) -> int:
    return int(ts // 86400)


def day_of_rfc3339(text: Any) -> int:
    if not isinstance(text, str) or len(text) > 64:
        raise ReconcileError(f"bucket time {str(text)[:64]!r} is not an RFC 3339 timestamp")
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ReconcileError(f"bucket time {text!r} is not an RFC 3339 timestamp") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return day_of_timestamp(moment.timestamp())


def count(value: Any, what: str) -> int:
    """A token or request count from a report: a non-negative integer of a sane size, or 0 when absent."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKENS:
        raise ReconcileError(f"{what} is {str(value)[:40]!r}, not a token or request count")
    return value


def text(value: Any, what: str, limit: int = 256) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise ReconcileError(f"{what} is not a string of at most {limit} characters")
    return value


@dataclass(slots=True)
class ProviderUsage:
    """Tokens (and requests, where the provider counts them) for one day, model and provider-side API key."""

    day: int
    model: str
    api_key_id: str | None
    tokens: dict[str, int] = field(default_factory=dict)  # by token type
    requests: int | None = None
    # The price variant the provider states costs by (Anthropic: service tier and context window), so that a cost
    # line is shared only among the usage billed at its price; None where costs are stated per key anyway.
    tier: str | None = None

    def add(self, other: ProviderUsage) -> None:
        for kind, n in other.tokens.items():
            self.tokens[kind] = self.tokens.get(kind, 0) + n
        if other.requests is not None:
            self.requests = (self.requests or 0) + other.requests


@dataclass(frozen=True, slots=True)
class ProviderCharge:
    """One cost line of the provider's report. `model` and `token_type` are None for charges that are not for a
    model's tokens (web search calls, storage...); `api_key_id` is None where the provider does not split costs by
    key (Anthropic). `resolution` is the smallest amount the provider's figure is stated to (half of it is the
    most its rounding can account for)."""

    day: int
    label: str
    usd: Decimal
    model: str | None = None
    token_type: str | None = None
    api_key_id: str | None = None
    resolution: Decimal = Decimal(0)
    tier: str | None = None  # see ProviderUsage.tier


@dataclass(slots=True)
class ProviderBill:
    provider: str
    usage: list[ProviderUsage] = field(default_factory=list)
    charges: list[ProviderCharge] = field(default_factory=list)
    requests_counted: bool = True  # False: the provider's usage report has no request counts (Anthropic)
