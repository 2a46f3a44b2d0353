"""Budgets: spend per calendar period, reservations that hold under concurrency, and the spend gauges.

Before a request is forwarded, its worst-case cost (estimated input plus the output cap, at the model's prices) is
reserved against every blocking budget that applies to it. A request is admitted while spent + reserved is still
under the limit, so a burst of concurrent requests overshoots by at most one request's cost. After the response the
reservation is settled with the real cost.

- One gateway: spend and reservations live in memory, seeded from the ledger at start, so spend survives restarts.
- Replicas sharing PostgreSQL: spend and reservations live in the `budget_spend` row of the budget's period,
  updated by single atomic statements; a reservation's hold row expires if its replica dies before settling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, TypeVar
from zoneinfo import ZoneInfo

from prometheus_client.core import GaugeMetricFamily, Metric

from metergate.config import BudgetConfig, Config
from metergate.errors import GatewayError
from metergate.estimate import worst_case_tokens
from metergate.forecast import forecast
from metergate.ledger import Ledger
from metergate.ledger.store import Adjustment, LedgerError, PostgresStore, Store
from metergate.periods import PERIODS, Period, Window, window
from metergate.pricing import PriceBook
from metergate.scopes import ScopeIndex, Subject, scope_id
from metergate.usage import INCOMPLETE, Usage, UsageRecord, from_pusd, to_pusd

if TYPE_CHECKING:
    from metergate.exchange import RequestContext

log = logging.getLogger("metergate.budgets")

# Operations whose output has no bound but the one the request sets (text generation).
OPEN_ENDED_OPS = frozenset({"chat", "completions", "responses", "messages", "generate", "stream_generate"})

ScopeKey = tuple[str, str]  # (team, app); app "" = the whole team; (SCOPED, counter id) for other scopes
SCOPED = "\0"  # never a team name (label values are printable)


def scope_of(budget: BudgetConfig) -> ScopeKey:
    return (budget.team or "", budget.app or "")


def budget_id(budget: BudgetConfig) -> str:
    return scope_id(budget, budget.period)


@dataclass(slots=True)
class Hold:
    budget: BudgetConfig
    window: Window
    amount_pusd: int
    counter: str = ""  # the counter's id: the budget's, or `<budget>|<user>` for a per-user budget
    hold_id: str = ""

    def __post_init__(self) -> None:
        self.counter = self.counter or budget_id(self.budget)

    @property
    def window_start(self) -> float:
        return self.window.start_ts

    @property
    def spend_key(self) -> ScopeKey:
        return scope_of(self.budget) if self.budget.simple else (SCOPED, self.counter)


@dataclass(slots=True)
class Reservation:
    holds: list[Hold] = field(default_factory=list)


class SpendTracker:
    """Spend per (team, app) and calendar period: ledger totals plus this process's records since.

    Each record counts under its (team, app) and under (team, "") for the whole team, so any scope's spend is a
    few dict lookups. `resync` writes pending records, reads the ledger's totals for the current periods (all
    replicas' records), and keeps counting this process's records observed since the flush on top, so nothing is
    counted twice.
    """

    def __init__(self, tz: ZoneInfo, clock: Clock, fiscal_start: int = 1) -> None:
        self.tz = tz
        self.clock = clock
        self.fiscal_start = fiscal_start
        self._base: dict[tuple[Period, float], dict[ScopeKey, int]] = {}
        self._local: dict[tuple[Period, float], dict[ScopeKey, int]] = {}
        self._mark: dict[tuple[Period, float], dict[ScopeKey, int]] = {}
        self._current: dict[Period, Window] = {}
        self._valid_from = self._valid_until = 0.0  # the span in which all of _current's periods hold
        self.closed_months = ClosedMonths()

    def windows(self, at: datetime | None = None) -> dict[Period, Window]:
        at = at or self.clock.now()
        return {p: window(p, at, self.tz, self.fiscal_start) for p in PERIODS}

    def window(self, period: Period, at: datetime | None = None) -> Window:
        return window(period, at or self.clock.now(), self.tz, self.fiscal_start)

    def current(self, ts: float | None = None) -> dict[Period, Window]:
        """The periods containing `ts` (default: now); reused while they last instead of recomputed."""
        if ts is None:
            ts = self.clock.time()
        if self._valid_from <= ts < self._valid_until:
            return self._current
        windows = self.windows(datetime.fromtimestamp(ts, UTC))
        start = max(w.start_ts for w in windows.values())
        end = min(w.end_ts for w in windows.values())
        if start <= self.clock.time() < end:
            self._current, self._valid_from, self._valid_until = windows, start, end
        return windows

    def observe(self, record: UsageRecord, scoped: Sequence[tuple[Period, str]] = ()) -> None:
        """Count a record under its team and app, and under the counters of the other scopes it matched."""
        cost = record.cost_pusd
        if not cost:
            return
        windows = self.current(record.started_at)
        for period, w in windows.items():
            bucket = self._local.setdefault((period, w.start_ts), {})
            for key in ((record.team, record.app), (record.team, "")):
                bucket[key] = bucket.get(key, 0) + cost
        for period, counter in scoped:
            bucket = self._local.setdefault((period, windows[period].start_ts), {})
            key = (SCOPED, counter)
            bucket[key] = bucket.get(key, 0) + cost

    def spent_pusd(self, team: str, app: str, period: Period, w: Window | None = None) -> int:
        return self.spent((team, app), period, w)

    def spent(self, scope: ScopeKey, period: Period, w: Window | None = None) -> int:
        w = w or self.current()[period]
        key = (period, w.start_ts)
        return (
            self._base.get(key, _EMPTY).get(scope, 0)
            + self._local.get(key, _EMPTY).get(scope, 0)
            - self._mark.get(key, _EMPTY).get(scope, 0)
        )

    def counters(self, period: Period, w: Window, prefix: str) -> dict[str, int]:
        """The scoped counters of one period whose id starts with `prefix`, with their spend (per-user budgets)."""
        key = (period, w.start_ts)
        found = {
            counter
            for d in (self._base.get(key, _EMPTY), self._local.get(key, _EMPTY))
            for marker, counter in d
            if marker == SCOPED and counter.startswith(prefix)
        }
        return {c: self.spent((SCOPED, c), period, w) for c in found}

    async def resync(self, ledger: Ledger, scoped: ScopedTotals | None = None) -> None:
        # The snapshot and the ledger's pending batch are taken in the same instant (no await in between), and
        # the queries run right after that batch is written: every record counted locally so far is in the
        # totals, and none observed later is.
        marks = {k: dict(v) for k, v in self._local.items()}
        windows = self.windows(self.clock.now())

        scoped_totals = scoped

        def totals(store: Store) -> dict[tuple[Period, float], dict[ScopeKey, int]]:
            base: dict[tuple[Period, float], dict[ScopeKey, int]] = {}
            for period, w in windows.items():
                per_app = self.closed_months.spend(store, "", w, windows["month"], store.spend)
                team_app = dict(per_app)
                for (team, _), pusd in per_app.items():
                    team_app[(team, "")] = team_app.get((team, ""), 0) + pusd
                base[(period, w.start_ts)] = team_app
            if scoped_totals is not None:
                for key, counters in scoped_totals(store, windows).items():
                    base.setdefault(key, {}).update(counters)
            return base

        base = await ledger.flush_then(totals)
        self._base = base
        self._mark = marks
        # Drop buckets of periods that have ended.
        current = set(base)
        self._local = {k: v for k, v in self._local.items() if k in current}
        self._mark = {k: v for k, v in self._mark.items() if k in current}

    def prune(self) -> None:
        """Drop the counts of periods that have ended (with a ledger, `resync` does it too)."""
        current = {(p, w.start_ts) for p, w in self.current().items()}
        self._local = {k: v for k, v in self._local.items() if k in current}
        self._mark = {k: v for k, v in self._mark.items() if k in current}
        self._base = {k: v for k, v in self._base.items() if k in current}

    def teams(self) -> set[str]:
        found: set[str] = set()
        for d in (*self._base.values(), *self._local.values()):
            found.update(t for t, _ in d if t != SCOPED)
        return found


_EMPTY: dict[ScopeKey, int] = {}
K = TypeVar("K")


class ClosedMonths:
    """Quarter and year totals as the months before the current one (read once: they no longer change) plus the
    current month, so a year budget does not read a year of ledger rows every refresh."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, float, float], dict[Any, int]] = {}

    def spend(
        self, store: Store, name: str, w: Window, month: Window, query: Callable[[float, float], dict[K, int]]
    ) -> dict[K, int]:
        if w.period not in ("quarter", "year") or month.start_ts <= w.start_ts:
            return query(w.start_ts, w.end_ts)
        key = (name, w.start_ts, month.start_ts)
        closed = self._cache.get(key)
        if closed is None:
            closed = query(w.start_ts, month.start_ts)
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[key] = closed
        total: dict[K, int] = dict(closed)
        for k, v in query(month.start_ts, w.end_ts).items():
            total[k] = total.get(k, 0) + v
        return total


# Ledger totals of the scoped budgets' counters for the current windows (run in the ledger's thread).
ScopedTotals = Callable[[Store, dict[Period, Window]], dict[tuple[Period, float], dict[ScopeKey, int]]]


class Clock:
    """Wall time corrected by the measured skew to the shared database's clock, so that every replica puts a
    request near midnight in the same period."""

    def __init__(self) -> None:
        self.skew_s = 0.0

    def time(self) -> float:
        return time.time() + self.skew_s

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.time(), UTC)


class BudgetStoreError(RuntimeError):
    """The shared budget counters refused an update (not an outage): the request is refused, not let through."""


@dataclass(frozen=True, slots=True)
class Standing:
    """A counter as a reservation found it: admitted or not, spend, reservations in flight, and the part of those
    kept until the period ends (requests whose bill is unknown: they never clear)."""

    admitted: bool
    spent: int
    reserved: int
    kept: int = 0


class LocalReservations:
    """Reservations of one gateway process, in memory."""

    def __init__(self, tracker: SpendTracker) -> None:
        self.tracker = tracker
        self._reserved: dict[tuple[str, float], int] = {}
        self._kept: dict[tuple[str, float], int] = {}
        self._ends: dict[tuple[str, float], float] = {}

    async def reserve(self, hold: Hold, limit_pusd: int) -> Standing:
        key = (hold.counter, hold.window_start)
        spent = self.tracker.spent(hold.spend_key, hold.window.period, hold.window)
        reserved = self._reserved.get(key, 0)
        if spent + reserved >= limit_pusd:
            return Standing(False, spent, reserved, self._kept.get(key, 0))
        self._reserved[key] = reserved + hold.amount_pusd
        self._ends[key] = hold.window.end_ts
        return Standing(True, spent, reserved)

    async def settle(self, hold: Hold, actual_pusd: int, keep_pusd: int = 0) -> None:
        self.release(hold, keep_pusd)

    def release(self, hold: Hold, keep_pusd: int = 0) -> None:
        """Synchronous: the record's cost enters the spend in the same instant its reservation leaves. `keep_pusd`
        of it stays reserved until the period ends (a request whose final bill is unknown)."""
        key = (hold.counter, hold.window_start)
        keep = min(keep_pusd, hold.amount_pusd)
        left = self._reserved.get(key, 0) - hold.amount_pusd + keep
        if left:
            self._reserved[key] = left
        else:
            # Counters come and go with users: an empty one is not kept.
            self._reserved.pop(key, None)
            self._ends.pop(key, None)
        if keep:
            self._kept[key] = self._kept.get(key, 0) + keep

    def reserved_pusd(self, counter: str, window_start: float) -> int:
        return self._reserved.get((counter, window_start), 0)

    def kept_pusd(self, counter: str, window_start: float) -> int:
        return self._kept.get((counter, window_start), 0)

    async def release_kept(self, counter: str, w: Window) -> None:
        """A reset: the reservations kept for unknown bills are let go with the spend set aside."""
        key = (counter, w.start_ts)
        kept = self._kept.pop(key, 0)
        left = self._reserved.get(key, 0) - kept
        if left > 0:
            self._reserved[key] = left
        else:
            self._reserved.pop(key, None)
            self._ends.pop(key, None)

    async def expire(self) -> None:
        """Forget the reservations of periods that have ended (what was kept for unknown bills included)."""
        now = self.tracker.clock.time()
        for key in [k for k, end in self._ends.items() if end <= now]:
            self._reserved.pop(key, None)
            self._kept.pop(key, None)
            self._ends.pop(key, None)

    async def reconcile(self) -> None:
        return None


class SharedReservations:
    """Reservations shared by replicas through PostgreSQL: one atomic statement to reserve, one to settle."""

    HOLD_TTL_MARGIN_S = 300.0

    def __init__(self, url: str, tracker: SpendTracker, replica: str, hold_ttl_s: float) -> None:
        self.url = url
        self.tracker = tracker
        self.replica = replica
        self.hold_ttl_s = hold_ttl_s + self.HOLD_TTL_MARGIN_S
        self._pool: asyncio.Queue[Any] = asyncio.Queue()
        self._size = 0
        self._max = 8
        self._ensured: dict[tuple[str, float], Hold] = {}
        self._seen: dict[tuple[str, float], tuple[int, int, int]] = {}  # (spent, reserved, kept) last read

    async def _conn(self) -> Any:
        import psycopg

        if self._pool.empty() and self._size < self._max:
            self._size += 1
            try:
                return await psycopg.AsyncConnection.connect(self.url, autocommit=True, connect_timeout=5)
            except psycopg.Error as exc:
                self._size -= 1
                raise LedgerError(f"budget database: {exc}") from exc
        return await self._pool.get()

    def _release(self, conn: Any) -> None:
        if conn.closed or conn.broken:
            self._size -= 1
        else:
            self._pool.put_nowait(conn)

    async def _run(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        import psycopg

        conn = await self._conn()
        try:
            async with conn.cursor() as cur:
                await cur.execute(sql, params)
                return list(await cur.fetchall()) if cur.description else []
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            # The database is unreachable or went away: the one case where budgets fail open (documented).
            raise LedgerError(f"budget database: {exc}") from exc
        except psycopg.Error as exc:
            # The database answered and refused the statement: never a reason to let a request through.
            raise BudgetStoreError(f"budget database refused an update: {exc}") from exc
        finally:
            self._release(conn)

    async def _ensure_row(self, hold: Hold) -> None:
        """The period's counter row, created from the ledger's totals the first time any replica needs it."""
        scope = hold.counter
        if (scope, hold.window_start) in self._ensured:
            return
        w = hold.window
        if hold.budget.simple:
            team, app = scope_of(hold.budget)
            await self._run(
                "INSERT INTO budget_spend (scope, period_start, spent_pusd, reserved_pusd) "
                "SELECT %(scope)s, %(start)s, COALESCE(SUM(cost_pusd), 0), 0 FROM usage_records "
                "WHERE team = %(team)s AND (%(app)s = '' OR app = %(app)s) AND started_at >= %(start)s "
                "AND started_at < %(end)s ON CONFLICT (scope, period_start) DO NOTHING",
                {"scope": scope, "start": hold.window_start, "end": w.end_ts, "team": team, "app": app},
            )
        else:
            # Other scopes start from the ledger's totals as the tracker last read them (all replicas' records);
            # `reconcile` raises the counter to the ledger's figure if records arrived in between.
            await self._run(
                "INSERT INTO budget_spend (scope, period_start, spent_pusd, reserved_pusd) "
                "VALUES (%(scope)s, %(start)s, %(spent)s, 0) ON CONFLICT (scope, period_start) DO NOTHING",
                {"scope": scope, "start": hold.window_start, "spent": self.tracker.spent(hold.spend_key, w.period, w)},
            )
        self._ensured[(scope, hold.window_start)] = hold

    async def reserve(self, hold: Hold, limit_pusd: int) -> Standing:
        await self._ensure_row(hold)
        hold.hold_id = uuid.uuid4().hex
        scope = hold.counter
        rows = await self._run(
            "WITH u AS (UPDATE budget_spend SET reserved_pusd = reserved_pusd + %(amount)s "
            "WHERE scope = %(scope)s AND period_start = %(start)s AND spent_pusd + reserved_pusd < %(limit)s "
            "RETURNING spent_pusd, reserved_pusd) "
            "INSERT INTO budget_holds (id, scope, period_start, amount_pusd, replica, expires_at) "
            "SELECT %(id)s, %(scope)s, %(start)s, %(amount)s, %(replica)s, %(expires)s FROM u "
            "RETURNING (SELECT spent_pusd FROM u), (SELECT reserved_pusd FROM u)",
            {
                "amount": hold.amount_pusd,
                "scope": scope,
                "start": hold.window_start,
                "limit": limit_pusd,
                "id": hold.hold_id,
                "replica": self.replica,
                "expires": self.tracker.clock.time() + self.hold_ttl_s,
            },
        )
        if rows:
            spent, reserved = int(rows[0][0]), int(rows[0][1]) - hold.amount_pusd
            self._seen[(scope, hold.window_start)] = (spent, reserved + hold.amount_pusd, 0)
            return Standing(True, spent, reserved)
        now = await self._run(
            "SELECT spent_pusd, reserved_pusd, kept_pusd FROM budget_spend "
            "WHERE scope = %(scope)s AND period_start = %(start)s",
            {"scope": scope, "start": hold.window_start},
        )
        spent, reserved, kept = (int(now[0][0]), int(now[0][1]), int(now[0][2])) if now else (0, 0, 0)
        self._seen[(scope, hold.window_start)] = (spent, reserved, kept)
        return Standing(False, spent, reserved, kept)

    async def settle(self, hold: Hold, actual_pusd: int, keep_pusd: int = 0) -> None:
        """The real cost always enters the spend; the reservation leaves it only if its hold still exists (a hold
        that outlived its TTL was already released by `expire`). `keep_pusd` of the hold stays reserved until the
        period ends, for a request whose final bill is unknown."""
        params = {
            "id": hold.hold_id,
            "actual": actual_pusd,
            "scope": hold.counter,
            "start": hold.window_start,
            "keep": min(keep_pusd, hold.amount_pusd),
            "until": hold.window.end_ts,
        }
        if not keep_pusd:
            await self._run(
                "WITH h AS (DELETE FROM budget_holds WHERE id = %(id)s RETURNING amount_pusd) "
                "UPDATE budget_spend SET reserved_pusd = reserved_pusd "
                "- COALESCE((SELECT SUM(amount_pusd) FROM h), 0), spent_pusd = spent_pusd + %(actual)s "
                "WHERE scope = %(scope)s AND period_start = %(start)s",
                params,
            )
            return
        await self._run(
            "WITH old AS (SELECT amount_pusd FROM budget_holds WHERE id = %(id)s FOR UPDATE), "
            "kept AS (UPDATE budget_holds SET amount_pusd = %(keep)s, expires_at = %(until)s WHERE id = %(id)s "
            "RETURNING amount_pusd) "
            "UPDATE budget_spend SET reserved_pusd = reserved_pusd - COALESCE((SELECT SUM(amount_pusd) FROM old), 0) "
            "+ COALESCE((SELECT SUM(amount_pusd) FROM kept), 0), spent_pusd = spent_pusd + %(actual)s, "
            "kept_pusd = kept_pusd + COALESCE((SELECT SUM(amount_pusd) FROM kept), 0) "
            "WHERE scope = %(scope)s AND period_start = %(start)s",
            params,
        )

    async def reconcile(self) -> None:
        """Spend the counters missed (a settlement lost to a database outage) is taken from the ledger; then every
        current counter is read back, so what this replica reports includes the other replicas' reservations."""
        scoped: list[tuple[str, float, int]] = []
        for (scope, start), hold in list(self._ensured.items()):
            w = hold.window
            if not w.contains(self.tracker.clock.time()):
                del self._ensured[(scope, start)]
                continue
            if not hold.budget.simple:
                scoped.append((scope, start, self.tracker.spent(hold.spend_key, w.period, w)))
            else:
                team, app = scope_of(hold.budget)
                await self._run(
                    "UPDATE budget_spend SET spent_pusd = GREATEST(spent_pusd, (SELECT COALESCE(SUM(cost_pusd), 0) "
                    "FROM usage_records WHERE team = %(team)s AND (%(app)s = '' OR app = %(app)s) "
                    "AND started_at >= %(start)s AND started_at < %(end)s)) "
                    "WHERE scope = %(scope)s AND period_start = %(start)s",
                    {"team": team, "app": app, "start": start, "end": w.end_ts, "scope": scope},
                )
        if scoped:
            # Scoped counters (one per user of a per-user budget: there can be many) in one statement.
            await self._run(
                "UPDATE budget_spend b SET spent_pusd = GREATEST(b.spent_pusd, v.tracked) "
                "FROM unnest(%(scopes)s::text[], %(starts)s::float8[], %(tracked)s::numeric[]) AS v(scope, start, "
                "tracked) WHERE b.scope = v.scope AND b.period_start = v.start AND v.tracked > b.spent_pusd",
                {
                    "scopes": [s for s, _, _ in scoped],
                    "starts": [t for _, t, _ in scoped],
                    "tracked": [v for _, _, v in scoped],
                },
            )
        # Only the current periods' rows are read back (every replica's reservations, for status and Realtime).
        starts = sorted({w.start_ts for w in self.tracker.current().values()})
        rows = await self._run(
            "SELECT scope, period_start, spent_pusd, reserved_pusd, kept_pusd FROM budget_spend "
            "WHERE period_start = ANY(%(starts)s)",
            {"starts": starts},
        )
        self._seen = {(scope, float(start)): (int(s), int(r), int(k)) for scope, start, s, r, k in rows}

    async def expire(self) -> None:
        """Release holds whose replica died before settling them."""
        await self._run(
            "WITH h AS (DELETE FROM budget_holds WHERE expires_at < %(now)s "
            "RETURNING scope, period_start, amount_pusd), "
            "s AS (SELECT scope, period_start, SUM(amount_pusd) AS amount FROM h GROUP BY scope, period_start) "
            "UPDATE budget_spend b SET reserved_pusd = b.reserved_pusd - s.amount FROM s "
            "WHERE b.scope = s.scope AND b.period_start = s.period_start",
            {"now": self.tracker.clock.time()},
        )
        # Counters of periods long over (a year is the longest) serve no budget: per-user budgets leave many.
        await self._run(
            "DELETE FROM budget_spend WHERE period_start < %(before)s AND reserved_pusd = 0",
            {"before": self.tracker.clock.time() - 367 * 86400},
        )

    def reserved_pusd(self, counter: str, window_start: float) -> int:
        return self._seen.get((counter, window_start), (0, 0, 0))[1]

    def kept_pusd(self, counter: str, window_start: float) -> int:
        return self._seen.get((counter, window_start), (0, 0, 0))[2]

    async def release_kept(self, counter: str, w: Window) -> None:
        """A reset: the holds kept until the period's end (unknown bills) are deleted, and leave the counter."""
        await self._run(
            "WITH h AS (DELETE FROM budget_holds WHERE scope = %(scope)s AND period_start = %(start)s "
            "AND expires_at = %(end)s RETURNING amount_pusd) "
            "UPDATE budget_spend SET reserved_pusd = reserved_pusd - COALESCE((SELECT SUM(amount_pusd) FROM h), 0), "
            "kept_pusd = GREATEST(kept_pusd - COALESCE((SELECT SUM(amount_pusd) FROM h), 0), 0) "
            "WHERE scope = %(scope)s AND period_start = %(start)s",
            {"scope": counter, "start": w.start_ts, "end": w.end_ts},
        )

    async def spent_now(self, counter: str, window_start: float) -> int:
        rows = await self._run(
            "SELECT spent_pusd FROM budget_spend WHERE scope = %(scope)s AND period_start = %(start)s",
            {"scope": counter, "start": window_start},
        )
        return int(rows[0][0]) if rows else 0

    async def close(self) -> None:
        while not self._pool.empty():
            conn = self._pool.get_nowait()
            await conn.close()


class BudgetGuard:
    """Admission control for budgets, and the budget/spend/forecast gauges."""

    HELD_RETRY_S = 2  # a refusal while in-flight requests hold the rest: they settle within seconds, as a rule

    def __init__(self, config: Config, prices: PriceBook, ledger: Ledger | None) -> None:
        self.config = config
        self.prices = prices
        self.ledger = ledger
        self.tz = config.timezone()
        self.clock = Clock()
        self.tracker = SpendTracker(self.tz, self.clock, config.server.fiscal_year_start_month)
        self.budgets = list(config.budgets)
        # A budget naming a user replaces the `*` budget of its scope with the same period and action.
        self.index: ScopeIndex[BudgetConfig] = ScopeIndex(self.budgets, budget_id, lambda b: (b.period, b.action))
        # Per budget, computed once: its warn and limit thresholds and its per-request cap, in pico-dollars.
        self._thresholds = {
            id(b): (to_pusd(Decimal(str(b.limit_usd * b.warn_at))), to_pusd(Decimal(str(b.limit_usd))))
            for b in self.budgets
            if b.limit_usd is not None
        }
        self._caps = {id(b): to_pusd(Decimal(str(b.max_request_usd))) for b in self.budgets if b.max_request_usd}
        # Overrides by counter id, and resets by (counter, period start): from the ledger (apply_adjustments).
        self._adjustments: list[Adjustment] = []
        self._overrides: dict[str, Adjustment] = {}
        self._resets: dict[tuple[str, float], int] = {}
        # Scoped budgets with a period: their spend is counted per counter, beside the team/app totals.
        self._scoped = [b for b in self.budgets if not b.simple and b.period is not None]
        self._estimates: dict[tuple[str, str, int, int, tuple[tuple[str, int], ...]], int] = {}
        shared = ledger is not None and ledger.config.url.startswith(("postgresql://", "postgres://"))
        ttl = config.server.upstream_timeout_s + config.server.drain_timeout_s
        self.reservations: LocalReservations | SharedReservations = (
            SharedReservations(ledger.config.url, self.tracker, ledger.replica, ttl)
            if shared and ledger is not None
            else LocalReservations(self.tracker)
        )
        self._forecasts: dict[tuple[str, str, Period], float] = {}
        self._history: dict[ScopeKey, dict[Any, float]] = {}
        self._history_stamp: tuple[float, int] | None = None
        self._warned: set[tuple[str, float, str]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None

    # --- lifecycle -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self._sync()
        self._loop_task = asyncio.create_task(self._maintain(), name="metergate-budgets")

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=10)
        if isinstance(self.reservations, SharedReservations):
            await self.reservations.close()

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(15)
            self.tracker.prune()
            try:
                await self._sync()
                await self.reservations.expire()
                await self.reservations.reconcile()
            except (LedgerError, OSError) as exc:
                log.warning("budget state not refreshed: %s", exc)

    async def sync(self) -> None:
        """Refresh spend and forecasts from the ledger now."""
        await self._sync(forecasts=True)

    async def _sync(self, forecasts: bool = True) -> None:
        if self.ledger is None or (not self.ledger.up and not await self._ledger_ready()):
            return
        try:
            store = await self.ledger.store()
            if isinstance(store, PostgresStore):
                self.clock.skew_s = await self.ledger.call(_skew, store)
                if abs(self.clock.skew_s) > 1.0:
                    log.warning(
                        "this machine's clock is %.1f s off the ledger database's; budgets and records use the "
                        "database's time",
                        self.clock.skew_s,
                    )
            await self.tracker.resync(self.ledger, self._scoped_totals if self._scoped else None)
            if any(b.period is not None for b in self.budgets):
                # A year is the longest period an override or a reset can still matter in.
                since = self.clock.time() - 400 * 86400
                self.apply_adjustments(await self.ledger.call(store.adjustments, since))
            if forecasts:
                await self._refresh_forecasts()
        except LedgerError as exc:
            log.warning("budget state not refreshed from the ledger: %s", exc)

    def _scoped_totals(
        self, store: Store, windows: dict[Period, Window]
    ) -> dict[tuple[Period, float], dict[ScopeKey, int]]:
        """The ledger's spend for every scoped budget's counters in its current period (in the ledger's thread)."""
        out: dict[tuple[Period, float], dict[ScopeKey, int]] = {}
        done: set[tuple[str, str]] = set()
        for b in self._scoped:
            assert b.period is not None
            if (self.index.id_of(b), b.period) in done:
                continue  # another budget of the same scope and period: the same counters
            done.add((self.index.id_of(b), b.period))
            w = windows[b.period]
            filters = {
                dim: value
                for dim, value in (
                    ("team", b.team),
                    ("app", b.app),
                    ("key_id", b.key),
                    ("provider", b.provider),
                    ("user", None if b.per_user else b.user),
                )
                if value is not None
            }
            filters.update({f"tag.{k}": v for k, v in b.tags.items()})
            by = (["user"] if b.per_user else []) + (["model"] if b.model is not None else [])
            bid = self.index.id_of(b)
            skip = self.index.overridden(b)

            def query(
                since: float, until: float, by: list[str] = by, filters: dict[str, str] = filters
            ) -> dict[tuple[str | None, ...], int]:
                return {a.group: a.cost_pusd for a in store.aggregate(since, until, by, filters)}

            counters = out.setdefault((b.period, w.start_ts), {})
            for group, pusd in self.tracker.closed_months.spend(store, bid, w, windows["month"], query).items():
                values = dict(zip(by, group, strict=True))
                if b.model is not None and not fnmatchcase(values["model"] or "", b.model):
                    continue
                if b.per_user:
                    user = values["user"]
                    if user is None or user in skip:
                        continue
                    key: ScopeKey = (SCOPED, f"{bid}|{user}")
                else:
                    key = (SCOPED, bid)
                counters[key] = counters.get(key, 0) + pusd
        return out

    async def _ledger_ready(self) -> bool:
        assert self.ledger is not None
        try:
            await self.ledger.store()
        except LedgerError:
            return False
        return True

    # --- admission -------------------------------------------------------------------------------------------

    async def reserve(self, ctx: RequestContext) -> Reservation | None:
        subject = Subject.of_request(ctx)
        if subject is None:
            return None
        applicable = self.index.matching(subject)
        if not applicable:
            return None
        # Two block budgets of one scope and period share a counter: the stricter limit holds it, once.
        blocking: dict[tuple[str, str], tuple[BudgetConfig, str]] = {}
        for b, c in applicable:
            if b.action == "block" and b.period is not None:
                other = blocking.get((c, b.period))
                if other is None or self.limits(b, c)[1] < self.limits(other[0], c)[1]:
                    blocking[(c, b.period)] = (b, c)
        capped = [b for b, _ in applicable if id(b) in self._caps]
        if not blocking and not capped:
            return None
        if (
            capped
            and ctx.facts is not None
            and ctx.facts.max_output_tokens is None
            and (ctx.match.endpoint.operation in OPEN_ENDED_OPS)
        ):
            # Without its own output cap a request's worst case is unknown (reasoning models write far more than
            # any default): a per-request limit cannot be promised for it.
            raise self._cap_refusal(capped[0], None)
        # A call with no model to price (a batch creation, an unmetered route) reserves nothing: it is only refused
        # once the budget is spent.
        estimate = self.worst_case_pusd(ctx) if ctx.route is not None and ctx.facts is not None else 0
        for budget in capped:
            if estimate > self._caps[id(budget)]:
                raise self._cap_refusal(budget, estimate)
        # The periods of the request's own start time, which its ledger record will carry too.
        windows = self.tracker.current(ctx.started_at)
        reservation = Reservation()
        try:
            for budget, counter in blocking.values():
                assert budget.period is not None
                w = windows[budget.period]
                limit = self.limits(budget, counter)[1]
                offset = self.offset(counter, w)
                # No hold needs to exceed the limit: one that large already refuses everything after it. This also
                # bounds every number the shared counters add up, whatever the client asked for.
                hold = Hold(budget, w, min(estimate, limit), counter)
                try:
                    # The counters hold the period's whole spend; a reset sets `offset` of it aside.
                    standing = await self.reservations.reserve(hold, limit + offset)
                except LedgerError as exc:
                    # The shared counters are unreachable: keep traffic flowing rather than fail every request.
                    log.warning("budget %s not enforced for this request: %s", counter, exc)
                    continue
                if not standing.admitted:
                    raise self._refusal(
                        budget, counter, w, standing.spent - offset, standing.reserved, subject.user, standing.kept
                    )
                reservation.holds.append(hold)
        except BaseException:
            # Refused, or the counters refused an update: what this request holds already is released.
            for held in reservation.holds:
                self._release(held, 0)
            raise
        return reservation

    def refusal(self, ctx: RequestContext) -> GatewayError | None:
        """The refusal a new spend by this request's sender would get now (a block budget spent), without
        reserving: for long-lived sessions (Realtime) that are checked as they spend."""
        subject = Subject.of_request(ctx)
        if subject is None:
            return None
        windows = self.tracker.current(self.clock.time())
        for budget, counter in self.index.matching(subject):
            if budget.action != "block" or budget.period is None:
                continue
            w = windows[budget.period]
            spent = self.spent(budget, counter, w)
            reserved = self.reservations.reserved_pusd(counter, w.start_ts)
            if spent + reserved >= self.limits(budget, counter)[1]:
                kept = self.reservations.kept_pusd(counter, w.start_ts)
                return self._refusal(budget, counter, w, spent, reserved, subject.user, kept)
        return None

    def spent(self, budget: BudgetConfig, counter: str, w: Window) -> int:
        """What counts against a budget counter in the window: its spend, less what a reset set aside."""
        assert budget.period is not None
        # The set-aside figure may be the shared counter's, ahead of the ledger for a moment: never below zero.
        return max(0, self.tracker.spent(self._spend_key(budget, counter), budget.period, w) - self.offset(counter, w))

    # --- overrides and resets --------------------------------------------------------------------------------

    def limits(self, budget: BudgetConfig, counter: str) -> tuple[int, int]:
        """(warn, limit) in pico-dollars: the configured ones, or an override's while it lasts (one on a per-user
        counter wins over one on its whole budget)."""
        o = self.override_of(budget, counter) if self._overrides else None
        if o is not None and o.limit_usd is not None:
            return to_pusd(o.limit_usd * Decimal(str(budget.warn_at))), to_pusd(o.limit_usd)
        return self._thresholds[id(budget)]

    def offset(self, counter: str, w: Window) -> int:
        return self._resets.get((counter, w.start_ts), 0) if self._resets else 0

    def override_of(self, budget: BudgetConfig, counter: str) -> Adjustment | None:
        """The override in force on a counter: its own, else its budget's (a per-user budget's `*`)."""
        bid = self.index.id_of(budget)
        now = self.clock.time()
        for key in (counter, bid):
            o = self._overrides.get(key)
            if o is not None and o.ended_at is None and o.until is not None and o.until > now:
                return o
        return None

    def apply_adjustments(self, adjustments: list[Adjustment]) -> None:
        """The ledger's overrides and resets, oldest first: a later one on a counter replaces an earlier one (an
        override ended early no longer counts)."""
        overrides: dict[str, Adjustment] = {}
        resets: dict[tuple[str, float], int] = {}
        for a in adjustments:
            if a.kind == "override" and a.ended_at is None:
                # An override ended early drops out: an older one still running comes back.
                overrides[a.counter] = a
            elif a.kind == "reset" and a.offset_pusd is not None:
                resets[(a.counter, a.period_start)] = a.offset_pusd
        self._adjustments = list(adjustments)
        self._overrides, self._resets = overrides, resets

    def resolve(self, counter: str) -> tuple[BudgetConfig, str]:
        """The budget a counter id names: a budget's id (as /admin/budgets lists it), or `<id>|<user>` for one
        user of a per-user budget."""
        for b in self.budgets:
            if b.period is None:
                continue
            bid = self.index.id_of(b)
            if counter == bid or (b.per_user and counter.startswith(bid + "|") and len(counter) > len(bid) + 1):
                return b, counter
        raise ValueError(f"no budget {counter!r}; budgets with a limit: {self._known_ids()}")

    def find(
        self,
        period: str,
        *,
        team: str | None = None,
        app: str | None = None,
        key: str | None = None,
        user: str | None = None,
        tags: dict[str, str] | None = None,
        model: str | None = None,
        provider: str | None = None,
    ) -> str:
        """The counter id of the budget with exactly this scope and period (`user` also names one user of a
        per-user budget of that scope)."""
        fields = (team, app, key, tuple(sorted((tags or {}).items())), model, provider, period)
        same = [
            b
            for b in self.budgets
            if (b.team, b.app, b.key, tuple(sorted(b.tags.items())), b.model, b.provider, b.period) == fields
        ]
        for b in same:
            if b.user == user:
                return self.index.id_of(b)
        for b in same:
            if b.per_user and user is not None:
                return f"{self.index.id_of(b)}|{user}"
        raise ValueError(f"no {period} budget with that scope; budgets with a limit: {self._known_ids()}")

    def _known_ids(self) -> str:
        return ", ".join(self.index.id_of(b) for b in self.budgets if b.period is not None) or "none"

    MAX_OVERRIDE_S = 366 * 86400

    async def adjust(
        self,
        kind: str,
        counter: str,
        by: str,
        reason: str = "",
        limit_usd: Decimal | None = None,
        until: float | None = None,
    ) -> Adjustment:
        """Record an override or a reset in the ledger, and apply it here at once (other replicas within 15 s)."""
        if self.ledger is None:
            raise ValueError("budget overrides and resets are kept in the ledger: configure ledger:")
        budget, counter = self.resolve(counter)
        assert budget.period is not None
        w = self.tracker.window(budget.period)
        now = self.clock.time()
        offset = None
        if kind == "override":
            if limit_usd is None or not (0 < limit_usd <= Decimal("1e12")):
                raise ValueError("limit_usd must be above 0 and at most 1e12")
            if until is None or until <= now:
                raise ValueError("until must be in the future")
            if until > now + self.MAX_OVERRIDE_S:
                raise ValueError("until must be within a year: an override is temporary, the config is the rule")
        elif kind == "reset":
            if budget.per_user and counter == self.index.id_of(budget):
                raise ValueError(f"a per-user budget is reset one user at a time: {counter}|<user>")
            # What the counter holds now is set aside: every replica's records as the ledger has them this moment,
            # or the shared counter's figure if it is ahead (settled requests whose records are still in flight).
            await self._sync(forecasts=False)
            offset = self.tracker.spent(self._spend_key(budget, counter), budget.period, w)
            if isinstance(self.reservations, SharedReservations):
                offset = max(offset, await self.reservations.spent_now(counter, w.start_ts))
            # Reservations kept for bills that will never be known go with it: a reset lets traffic through.
            await self.reservations.release_kept(counter, w)
            self._warned = {k for k in self._warned if k[0] != counter}
        else:
            raise ValueError(f"unknown adjustment {kind!r}")
        a = Adjustment(
            id="adj_" + uuid.uuid4().hex[:12],
            kind=kind,
            counter=counter,
            period_start=w.start_ts,
            created_at=now,
            created_by=by[:200] or "unknown",
            reason=reason[:500],
            limit_usd=limit_usd,
            until=until,
            offset_pusd=offset,
        )
        store = await self.ledger.store()
        await self.ledger.call(store.add_adjustment, a)
        self.apply_adjustments([*self._adjustments, a])
        return a

    async def end_override(self, adjustment_id: str) -> bool:
        if self.ledger is None:
            return False
        store = await self.ledger.store()
        if not await self.ledger.call(store.end_adjustment, adjustment_id, self.clock.time()):
            return False
        self.apply_adjustments(
            [replace(a, ended_at=self.clock.time()) if a.id == adjustment_id else a for a in self._adjustments]
        )
        return True

    @staticmethod
    def _spend_key(budget: BudgetConfig, counter: str) -> ScopeKey:
        return scope_of(budget) if budget.simple else (SCOPED, counter)

    def worst_case_pusd(self, ctx: RequestContext) -> int:
        """The worst case (estimate.worst_case_tokens) at the model's prices; cached per request shape."""
        assert ctx.route is not None and ctx.facts is not None
        input_tokens, output = worst_case_tokens(ctx, self.config.budget_defaults.default_max_output_tokens)
        upstream = ctx.route.upstream
        model = upstream.pricing_model(ctx.route.upstream_model)
        # Units the request itself fixes (characters of speech, DALL-E images of a size) are part of the worst case.
        units = ctx.facts.request_units
        key = (upstream.name, model, input_tokens, output, tuple(sorted(units.items())) if units else ())
        cached = self._estimates.get(key)
        if cached is not None:
            return cached
        cost = self.prices.price(
            upstream.name,
            upstream.config.pricing_provider_id,
            model,
            Usage(input_tokens=input_tokens, output_tokens=output, units=dict(units) if units else None),
            self.clock.now(),
        )
        estimate = to_pusd(cost) if cost is not None else 0
        if len(self._estimates) > 10_000:
            self._estimates.clear()  # prices change with time too: the cache is renewed now and then
        self._estimates[key] = estimate
        return estimate

    def _refusal(
        self,
        budget: BudgetConfig,
        counter: str,
        w: Window,
        spent: int,
        reserved: int,
        user: str | None,
        kept: int = 0,
    ) -> GatewayError:
        """Exhausted (spent, with what is kept for unknown bills, reached the limit: nothing clears before the
        reset) or held (what is left is reserved by requests in flight: it clears when they settle, so a retry in a
        moment may pass)."""
        limit = self.limits(budget, counter)[1]
        override = self.override_of(budget, counter)
        scope = budget.scope + (f" (user {user})" if budget.per_user and user is not None else "")
        shown = f"${from_pusd(limit):,.2f}" + (
            f" (overridden until {datetime.fromtimestamp(override.until or 0, self.tz).isoformat()})"
            if override
            else ""
        )
        headers = {"x-metergate-budget": counter[:256]}
        resets = w.end.isoformat()
        if spent + kept >= limit:
            wait = max(1, math.ceil(w.end_ts - self.clock.time()))
            unknown = (
                f" and ${from_pusd(kept):,.4f} is held for requests whose bill is unknown (their clients left)"
                if kept
                else ""
            )
            message = (
                f"Budget exceeded: the {budget.period} budget of {scope} is {shown}; "
                f"${from_pusd(spent):,.4f} is spent{unknown}. It resets at {resets}."
            )
            # The SDKs would otherwise retry a 429; this one will not clear before the reset.
            headers |= {"retry-after": str(wait), "x-should-retry": "false"}
            return GatewayError(429, "budget_exceeded", message, code="budget_exceeded", headers=headers)
        message = (
            f"Budget busy: the {budget.period} budget of {scope} is {shown}; "
            f"${from_pusd(spent):,.4f} is spent and the remaining ${from_pusd(limit - spent):,.4f} is reserved by "
            f"requests in flight (${from_pusd(reserved):,.4f} in all). Retry when they finish."
        )
        headers |= {"retry-after": str(self.HELD_RETRY_S), "x-should-retry": "true"}
        return GatewayError(429, "budget_exceeded", message, code="budget_held", headers=headers)

    def _cap_refusal(self, budget: BudgetConfig, estimate: int | None) -> GatewayError:
        assert budget.max_request_usd is not None
        if estimate is None:
            message = (
                f"A ${budget.max_request_usd:,.4f} per-request limit applies to {budget.scope}: set an output cap "
                "(max_tokens, max_completion_tokens, max_output_tokens or generationConfig.maxOutputTokens) so "
                "that the request's worst case is known."
            )
        else:
            message = (
                f"Request too expensive: at worst it could cost ${from_pusd(estimate):,.4f} (its input and its output "
                f"cap at the model's prices), over the ${budget.max_request_usd:,.4f} per-request limit of "
                f"{budget.scope}. Lower max_tokens (or its equivalent) or shorten the input."
            )
        return GatewayError(
            400,
            "request_cost_limit",
            message,
            code="request_cost_limit",
            headers={"x-metergate-budget": self.index.id_of(budget)[:256], "x-should-retry": "false"},
        )

    def settle(self, reservation: object | None, record: UsageRecord) -> None:
        applicable = self.index.matching(Subject.of_record(record)) if record.cost_pusd and self.budgets else []
        # A set: two budgets of one scope and period share a counter, which counts the record once.
        self.tracker.observe(record, list({(b.period, c) for b, c in applicable if b.period and not b.simple}))
        if applicable:
            self._check_thresholds(record, applicable)
        if not isinstance(reservation, Reservation):
            return
        actual = record.cost_pusd
        # The provider may have billed more than is known (a stream the client left before its usage arrived, an
        # upstream that never reported it, a stream cut after its first figures): the worst case reserved for it
        # stays reserved until the period ends, so hanging up never buys unmetered spend past a block budget.
        unknown = not record.metered or INCOMPLETE in record.usage.flags
        for hold in reservation.holds:
            self._release(hold, actual, max(hold.amount_pusd - actual, 0) if unknown else 0)

    def _release(self, hold: Hold, actual_pusd: int, keep_pusd: int = 0) -> None:
        if isinstance(self.reservations, LocalReservations):
            self.reservations.release(hold, keep_pusd)
        else:
            self._spawn(self._settle_shared(self.reservations, hold, actual_pusd, keep_pusd))

    @staticmethod
    async def _settle_shared(reservations: SharedReservations, hold: Hold, actual_pusd: int, keep_pusd: int) -> None:
        for attempt in range(5):
            try:
                await reservations.settle(hold, actual_pusd, keep_pusd)
                return
            except LedgerError:
                if attempt == 4:
                    raise  # logged by _settled; reconcile() restores the spend from the ledger
                await asyncio.sleep(0.2 * 2**attempt)

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._settled)

    def _settled(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("budget settlement failed: %s", task.exception())

    def _check_thresholds(self, record: UsageRecord, applicable: list[tuple[BudgetConfig, str]]) -> None:
        windows = self.tracker.current()
        for budget, counter in applicable:
            if budget.period is None or budget.limit_usd is None:
                continue
            w = windows[budget.period]
            spent = self.spent(budget, counter, w)
            warn_at, limit = self.limits(budget, counter)
            if spent < warn_at or (counter, w.start_ts, f"limit{id(budget)}") in self._warned:
                continue
            for level, threshold in (("warn", warn_at), ("limit", limit)):
                key = (counter, w.start_ts, f"{level}{id(budget)}")
                if spent >= threshold and key not in self._warned:
                    if len(self._warned) > 100_000:
                        self._warned.clear()  # per-user budgets: bounded, at worst a warning is logged again
                    self._warned.add(key)
                    log.warning(
                        "budget %s: %s of $%s reached ($%.4f spent this %s, action %s)",
                        counter,
                        "limit" if level == "limit" else f"{budget.warn_at:.0%}",
                        f"{budget.limit_usd:,.2f}" if budget.limit_usd >= 0.01 else f"{budget.limit_usd:g}",
                        float(from_pusd(spent)),
                        budget.period,
                        budget.action,
                    )

    # --- gauges ----------------------------------------------------------------------------------------------

    def scopes(self) -> list[ScopeKey]:
        teams = set(self.config.known_teams()) | self.tracker.teams()
        scopes = {(t, "") for t in teams}
        scopes.update(scope_of(b) for b in self.budgets if b.simple)
        return sorted(scopes)

    async def _refresh_forecasts(self) -> None:
        if self.ledger is None:
            return
        from metergate.reports import daily_history

        now = self.clock.now()
        windows = self.tracker.windows(now)
        # Full days do not change: the history query runs when the day changes or every 10 minutes (late
        # records of other replicas); today's spend comes from the tracker at every refresh.
        stamp = (windows["day"].start_ts, int(now.timestamp() // 600))
        if self._history_stamp != stamp:
            self._history = await daily_history(self.ledger, windows["day"].start, self.tz)
            self._history_stamp = stamp
        history = self._history
        forecasts: dict[tuple[str, str, Period], float] = {}
        for team, app in self.scopes():
            days = history.get((team, app), {}) if app else _team_days(history, team)
            today = float(from_pusd(self.tracker.spent_pusd(team, app, "day", windows["day"])))
            for period, w in windows.items():
                spent = float(from_pusd(self.tracker.spent_pusd(team, app, period, w)))
                forecasts[(team, app, period)] = forecast(w, now, spent, today, days)
        self._forecasts = forecasts

    def collect(self) -> Iterator[Metric]:
        labels = ("team", "app", "period")
        budget = GaugeMetricFamily(
            "llm_budget_usd", "Configured budget limit per team (app empty) or app.", labels=labels
        )
        ratio = GaugeMetricFamily("llm_budget_warn_ratio", "Share of the budget at which to warn.", labels=labels)
        for b in self.budgets:
            if b.simple and b.period is not None and b.limit_usd is not None:
                team, app = scope_of(b)
                budget.add_metric([team, app, b.period], float(from_pusd(self.limits(b, self.index.id_of(b))[1])))
                ratio.add_metric([team, app, b.period], b.warn_at)
        yield budget
        yield ratio
        windows = self.tracker.windows()
        spend = GaugeMetricFamily("llm_spend_usd", "Spend in the current calendar period.", labels=labels)
        projected = GaugeMetricFamily(
            "llm_spend_forecast_usd", "Projected spend at the end of the current period.", labels=labels
        )
        for team, app in self.scopes():
            for period, w in windows.items():
                spent = float(from_pusd(self.tracker.spent_pusd(team, app, period, w)))
                spend.add_metric([team, app, period], spent)
                projected.add_metric([team, app, period], max(spent, self._forecasts.get((team, app, period), spent)))
        yield spend
        yield projected
        # Budgets of other scopes (key, user, tags, model, provider): one series per budget, whatever the number of
        # users; a per-user budget's spend is its highest user's.
        scoped_limit = GaugeMetricFamily(
            "llm_scoped_budget_usd",
            "Limit of a budget scoped by key, user, tags, model or provider.",
            labels=("budget", "period"),
        )
        scoped_spend = GaugeMetricFamily(
            "llm_scoped_spend_usd",
            "Spend in the current period of a scoped budget (per-user budgets: the highest user's).",
            labels=("budget", "period"),
        )
        for b in self._scoped:
            assert b.period is not None and b.limit_usd is not None
            bid = self.index.id_of(b)
            w = windows[b.period]
            if b.per_user:
                spent_pusd = max(
                    (pusd - self.offset(c, w) for c, pusd in self.tracker.counters(b.period, w, bid + "|").items()),
                    default=0,
                )
            else:
                spent_pusd = self.spent(b, bid, w)
            scoped_limit.add_metric([bid, b.period], float(from_pusd(self.limits(b, bid)[1])))
            scoped_spend.add_metric([bid, b.period], float(from_pusd(spent_pusd)))
        yield scoped_limit
        yield scoped_spend
        skew = GaugeMetricFamily("metergate_clock_skew_seconds", "This machine's clock minus the ledger database's.")
        skew.add_metric([], -self.clock.skew_s)
        yield skew

    def spend_rows(self, period: Period) -> list[dict[str, Any]]:
        """Spend and forecast of every team and budget scope in the current `period`."""
        w = self.tracker.window(period)
        rows = []
        for team, app in self.scopes():
            spent = float(from_pusd(self.tracker.spent_pusd(team, app, period, w)))
            projected = max(spent, self._forecasts.get((team, app, period), spent))
            rows.append(
                {"team": team, "app": app or None, "period": period, "spent_usd": spent, "forecast_usd": projected}
            )
        return rows

    MAX_STATUS_USERS = 100

    def status(self) -> list[dict[str, Any]]:
        """Every budget with its spend, reservations and reset time (for the admin API); a per-user budget has one
        row per user who spent in the period (the highest MAX_STATUS_USERS)."""
        now = self.clock.now()
        out = []
        for b in self.budgets:
            if b.period is None or b.limit_usd is None:
                continue
            bid = self.index.id_of(b)
            w = self.tracker.window(b.period, now)
            if b.per_user:
                counters = {
                    c: pusd - self.offset(c, w) for c, pusd in self.tracker.counters(b.period, w, bid + "|").items()
                }
                # Users with an override or a reset show even before they spend.
                counters.update(
                    {
                        c: self.spent(b, c, w)
                        for c in (*self._overrides, *(k for k, _ in self._resets))
                        if c.startswith(bid + "|")
                    }
                )
                top = sorted(counters.items(), key=lambda kv: -kv[1])[: self.MAX_STATUS_USERS]
                instances: list[tuple[str, str | None, int]] = [(c, c.split("|", 1)[1], pusd) for c, pusd in top]
            else:
                instances = [(bid, b.user, self.spent(b, bid, w))]
            for counter, user, spent_pusd in instances:
                spent = from_pusd(spent_pusd)
                team, app = scope_of(b)
                forecast_usd = self._forecasts.get((team, app, b.period), 0.0) if b.simple else 0.0
                override = self.override_of(b, counter)
                reset = next(
                    (
                        a
                        for a in reversed(self._adjustments)
                        if a.kind == "reset" and a.counter == counter and a.period_start == w.start_ts
                    ),
                    None,
                )
                out.append(
                    {
                        "id": counter,
                        "scope": b.scope,
                        "team": b.team,
                        "app": b.app,
                        "key": b.key,
                        "user": user,
                        "tags": dict(b.tags),
                        "model": b.model,
                        "provider": b.provider,
                        "period": b.period,
                        "limit_usd": float(from_pusd(self.limits(b, counter)[1])),
                        "configured_limit_usd": b.limit_usd,
                        "override": _adjustment_info(override),
                        "reset": _adjustment_info(reset),
                        "max_request_usd": b.max_request_usd,
                        "action": b.action,
                        "warn_at": b.warn_at,
                        "spent_usd": float(spent),
                        "reserved_usd": float(from_pusd(self.reservations.reserved_pusd(counter, w.start_ts))),
                        "forecast_usd": max(float(spent), forecast_usd),
                        "period_start": w.start.isoformat(),
                        "resets_at": w.end.isoformat(),
                    }
                )
        return out


def _adjustment_info(a: Adjustment | None) -> dict[str, Any] | None:
    if a is None:
        return None
    info: dict[str, Any] = {"id": a.id, "at": a.created_at, "by": a.created_by, "reason": a.reason}
    if a.kind == "override":
        info |= {"limit_usd": float(a.limit_usd or 0), "until": a.until}
    else:
        info["set_aside_usd"] = float(from_pusd(a.offset_pusd or 0))
    return info


def _team_days(history: dict[ScopeKey, dict[Any, float]], team: str) -> dict[Any, float]:
    days: dict[Any, float] = {}
    for (t, _), per_day in history.items():
        if t == team:
            for d, v in per_day.items():
                days[d] = days.get(d, 0.0) + v
    return days


def _skew(store: PostgresStore) -> float:
    before = time.time()
    db_now = store.now()
    after = time.time()
    return db_now - (before + after) / 2
