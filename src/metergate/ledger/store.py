"""Ledger storage: SQLite for one gateway, PostgreSQL for replicas sharing one ledger.

Stores are synchronous and are only used from the ledger's own worker thread (`Ledger`), so the event loop never
waits on the database. Writes are idempotent on `request_id`: a batch replayed from the spool after a failure
that happened mid-commit cannot count a request twice.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from metergate.auth import Principal
from metergate.config import TAG_KEY_PATTERN
from metergate.ledger.schema import MIGRATIONS, MIGRATIONS_TABLE, RECORD_COLUMNS, SCHEMA_VERSION, Dialect

REPORT_DIMENSIONS = ("team", "app", "model", "provider", "endpoint", "key_id", "upstream_model")
_TAG_KEY = re.compile(TAG_KEY_PATTERN)


class LedgerError(Exception):
    """The ledger database cannot be used (unreachable, locked, corrupted, or from a newer metergate)."""


class RowRefused(Exception):
    """The database refused a batch because of what a row holds (a value out of range, a byte it cannot store),
    not because it is unreachable: retrying the same batch would fail forever."""


@dataclass(frozen=True, slots=True)
class Rejected:
    row: tuple[Any, ...]
    reason: str


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    sha256: str
    team: str
    app: str
    name: str
    created_at: float
    revoked_at: float | None
    tags: tuple[tuple[str, str], ...] = ()  # attribution tags every request of the key carries
    include_cost: bool = False  # every response carries its cost

    def principal(self) -> Principal:
        return Principal(self.team, self.app, self.id, self.tags, self.include_cost)


@dataclass(frozen=True, slots=True)
class Adjustment:
    """A budget override (`limit_usd` until `until`) or reset (`offset_pusd` of the period's spend set aside), on
    one budget counter, with who made it and when."""

    id: str
    kind: str  # "override" or "reset"
    counter: str
    period_start: float
    created_at: float
    created_by: str
    reason: str = ""
    limit_usd: Decimal | None = None
    until: float | None = None
    offset_pusd: int | None = None
    ended_at: float | None = None


@dataclass(frozen=True, slots=True)
class Aggregate:
    """Totals for one group of a report."""

    group: tuple[str | None, ...]
    requests: int
    errors: int
    tokens_in: int
    tokens_out: int
    tokens_cached: int
    cost_pusd: int
    tokens_cache_write: int = 0


@dataclass(frozen=True, slots=True)
class ProviderDay:
    """What the gateway sent one provider for one model on one UTC day (`day` = days since 1970-01-01)."""

    day: int
    provider: str
    model: str
    requests: int  # answered: the provider's usage was read
    failed: int  # sent upstream, then failed (a cut stream, a timeout...): the provider may have billed them
    unpriced: int  # answered, but the gateway had no price for them
    tokens_in: int
    tokens_out: int
    tokens_cached: int
    tokens_cache_write: int
    cost_pusd: int


class Store(ABC):
    dialect: Dialect
    url: str

    @abstractmethod
    def _execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one statement in its own transaction; rows for a query."""

    @abstractmethod
    def _write_rows(self, rows: Sequence[tuple[Any, ...]]) -> None: ...

    @abstractmethod
    def _migration_connection(self) -> Any: ...

    @abstractmethod
    def close(self) -> None: ...

    def now(self) -> float:
        """The database's clock (PostgreSQL) or this machine's (SQLite), in unix seconds."""
        return time.time()

    def migrate(self) -> int:
        """Bring the schema to SCHEMA_VERSION; returns the version found before."""
        conn = self._migration_connection()
        p = self._p
        try:
            with _transaction(conn, self.dialect):
                cur = conn.cursor()
                cur.execute(MIGRATIONS_TABLE[self.dialect])
                cur.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
                found = int(cur.fetchone()[0])
        except Exception as exc:
            raise LedgerError(f"{self.url}: cannot read the schema version: {_clean(exc)}") from exc
        if found > SCHEMA_VERSION:
            raise LedgerError(
                f"the ledger's schema is version {found}, newer than this metergate understands ({SCHEMA_VERSION}); "
                "upgrade metergate"
            )
        for migration in MIGRATIONS:
            if migration.version <= found:
                continue
            try:
                with _transaction(conn, self.dialect):
                    cur = conn.cursor()
                    for statement in migration.statements[self.dialect]:
                        cur.execute(statement)
                    cur.execute(
                        f"INSERT INTO schema_migrations (version, description, applied_at) VALUES ({p}, {p}, {p})",
                        (migration.version, migration.description, time.time()),
                    )
            except Exception as exc:
                raise LedgerError(f"{self.url}: migration {migration.version} failed: {_clean(exc)}") from exc
        return found

    def schema_version(self) -> int:
        return int(self._execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")[0][0])

    def write(self, rows: Sequence[tuple[Any, ...]]) -> list[Rejected]:
        """Write rows (idempotent on request_id); returns the rows the database refused, each isolated by
        bisecting the batch, so one bad row never keeps the others out. Raises LedgerError when the database
        cannot be used at all."""
        if not rows:
            return []
        try:
            self._write_rows(rows)
        except RowRefused as exc:
            if len(rows) == 1:
                return [Rejected(tuple(rows[0]), str(exc)[:500])]
            mid = len(rows) // 2
            return self.write(rows[:mid]) + self.write(rows[mid:])
        return []

    def count(self) -> int:
        return int(self._execute("SELECT COUNT(*) FROM usage_records")[0][0])

    def spend(self, since: float, until: float) -> dict[tuple[str, str], int]:
        """Cost in pico-USD per (team, app) of requests started in [since, until)."""
        p = self._p
        rows = self._execute(
            f"SELECT team, app, SUM(cost_pusd) FROM usage_records WHERE started_at >= {p} AND started_at < {p} "
            "GROUP BY team, app",
            (since, until),
        )
        return {(team, app): int(total) for team, app, total in rows}

    def cost_buckets(self, since: float, until: float, bucket_s: int) -> list[tuple[str, str, int, int]]:
        """Cost per (team, app, bucket) where bucket = floor(started_at / bucket_s), for forecasts."""
        p = self._p
        bucket = (
            f"CAST(started_at / {int(bucket_s)} AS INTEGER)"
            if self.dialect == "sqlite"
            else f"FLOOR(started_at / {int(bucket_s)})::BIGINT"
        )
        rows = self._execute(
            f"SELECT team, app, {bucket} AS b, SUM(cost_pusd) FROM usage_records "
            f"WHERE started_at >= {p} AND started_at < {p} GROUP BY team, app, b",
            (since, until),
        )
        return [(team, app, int(b), int(total)) for team, app, b, total in rows]

    def dimension_sql(self, dim: str, alias: str = "") -> str:
        """The SQL expression a report dimension groups or filters by: a column, `user`, or `tag.<key>` (a key of
        the tags JSON; the key is checked against the tag key pattern, so it is safe inside the SQL text)."""
        if dim in REPORT_DIMENSIONS:
            return alias + dim
        if dim == "user":
            return alias + "end_user"
        key = dim.removeprefix("tag.")
        if dim.startswith("tag.") and _TAG_KEY.fullmatch(key):
            if self.dialect == "sqlite":
                return f"json_extract({alias}tags, '$.{key}')"
            return f"({alias}tags::jsonb ->> '{key}')"
        raise ValueError(
            f"cannot group or filter by {dim!r}; choose from {', '.join(REPORT_DIMENSIONS)}, user or tag.<key>"
        )

    def _where(
        self, since: float, until: float, filters: Mapping[str, str] | None, alias: str = ""
    ) -> tuple[str, list[Any]]:
        p = self._p
        where = f"{alias}started_at >= {p} AND {alias}started_at < {p}"
        params: list[Any] = [since, until]
        for dim, value in (filters or {}).items():
            # The ledger never stores a NUL or an unbounded string, and PostgreSQL refuses a NUL in a parameter:
            # such a filter is a mistake to report, not a query to send.
            if "\x00" in value or len(value) > 1024:
                raise ValueError(f"a {dim} filter of {len(value)} characters with a NUL or past 1024 matches nothing")
            where += f" AND {self.dimension_sql(dim, alias)} = {p}"
            params.append(value)
        return where, params

    def aggregate(
        self, since: float, until: float, by: Sequence[str], filters: Mapping[str, str] | None = None
    ) -> list[Aggregate]:
        """Totals per group of `by` (dimensions: see `dimension_sql`) over requests started in [since, until) that
        match every filter. A group without a user or tag has None there."""
        exprs = [self.dimension_sql(dim) for dim in by]
        where, params = self._where(since, until, filters)
        select = "".join(f"{e}, " for e in exprs)
        positions = ", ".join(str(i + 1) for i in range(len(exprs)))
        group = f" GROUP BY {positions} ORDER BY {positions}" if exprs else ""
        rows = self._execute(
            f"SELECT {select}COUNT(*), SUM(CASE WHEN error_type IS NULL THEN 0 ELSE 1 END), "
            "COALESCE(SUM(tokens_in), 0), COALESCE(SUM(tokens_out), 0), COALESCE(SUM(tokens_cached), 0), "
            "COALESCE(SUM(cost_pusd), 0), COALESCE(SUM(tokens_cache_write), 0) "
            f"FROM usage_records WHERE {where}{group}",
            params,
        )
        n = len(by)
        return [
            Aggregate(
                _group(row[:n]),
                int(row[n]),
                int(row[n + 1] or 0),
                int(row[n + 2]),
                int(row[n + 3]),
                int(row[n + 4]),
                int(row[n + 5]),
                int(row[n + 6]),
            )
            for row in rows
            if int(row[n]) > 0
        ]

    def unit_totals(
        self, since: float, until: float, by: Sequence[str], filters: Mapping[str, str] | None = None
    ) -> list[tuple[tuple[str | None, ...], str, int]]:
        """Non-token units (details.units) per group of a report: (group, unit, quantity)."""
        exprs = [self.dimension_sql(dim, "r.") for dim in by]
        if self.dialect == "sqlite":
            source = "usage_records r, json_each(r.details, '$.units') j"
            quantity = "SUM(j.value)"
        else:
            source = "usage_records r, jsonb_each_text(r.details::jsonb -> 'units') j"
            quantity = "SUM(j.value::BIGINT)"
        where, params = self._where(since, until, filters, "r.")
        cols = "".join(f"{e}, " for e in exprs)
        positions = "".join(f"{i + 1}, " for i in range(len(exprs)))
        rows = self._execute(
            f"SELECT {cols}j.key, {quantity} FROM {source} WHERE r.details IS NOT NULL AND {where} "
            f"GROUP BY {positions}{len(exprs) + 1}",
            params,
        )
        n = len(by)
        return [(_group(row[:n]), str(row[n]), int(row[n + 1])) for row in rows]

    def cost_series(
        self, since: float, until: float, bucket_s: int, by: str, filters: Mapping[str, str] | None = None
    ) -> list[tuple[int, str | None, int, int]]:
        """(bucket, group, cost in pico-USD, requests) per bucket = floor(started_at / bucket_s) and value of the
        dimension `by`, over requests matching every filter: the points of a spend chart."""
        bucket = (
            f"CAST(started_at / {int(bucket_s)} AS INTEGER)"
            if self.dialect == "sqlite"
            else f"FLOOR(started_at / {int(bucket_s)})::BIGINT"
        )
        where, params = self._where(since, until, filters)
        rows = self._execute(
            f"SELECT {bucket} AS b, {self.dimension_sql(by)}, COALESCE(SUM(cost_pusd), 0), COUNT(*) "
            f"FROM usage_records WHERE {where} GROUP BY 1, 2 ORDER BY 1, 2",
            params,
        )
        return [(int(b), None if g is None else str(g), int(c), int(n)) for b, g, c, n in rows]

    def recent(
        self,
        since: float,
        until: float,
        limit: int,
        filters: Mapping[str, str] | None = None,
        failed: bool | None = None,
    ) -> list[dict[str, Any]]:
        """The newest records first (at most `limit`), matching every filter; `failed` keeps only errors (True) or
        only successes (False)."""
        where, params = self._where(since, until, filters)
        if failed is not None:
            where += " AND error_type IS NOT NULL" if failed else " AND error_type IS NULL"
        columns = (
            "request_id, started_at, team, app, key_id, provider, model, endpoint, code, stream, tokens_in, "
            "tokens_out, tokens_cached, cost_pusd, priced, latency_s, ttft_s, error_type, end_user"
        )
        rows = self._execute(
            f"SELECT {columns} FROM usage_records WHERE {where} ORDER BY started_at DESC LIMIT {int(limit)}",
            params,
        )
        names = [c.strip() for c in columns.split(",")]
        return [dict(zip(names, row, strict=True)) for row in rows]

    def provider_days(self, since: float, until: float) -> list[ProviderDay]:
        """Per UTC day, provider and model sent upstream: what the gateway metered, for reconciliation with the
        provider's own bill (whose buckets are UTC days). Every row's tokens and cost count; requests refused before
        they were sent count as neither answered nor failed."""
        day = "CAST(started_at / 86400 AS INTEGER)" if self.dialect == "sqlite" else "FLOOR(started_at / 86400)::BIGINT"
        # Answered: its usage was read (a client gone after the last byte included); failed: sent, usage unknown.
        answered = "(metered <> 0 AND (error_type IS NULL OR tokens_in + tokens_out > 0))"
        failed = "(metered = 0 AND error_type IS NOT NULL)"
        p = self._p
        rows = self._execute(
            f"SELECT {day} AS d, provider, upstream_model, "
            f"SUM(CASE WHEN {answered} THEN 1 ELSE 0 END), "
            f"SUM(CASE WHEN {failed} THEN 1 ELSE 0 END), "
            f"SUM(CASE WHEN {answered} AND priced = 0 THEN 1 ELSE 0 END), "
            "COALESCE(SUM(tokens_in), 0), COALESCE(SUM(tokens_out), 0), COALESCE(SUM(tokens_cached), 0), "
            "COALESCE(SUM(tokens_cache_write), 0), COALESCE(SUM(cost_pusd), 0) "
            f"FROM usage_records WHERE started_at >= {p} AND started_at < {p} GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
            (since, until),
        )
        return [ProviderDay(int(r[0]), str(r[1]), str(r[2]), *(int(v or 0) for v in r[3:])) for r in rows]

    # --- API keys --------------------------------------------------------------------------------------------

    def add_key(self, key: ApiKey) -> None:
        p = self._p
        self._execute(
            f"INSERT INTO api_keys (id, sha256, team, app, name, created_at, revoked_at, tags, include_cost) "
            f"VALUES ({p}, {p}, {p}, {p}, {p}, {p}, NULL, {p}, {p})",
            (
                key.id,
                key.sha256,
                key.team,
                key.app,
                key.name,
                key.created_at,
                tags_json(key.tags),
                key.include_cost,
            ),
        )

    def keys(self, include_revoked: bool = True) -> list[ApiKey]:
        where = "" if include_revoked else " WHERE revoked_at IS NULL"
        rows = self._execute(
            "SELECT id, sha256, team, app, name, created_at, revoked_at, tags, include_cost "
            f"FROM api_keys{where} ORDER BY created_at"
        )
        return [
            ApiKey(*row[:7], tags=_tags(row[7]), include_cost=bool(row[8]))  # type: ignore[misc]
            for row in rows
        ]

    def revoke_key(self, key_id: str) -> bool:
        p = self._p
        rows = self._execute(
            f"UPDATE api_keys SET revoked_at = {p} WHERE id = {p} AND revoked_at IS NULL RETURNING id",
            (time.time(), key_id),
        )
        return bool(rows)

    # --- budget overrides and resets ---------------------------------------------------------------------------

    def add_adjustment(self, a: Adjustment) -> None:
        p = self._p
        self._execute(
            "INSERT INTO budget_adjustments (id, kind, counter, period_start, limit_usd, until, offset_pusd, "
            f"created_at, created_by, reason, ended_at) VALUES ({', '.join([p] * 10)}, NULL)",
            (
                a.id,
                a.kind,
                a.counter,
                a.period_start,
                None if a.limit_usd is None else str(a.limit_usd),
                a.until,
                None if a.offset_pusd is None else str(a.offset_pusd),
                a.created_at,
                a.created_by,
                a.reason,
            ),
        )

    def adjustments(self, since: float) -> list[Adjustment]:
        """Overrides and resets made since `since` (every one a current period can still be affected by)."""
        p = self._p
        rows = self._execute(
            "SELECT id, kind, counter, period_start, limit_usd, until, offset_pusd, created_at, created_by, reason, "
            f"ended_at FROM budget_adjustments WHERE created_at >= {p} ORDER BY created_at, id",
            (since,),
        )
        return [
            Adjustment(
                id=r[0],
                kind=r[1],
                counter=r[2],
                period_start=float(r[3]),
                limit_usd=None if r[4] is None else Decimal(r[4]),
                until=None if r[5] is None else float(r[5]),
                offset_pusd=None if r[6] is None else int(r[6]),
                created_at=float(r[7]),
                created_by=r[8],
                reason=r[9],
                ended_at=None if r[10] is None else float(r[10]),
            )
            for r in rows
        ]

    def end_adjustment(self, adjustment_id: str, at: float) -> bool:
        p = self._p
        rows = self._execute(
            f"UPDATE budget_adjustments SET ended_at = {p} WHERE id = {p} AND ended_at IS NULL AND kind = 'override' "
            "RETURNING id",
            (at, adjustment_id),
        )
        return bool(rows)

    # --- batches ---------------------------------------------------------------------------------------------

    def save_batch(self, batch: BatchRow) -> None:
        """Record a batch (or what was learned about it since: its model, its results file); never overwrites who
        created it."""
        p = self._p
        self._execute(
            "INSERT INTO batches (provider, batch_id, family, team, app, key_id, endpoint, model, created_at, "
            f"output_ref, finished_at, attribution) VALUES ({', '.join([p] * 10)}, NULL, {p}) "
            "ON CONFLICT (provider, batch_id) DO UPDATE SET "
            "model = CASE WHEN excluded.model = '' THEN batches.model ELSE excluded.model END, "
            "output_ref = COALESCE(excluded.output_ref, batches.output_ref)",
            (
                batch.provider,
                batch.batch_id,
                batch.family,
                batch.team,
                batch.app,
                batch.key_id,
                batch.endpoint,
                batch.model,
                batch.created_at,
                batch.output_ref,
                orjson.dumps({"user": batch.user, "tags": dict(batch.tags)}).decode()
                if batch.user is not None or batch.tags
                else None,
            ),
        )

    def open_batches(self) -> list[BatchRow]:
        rows = self._execute(
            "SELECT provider, batch_id, family, team, app, key_id, endpoint, model, created_at, output_ref, "
            "attribution FROM batches WHERE finished_at IS NULL ORDER BY created_at"
        )
        return [_batch_row(row) for row in rows]

    def finish_batch(self, provider: str, batch_id: str) -> None:
        p = self._p
        self._execute(
            f"UPDATE batches SET finished_at = {p} WHERE provider = {p} AND batch_id = {p}",
            (time.time(), provider, batch_id),
        )

    def claim_items(self, provider: str, batch_id: str, items: Sequence[str]) -> list[str]:
        """The items of a batch not billed before, now marked billed (in one statement per chunk: concurrent
        claims from several replicas each get a disjoint share)."""
        p = self._p
        claimed: list[str] = []
        now = time.time()
        for start in range(0, len(items), 200):
            chunk = list(dict.fromkeys(items[start : start + 200]))
            values = ", ".join([f"({p}, {p}, {p}, {p})"] * len(chunk))
            params: list[Any] = []
            for item in chunk:
                params += [provider, batch_id, item, now]
            rows = self._execute(
                f"INSERT INTO batch_items (provider, batch_id, item, billed_at) VALUES {values} "
                "ON CONFLICT (provider, batch_id, item) DO NOTHING RETURNING item",
                params,
            )
            claimed += [str(r[0]) for r in rows]
        return claimed

    @property
    def _p(self) -> str:
        return "?" if self.dialect == "sqlite" else "%s"


@dataclass(frozen=True, slots=True)
class BatchRow:
    """A batch created through the gateway: whom its requests are billed to, and where its results are."""

    provider: str
    batch_id: str
    family: str
    team: str
    app: str
    key_id: str
    endpoint: str  # the route that created it (the endpoint label its requests are counted under)
    model: str
    created_at: float
    output_ref: str | None = None  # the results file (OpenAI output_file_id, Gemini responsesFile)
    user: str | None = None  # the creator's attribution, which every batched request's record carries
    tags: tuple[tuple[str, str], ...] = ()


@contextmanager
def _transaction(conn: Any, dialect: Dialect) -> Iterator[None]:
    if dialect == "postgresql":
        with conn.transaction():
            yield
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class SQLiteStore(Store):
    dialect: Dialect = "sqlite"

    def __init__(self, url: str, busy_timeout_s: float = 5.0) -> None:
        self.url = url
        path = sqlite_path(url)
        assert path is not None
        self.path = path
        try:
            if self.path.parent and not self.path.parent.exists():
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            # WAL: readers never block the writer; NORMAL: a process crash loses nothing committed.
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
        except (sqlite3.Error, OSError) as exc:
            raise LedgerError(f"cannot open {url}: {exc}") from exc

    def _migration_connection(self) -> sqlite3.Connection:
        return self._conn

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            cur = self._conn.execute(sql, params)
            return cur.fetchall()
        except sqlite3.Error as exc:
            raise LedgerError(f"{self.url}: {exc}") from exc

    # Rows per INSERT statement. One statement per row (executemany) hands the GIL back and forth with the event
    # loop thread at every row; a multi-row statement does it once per 100 rows.
    ROWS_PER_STATEMENT = 20

    @staticmethod
    @functools.cache
    def _insert_sql(n: int) -> str:
        cols = ", ".join(RECORD_COLUMNS)
        one = "(" + ", ".join("?" * len(RECORD_COLUMNS)) + ")"
        return f"INSERT INTO usage_records ({cols}) VALUES {', '.join([one] * n)} ON CONFLICT (request_id) DO NOTHING"

    def _write_rows(self, rows: Sequence[tuple[Any, ...]]) -> None:
        step = self.ROWS_PER_STATEMENT
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for i in range(0, len(rows), step):
                    chunk = rows[i : i + step]
                    self._conn.execute(self._insert_sql(len(chunk)), [v for row in chunk for v in row])
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        except (sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.DataError, OverflowError, ValueError) as exc:
            raise RowRefused(f"{type(exc).__name__}: {exc}") from exc
        except sqlite3.Error as exc:
            raise LedgerError(f"{self.url}: {exc}") from exc

    def close(self) -> None:
        self._conn.close()


class PostgresStore(Store):
    dialect: Dialect = "postgresql"

    def __init__(self, url: str, connect_timeout_s: float = 5.0) -> None:
        import psycopg

        self.url = url
        self._psycopg = psycopg
        self._connect_timeout = connect_timeout_s
        self._conn: Any = None
        self._connect()

    def _connect(self) -> None:
        try:
            self._conn = self._psycopg.connect(
                self.url, connect_timeout=max(1, int(self._connect_timeout)), autocommit=True
            )
        except self._psycopg.Error as exc:
            raise LedgerError(f"cannot connect to the ledger database: {_clean(exc)}") from exc

    def _live(self) -> Any:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._connect()
        return self._conn

    def _migration_connection(self) -> Any:
        return self._live()

    def now(self) -> float:
        return float(self._execute("SELECT EXTRACT(EPOCH FROM clock_timestamp())")[0][0])

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            conn = self._live()
            with conn.transaction(), conn.cursor() as cur:
                cur.execute(sql, params)
                return list(cur.fetchall()) if cur.description else []
        except self._psycopg.Error as exc:
            raise LedgerError(f"ledger database: {_clean(exc)}") from exc

    def _write_rows(self, rows: Sequence[tuple[Any, ...]]) -> None:
        cols = ", ".join(RECORD_COLUMNS)
        try:
            conn = self._live()
            with conn.transaction(), conn.cursor() as cur:
                # COPY is the fast path; a staging table lets the insert skip request ids already written.
                cur.execute(
                    "CREATE TEMP TABLE IF NOT EXISTS usage_staging (LIKE usage_records INCLUDING DEFAULTS) "
                    "ON COMMIT DELETE ROWS"
                )
                with cur.copy(f"COPY usage_staging ({cols}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(_pg_row(row))
                cur.execute(
                    f"INSERT INTO usage_records ({cols}) SELECT {cols} FROM usage_staging "
                    "ON CONFLICT (request_id) DO NOTHING"
                )
        except (self._psycopg.DataError, self._psycopg.IntegrityError) as exc:
            raise RowRefused(f"{type(exc).__name__}: {_clean(exc)}") from exc
        except self._psycopg.Error as exc:
            raise LedgerError(f"ledger database: {_clean(exc)}") from exc

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def _pg_row(row: tuple[Any, ...]) -> tuple[Any, ...]:
    # SQLite keeps flags as 0/1; PostgreSQL wants booleans.
    out = list(row)
    for i in (10, 17, 18):
        out[i] = bool(out[i])
    return tuple(out)


def _batch_row(row: tuple[Any, ...]) -> BatchRow:
    user: str | None = None
    tags: tuple[tuple[str, str], ...] = ()
    if row[10]:
        with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
            attribution = orjson.loads(row[10])
            user = attribution.get("user") if isinstance(attribution.get("user"), str) else None
            tags = _tags(orjson.dumps(attribution.get("tags")).decode())
    provider, batch_id, family, team, app, key_id, endpoint, model, created_at, output_ref = row[:10]
    return BatchRow(
        provider, batch_id, family, team, app, key_id, endpoint, model, created_at, output_ref, user=user, tags=tags
    )


def _group(values: Sequence[Any]) -> tuple[str | None, ...]:
    return tuple(None if v is None else str(v) for v in values)


def tags_json(tags: tuple[tuple[str, str], ...]) -> str | None:
    """Tags as a JSON object with sorted keys (None for none): one canonical text, queried with the JSON
    functions of both databases."""
    return orjson.dumps(dict(tags), option=orjson.OPT_SORT_KEYS).decode() if tags else None


def _tags(text: str | None) -> tuple[tuple[str, str], ...]:
    if not text:
        return ()
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return ()
    return tuple(sorted((str(k), str(v)) for k, v in value.items())) if isinstance(value, dict) else ()


def _clean(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def sqlite_path(url: str) -> Path | None:
    """The file of a `sqlite:///` URL (relative to the working directory; four slashes make it absolute)."""
    return Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None


def open_store(url: str) -> Store:
    if url.startswith("sqlite:///"):
        return SQLiteStore(url)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url)
    raise LedgerError(f"unsupported ledger url {url!r}")


def iter_chunks(rows: Sequence[tuple[Any, ...]], size: int) -> Iterable[Sequence[tuple[Any, ...]]]:
    for i in range(0, len(rows), size):
        yield rows[i : i + size]
