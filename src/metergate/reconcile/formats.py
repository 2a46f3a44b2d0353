"""A reconciliation as JSON (exact decimal strings for money), CSV (one row per line) or a Markdown summary."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import orjson

from metergate.reconcile.bill import day_of
from metergate.reconcile.compare import Reconciliation
from metergate.reports import spreadsheet_safe

CSV_FIELDS = (
    "date",
    "provider",
    "model",
    "api_key_id",
    "through_gateway",
    "gateway_requests",
    "gateway_failed_requests",
    "provider_requests",
    "gateway_tokens_in",
    "provider_tokens_in",
    "gateway_tokens_out",
    "provider_tokens_out",
    "gateway_tokens_cached",
    "provider_tokens_cached",
    "gateway_tokens_cache_write",
    "provider_tokens_cache_write",
    "gateway_cost_usd",
    "provider_cost_usd",
    "gap_usd",
    "causes",
    "explanation",
)


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value.normalize() if value else Decimal(0), "f")
    if isinstance(value, float) and math.isinf(value):
        return None  # JSON has no infinity: a ratio with nothing metered is null
    return value


def summary(results: Sequence[Reconciliation]) -> list[dict[str, Any]]:
    return [{k: _plain(v) for k, v in r.totals().items()} for r in results]


def to_json(results: Sequence[Reconciliation]) -> bytes:
    first = min(r.first_day for r in results)
    last = max(r.last_day for r in results)
    doc = {
        "from": day_of(first).isoformat(),
        "to": day_of(last).isoformat(),
        "timezone": "UTC",
        "complete": True,  # a report that could not be read in full is an error, never a partial document
        "providers": summary(results),
        "rows": [row for r in results for row in r.rows],
    }
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2)


def _cell(value: Any) -> Any:
    if isinstance(value, list):
        return " ".join(value)
    if isinstance(value, str):
        return spreadsheet_safe(value, _number)  # model names and key ids come from the provider
    return "" if value is None else value


def _number(value: str) -> bool:
    try:
        Decimal(value)
        return True
    except ArithmeticError:
        return False


def to_csv(results: Sequence[Reconciliation]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for r in results:
        for row in r.rows:
            writer.writerow([_cell(row.get(f)) for f in CSV_FIELDS])
    return out.getvalue()


def _md(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def to_markdown(results: Sequence[Reconciliation]) -> str:
    first = min(r.first_day for r in results)
    last = max(r.last_day for r in results)
    lines = [
        f"# Reconciliation with the providers' bills, {day_of(first)} to {day_of(last)} (UTC days)",
        "",
        "| provider | gateway cost | provider cost (gateway's keys) | gap | ratio | other keys (bypass) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for t in summary(results):
        ratio = "n/a" if t["ratio"] is None else f"{t['ratio']:.6f}"
        lines.append(
            f"| {_md(t['provider'])} | ${t['gateway_cost_usd']} | ${t['provider_cost_usd']} | ${t['gap_usd']} "
            f"| {ratio} | ${t['bypass_cost_usd']} |"
        )
    lines += [
        "",
        "| date | provider | model | API key | via gateway | tokens in (gw / provider) | tokens out (gw / provider) "
        "| cost (gw / provider) | gap | explanation |",
        "|---|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        for row in r.rows:
            lines.append(
                f"| {row['date']} | {_md(row['provider'])} | {_md(row['model'])} | {_md(row['api_key_id'] or '')} "
                f"| {'yes' if row['through_gateway'] else 'no'} "
                f"| {row['gateway_tokens_in']:,} / {row['provider_tokens_in']:,} "
                f"| {row['gateway_tokens_out']:,} / {row['provider_tokens_out']:,} "
                f"| ${row['gateway_cost_usd']} / ${row['provider_cost_usd']} | ${row['gap_usd']} "
                f"| {_md(row['explanation'])} |"
            )
    return "\n".join(lines) + "\n"
