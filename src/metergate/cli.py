"""The `metergate` command line."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from metergate.config import Config, ConfigError, load_config
from metergate.ledger import ApiKey, Ledger, LedgerError, redact_url, sqlite_path
from metergate.periods import PERIODS, parse_day
from metergate.usage import from_pusd

T = TypeVar("T")

app = typer.Typer(
    name="metergate",
    help="An LLM gateway that meters every token: attribution, pricing and Prometheus metrics.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Config values are printed as text, never as rich markup ("[hs]" in a glob is not a style), and laid out wide
# when the output is not a terminal, so a piped report keeps whole values on one line.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)

ConfigPath = Annotated[Path, typer.Option("--config", "-c", help="The gateway's YAML config file.")]


def _setup_logging(level: str) -> None:
    from metergate.logs import setup_logging

    try:
        setup_logging(level)
    except ValueError as exc:
        raise _fail("invalid --log-level", exc) from None


def _fail(title: str, detail: object) -> typer.Exit:
    print(f"{title}\n{detail}", file=sys.stderr)
    return typer.Exit(1)


def _emit(text: str, output: Path | None) -> None:
    """A command's document to --output, or to stdout."""
    if output is None:
        sys.stdout.write(text)
        return
    try:
        output.write_text(text)
    except OSError as exc:
        raise _fail("cannot write --output", f"{output}: {exc.strerror}") from None


def _table(title: str, *columns: str) -> Table:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def _row(table: Table, *cells: object) -> None:
    table.add_row(*(Text(str(c)) for c in cells))


def _load(path: Path) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        raise _fail("invalid config", exc) from None


@app.command()
def serve(
    config: ConfigPath,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run the gateway: the LLM API on server.listen and /metrics on server.metrics_listen."""
    from metergate.server import ListenError, build_runtime, run
    from metergate.server import serve as serve_runtime

    _setup_logging(log_level)
    cfg = _load(config)
    try:
        runtime = build_runtime(cfg)
        run(serve_runtime(runtime))
    except (ConfigError, ListenError) as exc:
        raise _fail("cannot start", exc) from None


def _print_modelless_routes(cfg: Config) -> None:
    """Where calls that name no model (files, batches, model lists...) go, per API: `path:` routes first, then
    the first provider speaking that API."""
    from metergate.providers import build_upstream
    from metergate.routing import Router

    upstreams = {name: build_upstream(name, p) for name, p in cfg.providers.items()}
    router = Router(cfg.routes, upstreams)
    table = _table("Calls naming no model (files, batches, model lists...)", "API", "path", "provider")
    for route in cfg.routes:
        if route.path is not None:
            _row(table, upstreams[route.provider].family, route.path, route.provider)
    for family, upstream in router.default_providers().items():
        _row(table, family, "(any other path)", upstream.name if upstream else "none: such calls get a 404")
    console.print(table)


@app.command("check-config")
def check_config(path: Annotated[Path, typer.Argument(help="The YAML config file to check.")]) -> None:
    """Validate a config and print what it means: listeners, providers, routes, teams, budgets."""
    cfg = _load(path)
    console.print(Text(f"{path}: valid", style="bold green"))
    console.print(Text(f"LLM API on {cfg.server.listen}, Prometheus metrics on {cfg.server.metrics_listen}/metrics"))
    providers = _table("Providers", "provider", "type", "base_url", "credential", "priced as")
    for name, p in cfg.providers.items():
        credential = f"${p.api_key_env}" if p.api_key_env else "(none)"
        _row(providers, name, p.type, p.base_url, credential, p.pricing_provider_id or "config prices only")
    console.print(providers)
    routes = _table("Routes (first match wins)", "#", "matches", "provider", "sent upstream as")
    for i, r in enumerate(cfg.routes, 1):
        matches = f"model {r.model}" if r.model is not None else f"path {r.path}"
        _row(routes, i, matches, r.provider, r.upstream_model or "(as requested)")
    console.print(routes)
    _print_modelless_routes(cfg)
    teams: dict[str, set[str]] = {}
    for k in cfg.keys:
        teams.setdefault(k.team, set()).add(k.app)
    for t in cfg.teams:
        teams.setdefault(t.name, set()).update(t.apps)
    team_table = _table("Teams", "team", "apps", "keys")
    for team, apps in sorted(teams.items()):
        _row(team_table, team, ", ".join(sorted(apps)), sum(1 for k in cfg.keys if k.team == team))
    console.print(team_table)
    if cfg.budgets:
        budgets = _table("Budgets", "scope", "period", "limit (USD)", "action", "warn at", "max per request (USD)")
        for b in cfg.budgets:
            _row(
                budgets,
                b.scope,
                b.period or "",
                f"{b.limit_usd:,.2f}" if b.limit_usd is not None else "",
                b.action if b.limit_usd is not None else "block",
                f"{b.warn_at:.0%}" if b.limit_usd is not None else "",
                f"{b.max_request_usd:,.4f}" if b.max_request_usd is not None else "",
            )
        console.print(budgets)
    if cfg.rate_limits:
        shared = f"shared through {redact_url(cfg.shared_state.redis_url)}" if cfg.shared_state else "per process"
        limits = _table(f"Rate limits ({shared})", "scope", "requests/min", "tokens/min")
        for rl in cfg.rate_limits:
            rpm, tpm = rl.requests_per_minute, rl.tokens_per_minute
            _row(limits, rl.scope, f"{rpm:,}" if rpm else "", f"{tpm:,}" if tpm else "")
        console.print(limits)
    if cfg.attribution.tags:
        console.print(Text(f"Attribution tags accepted from x-metergate-tags: {', '.join(cfg.attribution.tags)}"))
    _print_pricing(cfg)
    if cfg.prices:
        prices = _table("Price overrides", "model", "provider", "input $/Mtok", "output $/Mtok")
        for pr in cfg.prices:
            _row(prices, pr.model, pr.provider or "any", pr.input_mtok, pr.output_mtok)
        console.print(prices)
    if cfg.reconcile:
        reconcile = _table("Reconciled with the provider's bill", "provider", "admin key", "gateway keys", "serve")
        for name, rc in cfg.reconcile.items():
            every = f"every {rc.every_s:g} s, last {rc.lookback_days} finished days" if rc.every_s else "CLI only"
            ids = ", ".join(rc.api_key_ids) or "found from the key's redacted form"
            _row(reconcile, name, f"${rc.admin_key_env}", ids, every)
        console.print(reconcile)
    if cfg.server.trusted_headers:
        console.print(Text("trusted headers on: x-metergate-team / x-metergate-app attribute requests without a key"))
    for warning in cfg.missing_secrets():
        console.print(Text(f"warning: {warning} (serve will refuse to start)", style="yellow"))


@app.command()
def demo(
    listen: Annotated[str, typer.Option(help="Where the demo gateway serves the LLM API.")] = "127.0.0.1:8080",
    metrics_listen: Annotated[str, typer.Option(help="Where the demo serves /metrics.")] = "127.0.0.1:9102",
    rate: Annotated[float, typer.Option(help="Synthetic requests per second.")] = 8.0,
    duration: Annotated[float, typer.Option(help="Stop after this many seconds (0: run until Ctrl+C).")] = 0.0,
) -> None:
    """No config, no API key: the gateway, simulated providers and synthetic traffic from several teams."""
    from metergate.config import parse_hostport
    from metergate.demo import run_demo
    from metergate.server import ListenError

    for option, value in (("--listen", listen), ("--metrics-listen", metrics_listen)):
        try:
            parse_hostport(value)
        except ValueError as exc:
            raise _fail(f"invalid {option}", exc) from None
    if parse_hostport(listen) == parse_hostport(metrics_listen):
        raise _fail("invalid --metrics-listen", "it must differ from --listen (two listeners)")
    if not (0 < rate <= 10_000):
        raise _fail("invalid --rate", f"expected requests per second above 0 and at most 10000, got {rate:g}")
    if not (0 <= duration <= 365 * 86400):
        raise _fail("invalid --duration", f"expected seconds, 0 (run until Ctrl+C) or more, got {duration:g}")
    _setup_logging("warning")
    try:
        run_demo(listen=listen, metrics_listen=metrics_listen, rate=rate, duration=duration, console=console)
    except ListenError as exc:
        raise _fail("cannot start", exc) from None


def _print_pricing(cfg: Config) -> None:
    """Which routed models metergate can price, and which of their modifiers and units it cannot: what would be
    counted in llm_unpriced_requests_total, known before traffic arrives."""
    from metergate.pricing import PriceBook, coverage
    from metergate.providers import build_upstream

    book = PriceBook(cfg.prices)
    table = _table("Pricing (routes naming a model)", "model", "provider", "priced as", "no price for")
    unpriced = []
    for route in cfg.routes:
        if route.model is None:
            continue
        upstream = build_upstream(route.provider, cfg.providers[route.provider])
        if route.is_glob:
            matched = sum(route.matches(m) for m in book.catalogue_models(upstream.config.pricing_provider_id))
            note = f"glob: {matched} catalogue models match; others need a prices: entry"
            _row(table, route.model, route.provider, note, "")
            continue
        model = upstream.pricing_model(route.upstream_model or route.model)
        cov = coverage(book, upstream.family, route.provider, upstream.config.pricing_provider_id, model)
        if not cov.priced:
            unpriced.append(f"{model} ({route.provider})")
        _row(table, model, route.provider, cov.priced_as or "UNPRICED", ", ".join(cov.unpriced))
    console.print(table)
    for model in unpriced:
        console.print(
            Text(f"warning: {model} has no price: add a prices: entry, or its spend is not counted", style="yellow")
        )


keys_app = typer.Typer(
    help="Virtual keys stored in the ledger database (only their sha256 is kept).", no_args_is_help=True
)
app.add_typer(keys_app, name="keys")


def _ledger(cfg: Config) -> Ledger:
    if cfg.ledger is None:
        raise _fail("no ledger", "this command needs `ledger: {url: ...}` in the config")
    path = sqlite_path(cfg.ledger.url)
    if path is not None and not path.exists():
        # A relative path is read from the working directory: a new, empty ledger here is almost always the
        # wrong directory (and a key stored in it would never reach the gateway).
        raise _fail(
            "no ledger database",
            f"{path.resolve()} does not exist. Run this command where the gateway runs (a relative sqlite:/// path "
            "is relative to the working directory), or use an absolute path: sqlite:////var/lib/metergate/x.db",
        )
    return Ledger(cfg.ledger, replica="cli")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except LedgerError as exc:
        raise _fail("ledger error", exc) from None


async def _with_ledger(cfg: Config, work: Callable[[Ledger], Awaitable[T]]) -> T:
    ledger = _ledger(cfg)
    try:
        await ledger.store()
        return await work(ledger)
    finally:
        await ledger.stop()


@keys_app.command("create")
def keys_create(
    config: ConfigPath,
    team: Annotated[str, typer.Option(help="The team the key's traffic is attributed to.")],
    app_name: Annotated[str, typer.Option("--app", help="The app the key's traffic is attributed to.")],
    name: Annotated[str, typer.Option(help="A note to recognise the key by.")] = "",
    tag: Annotated[
        list[str] | None,
        typer.Option(help="A tag every request of the key carries, KEY=VALUE (repeat for more); see attribution.tags."),
    ] = None,
    include_cost: Annotated[
        bool, typer.Option("--include-cost", help="Every response to the key carries its cost in its usage.")
    ] = False,
) -> None:
    """Create a key and print it once; only its hash is stored. Running gateways pick it up within seconds."""
    from pydantic import ValidationError

    from metergate.admin import KeyCreate, explain_invalid, new_key
    from metergate.attribution import unlisted_tag

    cfg = _load(config)
    try:
        tags = _tags(tag)
    except ValueError as exc:
        raise _fail("invalid key", exc) from None
    try:
        request = KeyCreate(team=team, app=app_name, name=name, tags=tags, include_cost=include_cost)
    except ValidationError as exc:
        raise _fail("invalid key", explain_invalid(exc)) from None
    problem = unlisted_tag(request.tags, cfg.attribution.tags)
    if problem:
        raise _fail("invalid key", problem)
    key, record = new_key(team, app_name, name, request.tags, include_cost)

    async def work(ledger: Ledger) -> None:
        store = await ledger.store()
        await ledger.call(store.add_key, record)

    _run(_with_ledger(cfg, work))
    console.print(Text(f"key {record.id} for team {team}, app {app_name} (shown once, store it now):"))
    print(key)


@keys_app.command("list")
def keys_list(config: ConfigPath) -> None:
    """Keys in the ledger database and the config's keys (hash prefixes only)."""
    cfg = _load(config)

    async def work(ledger: Ledger) -> list[ApiKey]:
        store = await ledger.store()
        return await ledger.call(store.keys, True)

    table = _table("Keys", "id", "team", "app", "name", "tags", "sha256", "created", "status")
    for k in cfg.keys:
        _row(table, k.key_id, k.team, k.app, "(config)", _tags_cell(k.tags.items()), k.sha256[:12], "", "active")
    if cfg.ledger is not None:
        for key in _run(_with_ledger(cfg, work)):
            created = datetime.fromtimestamp(key.created_at).strftime("%Y-%m-%d %H:%M")
            status = "revoked" if key.revoked_at else "active"
            _row(table, key.id, key.team, key.app, key.name, _tags_cell(key.tags), key.sha256[:12], created, status)
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(config: ConfigPath, key_id: Annotated[str, typer.Argument(help="The key's id (keys list).")]) -> None:
    """Revoke a key: running gateways refuse it within seconds."""
    cfg = _load(config)

    async def work(ledger: Ledger) -> bool:
        store = await ledger.store()
        return await ledger.call(store.revoke_key, key_id)

    if not _run(_with_ledger(cfg, work)):
        raise _fail("not revoked", f"no active key {key_id} in the ledger (config keys are removed from the config)")
    console.print(Text(f"revoked {key_id}"))


budgets_app = typer.Typer(
    help="Override a budget's limit until a time, or reset its spend for the rest of the period (kept in the "
    "ledger with who and when; running gateways apply them within 15 s).",
    no_args_is_help=True,
)
app.add_typer(budgets_app, name="budgets")

BudgetOpt = Annotated[str | None, typer.Option("--budget", help="The budget's id, as `budgets list` shows it.")]
TeamOpt = Annotated[str | None, typer.Option(help="Scope: the budget's team.")]
AppOpt = Annotated[str | None, typer.Option("--app", help="Scope: the budget's app.")]
KeyOpt = Annotated[str | None, typer.Option("--key", help="Scope: the budget's key id.")]
UserOpt = Annotated[str | None, typer.Option(help="Scope: the budget's user (one user of a per-user budget).")]
TagOpt = Annotated[list[str] | None, typer.Option("--tag", help="Scope: a tag of the budget, KEY=VALUE.")]
ModelOpt = Annotated[str | None, typer.Option(help="Scope: the budget's model (as in the config).")]
ProviderOpt = Annotated[str | None, typer.Option(help="Scope: the budget's provider.")]
PeriodOpt = Annotated[str | None, typer.Option(help="The budget's period: day, week, month, quarter, year.")]
ByOpt = Annotated[str | None, typer.Option("--by", help="Who asks, for the record (default: $USER).")]
ReasonOpt = Annotated[str, typer.Option(help="Why, for the record.")]


def _budget_counter(guard: Any, budget: str | None, scope: dict[str, Any]) -> str:
    if budget:
        return str(guard.resolve(budget)[1])
    period = scope.pop("period")
    if not period:
        raise ValueError("give --budget ID, or the budget's scope (--team, --user, --tag...) and --period")
    return str(guard.find(period, tags=_tags(scope.pop("tag")), **scope))


def _tags(items: list[str] | None) -> dict[str, str]:
    """Repeated `--tag KEY=VALUE` options as a mapping."""
    tags: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--tag {item!r}: expected KEY=VALUE")
        tags[key.strip()] = value.strip()
    return tags


async def _synced_guard(cfg: Config, ledger: Ledger) -> Any:
    """Budgets as a running gateway sees them: spend, forecasts, overrides and resets read from the ledger."""
    from metergate.budgets import BudgetGuard
    from metergate.pricing import PriceBook

    guard = BudgetGuard(cfg, PriceBook(cfg.prices), ledger)
    await guard.sync()
    return guard


def _adjust_budget(config: Path, budget: str | None, scope: dict[str, Any], **adjustment: Any) -> Any:
    import getpass

    cfg = _load(config)
    if cfg.ledger is None:
        raise _fail("no ledger", "budget overrides and resets are kept in the ledger: configure ledger:")
    by = adjustment.pop("by") or os.environ.get("USER") or getpass.getuser() or "cli"

    async def work(ledger: Ledger) -> Any:
        guard = await _synced_guard(cfg, ledger)
        counter = _budget_counter(guard, budget, scope)
        return await guard.adjust(counter=counter, by=by, **adjustment)

    try:
        return _run(_with_ledger(cfg, work))
    except ValueError as exc:
        raise _fail("not done", exc) from None


@budgets_app.command("override")
def budgets_override(
    config: ConfigPath,
    limit_usd: Annotated[float, typer.Option("--limit-usd", help="The limit while the override lasts.")],
    until: Annotated[str, typer.Option(help="When it ends: 2026-11-30T18:00 (server.timezone) or with an offset.")],
    budget: BudgetOpt = None,
    team: TeamOpt = None,
    app_name: AppOpt = None,
    key: KeyOpt = None,
    user: UserOpt = None,
    tag: TagOpt = None,
    model: ModelOpt = None,
    provider: ProviderOpt = None,
    period: PeriodOpt = None,
    reason: ReasonOpt = "",
    by: ByOpt = None,
) -> None:
    """Give a budget another limit until a time; the configured one comes back after it."""
    cfg = _load(config)
    try:
        ends = datetime.fromisoformat(until)
    except ValueError:
        raise _fail("invalid --until", f"expected a date and time like 2026-11-30T18:00, got {until!r}") from None
    if ends.tzinfo is None:
        ends = ends.replace(tzinfo=cfg.timezone())
    if not 0 < limit_usd <= 1e12:
        raise _fail("invalid --limit-usd", "must be above 0 and at most 1e12")
    scope = {"team": team, "app": app_name, "key": key, "user": user, "tag": tag, "model": model}
    scope |= {"provider": provider, "period": period}
    made = _adjust_budget(
        config,
        budget,
        scope,
        kind="override",
        limit_usd=Decimal(str(limit_usd)),
        until=ends.timestamp(),
        reason=reason,
        by=by,
    )
    console.print(Text(f"override {made.id}: {made.counter} at ${limit_usd:,.2f} until {ends.isoformat()}"))


@budgets_app.command("reset")
def budgets_reset(
    config: ConfigPath,
    budget: BudgetOpt = None,
    team: TeamOpt = None,
    app_name: AppOpt = None,
    key: KeyOpt = None,
    user: UserOpt = None,
    tag: TagOpt = None,
    model: ModelOpt = None,
    provider: ProviderOpt = None,
    period: PeriodOpt = None,
    reason: ReasonOpt = "",
    by: ByOpt = None,
) -> None:
    """Set aside what a budget has spent so far in its current period: it counts from zero until the period ends."""
    scope = {"team": team, "app": app_name, "key": key, "user": user, "tag": tag, "model": model}
    scope |= {"provider": provider, "period": period}
    made = _adjust_budget(config, budget, scope, kind="reset", reason=reason, by=by)
    console.print(Text(f"reset {made.id}: {made.counter}, ${from_pusd(made.offset_pusd or 0):,.4f} set aside"))


@budgets_app.command("list")
def budgets_list(config: ConfigPath) -> None:
    """Every budget with its limit in force, spend, override or reset, and reset time."""
    cfg = _load(config)

    async def work(ledger: Ledger) -> list[dict[str, Any]]:
        return list((await _synced_guard(cfg, ledger)).status())

    rows = _run(_with_ledger(cfg, work)) if cfg.ledger is not None else []
    table = _table("Budgets", "id", "period", "limit (USD)", "spent (USD)", "override", "reset", "resets at")
    for r in rows:
        override = r["override"]
        _row(
            table,
            r["id"],
            r["period"],
            f"{r['limit_usd']:,.2f}",
            f"{r['spent_usd']:,.4f}",
            f"{override['id']} until {datetime.fromtimestamp(override['until'], cfg.timezone()):%Y-%m-%d %H:%M}"
            if override
            else "",
            f"{r['reset']['id']} by {r['reset']['by']}" if r["reset"] else "",
            r["resets_at"],
        )
    console.print(table)


Format = Literal["table", "csv", "json"]


@app.command()
def report(
    config: ConfigPath,
    start: Annotated[str, typer.Option("--from", help="First day, e.g. 2026-11-01.")],
    end: Annotated[str, typer.Option("--to", help="Last day, inclusive.")],
    by: Annotated[
        str,
        typer.Option(help="Group by: team, app, model, provider, endpoint, key_id, upstream_model, user, tag.<key>."),
    ] = "team,app,model",
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
    team: Annotated[str | None, typer.Option(help="Only this team's records.")] = None,
    tag: Annotated[str | None, typer.Option(help="Only records with this tag, KEY=VALUE (customer=acme).")] = None,
) -> None:
    """Usage and cost from the ledger over a date range, in the config's timezone."""
    from metergate.reports import ROW_FIELDS, build_report, parse_tag_filter, to_csv, to_json, units_cell

    cfg = _load(config)
    if fmt not in ("table", "csv", "json"):
        raise _fail("invalid --format", "choose table, csv or json")
    try:
        first, last = parse_day(start), parse_day(end)
        dims = [d.strip() for d in by.split(",") if d.strip()]
        if not dims:
            raise ValueError("--by needs at least one of team, app, model, provider, endpoint, key_id, user, tag.<key>")
        filters = ({"team": team} if team else {}) | (parse_tag_filter(tag) if tag else {})
        result = _run(
            _with_ledger(cfg, lambda ledger: build_report(ledger, first, last, dims, cfg.timezone(), filters))
        )
    except ValueError as exc:
        raise _fail("invalid report", exc) from None
    if fmt == "json":
        sys.stdout.write(to_json(result).decode() + "\n")
    elif fmt == "csv":
        sys.stdout.write(to_csv(result))
    else:
        table = _table(f"Usage {first} to {last} ({cfg.server.timezone})", *dims, *ROW_FIELDS, "units")
        for row in result.rows:
            _row(
                table,
                *(row[d] if row[d] is not None else "(none)" for d in dims),
                *(_fmt(row[f]) for f in ROW_FIELDS),
                units_cell(row),
            )
        totals = result.totals
        _row(table, "TOTAL", *([""] * (len(dims) - 1)), *(_fmt(totals[f]) for f in ROW_FIELDS), units_cell(totals))
        console.print(table)


@app.command()
def chargeback(
    config: ConfigPath,
    month: Annotated[str, typer.Option(help="The month, e.g. 2026-11.")],
    team: Annotated[str | None, typer.Option(help="The team to bill.")] = None,
    tag: Annotated[str | None, typer.Option(help="The tag to bill, KEY=VALUE (customer=acme).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="markdown or csv.")] = "markdown",
    output: Annotated[Path | None, typer.Option(help="Write to this file instead of stdout.")] = None,
) -> None:
    """A monthly chargeback statement for a team (by app and model) or a tag such as a customer (by team, app and
    model; with --team, within that team), from the ledger, in Markdown or CSV."""
    from metergate.reports import (
        build_report,
        chargeback_groups,
        chargeback_markdown,
        month_bounds,
        parse_tag_filter,
        statement_subject,
        to_csv,
    )

    cfg = _load(config)
    if fmt not in ("markdown", "csv"):
        raise _fail("invalid --format", "choose markdown or csv")
    if not team and not tag:
        raise _fail("invalid chargeback", "give --team, --tag KEY=VALUE, or both")
    try:
        first, last = month_bounds(month)
        filters = ({"team": team} if team else {}) | (parse_tag_filter(tag) if tag else {})
        groups = chargeback_groups(filters)
        result = _run(
            _with_ledger(cfg, lambda ledger: build_report(ledger, first, last, groups, cfg.timezone(), filters))
        )
    except ValueError as exc:
        raise _fail("invalid chargeback", exc) from None
    text = to_csv(result) if fmt == "csv" else chargeback_markdown(statement_subject(filters), month, result)
    _emit(text, output)


export_app = typer.Typer(help="The ledger in formats other tools read.", no_args_is_help=True)
app.add_typer(export_app, name="export")


@export_app.command("focus")
def export_focus(
    config: ConfigPath,
    start: Annotated[str, typer.Option("--from", help="First day, e.g. 2026-11-01 (the config's timezone).")],
    end: Annotated[str, typer.Option("--to", help="Last day, inclusive.")],
    output: Annotated[Path, typer.Option(help="The file to write.")],
    fmt: Annotated[str, typer.Option("--format", help="csv or parquet (parquet needs pyarrow).")] = "csv",
) -> None:
    """The ledger as a FOCUS 1.0 dataset (FinOps Open Cost and Usage Specification): one row per day, team, app,
    provider, model, user and tag values, for FinOps tools."""
    from metergate.focus import FOCUS_VERSION, focus_rows, write_csv, write_parquet

    cfg = _load(config)
    if fmt not in ("csv", "parquet"):
        raise _fail("invalid --format", "choose csv or parquet")
    try:
        first, last = parse_day(start), parse_day(end)
        rows = _run(_with_ledger(cfg, lambda ledger: focus_rows(cfg, ledger, first, last)))
        (write_parquet if fmt == "parquet" else write_csv)(rows, output)
    except ValueError as exc:
        raise _fail("invalid export", exc) from None
    except OSError as exc:
        raise _fail("cannot write --output", f"{output}: {exc.strerror}") from None
    if not rows:
        print("warning: no charges in these days: the file has its header only", file=sys.stderr)
    total = sum((r["BilledCost"] for r in rows), Decimal(0))
    print(f"{len(rows)} rows, BilledCost ${total} (FOCUS {FOCUS_VERSION}) written to {output}", file=sys.stderr)


@app.command("reconcile")
def reconcile_cmd(
    config: ConfigPath,
    start: Annotated[str, typer.Option("--from", help="First UTC day, e.g. 2026-11-01.")],
    end: Annotated[str, typer.Option("--to", help="Last UTC day, inclusive.")],
    fmt: Annotated[str, typer.Option("--format", help="markdown, json or csv.")] = "markdown",
    provider: Annotated[
        list[str] | None, typer.Option(help="Only this provider (repeat for more); default: every one in reconcile.")
    ] = None,
    output: Annotated[Path | None, typer.Option(help="Write to this file instead of stdout.")] = None,
) -> None:
    """The ledger checked against each provider's own usage and cost reports (its admin API): one row per UTC day,
    model and provider-side API key, every difference explained. Nothing is printed unless every report was read
    in full."""
    from metergate.pricing import PriceBook
    from metergate.reconcile import ReconcileError
    from metergate.reconcile.bill import day_number
    from metergate.reconcile.formats import to_csv, to_json, to_markdown
    from metergate.reconcile.run import reconcile_provider

    cfg = _load(config)
    if fmt not in ("markdown", "json", "csv"):
        raise _fail("invalid --format", "choose markdown, json or csv")
    names = provider or list(cfg.reconcile)
    if not names:
        raise _fail("nothing to reconcile", "add a reconcile: section naming a provider and its admin key")
    unknown = [n for n in names if n not in cfg.reconcile]
    if unknown:
        raise _fail("invalid --provider", f"{', '.join(unknown)} not in the config's reconcile: section")
    try:
        first, last = day_number(parse_day(start)), day_number(parse_day(end))
        if last < first:
            raise ValueError(f"--to {end} is before --from {start}")
        if last - first > 366:
            raise ValueError("reconcile at most 367 days at a time")
    except ValueError as exc:
        raise _fail("invalid dates", exc) from None
    prices = PriceBook(cfg.prices)

    async def work(ledger: Ledger) -> list[Any]:
        return [await reconcile_provider(cfg, n, ledger, prices, first, last) for n in names]

    try:
        results = _run(_with_ledger(cfg, work))
    except ReconcileError as exc:
        raise _fail("reconciliation failed, no report written", exc) from None
    text = (
        to_json(results).decode() + "\n" if fmt == "json" else to_csv(results) if fmt == "csv" else to_markdown(results)
    )
    _emit(text, output)


@app.command("forecast")
def forecast_cmd(config: ConfigPath) -> None:
    """Spend so far and projected spend at the end of each period, per team and budget scope."""
    cfg = _load(config)

    async def work(ledger: Ledger) -> list[dict[str, Any]]:
        guard = await _synced_guard(cfg, ledger)
        return [row for period in PERIODS for row in guard.spend_rows(period)]

    rows = _run(_with_ledger(cfg, work))
    budgets = {(b.team, b.app or "", b.period): b.limit_usd for b in cfg.budgets if b.simple}
    table = _table("Spend and forecast", "team", "app", "period", "spent (USD)", "forecast (USD)", "budget (USD)")
    for r in rows:
        limit = budgets.get((r["team"], r["app"] or "", r["period"]))
        _row(
            table,
            r["team"],
            r["app"] or "(all)",
            r["period"],
            f"{r['spent_usd']:,.4f}",
            f"{r['forecast_usd']:,.4f}",
            f"{limit:,.2f}" if limit is not None else "",
        )
    console.print(table)


def _tags_cell(tags: Iterable[tuple[str, str]]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(tags))


def _fmt(value: Any) -> str:
    if isinstance(value, Decimal):
        return f"{value:,.6f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def main() -> None:
    app()
