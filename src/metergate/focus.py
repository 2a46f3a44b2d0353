"""The ledger as a FOCUS dataset (FinOps Open Cost and Usage Specification 1.0), for FinOps tools.

One row per charge period (a day of the config's timezone, stated in UTC) and team, app, provider, model, end user
and tag values: BilledCost = EffectiveCost = ContractedCost = the ledger's cost, ListCost at the catalogue's list
price, ConsumedQuantity in tokens (or the request's billed unit where there are no tokens). Team, app, user and tags
are in `Tags` and in `x_` columns. The validator on PyPI (focus-validator 1.0.0) still requires some pre-1.0 column
names (Provider, Publisher, InvoiceIssuer, ResourceID, ChargeType); they are written beside the 1.0 names.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
from genai_prices import __version__ as catalogue_version

from metergate.config import Config
from metergate.ledger import Ledger
from metergate.ledger.store import Aggregate
from metergate.pricing import PriceBook
from metergate.reports import spreadsheet_safe
from metergate.usage import from_pusd

FOCUS_VERSION = "1.0"
SERVICE_CATEGORY = "AI and Machine Learning"
_PICO = Decimal("0.000000000001")

# (ProviderName, PublisherName, InvoiceIssuerName, ServiceName) by provider type.
_PARTIES = {
    "openai": ("OpenAI", "OpenAI", "OpenAI", "OpenAI API"),
    "anthropic": ("Anthropic", "Anthropic", "Anthropic", "Claude API"),
    "gemini": ("Google", "Google", "Google", "Gemini API"),
    "azure-openai": ("Microsoft", "OpenAI", "Microsoft", "Azure OpenAI"),
}
_UNIT_NAMES = {
    "image": "Images",
    "audio_second": "Seconds",
    "character": "Characters",
    "web_search": "Searches",
    "web_fetch": "Fetches",
    "file_search": "Searches",
    "code_interpreter_session": "Sessions",
    "image_generation_call": "Calls",
}

COLUMNS = (
    # FOCUS 1.0
    "AvailabilityZone",
    "BilledCost",
    "BillingAccountId",
    "BillingAccountName",
    "BillingCurrency",
    "BillingPeriodEnd",
    "BillingPeriodStart",
    "ChargeCategory",
    "ChargeClass",
    "ChargeDescription",
    "ChargeFrequency",
    "ChargePeriodEnd",
    "ChargePeriodStart",
    "CommitmentDiscountCategory",
    "CommitmentDiscountId",
    "CommitmentDiscountName",
    "CommitmentDiscountStatus",
    "CommitmentDiscountType",
    "ConsumedQuantity",
    "ConsumedUnit",
    "ContractedCost",
    "ContractedUnitPrice",
    "EffectiveCost",
    "InvoiceIssuerName",
    "ListCost",
    "ListUnitPrice",
    "PricingCategory",
    "PricingQuantity",
    "PricingUnit",
    "ProviderName",
    "PublisherName",
    "RegionId",
    "RegionName",
    "ResourceId",
    "ResourceName",
    "ResourceType",
    "ServiceCategory",
    "ServiceName",
    "SkuId",
    "SkuPriceId",
    "SubAccountId",
    "SubAccountName",
    "Tags",
    # the names focus-validator 1.0.0 checks instead of some 1.0 ones
    "ChargeType",
    "InvoiceIssuer",
    "Provider",
    "Publisher",
    "ResourceID",
    # metergate's own columns (FOCUS: custom columns start with x_)
    "x_Team",
    "x_App",
    "x_User",
    "x_GatewayProvider",
    "x_Requests",
    "x_FailedRequests",
    "x_InputTokens",
    "x_OutputTokens",
    "x_CachedInputTokens",
    "x_Units",
)
DECIMALS = frozenset(
    {"BilledCost", "ConsumedQuantity", "ContractedCost", "EffectiveCost", "ListCost", "PricingQuantity"}
    | {"ContractedUnitPrice", "ListUnitPrice"}
)
TIMES = frozenset({"BillingPeriodEnd", "BillingPeriodStart", "ChargePeriodEnd", "ChargePeriodStart"})
INTEGERS = frozenset({"x_Requests", "x_FailedRequests", "x_InputTokens", "x_OutputTokens", "x_CachedInputTokens"})


@dataclass(frozen=True)
class _Period:
    start: datetime
    end: datetime
    billing_start: datetime
    billing_end: datetime


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC)


def _period(day: date, tz: ZoneInfo) -> _Period:
    month = day.replace(day=1)
    next_month = (month + timedelta(days=32)).replace(day=1)
    return _Period(
        _utc(datetime.combine(day, time(0), tzinfo=tz)),
        _utc(datetime.combine(day + timedelta(days=1), time(0), tzinfo=tz)),
        _utc(datetime.combine(month, time(0), tzinfo=tz)),
        _utc(datetime.combine(next_month, time(0), tzinfo=tz)),
    )


def _list_cost(
    cfg: Config, catalogue: PriceBook, overrides: PriceBook, provider: str, model: str, a: Aggregate, at: datetime
) -> Decimal:
    """The group's cost at the catalogue's list price: the ledger's cost unless a config price replaced the
    catalogue's for this model; then the catalogue's unit prices of an ordinary request times the group's tokens
    (cache writes at the 5-minute rate; the ledger cost when the catalogue has no price)."""
    billed = from_pusd(a.cost_pusd)
    p = cfg.providers.get(provider)
    if p is None or overrides.override_card(provider, model) is None:
        return billed
    unit = catalogue.per_mtok(provider, p.pricing_provider_id, model, at)
    if unit is None:
        return billed
    uncached = max(0, a.tokens_in - a.tokens_cached - a.tokens_cache_write)
    listed = (
        uncached * unit["input"]
        + a.tokens_cached * unit["cached_input"]
        + a.tokens_cache_write * unit["cache_write"]
        + a.tokens_out * unit["output"]
    ) / 1_000_000
    return listed.quantize(_PICO)


def _dims(cfg: Config) -> list[str]:
    return ["team", "app", "provider", "upstream_model", "user", *(f"tag.{k}" for k in cfg.attribution.tags)]


async def focus_rows(cfg: Config, ledger: Ledger, start: date, end: date) -> list[dict[str, Any]]:
    """The FOCUS rows of the local days from `start` to `end` inclusive (values as Python objects)."""
    if end < start:
        raise ValueError(f"--to {end} is before --from {start}")
    tz = cfg.timezone()
    dims = _dims(cfg)
    catalogue, overrides = PriceBook([]), PriceBook(cfg.prices)
    await ledger.flush_now()
    store = await ledger.store()
    rows: list[dict[str, Any]] = []
    day = start
    while day <= end:
        period = _period(day, tz)
        lo, hi = period.start.timestamp(), period.end.timestamp()
        groups = await ledger.call(store.aggregate, lo, hi, dims, None)
        units: dict[tuple[str | None, ...], dict[str, int]] = {}
        for group, unit, n in await ledger.call(store.unit_totals, lo, hi, dims, None):
            if n:
                units.setdefault(group, {})[unit] = n
        for a in groups:
            row = _row(cfg, catalogue, overrides, dims, a, units.get(a.group, {}), period)
            if row is not None:
                rows.append(row)
        day += timedelta(days=1)
    return rows


def _row(
    cfg: Config,
    catalogue: PriceBook,
    overrides: PriceBook,
    dims: Sequence[str],
    a: Aggregate,
    units: dict[str, int],
    period: _Period,
) -> dict[str, Any] | None:
    values = dict(zip(dims, a.group, strict=True))
    team, app, provider, model, user = (values[d] or "" for d in ("team", "app", "provider", "upstream_model", "user"))
    tokens = a.tokens_in + a.tokens_out
    if not a.cost_pusd and not tokens and not units:
        return None  # requests refused or failed at no charge: nothing to bill
    kind = cfg.providers[provider].type if provider in cfg.providers else "openai-compatible"
    provider_name, publisher, issuer, service = _PARTIES.get(kind, (provider, provider, provider, f"{provider} API"))
    if tokens or not units:
        quantity, unit = Decimal(tokens), "Tokens"
    else:
        name, n = max(units.items(), key=lambda kv: kv[1])
        quantity, unit = Decimal(n), _UNIT_NAMES.get(name.split("/")[0], name)
    cost = from_pusd(a.cost_pusd)
    tags = {"team": team, "app": app} | ({"user": user} if user else {})
    tags |= {d.removeprefix("tag."): v for d, v in values.items() if d.startswith("tag.") and v is not None}
    overridden = overrides.override_card(provider, model) is not None
    sku = f"{kind}/{model}"
    return {
        "AvailabilityZone": None,
        "BilledCost": cost,
        "BillingAccountId": f"provider:{provider}",  # never all digits: FOCUS tools would read a number
        "BillingAccountName": f"{provider_name} ({provider})",
        "BillingCurrency": "USD",
        "BillingPeriodEnd": period.billing_end,
        "BillingPeriodStart": period.billing_start,
        "ChargeCategory": "Usage",
        "ChargeClass": None,
        "ChargeDescription": f"{model} through metergate: {a.tokens_in:,} input and {a.tokens_out:,} output tokens "
        f"in {a.requests:,} requests",
        "ChargeFrequency": "Usage-Based",
        "ChargePeriodEnd": period.end,
        "ChargePeriodStart": period.start,
        "CommitmentDiscountCategory": None,
        "CommitmentDiscountId": None,
        "CommitmentDiscountName": None,
        "CommitmentDiscountStatus": None,
        "CommitmentDiscountType": None,
        "ConsumedQuantity": quantity,
        "ConsumedUnit": unit,
        "ContractedCost": cost,
        "ContractedUnitPrice": None,
        "EffectiveCost": cost,
        "InvoiceIssuerName": issuer,
        "ListCost": _list_cost(cfg, catalogue, overrides, provider, model, a, period.start),
        "ListUnitPrice": None,  # input and output tokens have different prices: no single unit price
        "PricingCategory": "Standard",
        "PricingQuantity": quantity,
        "PricingUnit": unit,
        "ProviderName": provider_name,
        "PublisherName": publisher,
        "RegionId": None,
        "RegionName": None,
        "ResourceId": f"{provider}/{model}",
        "ResourceName": model,
        "ResourceType": "Model",
        "ServiceCategory": SERVICE_CATEGORY,
        "ServiceName": service,
        "SkuId": sku,
        "SkuPriceId": f"{sku}/{'config' if overridden else 'genai-prices-' + catalogue_version}",
        "SubAccountId": f"team:{team}",
        "SubAccountName": team,
        "Tags": orjson.dumps(tags).decode(),
        "ChargeType": "Usage",
        "InvoiceIssuer": issuer,
        "Provider": provider_name,
        "Publisher": publisher,
        "ResourceID": f"{provider}/{model}",
        "x_Team": team,
        "x_App": app,
        "x_User": user or None,
        "x_GatewayProvider": provider,
        "x_Requests": a.requests,
        "x_FailedRequests": a.errors,
        "x_InputTokens": a.tokens_in,
        "x_OutputTokens": a.tokens_out,
        "x_CachedInputTokens": a.tokens_cached,
        "x_Units": orjson.dumps(units).decode() if units else None,
    }


_LABEL = re.compile(r"^[A-Za-z0-9_.:/-]*$")  # team, app, provider and model names as the gateway labels them


def _text(column: str, value: Any) -> str:
    """A CSV cell as FOCUS tools read it: decimals always with a point, times in UTC with Z, null as empty."""
    if value is None:
        return ""
    if column in DECIMALS:
        text = format(value, "f")
        return text if "." in text else text + ".0"
    if column in TIMES:
        return str(value.strftime("%Y-%m-%dT%H:%M:%SZ"))
    text = str(value)
    if column in INTEGERS:
        return text
    # Free text (a user id from a client) must not run as a spreadsheet formula when the file is opened; names
    # that are plain labels (`-ops`) cannot, and are kept as they are so that every column agrees with Tags.
    return spreadsheet_safe(text, _LABEL.match)


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([_text(c, row[c]) for c in COLUMNS])


def write_parquet(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Parquet with FOCUS types: decimals as double (what FinOps tools and the validator read), times as UTC
    timestamps, counts as int64, the rest as strings."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("--format parquet needs pyarrow: pip install 'metergate[parquet]'") from None

    def kind(column: str) -> Any:
        if column in DECIMALS:
            return pa.float64()
        if column in TIMES:
            return pa.timestamp("us", tz="UTC")
        if column in INTEGERS:
            return pa.int64()
        return pa.string()

    schema = pa.schema([(c, kind(c)) for c in COLUMNS])
    columns = {c: [None if r[c] is None else float(r[c]) if c in DECIMALS else r[c] for r in rows] for c in COLUMNS}
    pq.write_table(pa.Table.from_pydict(columns, schema=schema), path)
