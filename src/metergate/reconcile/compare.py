"""The provider's bill beside the ledger, one row per UTC day, model and provider-side API key, each difference
explained from the figures on both sides (never guessed).

Where a provider states costs per model and token type but not per API key (Anthropic), each cost line is shared
among the keys in proportion to their tokens of that type: exact when every key pays the same unit price, which is
how both providers bill.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from metergate.ledger.store import ProviderDay
from metergate.reconcile.bill import (
    CACHE_WRITE,
    CACHE_WRITE_1H,
    CACHED_INPUT,
    INPUT,
    OUTPUT,
    TOKEN_TYPES,
    ProviderBill,
    ProviderCharge,
    day_of,
    model_key,
)
from metergate.usage import from_pusd

PICO = Decimal("1e-12")
MILLION = Decimal(1_000_000)
GATEWAY = "\0gateway"  # the slot of the keys the gateway sends with (one row even when it rotated keys)
UNATTRIBUTED = "(unattributed)"
# Why a row differs. Codes in `causes`, in this order; `explanation` says it in words with the figures.
MATCH, BYPASS, UNPRICED, PRICE_DIFFERENCE = "match", "bypass", "unpriced", "price_difference"
FAILED_BUT_BILLED, ROUNDING, NOT_BILLED_YET, TOKEN_DIFFERENCE = (
    "failed_but_billed",
    "rounding",
    "not_on_provider_bill",
    "token_difference",
)
OTHER_CHARGE, UNIT_CHARGES, NOT_IN_LEDGER = "other_charge", "unit_charges", "not_in_ledger"

# USD per million tokens of each token type, as the gateway priced a model on a day (None: unpriced there).
UnitPrices = Callable[[str, int], dict[str, Decimal] | None]


@dataclass(slots=True)
class _Slot:
    day: int
    model: str
    key: str
    key_ids: set[str] = field(default_factory=set)
    tokens: dict[str, int] = field(default_factory=dict)
    tier_tokens: dict[tuple[str, str], int] = field(default_factory=dict)  # (tier, type) -> tokens
    requests: int | None = None
    has_usage: bool = False
    cost: dict[str, Decimal] = field(default_factory=dict)  # by token type, "other" for other charges
    resolution: Decimal = Decimal(0)
    lines: int = 0
    gateway: ProviderDay | None = None

    @property
    def provider_cost(self) -> Decimal:
        return sum(self.cost.values(), Decimal(0))


@dataclass(frozen=True)
class Reconciliation:
    provider: str
    first_day: int
    last_day: int
    key_ids: tuple[str, ...]  # the provider-side ids of the gateway's keys
    rows: list[dict[str, Any]]
    requests_counted: bool

    def totals(self) -> dict[str, Any]:
        """Costs over the gateway's own keys (the meter's accuracy) and over the other keys (traffic around it)."""
        through = [r for r in self.rows if r["through_gateway"]]
        gateway = sum((Decimal(r["gateway_cost_usd"]) for r in through), Decimal(0))
        provider = sum((Decimal(r["provider_cost_usd"]) for r in through), Decimal(0))
        others = [r for r in self.rows if not r["through_gateway"]]
        bypass = sum((Decimal(r["provider_cost_usd"]) for r in others if BYPASS in r["causes"]), Decimal(0))
        unattributed = sum((Decimal(r["provider_cost_usd"]) for r in others if BYPASS not in r["causes"]), Decimal(0))
        return {
            "provider": self.provider,
            "gateway_cost_usd": gateway,
            "provider_cost_usd": provider,
            "gap_usd": provider - gateway,
            "ratio": ratio(provider, gateway),
            "bypass_cost_usd": bypass,
            # charges the provider ties to no API key (Anthropic code execution, OpenAI storage...)
            "unattributed_cost_usd": unattributed,
        }


def ratio(provider: Decimal, gateway: Decimal) -> float:
    """Provider cost over gateway cost: 1 when both agree (or both are zero), +inf when only the provider billed."""
    if gateway == 0:
        return 1.0 if provider == 0 else float("inf")
    return float(provider / gateway)


def _share(charge: ProviderCharge, slots: Sequence[_Slot]) -> list[tuple[_Slot, Decimal]]:
    """A charge without an API key split over the slots in proportion to their tokens of its type, in whole
    pico-dollars that add up to the charge (the remainder goes to the largest share)."""
    assert charge.token_type is not None
    kind = charge.token_type
    weights = [(s, s.tier_tokens.get((charge.tier, kind), 0)) for s in slots] if charge.tier else []
    if not sum(w for _, w in weights):  # no usage at the line's price variant: by the type's tokens at any
        weights = [(s, s.tokens.get(kind, 0)) for s in slots]
    total = sum(w for _, w in weights)
    if total == 0:
        return []
    shares = [(s, (charge.usd * w / total).quantize(PICO)) for s, w in weights if w]
    rest = charge.usd - sum((a for _, a in shares), Decimal(0))
    if rest:
        i = max(range(len(shares)), key=lambda k: shares[k][1])
        shares[i] = (shares[i][0], shares[i][1] + rest)
    return shares


def reconcile(
    bill: ProviderBill,
    gateway: Iterable[ProviderDay],
    gateway_keys: set[str],
    first_day: int,
    last_day: int,
    unit_prices: UnitPrices,
) -> Reconciliation:
    """One row per (day, model, API key) either side knows of, with the difference and its causes."""
    slots: dict[tuple[int, str, str], _Slot] = {}

    def slot(day: int, model: str, key: str | None, gateway_row: bool = False) -> _Slot:
        k = GATEWAY if gateway_row or key in gateway_keys else (key or UNATTRIBUTED)
        found = slots.get((day, model_key(model), k))
        if found is None:
            found = slots[(day, model_key(model), k)] = _Slot(day, model, k)
        if key:
            found.key_ids.add(key)
        return found

    for u in bill.usage:
        if first_day <= u.day <= last_day:
            s = slot(u.day, u.model, u.api_key_id)
            s.model, s.has_usage = u.model, True
            for kind, n in u.tokens.items():
                s.tokens[kind] = s.tokens.get(kind, 0) + n
                if u.tier is not None:
                    s.tier_tokens[(u.tier, kind)] = s.tier_tokens.get((u.tier, kind), 0) + n
            if u.requests is not None:
                s.requests = (s.requests or 0) + u.requests
    for g in gateway:
        if first_day <= g.day <= last_day:
            s = slot(g.day, g.model, None, gateway_row=True)
            s.gateway = g if s.gateway is None else _add_days(s.gateway, g)
            if not s.has_usage:
                s.model = g.model
    for c in bill.charges:
        if not first_day <= c.day <= last_day:
            continue
        if c.token_type is None or (c.model is None and c.api_key_id is not None):
            _charge(slot(c.day, c.label, c.api_key_id), OTHER_CHARGE, c.usd, c)
        elif c.api_key_id is not None and c.model is not None:
            _charge(slot(c.day, c.model, c.api_key_id), c.token_type, c.usd, c)
        else:
            # no key (Anthropic), or no model either (its web searches): shared by the usage it is for
            same = [
                s
                for (d, m, _), s in slots.items()
                if d == c.day and (c.model is None or m == model_key(c.model)) and s.has_usage
            ]
            shares = _share(c, same)
            if not shares:
                shares = [(slot(c.day, c.model or c.label, None), c.usd)]
            for s, amount in shares:
                _charge(s, c.token_type, amount, c)
    keys = sorted(gateway_keys)
    rows = [
        _row(bill, s, unit_prices, keys)
        for _, s in sorted(slots.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2]))
        if s.has_usage or s.cost or (s.gateway is not None and _billable(s.gateway))
    ]
    return Reconciliation(bill.provider, first_day, last_day, tuple(sorted(gateway_keys)), rows, bill.requests_counted)


def _charge(s: _Slot, kind: str, amount: Decimal, c: ProviderCharge) -> None:
    s.cost[kind] = s.cost.get(kind, Decimal(0)) + amount
    s.resolution += c.resolution
    s.lines += 1


def _add_days(a: ProviderDay, b: ProviderDay) -> ProviderDay:
    """Two ledger groups matched to one row (a snapshot name and its alias): their sums."""
    return ProviderDay(
        a.day,
        a.provider,
        a.model,
        *(x + y for x, y in zip(_figures(a), _figures(b), strict=True)),
    )


def _billable(d: ProviderDay) -> bool:
    """Whether a ledger group is something a provider bills: listing models, uploading files, free endpoints and
    requests refused before they were sent are not, and would only add empty rows."""
    return bool(d.tokens_in or d.tokens_out or d.cost_pusd or d.failed)


def _figures(d: ProviderDay) -> tuple[int, ...]:
    return (
        d.requests,
        d.failed,
        d.unpriced,
        d.tokens_in,
        d.tokens_out,
        d.tokens_cached,
        d.tokens_cache_write,
        d.cost_pusd,
    )


def _per_mtok(cost: dict[str, Decimal], tokens: dict[str, int]) -> dict[str, str]:
    return {
        kind: _usd((cost[kind] * MILLION / tokens[kind]).quantize(Decimal("0.000001")))
        for kind in TOKEN_TYPES
        if tokens.get(kind) and kind in cost
    }


def _usd(value: Decimal) -> str:
    return format(value.normalize() if value else Decimal(0), "f")


def _row(bill: ProviderBill, s: _Slot, unit_prices: UnitPrices, gateway_keys: Sequence[str]) -> dict[str, Any]:
    g = s.gateway
    through = s.key == GATEWAY
    t = s.tokens
    p_in = t.get(INPUT, 0) + t.get(CACHED_INPUT, 0) + t.get(CACHE_WRITE, 0) + t.get(CACHE_WRITE_1H, 0)
    p_out, p_cached = t.get(OUTPUT, 0), t.get(CACHED_INPUT, 0)
    p_write = t.get(CACHE_WRITE, 0) + t.get(CACHE_WRITE_1H, 0)
    g_cost = from_pusd(g.cost_pusd) if g else Decimal(0)
    p_cost = s.provider_cost
    gap = p_cost - g_cost
    row: dict[str, Any] = {
        "date": day_of(s.day).isoformat(),
        "provider": bill.provider,
        "model": s.model,
        "api_key_id": ",".join(sorted(s.key_ids)) or (",".join(gateway_keys) if through else s.key),
        "through_gateway": through,
        "gateway_requests": g.requests if g else 0,
        "gateway_failed_requests": g.failed if g else 0,
        "provider_requests": s.requests if bill.requests_counted else None,
        "gateway_tokens_in": g.tokens_in if g else 0,
        "provider_tokens_in": p_in,
        "gateway_tokens_out": g.tokens_out if g else 0,
        "provider_tokens_out": p_out,
        "gateway_tokens_cached": g.tokens_cached if g else 0,
        "provider_tokens_cached": p_cached,
        "gateway_tokens_cache_write": g.tokens_cache_write if g else 0,
        "provider_tokens_cache_write": p_write,
        "gateway_cost_usd": _usd(g_cost),
        "provider_cost_usd": _usd(p_cost),
        "gap_usd": _usd(gap),
    }
    causes, words = _explain(bill, s, row, gap, unit_prices)
    row["causes"] = causes
    row["explanation"] = "; ".join(words)
    return row


def _explain(
    bill: ProviderBill, s: _Slot, row: dict[str, Any], gap: Decimal, unit_prices: UnitPrices
) -> tuple[list[str], list[str]]:
    g = s.gateway
    causes: list[str] = []
    words: list[str] = []
    if OTHER_CHARGE in s.cost:
        causes.append(OTHER_CHARGE)
        words.append(
            f"a charge the provider does not state per model's tokens ({s.model}, ${row['provider_cost_usd']}); "
            "the gateway includes such fees in the cost of the requests that caused them"
        )
    if not row["through_gateway"]:
        if s.has_usage or (s.cost and s.key != UNATTRIBUTED):
            causes.append(BYPASS)
            who = f"key {row['api_key_id']}" if s.key != UNATTRIBUTED else "no API key"
            words.append(f"bypass: billed under {who}, which the gateway does not use: ${row['provider_cost_usd']}")
        elif not causes:
            causes.append(OTHER_CHARGE)
            words.append(f"a charge tied to no API key: ${row['provider_cost_usd']}")
        return causes, words
    tokens = ("tokens_in", "tokens_out", "tokens_cached", "tokens_cache_write")
    same_tokens = all(row[f"gateway_{f}"] == row[f"provider_{f}"] for f in tokens)
    requests_differ = bill.requests_counted and g is not None and (s.requests or 0) != g.requests
    if g is not None and g.unpriced:
        causes.append(UNPRICED)
        words.append(
            f"unpriced: the gateway has no price for {s.model} and recorded {g.unpriced} of its requests at $0; "
            f"the provider billed ${row['provider_cost_usd']}"
        )
    if not same_tokens or requests_differ:
        more = {f: row[f"provider_{f}"] - row[f"gateway_{f}"] for f in tokens}
        if g is not None and g.failed and all(v >= 0 for v in more.values()):
            causes.append(FAILED_BUT_BILLED)
            words.append(
                f"failed but billed: {g.failed} request(s) the gateway recorded as failed after sending them; "
                f"the provider billed {more['tokens_in']:,} input and {more['tokens_out']:,} output tokens "
                "more than the gateway metered"
            )
        elif g is None:
            causes.append(NOT_IN_LEDGER)
            words.append(
                "not in the ledger: the provider billed the gateway's key for traffic the gateway has no record "
                "of: the key is used somewhere else too, or records were lost (metergate_ledger_dropped_records)"
            )
        elif not s.has_usage:
            causes.append(NOT_BILLED_YET)
            words.append(
                "not on the provider's bill: the gateway metered this traffic but the provider reports none for it "
                "(its reports can lag by hours; check again later)"
            )
        else:
            causes.append(TOKEN_DIFFERENCE)
            words.append(
                "token difference: the provider counted "
                + ", ".join(f"{v:+,} {f.removeprefix('tokens_')}" for f, v in more.items() if v)
                + (f", {(s.requests or 0) - (g.requests if g else 0):+,} requests" if requests_differ else "")
                + " against the gateway: a metering difference to look into"
            )
    elif gap and UNPRICED not in causes and OTHER_CHARGE not in causes:
        tolerance = s.resolution / 2 + PICO * s.lines
        if not any(row[f"gateway_{f}"] for f in tokens):
            causes.append(UNIT_CHARGES)
            words.append(
                "billed per unit (images, audio seconds, characters): the provider states these in line items of "
                "their own, not per model's tokens; compare the day's other_charge rows"
            )
        elif abs(gap) <= tolerance:
            causes.append(ROUNDING)
            words.append(
                f"rounding: the provider states its amounts to ${_usd(max(s.resolution / max(s.lines, 1), PICO))}; "
                f"the ${_usd(gap)} difference is within the rounding of its {s.lines} cost line(s)"
            )
        else:
            causes.append(PRICE_DIFFERENCE)
            provider_prices = _per_mtok(s.cost, s.tokens)
            gateway_prices = unit_prices(g.model if g is not None else s.model, s.day) or {}
            row["provider_usd_per_mtok"] = provider_prices
            row["gateway_usd_per_mtok"] = {k: _usd(v) for k, v in gateway_prices.items() if k in provider_prices}
            differing = [
                f"{kind} ${price}/M at the provider vs ${row['gateway_usd_per_mtok'].get(kind, '?')}/M at the gateway"
                for kind, price in provider_prices.items()
                if row["gateway_usd_per_mtok"].get(kind) != price
            ]
            words.append(
                "price difference: the same tokens cost " + ", ".join(differing)
                if differing
                else f"price difference: the same tokens at the same list prices cost ${_usd(gap)} more at the "
                "provider: a modifier the gateway did not apply (batch, service tier, region, long context)"
            )
    if not causes:
        causes.append(MATCH)
        words.append("match")
    return causes, words
