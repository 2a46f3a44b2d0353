"""The `metergate` command line."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from metergate.config import Config, ConfigError, load_config

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
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _fail(title: str, detail: object) -> typer.Exit:
    print(f"{title}\n{detail}", file=sys.stderr)
    return typer.Exit(1)


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
    routes = _table("Routes (first match wins)", "#", "model", "provider", "sent upstream as")
    for i, r in enumerate(cfg.routes, 1):
        _row(routes, i, r.model, r.provider, r.upstream_model or "(as requested)")
    console.print(routes)
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
        budgets = _table("Budgets", "scope", "period", "limit (USD)", "action", "warn at")
        for b in cfg.budgets:
            _row(budgets, b.scope, b.period, f"{b.limit_usd:,.2f}", b.action, f"{b.warn_at:.0%}")
        console.print(budgets)
    if cfg.prices:
        prices = _table("Price overrides", "model", "provider", "input $/Mtok", "output $/Mtok")
        for pr in cfg.prices:
            _row(prices, pr.model, pr.provider or "any", pr.input_mtok, pr.output_mtok)
        console.print(prices)
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
    from metergate.demo import run_demo

    _setup_logging("warning")
    run_demo(listen=listen, metrics_listen=metrics_listen, rate=rate, duration=duration, console=console)


def main() -> None:
    app()
