"""Shared fixtures: a simulated provider, real gateway processes in front of it, and metric snapshots."""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from metergate.simulator import DEFAULT_KEYS, Bill, Billed, SimulatorThread, free_port
from tests.pricesheet import cost

# The SDKs read these from the environment; a developer's own settings must not leak into the tests.
for _var in (
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "OPENAI_CUSTOM_HEADERS",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "ANTHROPIC_BASE_URL",
    "ANTHROPIC_CUSTOM_HEADERS",
):
    os.environ.pop(_var, None)

# Gateway keys by "team/app".
KEYS = {
    "search/ranker": "mg-key-search-ranker",
    "search/indexer": "mg-key-search-indexer",
    "ads/bidder": "mg-key-ads-bidder",
    "support/assistant": "mg-key-support-assistant",
}
PROVIDER_ENV = {
    "SIM_OPENAI_KEY": DEFAULT_KEYS["openai"],
    "SIM_AZURE_KEY": DEFAULT_KEYS["azure"],
    "SIM_ANTHROPIC_KEY": DEFAULT_KEYS["anthropic"],
    "SIM_GEMINI_KEY": DEFAULT_KEYS["gemini"],
}


def keys_yaml() -> str:
    lines = []
    for scope, key in KEYS.items():
        team, app = scope.split("/")
        lines.append(f'  - {{sha256: "{hashlib.sha256(key.encode()).hexdigest()}", team: {team}, app: {app}}}')
    return "keys:\n" + "\n".join(lines) + "\n"


def standard_config(
    sim_url: str,
    listen: str,
    metrics: str,
    extra: str = "",
    server_extra: str = "",
    providers_extra: str = "",
    routes_first: str = "",
) -> str:
    """The test gateway's config; `*_extra` add YAML lines inside a section (indented like its entries)."""
    return (
        textwrap.dedent(
            f"""\
            server: {{listen: "{listen}", metrics_listen: "{metrics}"{server_extra}}}
            providers:
              openai: {{type: openai, base_url: "{sim_url}", api_key_env: SIM_OPENAI_KEY}}
              azure: {{type: azure-openai, base_url: "{sim_url}", api_key_env: SIM_AZURE_KEY,
                      api_version: "2024-10-21", deployments: {{prod-4o-mini: gpt-4o-mini}}}}
              anthropic: {{type: anthropic, base_url: "{sim_url}", api_key_env: SIM_ANTHROPIC_KEY}}
              gemini: {{type: gemini, base_url: "{sim_url}", api_key_env: SIM_GEMINI_KEY}}
            """
        )
        + providers_extra
        + "routes:\n"
        + routes_first
        + "".join(
            f"  - {route}\n"
            for route in (
                '{model: "prod-*", provider: azure}',
                '{model: "fast", provider: openai, upstream_model: gpt-4o-mini}',
                '{model: "gpt-*", provider: openai}',
                '{model: "o4-*", provider: openai}',
                '{model: "text-embedding-*", provider: openai}',
                '{model: "claude-*", provider: anthropic}',
                '{model: "gemini-*", provider: gemini}',
                '{model: "self-hosted-*", provider: openai}',
            )
        )
        + keys_yaml()
        + extra
    )


@dataclass
class Gateway:
    """A `metergate serve` process."""

    config_path: Path
    env: dict[str, str]
    listen: str
    metrics_listen: str
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    max_open_files: int | None = None  # RLIMIT_NOFILE for the process (soft and hard)

    @property
    def url(self) -> str:
        return f"http://{self.listen}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.metrics_listen}/metrics"

    def start(self) -> Gateway:
        assert self.log_path is not None
        log = self.log_path.open("ab")
        limit = self.max_open_files

        def limit_files() -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "metergate", "serve", "--config", str(self.config_path), *self.extra_args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=limit_files if limit is not None else None,
            cwd=self.config_path.parent,  # relative paths (a default spool) stay in the test's own directory
        )
        deadline = time.time() + 20
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"http://{self.metrics_listen}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"gateway did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def metrics(self) -> Metrics:
        return Metrics.parse(httpx.get(self.metrics_url, timeout=5).text)

    def rss_bytes(self) -> int:
        """The process's resident memory, from /proc."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def headers(self, scope: str) -> dict[str, str]:
        return {"authorization": f"Bearer {KEYS[scope]}"}


@dataclass
class Metrics:
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]

    @classmethod
    def parse(cls, text: str) -> Metrics:
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples[(s.name, frozenset(s.labels.items()))] = s.value
        return cls(samples)

    def sum(self, name: str, **labels: str) -> float:
        want = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and want <= ls)

    def delta(self, before: Metrics, name: str, **labels: str) -> float:
        return self.sum(name, **labels) - before.sum(name, **labels)


# Runs the gateway processes under test from another checkout's `src` (the tests and the simulator stay these):
# how a new test is shown to fail on the previous release, e.g. METERGATE_TEST_GATEWAY_SRC=/tmp/old/src pytest ...
GATEWAY_SRC = os.environ.get("METERGATE_TEST_GATEWAY_SRC")


def cli(gw: Gateway, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`metergate <args> --config <the gateway's config>`, as an operator runs it beside the gateway."""
    return subprocess.run(
        [sys.executable, "-m", "metergate", *args, "--config", str(gw.config_path)],
        env={**gw.env, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def admin(gw: Gateway, method: str, path: str, **kw: Any) -> httpx.Response:
    """A call to the gateway's admin API with the token its environment sets."""
    token = gw.env["METERGATE_ADMIN_TOKEN"]
    return httpx.request(method, f"{gw.url}{path}", headers={"authorization": f"Bearer {token}"}, **kw)


def sqlite_ledger(tmp: Path) -> str:
    """The config line of a SQLite ledger in `tmp` (ledger.db) that flushes quickly, for tests that read it back."""
    return f'ledger: {{url: "sqlite:///{tmp}/ledger.db", flush_interval_s: 0.05}}\n'


def make_gateway(tmp: Path, sim_url: str, env: dict[str, str] | None = None, **sections: str) -> Gateway:
    listen, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    config = tmp / f"gateway-{uuid.uuid4().hex[:6]}.yaml"
    config.write_text(standard_config(sim_url, listen, metrics, **sections))
    full_env = {**os.environ, **PROVIDER_ENV, **(env or {})}
    if GATEWAY_SRC:
        full_env["PYTHONPATH"] = GATEWAY_SRC
    return Gateway(config, full_env, listen, metrics, log_path=config.with_suffix(".log"))


@pytest.fixture(scope="session")
def simulator() -> Iterator[SimulatorThread]:
    sim = SimulatorThread().start()
    sim.app.deployments["prod-4o-mini"] = "gpt-4o-mini"
    yield sim
    sim.stop()


@pytest.fixture(scope="module")
def gateway(simulator: SimulatorThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = make_gateway(tmp_path_factory.mktemp("gw"), simulator.url).start()
    yield gw
    gw.stop()


@pytest.fixture
def tag() -> str:
    """A fresh tag: the simulator files this test's requests under it."""
    return uuid.uuid4().hex


def expected(bills: list[Bill], model: str) -> tuple[Billed, Decimal]:
    """Total reported tokens and their cost, from the simulator's bills."""
    total = Billed()
    money = Decimal(0)
    for b in bills:
        if not b.usage_readable:
            continue
        r = b.reported
        total = Billed(
            total.input + r.input,
            total.output + r.output,
            total.cached + r.cached,
            total.cache_write + r.cache_write,
            total.cache_write_1h + r.cache_write_1h,
            total.reasoning + r.reasoning,
        )
        money += cost(model, r)
    return total, money


def system_tool(name: str) -> str:
    """The path of a Debian-packaged tool the tests run for real; fails (never skips) when it is missing."""
    path = shutil.which(name)
    if path is None:
        package = {"alertmanager": "prometheus-alertmanager", "amtool": "prometheus-alertmanager"}.get(
            name, "prometheus"
        )
        package = "chromium" if name == "chromium" else package
        pytest.fail(
            f"`{name}` is not installed: this test runs the real tool. Install Debian's {package} "
            f"(`make system-deps`, scripts/install-system-deps.sh, or `apt-get install {package}`).",
            pytrace=False,
        )
    return path


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value or time.time() > deadline:
            return value
        time.sleep(interval)


def assert_metered(
    gw: Gateway, before: Metrics, bills: list[Bill], model: str, price_as: str | None = None, **labels: str
) -> None:
    """The gateway's counters moved by exactly what the simulated provider reported, tokens and dollars."""
    want, money = expected(bills, price_as or model)
    after = gw.metrics()
    got = {
        "in": after.delta(before, "llm_tokens_in", model=model, **labels),
        "out": after.delta(before, "llm_tokens_out", model=model, **labels),
        "cached": after.delta(before, "llm_tokens_in_cached", model=model, **labels),
        "cache_write": after.delta(before, "llm_tokens_in_cache_write", model=model, **labels),
        "reasoning": after.delta(before, "llm_tokens_out_reasoning", model=model, **labels),
    }
    assert got == {
        "in": want.input,
        "out": want.output,
        "cached": want.cached,
        "cache_write": want.cache_write,
        "reasoning": want.reasoning,
    }
    got_cost = after.delta(before, "llm_total_cost_usd", model=model, **labels)
    assert abs(Decimal(repr(got_cost)) - money) <= Decimal("1e-9"), (got_cost, money)


PG_SERVER = os.environ.get("METERGATE_TEST_PG", "postgresql://postgres@127.0.0.1:5432")


def create_pg_database() -> str:
    """A fresh PostgreSQL database on the test server (trust auth); never skipped: CI must reach it."""
    import psycopg

    name = f"mg_test_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        raise RuntimeError(f"the PostgreSQL tests need a server at {PG_SERVER} (trust auth): {exc}") from exc
    return f"{PG_SERVER}/{name}"


def drop_pg_database(url: str) -> None:
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url() -> Iterator[str]:
    url = create_pg_database()
    yield url
    drop_pg_database(url)
