"""Versioned schema migrations for the ledger, one list per database dialect.

A migration is applied once, in order, inside a transaction, and recorded in `schema_migrations`. Released
migrations are never edited: a change is a new version. `SCHEMA_VERSION` is the version this code writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Dialect = Literal["sqlite", "postgresql"]


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: dict[Dialect, tuple[str, ...]]


def _both(*statements: str, **types: tuple[str, str]) -> dict[Dialect, tuple[str, ...]]:
    """The same statements for both dialects, with {placeholders} filled per dialect."""
    sqlite = {name: pair[0] for name, pair in types.items()}
    postgres = {name: pair[1] for name, pair in types.items()}
    return {
        "sqlite": tuple(s.format(**sqlite) for s in statements),
        "postgresql": tuple(s.format(**postgres) for s in statements),
    }


_TYPES = {
    "real": ("REAL", "DOUBLE PRECISION"),
    "big": ("INTEGER", "BIGINT"),
    "flag": ("INTEGER", "BOOLEAN"),
}

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "usage records, API keys, shared budget counters",
        _both(
            """CREATE TABLE usage_records (
                request_id TEXT PRIMARY KEY,
                started_at {real} NOT NULL,
                team TEXT NOT NULL,
                app TEXT NOT NULL,
                key_id TEXT NOT NULL,
                provider TEXT NOT NULL,
                model TEXT NOT NULL,
                upstream_model TEXT NOT NULL,
                endpoint TEXT NOT NULL,
                code INTEGER NOT NULL,
                stream {flag} NOT NULL,
                tokens_in {big} NOT NULL,
                tokens_out {big} NOT NULL,
                tokens_cached {big} NOT NULL,
                tokens_cache_write {big} NOT NULL,
                tokens_reasoning {big} NOT NULL,
                cost_pusd {big} NOT NULL,
                priced {flag} NOT NULL,
                metered {flag} NOT NULL,
                latency_s {real} NOT NULL,
                ttft_s {real},
                error_type TEXT,
                replica TEXT NOT NULL
            )""",
            # Every query selects a time range first; a (team, app, started_at) index would cost each insert a
            # third b-tree update (30% of the write) for queries that the time index already narrows well.
            "CREATE INDEX usage_records_time ON usage_records (started_at)",
            """CREATE TABLE api_keys (
                id TEXT PRIMARY KEY,
                sha256 TEXT NOT NULL UNIQUE,
                team TEXT NOT NULL,
                app TEXT NOT NULL,
                name TEXT NOT NULL,
                created_at {real} NOT NULL,
                revoked_at {real}
            )""",
            # Budget counters shared by replicas (PostgreSQL); a single process keeps them in memory instead.
            """CREATE TABLE budget_spend (
                scope TEXT NOT NULL,
                period_start {real} NOT NULL,
                spent_pusd {big} NOT NULL,
                reserved_pusd {big} NOT NULL DEFAULT 0,
                PRIMARY KEY (scope, period_start)
            )""",
            """CREATE TABLE budget_holds (
                id TEXT PRIMARY KEY,
                scope TEXT NOT NULL,
                period_start {real} NOT NULL,
                amount_pusd {big} NOT NULL,
                replica TEXT NOT NULL,
                expires_at {real} NOT NULL
            )""",
            "CREATE INDEX budget_holds_expiry ON budget_holds (expires_at)",
            **_TYPES,
        ),
    ),
)

MIGRATIONS += (
    Migration(
        2,
        "shared budget counters as NUMERIC: a limit or a sum of holds past BIGINT must not fail a reservation",
        {
            "sqlite": (),  # budget counters are shared through PostgreSQL only; SQLite keeps them in memory
            "postgresql": (
                "ALTER TABLE budget_spend ALTER COLUMN spent_pusd TYPE NUMERIC(40, 0), "
                "ALTER COLUMN reserved_pusd TYPE NUMERIC(40, 0)",
                "ALTER TABLE budget_holds ALTER COLUMN amount_pusd TYPE NUMERIC(40, 0)",
            ),
        },
    ),
)

MIGRATIONS += (
    Migration(
        3,
        "usage_records.details: non-token units, separately billed passes, price modifiers and usage flags (JSON)",
        _both("ALTER TABLE usage_records ADD COLUMN details TEXT"),
    ),
)

MIGRATIONS += (
    Migration(
        4,
        "batches created through the gateway, and the batched requests already billed (never billed twice)",
        _both(
            """CREATE TABLE batches (
                provider TEXT NOT NULL,
                batch_id TEXT NOT NULL,
                family TEXT NOT NULL,
                team TEXT NOT NULL,
                app TEXT NOT NULL,
                key_id TEXT NOT NULL,
                endpoint TEXT NOT NULL,
                model TEXT NOT NULL,
                created_at {real} NOT NULL,
                output_ref TEXT,
                finished_at {real},
                PRIMARY KEY (provider, batch_id)
            )""",
            "CREATE INDEX batches_open ON batches (finished_at)",
            """CREATE TABLE batch_items (
                provider TEXT NOT NULL,
                batch_id TEXT NOT NULL,
                item TEXT NOT NULL,
                billed_at {real} NOT NULL,
                PRIMARY KEY (provider, batch_id, item)
            )""",
            **_TYPES,
        ),
    ),
)

MIGRATIONS += (
    Migration(
        5,
        "attribution: the end user and the tags of each record, a key's tags and cost opt-in, a batch creator's "
        "attribution; budget overrides and resets; reservations kept for unknown bills",
        _both(
            "ALTER TABLE usage_records ADD COLUMN end_user TEXT",
            "ALTER TABLE usage_records ADD COLUMN tags TEXT",
            "ALTER TABLE api_keys ADD COLUMN tags TEXT",
            "ALTER TABLE api_keys ADD COLUMN include_cost {flag} NOT NULL DEFAULT {false}",
            "ALTER TABLE batches ADD COLUMN attribution TEXT",
            # Budget overrides (a limit until a time) and resets (the period's spend so far set aside), who/when.
            # Money as decimal text: a limit can exceed what BIGINT holds in pico-dollars.
            """CREATE TABLE budget_adjustments (
                id TEXT PRIMARY KEY,
                kind TEXT NOT NULL,
                counter TEXT NOT NULL,
                period_start {real} NOT NULL,
                limit_usd TEXT,
                until {real},
                offset_pusd TEXT,
                created_at {real} NOT NULL,
                created_by TEXT NOT NULL,
                reason TEXT NOT NULL,
                ended_at {real}
            )""",
            "CREATE INDEX budget_adjustments_time ON budget_adjustments (created_at)",
            # Reservations kept until their period ends (requests whose bill is unknown): they never clear, so a
            # refusal they cause says the budget is exhausted, not busy.
            "ALTER TABLE budget_spend ADD COLUMN kept_pusd {num} NOT NULL DEFAULT 0",
            **_TYPES,
            false=("0", "FALSE"),
            num=("INTEGER", "NUMERIC(40, 0)"),
        ),
    ),
)

SCHEMA_VERSION = MIGRATIONS[-1].version

MIGRATIONS_TABLE = {
    "sqlite": "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, description TEXT NOT NULL, "
    "applied_at REAL NOT NULL)",
    "postgresql": "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, description TEXT NOT "
    "NULL, applied_at DOUBLE PRECISION NOT NULL)",
}

# The columns of usage_records in insert order; `records.record_row` produces tuples in this order.
RECORD_COLUMNS = (
    "request_id",
    "started_at",
    "team",
    "app",
    "key_id",
    "provider",
    "model",
    "upstream_model",
    "endpoint",
    "code",
    "stream",
    "tokens_in",
    "tokens_out",
    "tokens_cached",
    "tokens_cache_write",
    "tokens_reasoning",
    "cost_pusd",
    "priced",
    "metered",
    "latency_s",
    "ttft_s",
    "error_type",
    "replica",
    "details",
    "end_user",
    "tags",
)
