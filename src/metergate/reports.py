"""Reports from the ledger: totals by team/app/model over dates, daily history, monthly chargeback statements.

Costs are summed as exact pico-dollar integers and shown in USD; a report's totals are the ledger's totals.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from metergate.ledger import Ledger
from metergate.ledger.store import Aggregate
from metergate.periods import first_day, next_first_day, parse_day
from metergate.usage import from_pusd

_BUCKET_S = 900  # quarter hours map onto local dates in every timezone (offsets are whole quarter hours)
ROW_FIELDS = ("requests", "errors", "tokens_in", "tokens_out", "tokens_cached", "cost_usd")


@dataclass(frozen=True)
class Report:
    start: date
    end: date  # inclusive
    tz: str
    by: tuple[str, ...]
    rows: list[dict[str, Any]]

    @property
    def totals(self) -> dict[str, Any]:
        out: dict[str, Any] = {f: 0 for f in ROW_FIELDS}
        out["cost_usd"] = Decimal(0)
        units: dict[str, int] = {}
        for row in self.rows:
            for f in ROW_FIELDS:
                out[f] += row[f]
            for unit, n in (row.get("units") or {}).items():
                units[unit] = units.get(unit, 0) + n
        if units:
            out["units"] = units
        return out


def day_bounds(start: date, end_inclusive: date, tz: ZoneInfo) -> tuple[float, float]:
    lo = datetime.combine(start, time(0), tzinfo=tz).timestamp()
    hi = datetime.combine(end_inclusive + timedelta(days=1), time(0), tzinfo=tz).timestamp()
    return lo, hi


def rows_of(aggregates: Sequence[Aggregate], by: Sequence[str]) -> list[dict[str, Any]]:
    return [
        {
            **dict(zip(by, a.group, strict=True)),
            "requests": a.requests,
            "errors": a.errors,
            "tokens_in": a.tokens_in,
            "tokens_out": a.tokens_out,
            "tokens_cached": a.tokens_cached,
            "cost_usd": from_pusd(a.cost_pusd),
        }
        for a in aggregates
    ]


async def build_report(
    ledger: Ledger, start: date, end: date, by: Sequence[str], tz: ZoneInfo, team: str | None = None
) -> Report:
    if end < start:
        raise ValueError(f"--to {end} is before --from {start}")
    await ledger.flush_now()
    store = await ledger.store()
    lo, hi = day_bounds(start, end, tz)
    aggregates = await ledger.call(store.aggregate, lo, hi, list(by), team)
    rows = rows_of(aggregates, by)
    units = await ledger.call(store.unit_totals, lo, hi, list(by), team)
    if units:
        by_group = {tuple(str(row[d]) for d in by): row for row in rows}
        for group, unit, quantity in units:
            row = by_group.get(group)
            if row is not None and quantity:
                row.setdefault("units", {})[unit] = quantity
    return Report(start, end, str(tz), tuple(by), rows)


async def daily_history(
    ledger: Ledger, now: datetime, tz: ZoneInfo, days: int = 35
) -> dict[tuple[str, str], dict[date, float]]:
    """Spend per (team, app) and local date over the last `days` days, for forecasts."""
    store = await ledger.store()
    until = now.timestamp()
    since = until - days * 86400
    buckets = await ledger.call(store.cost_buckets, since, until, _BUCKET_S)
    history: dict[tuple[str, str], dict[date, float]] = {}
    for team, app, bucket, pusd in buckets:
        day = datetime.fromtimestamp(bucket * _BUCKET_S, tz).date()
        per_day = history.setdefault((team, app), {})
        per_day[day] = per_day.get(day, 0.0) + float(from_pusd(pusd))
    return history


def month_bounds(month: str) -> tuple[date, date]:
    """'2026-11' -> (2026-11-01, 2026-11-30)."""
    if not re.fullmatch(r"\d{4}-\d{2}", month):
        raise ValueError(f"expected a month like 2026-11, got {month!r}")
    try:
        first = parse_day(month + "-01")
    except ValueError as exc:
        raise ValueError(f"expected a month like 2026-11 from 1970-01 to 9998-12, got {month!r}") from exc
    return first_day("month", first), next_first_day("month", first) - timedelta(days=1)


# --- formats ----------------------------------------------------------------------------------------------------


def _cell(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value.quantize(Decimal("0.000001")) if value else value, "f")
    return value


def to_json(report: Report) -> bytes:
    rows = [{k: (float(v) if isinstance(v, Decimal) else v) for k, v in row.items()} for row in report.rows]
    return orjson.dumps(rows, option=orjson.OPT_INDENT_2)


def to_csv(report: Report) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*report.by, *ROW_FIELDS, "units"])
    for row in report.rows:
        writer.writerow([row[k] for k in report.by] + [_exact(row[f]) for f in ROW_FIELDS] + [units_cell(row)])
    totals = report.totals
    writer.writerow(
        ["TOTAL", *([""] * (len(report.by) - 1))] + [_exact(totals[f]) for f in ROW_FIELDS] + [units_cell(totals)]
    )
    return out.getvalue()


def units_cell(row: dict[str, Any]) -> str:
    """Non-token units as `web_search=3 web_fetch=1` (empty when none)."""
    return " ".join(f"{unit}={n}" for unit, n in sorted((row.get("units") or {}).items()))


def _exact(value: Any) -> Any:
    return format(value, "f") if isinstance(value, Decimal) else value


def chargeback_markdown(team: str, month: str, report: Report) -> str:
    """A monthly statement for one team: its spend by app and model, with totals that match the ledger."""
    totals = report.totals
    lines = [
        f"# LLM chargeback statement: team {team}, {month}",
        "",
        f"Period: {report.start} to {report.end} ({report.tz}). Source: the metergate ledger.",
        "",
        f"**Total: ${_money(totals['cost_usd'])}** for {totals['requests']:,} requests "
        f"({totals['tokens_in']:,} input and {totals['tokens_out']:,} output tokens).",
        "",
        "| app | model | requests | input tokens | output tokens | cost (USD) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in report.rows:
        lines.append(
            f"| {row['app']} | {row['model']} | {row['requests']:,} | {row['tokens_in']:,} | "
            f"{row['tokens_out']:,} | {_money(row['cost_usd'])} |"
        )
    lines.append(
        f"| **total** | | **{totals['requests']:,}** | **{totals['tokens_in']:,}** | **{totals['tokens_out']:,}** | "
        f"**{_money(totals['cost_usd'])}** |"
    )
    by_app: dict[str, Decimal] = {}
    for row in report.rows:
        by_app[row["app"]] = by_app.get(row["app"], Decimal(0)) + row["cost_usd"]
    if by_app:
        lines += ["", "## By app", "", "| app | cost (USD) | share |", "|---|---:|---:|"]
        total = totals["cost_usd"] or Decimal(1)
        for app, cost in sorted(by_app.items(), key=lambda kv: -kv[1]):
            lines.append(f"| {app} | {_money(cost)} | {float(cost / total):.1%} |")
    if totals.get("units"):
        lines += ["", "## Non-token charges (included in the costs above)", "", "| unit | quantity |", "|---|---:|"]
        for unit, n in sorted(totals["units"].items()):
            lines.append(f"| {unit} | {n:,} |")
    lines.append("")
    lines.append("Costs are priced per request from the provider's own usage figures (genai-prices, pinned).")
    return "\n".join(lines) + "\n"


def _money(value: Decimal) -> str:
    return f"{value:,.6f}"
