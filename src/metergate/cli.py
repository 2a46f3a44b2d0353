"""The `metergate` command line."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from metergate.config import Config, ConfigError, load_config

app = typer.Typer(
    name="metergate",
    help="An LLM gateway that meters every token: attribution, pricing and Prometheus metrics.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

ConfigPath = Annotated[Path, typer.Option("--config", "-c", help="The gateway's YAML config file.")]


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _load(path: Path) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        err_console.print(f"[bold red]invalid config[/]\n{exc}")
        raise typer.Exit(1) from None


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
        err_console.print(f"[bold red]cannot start[/]\n{exc}")
        raise typer.Exit(1) from None


@app.command("check-config")
def check_config(path: Annotated[Path, typer.Argument(help="The YAML config file to check.")]) -> None:
    """Validate a config and print what it means: listeners, providers, routes, teams, budgets."""
    cfg = _load(path)
    console.print(f"[bold green]{path}: valid[/]")
    console.print(
        f"LLM API on [bold]{cfg.server.listen}[/], Prometheus metrics on [bold]{cfg.server.metrics_listen}/metrics[/]"
    )
    providers = Table("provider", "type", "base_url", "credential", "priced as", title="Providers")
    for name, p in cfg.providers.items():
        credential = f"${p.api_key_env}" if p.api_key_env else "(none)"
        providers.add_row(name, p.type, p.base_url, credential, p.pricing_provider_id or "config prices only")
    console.print(providers)
    routes = Table("#", "model", "provider", "sent upstream as", title="Routes (first match wins)")
    for i, r in enumerate(cfg.routes, 1):
        routes.add_row(str(i), r.model, r.provider, r.upstream_model or "(as requested)")
    console.print(routes)
    teams: dict[str, set[str]] = {}
    for k in cfg.keys:
        teams.setdefault(k.team, set()).add(k.app)
    for t in cfg.teams:
        teams.setdefault(t.name, set()).update(t.apps)
    team_table = Table("team", "apps", "keys", title="Teams")
    for team, apps in sorted(teams.items()):
        team_table.add_row(team, ", ".join(sorted(apps)), str(sum(1 for k in cfg.keys if k.team == team)))
    console.print(team_table)
    if cfg.budgets:
        budgets = Table("scope", "period", "limit (USD)", "action", "warn at", title="Budgets")
        for b in cfg.budgets:
            budgets.add_row(b.scope, b.period, f"{b.limit_usd:,.2f}", b.action, f"{b.warn_at:.0%}")
        console.print(budgets)
    if cfg.prices:
        prices = Table("model", "provider", "input $/Mtok", "output $/Mtok", title="Price overrides")
        for pr in cfg.prices:
            prices.add_row(pr.model, pr.provider or "any", f"{pr.input_mtok}", f"{pr.output_mtok}")
        console.print(prices)
    if cfg.server.trusted_headers:
        console.print(
            "[yellow]trusted headers on:[/] x-metergate-team / x-metergate-app attribute requests without a key"
        )
    for warning in cfg.missing_secrets():
        console.print(f"[yellow]warning:[/] {warning} (serve will refuse to start)")


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
