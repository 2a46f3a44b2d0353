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
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from prometheus_client.core import GaugeMetricFamily, Metric

from metergate.auth import Principal
from metergate.config import BudgetConfig, Config
from metergate.errors import GatewayError
from metergate.forecast import forecast
from metergate.ledger import Ledger
from metergate.ledger.store import LedgerError, PostgresStore, Store
from metergate.periods import PERIODS, Period, Window, window
from metergate.pricing import PriceBook
from metergate.usage import INCOMPLETE, Usage, UsageRecord, from_pusd, to_pusd

if TYPE_CHECKING:
    from metergate.exchange import RequestContext

log = logging.getLogger("metergate.budgets")

ScopeKey = tuple[str, str]  # (team, app); app "" = the whole team


def scope_of(budget: BudgetConfig) -> ScopeKey:
    return (budget.team, budget.app or "")


def budget_id(budget: BudgetConfig) -> str:
    team, app = scope_of(budget)
    return f"{team}/{app or '*'}/{budget.period}"


@dataclass(slots=True)
class Hold:
    budget: BudgetConfig
    window: Window
    amount_pusd: int
    hold_id: str = ""

    @property
    def window_start(self) -> float:
        return self.window.start_ts


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

    def __init__(self, tz: ZoneInfo, clock: Clock) -> None:
        self.tz = tz
        self.clock = clock
        self._base: dict[tuple[Period, float], dict[ScopeKey, int]] = {}
        self._local: dict[tuple[Period, float], dict[ScopeKey, int]] = {}
        self._mark: dict[tuple[Period, float], dict[ScopeKey, int]] = {}
        self._current: dict[Period, Window] = {}
        self._valid_from = self._valid_until = 0.0  # the span in which all of _current's periods hold

    def windows(self, at: datetime | None = None) -> dict[Period, Window]:
        at = at or self.clock.now()
        return {p: window(p, at, self.tz) for p in PERIODS}

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

    def observe(self, record: UsageRecord) -> None:
        cost = record.cost_pusd
        if not cost:
            return
        for period, w in self.current(record.started_at).items():
            bucket = self._local.setdefault((period, w.start_ts), {})
            for key in ((record.team, record.app), (record.team, "")):
                bucket[key] = bucket.get(key, 0) + cost

    def spent_pusd(self, team: str, app: str, period: Period, w: Window | None = None) -> int:
        w = w or self.current()[period]
        key = (period, w.start_ts)
        scope = (team, app)
        return (
            self._base.get(key, _EMPTY).get(scope, 0)
            + self._local.get(key, _EMPTY).get(scope, 0)
            - self._mark.get(key, _EMPTY).get(scope, 0)
        )

    async def resync(self, ledger: Ledger) -> None:
        # The snapshot and the ledger's pending batch are taken in the same instant (no await in between), and
        # the queries run right after that batch is written: every record counted locally so far is in the
        # totals, and none observed later is.
        marks = {k: dict(v) for k, v in self._local.items()}
        windows = self.windows(self.clock.now())

        def totals(store: Store) -> dict[tuple[Period, float], dict[ScopeKey, int]]:
            base: dict[tuple[Period, float], dict[ScopeKey, int]] = {}
            for period, w in windows.items():
                per_app = store.spend(w.start_ts, w.end_ts)
                scoped = dict(per_app)
                for (team, _), pusd in per_app.items():
                    scoped[(team, "")] = scoped.get((team, ""), 0) + pusd
                base[(period, w.start_ts)] = scoped
            return base

        base = await ledger.flush_then(totals)
        self._base = base
        self._mark = marks
        # Drop buckets of periods that have ended.
        current = set(base)
        self._local = {k: v for k, v in self._local.items() if k in current}
        self._mark = {k: v for k, v in self._mark.items() if k in current}

    def teams(self) -> set[str]:
        found: set[str] = set()
        for d in (*self._base.values(), *self._local.values()):
            found.update(t for t, _ in d)
        return found


_EMPTY: dict[ScopeKey, int] = {}


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


class LocalReservations:
    """Reservations of one gateway process, in memory."""

    def __init__(self, tracker: SpendTracker) -> None:
        self.tracker = tracker
        self._reserved: dict[tuple[str, float], int] = {}

    async def reserve(self, hold: Hold, limit_pusd: int) -> tuple[bool, int, int]:
        team, app = scope_of(hold.budget)
        key = (budget_id(hold.budget), hold.window_start)
        spent = self.tracker.spent_pusd(team, app, hold.budget.period, hold.window)
        reserved = self._reserved.get(key, 0)
        if spent + reserved >= limit_pusd:
            return False, spent, reserved
        self._reserved[key] = reserved + hold.amount_pusd
        return True, spent, reserved

    async def settle(self, hold: Hold, actual_pusd: int, keep_pusd: int = 0) -> None:
        self.release(hold, keep_pusd)

    def release(self, hold: Hold, keep_pusd: int = 0) -> None:
        """Synchronous: the record's cost enters the spend in the same instant its reservation leaves. `keep_pusd`
        of it stays reserved until the period ends (a request whose final bill is unknown)."""
        key = (budget_id(hold.budget), hold.window_start)
        self._reserved[key] = self._reserved.get(key, 0) - hold.amount_pusd + min(keep_pusd, hold.amount_pusd)

    def reserved_pusd(self, budget: BudgetConfig, window_start: float) -> int:
        return self._reserved.get((budget_id(budget), window_start), 0)

    async def expire(self) -> None:
        return None

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
        self._ensured: set[tuple[str, float]] = set()
        self._seen: dict[tuple[str, float], tuple[int, int]] = {}

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
        scope = budget_id(hold.budget)
        if (scope, hold.window_start) in self._ensured:
            return
        team, app = scope_of(hold.budget)
        w = hold.window
        await self._run(
            "INSERT INTO budget_spend (scope, period_start, spent_pusd, reserved_pusd) "
            "SELECT %(scope)s, %(start)s, COALESCE(SUM(cost_pusd), 0), 0 FROM usage_records "
            "WHERE team = %(team)s AND (%(app)s = '' OR app = %(app)s) AND started_at >= %(start)s "
            "AND started_at < %(end)s ON CONFLICT (scope, period_start) DO NOTHING",
            {"scope": scope, "start": hold.window_start, "end": w.end_ts, "team": team, "app": app},
        )
        self._ensured.add((scope, hold.window_start))

    async def reserve(self, hold: Hold, limit_pusd: int) -> tuple[bool, int, int]:
        await self._ensure_row(hold)
        hold.hold_id = uuid.uuid4().hex
        scope = budget_id(hold.budget)
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
            self._seen[(scope, hold.window_start)] = (spent, reserved + hold.amount_pusd)
            return True, spent, reserved
        now = await self._run(
            "SELECT spent_pusd, reserved_pusd FROM budget_spend WHERE scope = %(scope)s AND period_start = %(start)s",
            {"scope": scope, "start": hold.window_start},
        )
        spent, reserved = (int(now[0][0]), int(now[0][1])) if now else (0, 0)
        self._seen[(scope, hold.window_start)] = (spent, reserved)
        return False, spent, reserved

    async def settle(self, hold: Hold, actual_pusd: int, keep_pusd: int = 0) -> None:
        """The real cost always enters the spend; the reservation leaves it only if its hold still exists (a hold
        that outlived its TTL was already released by `expire`). `keep_pusd` of the hold stays reserved until the
        period ends, for a request whose final bill is unknown."""
        params = {
            "id": hold.hold_id,
            "actual": actual_pusd,
            "scope": budget_id(hold.budget),
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
            "+ COALESCE((SELECT SUM(amount_pusd) FROM kept), 0), spent_pusd = spent_pusd + %(actual)s "
            "WHERE scope = %(scope)s AND period_start = %(start)s",
            params,
        )

    async def reconcile(self) -> None:
        """Spend the counters missed (a settlement lost to a database outage) is taken from the ledger; then every
        current counter is read back, so what this replica reports includes the other replicas' reservations."""
        for scope, start in list(self._ensured):
            team, app_part, period = scope.split("/")
            app = "" if app_part == "*" else app_part
            w = window(period, datetime.fromtimestamp(start, UTC), self.tracker.tz)  # type: ignore[arg-type]
            if not w.contains(self.tracker.clock.time()):
                self._ensured.discard((scope, start))
                continue
            await self._run(
                "UPDATE budget_spend SET spent_pusd = GREATEST(spent_pusd, (SELECT COALESCE(SUM(cost_pusd), 0) "
                "FROM usage_records WHERE team = %(team)s AND (%(app)s = '' OR app = %(app)s) "
                "AND started_at >= %(start)s AND started_at < %(end)s)) "
                "WHERE scope = %(scope)s AND period_start = %(start)s",
                {"team": team, "app": app, "start": start, "end": w.end_ts, "scope": scope},
            )
        # A month is the longest period: older rows are no budget's current window.
        rows = await self._run(
            "SELECT scope, period_start, spent_pusd, reserved_pusd FROM budget_spend WHERE period_start >= %(since)s",
            {"since": self.tracker.clock.time() - 32 * 86400},
        )
        for scope, start, spent, reserved in rows:
            self._seen[(scope, float(start))] = (int(spent), int(reserved))

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

    def reserved_pusd(self, budget: BudgetConfig, window_start: float) -> int:
        return self._seen.get((budget_id(budget), window_start), (0, 0))[1]

    async def close(self) -> None:
        while not self._pool.empty():
            conn = self._pool.get_nowait()
            await conn.close()


class BudgetGuard:
    """Admission control for budgets, and the budget/spend/forecast gauges."""

    def __init__(self, config: Config, prices: PriceBook, ledger: Ledger | None) -> None:
        self.config = config
        self.prices = prices
        self.ledger = ledger
        self.tz = config.timezone()
        self.clock = Clock()
        self.tracker = SpendTracker(self.tz, self.clock)
        self.budgets = list(config.budgets)
        # Per budget, computed once: its id and its warn and limit thresholds in pico-dollars.
        self._ids = {id(b): budget_id(b) for b in self.budgets}
        self._thresholds = {
            id(b): (to_pusd(Decimal(str(b.limit_usd * b.warn_at))), to_pusd(Decimal(str(b.limit_usd))))
            for b in self.budgets
        }
        self._estimates: dict[tuple[str, str, int, int, tuple[tuple[str, int], ...]], int] = {}
        self._by_team: dict[str, list[BudgetConfig]] = {}
        for b in self.budgets:
            self._by_team.setdefault(b.team, []).append(b)
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
            await self.tracker.resync(self.ledger)
            if forecasts:
                await self._refresh_forecasts()
        except LedgerError as exc:
            log.warning("budget state not refreshed from the ledger: %s", exc)

    async def _ledger_ready(self) -> bool:
        assert self.ledger is not None
        try:
            await self.ledger.store()
        except LedgerError:
            return False
        return True

    # --- admission -------------------------------------------------------------------------------------------

    async def reserve(self, ctx: RequestContext) -> Reservation | None:
        principal = ctx.principal
        if principal is None:
            return None
        budgets = [
            b
            for b in self._by_team.get(principal.team, ())
            if b.action == "block" and (b.app is None or b.app == principal.app)
        ]
        if not budgets:
            return None
        # A call with no model to price (a batch creation, an unmetered route) reserves nothing: it is only refused
        # once the budget is spent.
        estimate = self.worst_case_pusd(ctx) if ctx.route is not None and ctx.facts is not None else 0
        # The periods of the request's own start time, which its ledger record will carry too.
        windows = self.tracker.current(ctx.started_at)
        reservation = Reservation()
        for budget in budgets:
            w = windows[budget.period]
            limit = self._thresholds[id(budget)][1]
            # No hold needs to exceed the limit: one that large already refuses everything after it. This also
            # bounds every number the shared counters add up, whatever the client asked for.
            hold = Hold(budget, w, min(estimate, limit))
            try:
                ok, spent, reserved = await self.reservations.reserve(hold, limit)
            except LedgerError as exc:
                # The shared counters are unreachable: keep traffic flowing rather than fail every request.
                log.warning("budget %s not enforced for this request: %s", budget_id(budget), exc)
                continue
            if not ok:
                for held in reservation.holds:
                    self._release(held, 0)
                raise self._refusal(budget, w, spent, reserved)
            reservation.holds.append(hold)
        return reservation

    def refusal(self, principal: Principal) -> GatewayError | None:
        """The refusal a new spend by this principal would get now (a block budget spent), without reserving:
        for long-lived sessions (Realtime) that are checked as they spend."""
        windows = self.tracker.current(self.clock.time())
        for budget in self._by_team.get(principal.team, ()):
            if budget.action != "block" or (budget.app is not None and budget.app != principal.app):
                continue
            w = windows[budget.period]
            team, app = scope_of(budget)
            spent = self.tracker.spent_pusd(team, app, budget.period, w)
            reserved = self.reservations.reserved_pusd(budget, w.start_ts)
            if spent + reserved >= self._thresholds[id(budget)][1]:
                return self._refusal(budget, w, spent, reserved)
        return None

    def worst_case_pusd(self, ctx: RequestContext) -> int:
        """Estimated input (a token is at least 3 bytes of the request body, in practice) plus the output cap.

        The input estimate is rounded up to a multiple of 256 tokens, so the price of a request shape is computed
        once and reused: still an upper bound, at a fraction of the cost.
        """
        assert ctx.route is not None and ctx.facts is not None
        body_bytes = len(ctx.raw_body) if ctx.raw_body is not None else 0
        input_tokens = -(-(body_bytes // 3 + 16) // 256) * 256
        cap = ctx.facts.max_output_tokens or self.config.budget_defaults.default_max_output_tokens
        output = cap * ctx.facts.choices  # every choice (OpenAI n, Gemini candidateCount) is billed
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

    def _refusal(self, budget: BudgetConfig, w: Window, spent: int, reserved: int) -> GatewayError:
        resets = w.end.isoformat()
        wait = max(1, math.ceil(w.end_ts - self.clock.time()))
        message = (
            f"Budget exceeded: the {budget.period} budget of {budget.scope} is ${budget.limit_usd:,.2f}; "
            f"${from_pusd(spent):,.4f} is spent and ${from_pusd(reserved):,.4f} reserved by requests in flight. "
            f"It resets at {resets}."
        )
        return GatewayError(
            429,
            "budget_exceeded",
            message,
            code="budget_exceeded",
            # The SDKs would otherwise retry a 429; this one will not clear before the reset.
            headers={"retry-after": str(wait), "x-should-retry": "false", "x-metergate-budget": budget_id(budget)},
        )

    def settle(self, reservation: object | None, record: UsageRecord) -> None:
        self.tracker.observe(record)
        self._check_thresholds(record)
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

    def _check_thresholds(self, record: UsageRecord) -> None:
        if not record.cost_pusd:
            return
        windows = self.tracker.current()
        for budget in self._by_team.get(record.team, ()):
            if budget.app is not None and budget.app != record.app:
                continue
            bid = self._ids[id(budget)]
            w = windows[budget.period]
            spent = self.tracker.spent_pusd(budget.team, budget.app or "", budget.period, w)
            warn_at, limit = self._thresholds[id(budget)]
            if spent < warn_at or (bid, w.start_ts, "limit") in self._warned:
                continue
            for level, threshold in (("warn", warn_at), ("limit", limit)):
                key = (bid, w.start_ts, level)
                if spent >= threshold and key not in self._warned:
                    self._warned.add(key)
                    log.warning(
                        "budget %s: %s of $%s reached ($%.4f spent this %s, action %s)",
                        bid,
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
        scopes.update(scope_of(b) for b in self.budgets)
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
            team, app = scope_of(b)
            budget.add_metric([team, app, b.period], b.limit_usd)
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
        skew = GaugeMetricFamily("metergate_clock_skew_seconds", "This machine's clock minus the ledger database's.")
        skew.add_metric([], -self.clock.skew_s)
        yield skew

    def spend_rows(self, period: Period) -> list[dict[str, Any]]:
        """Spend and forecast of every team and budget scope in the current `period`."""
        w = window(period, self.clock.now(), self.tz)
        rows = []
        for team, app in self.scopes():
            spent = float(from_pusd(self.tracker.spent_pusd(team, app, period, w)))
            projected = max(spent, self._forecasts.get((team, app, period), spent))
            rows.append(
                {"team": team, "app": app or None, "period": period, "spent_usd": spent, "forecast_usd": projected}
            )
        return rows

    def status(self) -> list[dict[str, Any]]:
        """Every budget with its spend, reservations and reset time (for the admin API)."""
        now = self.clock.now()
        out = []
        for b in self.budgets:
            team, app = scope_of(b)
            w = window(b.period, now, self.tz)
            spent = from_pusd(self.tracker.spent_pusd(team, app, b.period, w))
            out.append(
                {
                    "id": budget_id(b),
                    "team": team,
                    "app": app or None,
                    "period": b.period,
                    "limit_usd": b.limit_usd,
                    "action": b.action,
                    "warn_at": b.warn_at,
                    "spent_usd": float(spent),
                    "reserved_usd": float(from_pusd(self.reservations.reserved_pusd(b, w.start_ts))),
                    "forecast_usd": max(float(spent), self._forecasts.get((team, app, b.period), 0.0)),
                    "period_start": w.start.isoformat(),
                    "resets_at": w.end.isoformat(),
                }
            )
        return out


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
