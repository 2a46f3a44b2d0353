"""The admin HTTP API under /admin/: keys, budgets, spend and reports.

Guarded by a bearer token from the environment (`METERGATE_ADMIN_TOKEN`); without it the admin API is off.
Request and response bodies are pydantic models, from which `/admin/openapi.json` is generated.
"""

from __future__ import annotations

import hmac
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qsl
from zoneinfo import ZoneInfo

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from metergate import __version__
from metergate.attribution import unlisted_tag
from metergate.auth import Principal
from metergate.budgets import BudgetGuard
from metergate.config import RESERVED_LABELS, LabelValue, TagKey, TagValue, hash_key
from metergate.console import same_origin
from metergate.console.session import FailureLimit, Sessions
from metergate.errors import GatewayError
from metergate.ledger import ApiKey, Ledger, LedgerError
from metergate.ledger.store import Adjustment, Aggregate
from metergate.periods import PERIODS, parse_day
from metergate.reports import (
    build_report,
    chargeback_groups,
    chargeback_markdown,
    day_bounds,
    month_bounds,
    parse_tag_filter,
    statement_subject,
    to_csv,
)
from metergate.usage import from_pusd

if TYPE_CHECKING:
    from metergate.exchange import RequestBody
    from metergate.metrics import Meter

ADMIN_TOKEN_ENV = "METERGATE_ADMIN_TOKEN"
SERIES_STEP_S = 900  # quarter hours fold into local hours and days in every timezone


class KeyCreate(BaseModel):
    team: LabelValue
    app: LabelValue
    name: str = Field(default="", max_length=200)
    tags: dict[TagKey, TagValue] = Field(default_factory=dict, max_length=64)
    include_cost: bool = Field(default=False, description="Every response to the key carries its cost.")

    @field_validator("team", "app")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value in RESERVED_LABELS:
            raise ValueError(f"{value!r} is reserved by metergate")
        return value


def explain_invalid(exc: ValidationError) -> str:
    """Every problem, each naming its field: pydantic's first line only says which model failed."""
    problems = []
    for err in exc.errors():
        field = ".".join(map(str, err["loc"])) or "body"
        problems.append(f"{field}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(problems)


class KeyInfo(BaseModel):
    id: str
    team: str
    app: str
    name: str
    sha256_prefix: str
    created_at: float
    revoked_at: float | None
    tags: dict[str, str] = Field(default_factory=dict)
    include_cost: bool = False


class KeyCreated(KeyInfo):
    key: str = Field(description="The key itself. Shown once: only its sha256 is stored.")


PeriodName = Literal["day", "week", "month", "quarter", "year"]


class AdjustmentSummary(BaseModel):
    id: str
    at: float
    by: str
    reason: str
    limit_usd: float | None = None
    until: float | None = None
    set_aside_usd: float | None = None


class BudgetStatus(BaseModel):
    id: str = Field(description="The budget's counter: `<budget>|<user>` for each user of a per-user budget.")
    scope: str
    team: str | None
    app: str | None
    key: str | None = None
    user: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    model: str | None = None
    provider: str | None = None
    period: PeriodName
    limit_usd: float = Field(description="The limit in force: an override's while it lasts.")
    configured_limit_usd: float | None = None
    override: AdjustmentSummary | None = None
    reset: AdjustmentSummary | None = Field(default=None, description="A reset in the current period.")
    max_request_usd: float | None = None
    action: Literal["block", "alert"]
    warn_at: float
    spent_usd: float
    reserved_usd: float
    forecast_usd: float
    period_start: str
    resets_at: str


class OverrideCreate(BaseModel):
    budget: str = Field(max_length=600, description="The budget's id as GET /admin/budgets lists it (or <id>|<user>).")
    limit_usd: float = Field(gt=0, le=1e12, allow_inf_nan=False)
    until: datetime = Field(description="ISO 8601; without an offset, in the gateway's timezone.")
    reason: str = Field(default="", max_length=500)
    by: str = Field(default="admin-api", min_length=1, max_length=200, description="Who asks, for the record.")


class ResetCreate(BaseModel):
    budget: str = Field(max_length=600, description="The budget's id (a per-user budget: <id>|<user>).")
    reason: str = Field(default="", max_length=500)
    by: str = Field(default="admin-api", min_length=1, max_length=200)


class AdjustmentInfo(BaseModel):
    id: str
    kind: Literal["override", "reset"]
    budget: str
    period_start: float
    limit_usd: float | None
    until: float | None
    set_aside_usd: float | None
    created_at: float
    created_by: str
    reason: str
    ended_at: float | None


class SpendRow(BaseModel):
    team: str
    app: str | None
    period: PeriodName
    spent_usd: float
    forecast_usd: float


class ReportRow(BaseModel):
    """One group of a report: the dimensions asked for in `by` (a user or tag the records lack is null), then the
    totals. A `tag.<key>` dimension appears under that name."""

    model_config = ConfigDict(extra="allow")

    team: str | None = None
    app: str | None = None
    model: str | None = None
    provider: str | None = None
    endpoint: str | None = None
    key_id: str | None = None
    upstream_model: str | None = None
    user: str | None = None
    requests: int
    errors: int
    tokens_in: int
    tokens_out: int
    tokens_cached: int
    cost_usd: float
    units: dict[str, int] | None = Field(default=None, description="Non-token units billed (web_search...).")


class ErrorBody(BaseModel):
    error: dict[str, str]


Handler = Callable[[dict[str, str], bytes, list[str]], Awaitable[tuple[int, Any, str]]]


class AdminApi:
    def __init__(
        self,
        guard: BudgetGuard,
        ledger: Ledger | None,
        on_key: Callable[[str, Principal | None], None],
        meter: Meter | None = None,
    ) -> None:
        self.guard = guard
        self.ledger = ledger
        self.on_key = on_key
        self.meter = meter
        self.token = os.environ.get(ADMIN_TOKEN_ENV) or None
        # The console's signed session cookie is the other way in (console/session.py).
        self.sessions = Sessions(self.token) if self.token else None
        self.failures = FailureLimit(20)  # wrong bearer tokens per client address and minute
        self.routes: list[tuple[str, str, Handler]] = [
            ("GET", "/admin/openapi.json", self._openapi),
            ("GET", "/admin/keys", self._list_keys),
            ("POST", "/admin/keys", self._create_key),
            ("DELETE", "/admin/keys/{id}", self._revoke_key),
            ("GET", "/admin/budgets", self._budgets),
            ("GET", "/admin/budgets/adjustments", self._list_adjustments),
            ("POST", "/admin/budgets/overrides", self._override),
            ("DELETE", "/admin/budgets/overrides/{id}", self._end_override),
            ("POST", "/admin/budgets/resets", self._reset),
            ("GET", "/admin/spend", self._spend),
            ("GET", "/admin/reports", self._report),
            ("GET", "/admin/reports/chargeback", self._chargeback),
            ("GET", "/admin/overview", self._overview),
            ("GET", "/admin/series", self._series),
            ("GET", "/admin/requests", self._requests),
        ]

    async def handle(
        self,
        method: str,
        path: str,
        query: str,
        headers: dict[str, str],
        request_body: RequestBody,
        *,
        via_console: bool = False,
        client: str = "",
    ) -> tuple[int, bytes, str]:
        """Answers one admin request; the body is read only after the token is checked. `via_console`: asked
        under /console/admin/, where the console's session cookie is accepted too."""
        if self.token is None:
            return _error(404, f"the admin API is off: set {ADMIN_TOKEN_ENV} to enable it")
        refusal = self._refusal(method, path, headers, via_console, client)
        if refusal is not None:
            return refusal
        try:
            body = await request_body.read()
        except GatewayError as exc:
            return _error(exc.status, exc.message)
        params = dict(parse_qsl(query))
        for route_method, pattern, handler in self.routes:
            args = _match(pattern, path)
            if args is None:
                continue
            if route_method != method:
                continue
            try:
                status, payload, content_type = await handler(params, body, args)
            except (ValueError, ValidationError) as exc:
                return _error(400, explain_invalid(exc) if isinstance(exc, ValidationError) else str(exc))
            except LedgerError as exc:
                return _error(503, str(exc))
            if content_type == "application/json":
                return status, orjson.dumps(payload, default=_default), content_type
            return status, payload.encode() if isinstance(payload, str) else payload, content_type
        if any(_match(p, path) is not None for _, p, _ in self.routes):
            return _error(405, f"{method} is not allowed on {path}")
        return _error(404, f"no admin route {path}")

    def _refusal(
        self, method: str, path: str, headers: dict[str, str], via_console: bool, client: str
    ) -> tuple[int, bytes, str] | None:
        """None when the request may proceed: the bearer token, or under /console/admin/ the console's session
        cookie (with the session's CSRF token in x-csrf-token, from this origin, for anything but a read)."""
        assert self.token is not None and self.sessions is not None
        if path == "/admin/openapi.json":
            return None
        presented = headers.get("authorization", "").removeprefix("Bearer ").strip()
        if presented:
            if self.failures.blocked(client):
                return _error(429, "too many wrong admin tokens from this address: wait a minute")
            if hmac.compare_digest(presented.encode(), self.token.encode()):
                return None
            self.failures.failed(client)
            return _error(401, "missing or wrong admin token")
        nonce = self.sessions.nonce(headers.get("cookie")) if via_console else None
        if nonce is None:
            return _error(401, "missing or wrong admin token")
        public_url = self.guard.config.server.public_url
        if headers.get("sec-fetch-site") in ("cross-site", "same-site"):
            return _error(403, "the console's session works from the console's own pages only")
        if method not in ("GET", "HEAD") and not (
            same_origin(headers, public_url) and self.sessions.csrf_ok(nonce, headers.get("x-csrf-token"))
        ):
            return _error(403, "a change from the console needs its CSRF token (x-csrf-token) and its own origin")
        return None

    def _need_ledger(self) -> Ledger:
        if self.ledger is None:
            raise LedgerError("this gateway has no ledger configured (config: ledger.url)")
        return self.ledger

    # --- handlers --------------------------------------------------------------------------------------------

    async def _openapi(self, params: dict[str, str], body: bytes, args: list[str]) -> tuple[int, Any, str]:
        return 200, openapi_schema(), "application/json"

    async def _list_keys(self, params: dict[str, str], body: bytes, args: list[str]) -> tuple[int, Any, str]:
        ledger = self._need_ledger()
        store = await ledger.store()
        keys = await ledger.call(store.keys, True)
        return 200, [_key_info(k).model_dump() for k in keys], "application/json"

    async def _create_key(self, params: dict[str, str], body: bytes, args: list[str]) -> tuple[int, Any, str]:
        request = KeyCreate.model_validate_json(body or b"{}")
        problem = unlisted_tag(request.tags, self.guard.config.attribution.tags)
        if problem:
            return 422, {"error": {"message": problem}}, "application/json"
        ledger = self._need_ledger()
        key, record = new_key(request.team, request.app, request.name, request.tags, request.include_cost)
        store = await ledger.store()
        await ledger.call(store.add_key, record)
        self.on_key(record.sha256, record.principal())
        return 201, KeyCreated(key=key, **_key_info(record).model_dump()).model_dump(), "application/json"

    async def _revoke_key(self, params: dict[str, str], body: bytes, args: list[str]) -> tuple[int, Any, str]:
        ledger = self._need_ledger()
        store = await ledger.store()
        keys = {k.id: k for k in await ledger.call(store.keys, True)}
        if args[0] not in keys or not await ledger.call(store.revoke_key, args[0]):
            return 404, {"error": {"message": f"no active key {args[0]}"}}, "application/json"
        self.on_key(keys[args[0]].sha256, None)
        return 200, {"id": args[0], "revoked": True}, "application/json"

    async def _budgets(self, params: dict[str, str], body: bytes, args: list[str]) -> tuple[int, Any, str]:
        return 200, self.guard.status(), "application/json"

    async def _list_adjustments(self, params: dict[str, str], body: bytes, args: list[str]) -> tuple[int, Any, str]:
        ledger = self._need_ledger()
        store = await ledger.store()
        since = self.guard.clock.time() - 400 * 86400
        found = await ledger.call(store.adjustments, since)
        return 200, [adjustment_info(a).model_dump() for a in found], "application/json"

    async def _override(self, params: dict[str, str], body: bytes, args: list[str]) -> tuple[int, Any, str]:
        request = OverrideCreate.model_validate_json(body or b"{}")
        until = request.until if request.until.tzinfo else request.until.replace(tzinfo=self.guard.tz)
        made = await self.guard.adjust(
            "override",
            request.budget,
            request.by,
            request.reason,
            limit_usd=Decimal(str(request.limit_usd)),
            until=until.timestamp(),
        )
        return 201, adjustment_info(made).model_dump(), "application/json"

    async def _end_override(self, params: dict[str, str], body: bytes, args: list[str]) -> tuple[int, Any, str]:
        if not await self.guard.end_override(args[0]):
            return 404, {"error": {"message": f"no active override {args[0]}"}}, "application/json"
        return 200, {"id": args[0], "ended": True}, "application/json"

    async def _reset(self, params: dict[str, str], body: bytes, args: list[str]) -> tuple[int, Any, str]:
        request = ResetCreate.model_validate_json(body or b"{}")
        made = await self.guard.adjust("reset", request.budget, request.by, request.reason)
        return 201, adjustment_info(made).model_dump(), "application/json"

    async def _spend(self, params: dict[str, str], body: bytes, args: list[str]) -> tuple[int, Any, str]:
        period = params.get("period", "month")
        if period not in PERIODS:
            raise ValueError("period must be day, week, month, quarter or year")
        rows = [SpendRow.model_validate(row).model_dump() for row in self.guard.spend_rows(period)]
        return 200, rows, "application/json"

    async def _report(self, params: dict[str, str], body: bytes, args: list[str]) -> tuple[int, Any, str]:
        ledger = self._need_ledger()
        fmt = _format(params, "json", "csv")
        start, end = _dates(params, self.guard.tz)
        by = [d for d in params.get("by", "team,app,model").split(",") if d]
        report = await build_report(ledger, start, end, by, self.guard.tz, report_filters(params))
        if fmt == "csv":
            return 200, to_csv(report), "text/csv; charset=utf-8"
        rows = [
            {**ReportRow(**row).model_dump(exclude_none=True), **{d: row[d] for d in report.by}} for row in report.rows
        ]
        return 200, rows, "application/json"

    async def _chargeback(self, params: dict[str, str], body: bytes, args: list[str]) -> tuple[int, Any, str]:
        ledger = self._need_ledger()
        filters = report_filters(params)
        if not filters:
            raise ValueError("team or tag is required (team=search, tag=customer=acme)")
        fmt = _format(params, "markdown", "csv")
        month = params.get("month") or date.today().strftime("%Y-%m")
        start, end = month_bounds(month)
        report = await build_report(ledger, start, end, chargeback_groups(filters), self.guard.tz, filters)
        if fmt == "csv":
            return 200, to_csv(report), "text/csv; charset=utf-8"
        return 200, chargeback_markdown(statement_subject(filters), month, report), "text/markdown; charset=utf-8"

    # --- the console's reads ---------------------------------------------------------------------------------------

    async def _overview(self, params: dict[str, str], body: bytes, args: list[str]) -> tuple[int, Any, str]:
        ledger = self._need_ledger()
        tz, now = self.guard.tz, self.guard.clock.now()
        spans = {p: self.guard.tracker.window(p, now) for p in ("day", "week", "month")}
        today = now.astimezone(tz).date()
        lo = min(w.start.timestamp() for w in spans.values())
        hi = day_bounds(today, today, tz)[1]
        month_lo = spans["month"].start.timestamp()
        await ledger.flush_now()
        # Three queries on the reading connection, whatever the number of teams: the page refreshes every few s.
        buckets = await ledger.read(lambda st: st.cost_series(lo, hi, SERIES_STEP_S, "team"))
        by_app = await ledger.read(lambda st: st.aggregate(month_lo, hi, ["team", "app"]))
        by_model = await ledger.read(lambda st: st.aggregate(month_lo, hi, ["provider", "model"]))
        totals: dict[str, dict[str, int]] = {}
        for b, team_name, pusd, _ in buckets:
            for period, w in spans.items():
                if b * SERIES_STEP_S >= w.start.timestamp():
                    per = totals.setdefault(str(team_name), {})
                    per[period] = per.get(period, 0) + pusd
        forecasts = {r["team"]: r["forecast_usd"] for r in self.guard.spend_rows("month") if r["app"] is None}
        budgets = {
            b["team"]: b
            for b in self.guard.status()
            if b["period"] == "month" and b["team"] and b["scope"] == b["team"]  # the team's own budget
        }
        teams = []
        for team in sorted(set(totals) | set(budgets)):
            spent = {period: float(from_pusd(pusd)) for period, pusd in totals.get(team, {}).items()}
            budget = budgets.get(team)
            teams.append(
                {
                    "team": team,
                    "today_usd": spent.get("day", 0.0),
                    "week_usd": spent.get("week", 0.0),
                    "month_usd": spent.get("month", 0.0),
                    "forecast_month_usd": max(forecasts.get(team, 0.0), spent.get("month", 0.0)),
                    "budget_month_usd": budget["limit_usd"] if budget else None,
                    "budget_action": budget["action"] if budget else None,
                }
            )

        def top(aggregates: list[Aggregate], dims: tuple[str, ...]) -> list[dict[str, Any]]:
            best = sorted(aggregates, key=lambda a: -a.cost_pusd)[:10]
            return [
                {
                    **dict(zip(dims, a.group, strict=True)),
                    "cost_usd": float(from_pusd(a.cost_pusd)),
                    "requests": a.requests,
                }
                for a in best
            ]

        traffic = self.meter.traffic() if self.meter is not None else {}
        return (
            200,
            {
                "timezone": str(tz),
                "now": now.astimezone(tz).isoformat(timespec="seconds"),
                "periods": {p: {"from": w.start.date().isoformat(), "to": today.isoformat()} for p, w in spans.items()},
                "teams": teams,
                "top_models": top(by_model, ("provider", "model")),
                "top_apps": top(by_app, ("team", "app")),
                "traffic": {**traffic, "source": "this replica's counters since it started (as /metrics)"},
                "tag_keys": list(self.guard.config.attribution.tags),
            },
            "application/json",
        )

    async def _series(self, params: dict[str, str], body: bytes, args: list[str]) -> tuple[int, Any, str]:
        ledger = self._need_ledger()
        start, end = _dates(params, self.guard.tz)
        bucket = params.get("bucket", "day")
        if bucket not in ("hour", "day"):
            raise ValueError("bucket must be hour or day")
        if (end - start).days > (14 if bucket == "hour" else 400):
            raise ValueError("at most 15 days by the hour, 401 by the day")
        by = params.get("by", "team")
        tz = self.guard.tz
        lo, hi = day_bounds(start, end, tz)
        filters = report_filters(params)
        rows = await ledger.read(lambda st: st.cost_series(lo, hi, SERIES_STEP_S, by, filters))

        def fold(step: int) -> float:
            """The local hour or day a quarter hour belongs to (a repeated hour on a fall-back day stays apart)."""
            hour = datetime.fromtimestamp(step * SERIES_STEP_S, tz).replace(minute=0, second=0)
            return (hour if bucket == "hour" else hour.replace(hour=0)).timestamp()

        points: dict[tuple[float, str | None], list[int]] = {}
        for b, group, pusd, n in rows:
            point = points.setdefault((fold(b), group), [0, 0])
            point[0] += pusd
            point[1] += n
        out = [
            {
                "t": datetime.fromtimestamp(ts, tz).isoformat(timespec="minutes"),
                "ts": int(ts),
                by: group,
                "cost_usd": float(from_pusd(pusd)),
                "requests": n,
            }
            for (ts, group), (pusd, n) in sorted(points.items(), key=lambda kv: (kv[0][0], kv[0][1] or ""))
        ]
        # Every bucket of the range, so that a chart shows the days (or hours) without spend as zero; folded the same
        # way as the points, so clock changes neither drop nor repeat an hour.
        first, last = int(lo) // SERIES_STEP_S, int(hi) // SERIES_STEP_S
        starts = sorted({int(fold(step)) for step in range(first, last)})
        return (
            200,
            {"bucket": bucket, "by": by, "timezone": str(tz), "buckets": starts, "points": out},
            "application/json",
        )

    async def _requests(self, params: dict[str, str], body: bytes, args: list[str]) -> tuple[int, Any, str]:
        ledger = self._need_ledger()
        try:
            limit = int(params.get("limit", "100"))
        except ValueError:
            raise ValueError("limit must be a whole number") from None
        if not 1 <= limit <= 1000:
            raise ValueError("limit must be between 1 and 1000")
        status = params.get("status", "")
        if status not in ("", "ok", "error"):
            raise ValueError("status must be ok or error")
        tz = self.guard.tz
        if "from" in params or "to" in params:
            lo, hi = day_bounds(*_dates(params, self.guard.tz), tz)
        else:
            hi = self.guard.clock.time() + 60
            lo = hi - 7 * 86400  # the last week unless dates say otherwise: the newest rows are the point
        filters = {d: params[d] for d in ("team", "app", "model", "provider") if params.get(d)}
        filters |= report_filters({"tag": params["tag"]}) if params.get("tag") else {}
        failed = {"": None, "ok": False, "error": True}[status]
        rows = await ledger.read(lambda st: st.recent(lo, hi, limit, filters, failed))
        out = []
        for r in rows:
            cost = r.pop("cost_pusd")
            r["time"] = datetime.fromtimestamp(r["started_at"], tz).isoformat(timespec="seconds")
            r["cost_usd"] = float(from_pusd(cost))
            r["stream"], r["priced"] = bool(r["stream"]), bool(r["priced"])
            r["user"] = r.pop("end_user")
            out.append(r)
        return 200, out, "application/json"


def adjustment_info(a: Adjustment) -> AdjustmentInfo:
    return AdjustmentInfo(
        id=a.id,
        kind=a.kind,  # type: ignore[arg-type]
        budget=a.counter,
        period_start=a.period_start,
        limit_usd=None if a.limit_usd is None else float(a.limit_usd),
        until=a.until,
        set_aside_usd=None if a.offset_pusd is None else float(from_pusd(a.offset_pusd)),
        created_at=a.created_at,
        created_by=a.created_by,
        reason=a.reason,
        ended_at=a.ended_at,
    )


def report_filters(params: dict[str, str]) -> dict[str, str]:
    """The `team=` and `tag=KEY=VALUE` query parameters as report filters."""
    filters = {"team": params["team"]} if params.get("team") else {}
    if params.get("tag"):
        filters.update(parse_tag_filter(params["tag"]))
    return filters


def _format(params: dict[str, str], *allowed: str) -> str:
    """The `format` parameter; the first allowed one when absent, and an error when it is none of them."""
    fmt = params.get("format", allowed[0])
    if fmt not in allowed:
        raise ValueError(f"format must be {' or '.join(allowed)}, got {fmt!r}")
    return fmt


def new_key(
    team: str, app: str, name: str = "", tags: dict[str, str] | None = None, include_cost: bool = False
) -> tuple[str, ApiKey]:
    key = "mg-" + secrets.token_urlsafe(32)
    record = ApiKey(
        id="key_" + secrets.token_hex(6),
        sha256=hash_key(key),
        team=team,
        app=app,
        name=name,
        created_at=time.time(),
        revoked_at=None,
        tags=tuple(sorted((tags or {}).items())),
        include_cost=include_cost,
    )
    return key, record


def _key_info(k: ApiKey) -> KeyInfo:
    return KeyInfo(
        id=k.id,
        team=k.team,
        app=k.app,
        name=k.name,
        sha256_prefix=k.sha256[:12],
        created_at=k.created_at,
        revoked_at=k.revoked_at,
        tags=dict(k.tags),
        include_cost=k.include_cost,
    )


def _dates(params: dict[str, str], tz: ZoneInfo | None = None) -> tuple[date, date]:
    today = datetime.now(tz).date()
    start = parse_day(params["from"]) if "from" in params else today.replace(day=1)
    end = parse_day(params["to"]) if "to" in params else today
    return start, end


def _match(pattern: str, path: str) -> list[str] | None:
    want, got = pattern.split("/"), path.split("/")
    if len(want) != len(got):
        return None
    args = []
    for w, g in zip(want, got, strict=True):
        if w.startswith("{"):
            if not g:
                return None
            args.append(g)
        elif w != g:
            return None
    return args


def _error(status: int, message: str) -> tuple[int, bytes, str]:
    return status, orjson.dumps({"error": {"message": message}}), "application/json"


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return float(value)
    raise TypeError(type(value).__name__)


def openapi_schema() -> dict[str, Any]:
    """The admin API's OpenAPI 3.1 document, built from the pydantic models above."""
    models = {
        m.__name__: m
        for m in (
            KeyCreate,
            KeyInfo,
            KeyCreated,
            BudgetStatus,
            OverrideCreate,
            ResetCreate,
            AdjustmentInfo,
            SpendRow,
            ReportRow,
            ErrorBody,
        )
    }
    schemas: dict[str, Any] = {}
    for name, model in models.items():
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[name] = schema

    def ref(name: str) -> dict[str, str]:
        return {"$ref": f"#/components/schemas/{name}"}

    def array(name: str) -> dict[str, Any]:
        return {"type": "array", "items": ref(name)}

    def ok(schema: dict[str, Any], status: str = "200", media: str = "application/json") -> dict[str, Any]:
        errors = {
            str(code): {"description": text, "content": {"application/json": {"schema": ref("ErrorBody")}}}
            for code, text in ((400, "bad request"), (401, "wrong admin token"), (503, "ledger unavailable"))
        }
        return {status: {"description": "OK", "content": {media: {"schema": schema}}}, **errors}

    date_param = [
        {"name": "from", "in": "query", "schema": {"type": "string", "format": "date"}},
        {"name": "to", "in": "query", "schema": {"type": "string", "format": "date"}, "description": "inclusive"},
    ]
    filter_params = [
        {"name": "team", "in": "query", "schema": {"type": "string"}},
        {"name": "tag", "in": "query", "schema": {"type": "string"}, "example": "customer=acme"},
    ]
    paths = {
        "/admin/keys": {
            "get": {"summary": "List keys (hash prefixes only)", "responses": ok(array("KeyInfo"))},
            "post": {
                "summary": "Create a key; the key is returned once",
                "requestBody": {"required": True, "content": {"application/json": {"schema": ref("KeyCreate")}}},
                "responses": ok(ref("KeyCreated"), "201"),
            },
        },
        "/admin/keys/{id}": {
            "delete": {
                "summary": "Revoke a key",
                "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {**ok({"type": "object"}), "404": {"description": "no such active key"}},
            }
        },
        "/admin/budgets": {
            "get": {"summary": "Budgets with spend, reservations, forecast", "responses": ok(array("BudgetStatus"))}
        },
        "/admin/budgets/adjustments": {
            "get": {"summary": "Overrides and resets of the last 400 days", "responses": ok(array("AdjustmentInfo"))}
        },
        "/admin/budgets/overrides": {
            "post": {
                "summary": "Override a budget's limit until a time (recorded in the ledger: who, when, why)",
                "requestBody": {"required": True, "content": {"application/json": {"schema": ref("OverrideCreate")}}},
                "responses": ok(ref("AdjustmentInfo"), "201"),
            }
        },
        "/admin/budgets/overrides/{id}": {
            "delete": {
                "summary": "End an override before its time",
                "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {**ok({"type": "object"}), "404": {"description": "no such active override"}},
            }
        },
        "/admin/budgets/resets": {
            "post": {
                "summary": "Reset a budget's spend for the rest of its current period (recorded in the ledger)",
                "requestBody": {"required": True, "content": {"application/json": {"schema": ref("ResetCreate")}}},
                "responses": ok(ref("AdjustmentInfo"), "201"),
            }
        },
        "/admin/spend": {
            "get": {
                "summary": "Spend and forecast per team and budget scope in the current period",
                "parameters": [{"name": "period", "in": "query", "schema": {"enum": list(PERIODS)}}],
                "responses": ok(array("SpendRow")),
            }
        },
        "/admin/reports": {
            "get": {
                "summary": "Totals from the ledger",
                "parameters": [
                    *date_param,
                    {
                        "name": "by",
                        "in": "query",
                        "schema": {"type": "string"},
                        "example": "team,user,tag.customer",
                        "description": "team, app, model, provider, endpoint, key_id, upstream_model, user, tag.<key>",
                    },
                    *filter_params,
                    {"name": "format", "in": "query", "schema": {"enum": ["json", "csv"]}},
                ],
                "responses": ok(array("ReportRow")),
            }
        },
        "/admin/reports/chargeback": {
            "get": {
                "summary": "A team's or a tag's (customer=acme) monthly chargeback statement; team, tag or both",
                "parameters": [
                    *filter_params,
                    {"name": "month", "in": "query", "schema": {"type": "string", "pattern": r"^\d{4}-\d{2}$"}},
                    {"name": "format", "in": "query", "schema": {"enum": ["markdown", "csv"]}},
                ],
                "responses": ok({"type": "string"}, media="text/markdown"),
            }
        },
    }
    paths["/admin/overview"] = {
        "get": {
            "summary": "Spend today, this week and month to date per team with forecast and budget; top models "
            "and apps; this replica's error rate and latency quantiles (the console's overview)",
            "responses": ok({"type": "object"}),
        }
    }
    paths["/admin/series"] = {
        "get": {
            "summary": "Spend per local hour or day and per team, app or model: the points of a chart",
            "parameters": [
                *date_param,
                {"name": "bucket", "in": "query", "schema": {"enum": ["hour", "day"]}},
                {"name": "by", "in": "query", "schema": {"type": "string"}, "example": "app"},
                *filter_params,
            ],
            "responses": ok({"type": "object"}),
        }
    }
    paths["/admin/requests"] = {
        "get": {
            "summary": "The latest ledger rows, newest first",
            "parameters": [
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                *date_param,
                *filter_params,
                *({"name": d, "in": "query", "schema": {"type": "string"}} for d in ("app", "model", "provider")),
                {"name": "status", "in": "query", "schema": {"enum": ["ok", "error"]}},
            ],
            "responses": ok({"type": "array", "items": {"type": "object"}}),
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "metergate admin API", "version": __version__},
        "components": {
            "schemas": schemas,
            "securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"adminToken": []}],
        "paths": paths,
    }
