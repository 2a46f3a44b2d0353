"""Reports from the ledger: totals by team/app/model over dates, daily history, monthly chargeback statements.

Costs are summed as exact pico-dollar integers and shown in USD; a report's totals are the ledger's totals.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Mapping, Sequence
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
    ledger: Ledger,
    start: date,
    end: date,
    by: Sequence[str],
    tz: ZoneInfo,
    filters: Mapping[str, str] | None = None,
) -> Report:
    """Totals per group of `by` (team, app, model, provider, endpoint, key_id, upstream_model, user, tag.<key>)
    over whole local days, for the records matching every filter (the same dimensions, e.g. `tag.customer`)."""
    if end < start:
        raise ValueError(f"--to {end} is before --from {start}")
    await ledger.flush_now()
    lo, hi = day_bounds(start, end, tz)
    aggregates = await ledger.read(lambda s: s.aggregate(lo, hi, list(by), filters))
    rows = rows_of(aggregates, by)
    units = await ledger.read(lambda s: s.unit_totals(lo, hi, list(by), filters))
    if units:
        by_group = {tuple(row[d] for d in by): row for row in rows}
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


def parse_tag_filter(text: str) -> dict[str, str]:
    """`customer=acme` as the report filter {"tag.customer": "acme"}."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise ValueError(f"a tag filter is KEY=VALUE (customer=acme), got {text!r}")
    return {f"tag.{key.strip()}": value.strip()}


def chargeback_groups(filters: Mapping[str, str]) -> list[str]:
    """A statement's rows: by app and model within one team, by team, app and model across teams (a tag)."""
    return ["app", "model"] if "team" in filters else ["team", "app", "model"]


def statement_subject(filters: Mapping[str, str]) -> str:
    parts = [f"team {filters['team']}"] if "team" in filters else []
    parts += [f"{dim.removeprefix('tag.')}={value}" for dim, value in filters.items() if dim.startswith("tag.")]
    return ", ".join(parts)


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
        writer.writerow(
            [_text_cell(row[k]) for k in report.by] + [_exact(row[f]) for f in ROW_FIELDS] + [units_cell(row)]
        )
    totals = report.totals
    writer.writerow(
        ["TOTAL", *([""] * (len(report.by) - 1))] + [_exact(totals[f]) for f in ROW_FIELDS] + [units_cell(totals)]
    )
    return out.getvalue()


def spreadsheet_safe(text: str, harmless: Callable[[str], object] | None = None) -> str:
    """Text for a CSV cell: a spreadsheet would run a cell starting with = + - @ as a formula (OWASP "CSV
    injection"), so such a cell is prefixed with a quote, unless `harmless` says it cannot be one (a number, a
    plain label)."""
    if text[:1] in ("=", "+", "-", "@", "\t", "\r") and not (harmless is not None and harmless(text)):
        return "'" + text
    return text


def _text_cell(value: str | None) -> str:
    """A group value for a CSV cell: users and tag values come from clients."""
    return "" if value is None else spreadsheet_safe(value)


def units_cell(row: dict[str, Any]) -> str:
    """Non-token units as `web_search=3 web_fetch=1` (empty when none)."""
    return " ".join(f"{unit}={n}" for unit, n in sorted((row.get("units") or {}).items()))


def _exact(value: Any) -> Any:
    return format(value, "f") if isinstance(value, Decimal) else value


def chargeback_markdown(subject: str, month: str, report: Report) -> str:
    """A monthly statement for one subject (`team search`, `customer=acme`...): its spend by the report's groups
    (app and model, with team for a tag), with totals that match the ledger."""
    totals = report.totals
    by = report.by
    lines = [
        f"# LLM chargeback statement: {_md(subject)}, {month}",
        "",
        f"Period: {report.start} to {report.end} ({report.tz}). Source: the metergate ledger.",
        "",
        f"**Total: ${_money(totals['cost_usd'])}** for {totals['requests']:,} requests "
        f"({totals['tokens_in']:,} input and {totals['tokens_out']:,} output tokens).",
        "",
        "| " + " | ".join(by) + " | requests | input tokens | output tokens | cost (USD) |",
        "|" + "---|" * len(by) + "---:|---:|---:|---:|",
    ]
    for row in report.rows:
        cells = " | ".join(_md(row[d]) for d in by)
        lines.append(
            f"| {cells} | {row['requests']:,} | {row['tokens_in']:,} | {row['tokens_out']:,} | "
            f"{_money(row['cost_usd'])} |"
        )
    lines.append(
        "| **total** |" + " |" * (len(by) - 1) + f" **{totals['requests']:,}** | **{totals['tokens_in']:,}** | "
        f"**{totals['tokens_out']:,}** | **{_money(totals['cost_usd'])}** |"
    )
    if "app" in by:
        owner = [d for d in ("team", "app") if d in by]
        by_app: dict[str, Decimal] = {}
        for row in report.rows:
            name = "/".join(str(row[d]) for d in owner)
            by_app[name] = by_app.get(name, Decimal(0)) + row["cost_usd"]
        lines += ["", "## By app", "", "| app | cost (USD) | share |", "|---|---:|---:|"]
        total = totals["cost_usd"] or Decimal(1)
        for app, cost in sorted(by_app.items(), key=lambda kv: -kv[1]):
            lines.append(f"| {_md(app)} | {_money(cost)} | {float(cost / total):.1%} |")
    if totals.get("units"):
        lines += ["", "## Non-token charges (included in the costs above)", "", "| unit | quantity |", "|---|---:|"]
        for unit, n in sorted(totals["units"].items()):
            lines.append(f"| {unit} | {n:,} |")
    lines.append("")
    lines.append("Costs are priced per request from the provider's own usage figures (genai-prices, pinned).")
    return "\n".join(lines) + "\n"


def _md(value: str | None) -> str:
    """A value inside a Markdown table cell: a pipe would end the cell, a newline the row."""
    if value is None:
        return "(none)"
    return value.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _money(value: Decimal) -> str:
    return f"{value:,.6f}"
