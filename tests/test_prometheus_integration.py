"""A real Prometheus scraping real gateways, with the shipped rules and dashboards, time compressed 60x.

One module-scoped stack: the simulated provider, a gateway with budgets and a SQLite ledger, a second gateway that
is only there to be killed, and Debian's `prometheus` (scrape and evaluation every second) loading the rule files
of deploy/prometheus/rules/ with every duration divided by 60 (5m -> 5s, 1h -> 1m, 1d -> 24m). Traffic from
several teams goes through the official OpenAI and Anthropic SDKs; the simulator's bills are the ground truth.

What is checked, through Prometheus's HTTP API only:
- the seed's query verbatim, and the priced cost per team, against what the simulator billed;
- every query of both Grafana dashboards is accepted and returns data (All teams and one team);
- every rule group evaluates without error;
- the budget, spike and target-down alerts really fire when traffic crosses their thresholds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import anthropic
import httpx
import openai
import pytest
import yaml
from anthropic.types import MessageParam
from openai.types.chat import ChatCompletionMessageParam

from metergate.simulator import Bill, SimulatorThread, free_port
from tests.conftest import KEYS, Gateway, make_gateway, system_tool
from tests.pricesheet import PRICES, cost

ROOT = Path(__file__).resolve().parent.parent
RULES_DIR = ROOT / "deploy" / "prometheus" / "rules"
DASHBOARDS_DIR = ROOT / "deploy" / "grafana" / "dashboards"
DASHBOARD_GENERATOR = ROOT / "deploy" / "grafana" / "dashboards.py"

TIME_FACTOR = 60  # one real second stands for one minute of the rules' time
SEED_QUERY = "sum by (team) (llm_tokens_in + llm_tokens_out) * 0.00002"
CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "How much did that answer cost?"}]
CLAUDE: list[MessageParam] = [{"role": "user", "content": "How much did that answer cost?"}]

# The teams and what each one's traffic is for.
WARN_TEAM = "search"  # daily budget $1 warning at 80%: spends ~$0.89; also the dashboards' concrete team
OVER_TEAM = "ads"  # daily budget $0.01, action block: exceeded by one request, then refused
SPIKE_TEAM = "support"  # a quiet baseline for over a (compressed) hour, then a burst
UNPRICED_MODEL = "self-hosted-llama"  # routed to openai, in no price list: counted, never priced

BUDGETS = """\
budgets:
  - {team: ads, period: day, limit_usd: 0.01, action: block}
  - {team: search, period: day, limit_usd: 1.0, warn_at: 0.8}
  - {team: search, period: month, limit_usd: 1000}
  - {team: search, app: ranker, period: week, limit_usd: 50}
"""

T = TypeVar("T")


# --- waiting -------------------------------------------------------------------------------------------------------


def eventually(check: Callable[[], T], what: str, timeout: float = 60.0, interval: float = 0.25) -> T:
    """Calls `check` until it returns without an AssertionError; fails with the last one after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: still not true after {timeout:.0f} s: {exc}") from exc
        time.sleep(interval)


# --- compressing the rules' time -----------------------------------------------------------------------------------

_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
_DURATION = r"(?:\d+(?:ms|[smhdwy]))+"
_RANGE_RE = re.compile(rf"\[({_DURATION})(?::({_DURATION})?)?\]")
_OFFSET_RE = re.compile(rf"\boffset(\s+)(-?)({_DURATION})\b")
_FOR_RE = re.compile(rf"^(\s*(?:for|keep_firing_for):\s*)({_DURATION})(\s*)$", re.MULTILINE)


def compress_duration(literal: str, factor: int = TIME_FACTOR) -> str:
    """A Prometheus duration divided by `factor`, in whole seconds (at least 1 s): 5m -> 5s, 1h -> 1m, 1d -> 24m."""
    parts = re.findall(r"(\d+)(ms|[smhdwy])", literal)
    assert "".join(n + u for n, u in parts) == literal, f"not a duration: {literal!r}"
    seconds = sum(int(n) * _UNIT_SECONDS[u] for n, u in parts)
    compressed = max(1, math.ceil(seconds / factor))
    return f"{compressed // 60}m" if compressed % 60 == 0 else f"{compressed}s"


def compress_rules(text: str, factor: int = TIME_FACTOR) -> tuple[str, int]:
    """Rewrites every duration literal in range selectors (and subqueries), after `offset` and in `for:`, in
    expressions and annotation templates alike. Returns the new text and how many literals were rewritten."""
    count = 0

    def one(literal: str) -> str:
        nonlocal count
        count += 1
        return compress_duration(literal, factor)

    def in_range(m: re.Match[str]) -> str:
        step = f":{one(m.group(2))}" if m.group(2) else (":" if ":" in m.group(0) else "")
        return f"[{one(m.group(1))}{step}]"

    text = _RANGE_RE.sub(in_range, text)
    text = _OFFSET_RE.sub(lambda m: f"offset{m.group(1)}{m.group(2)}{one(m.group(3))}", text)
    text = _FOR_RE.sub(lambda m: f"{m.group(1)}{one(m.group(2))}{m.group(3)}", text)
    return text, count


def write_compressed_rules(out_dir: Path) -> list[Path]:
    """The shipped rule files, time compressed, checked with `promtool check rules`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for source in sorted(RULES_DIR.glob("*.yml")):
        text, count = compress_rules(source.read_text())
        assert count > 0, f"{source.name}: no duration to compress"
        target = out_dir / source.name
        target.write_text(text)
        written.append(target)
    assert written, f"no rule files in {RULES_DIR}"
    result = subprocess.run(
        [system_tool("promtool"), "check", "rules", *map(str, written)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, (
        f"promtool check rules failed on the compressed rules:\n{result.stdout}{result.stderr}"
    )
    return written


# --- Prometheus ----------------------------------------------------------------------------------------------------


@dataclass
class Prometheus:
    """A `prometheus` process and its HTTP API."""

    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def raw(self, path: str, **params: str) -> dict[str, Any]:
        response = httpx.get(f"{self.url}{path}", params=params, timeout=10)
        body: dict[str, Any] = response.json()
        return body

    def get(self, path: str, **params: str) -> Any:
        body = self.raw(path, **params)
        assert body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", f"{expr}: {data['resultType']}"
        result: list[dict[str, Any]] = data["result"]
        return result

    def by(self, expr: str, label: str) -> dict[str, float]:
        """An instant vector keyed by one label (which must be unique in the result)."""
        out: dict[str, float] = {}
        for sample in self.query(expr):
            key = sample["metric"].get(label, "")
            assert key not in out, f"{expr}: two series for {label}={key!r}"
            out[key] = float(sample["value"][1])
        return out

    def alerts(self, name: str, state: str = "firing") -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = self.get("/api/v1/alerts")["alerts"]
        return [a for a in alerts if a["labels"].get("alertname") == name and a["state"] == state]

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(f"{self.url}/-/quit", timeout=5)  # --web.enable-lifecycle
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_prometheus(tmp: Path, targets: list[str]) -> Prometheus:
    binary = system_tool("prometheus")
    rules = write_compressed_rules(tmp / "rules")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in rules],
        # The alert rules select up{job=~"metergate.*"}.
        "scrape_configs": [{"job_name": "metergate", "static_configs": [{"targets": targets}]}],
    }
    config_path = tmp / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    checked = subprocess.run(
        [system_tool("promtool"), "check", "config", str(config_path)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, f"promtool check config:\n{checked.stdout}{checked.stderr}"
    listen = f"127.0.0.1:{free_port()}"
    log_path = tmp / "prometheus.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address={listen}",
                "--web.enable-lifecycle",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    prom = Prometheus(f"http://{listen}", proc, log_path)
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {proc.returncode}:\n{prom.log()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{prom.url}/-/ready", timeout=1).status_code == 200:
                return prom
        if time.monotonic() > deadline:
            prom.stop()
            raise RuntimeError(f"prometheus did not become ready:\n{prom.log()}")
        time.sleep(0.1)


# --- traffic -------------------------------------------------------------------------------------------------------


def oai(gw: Gateway, scope: str, tag: str, key: str | None = None, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{gw.url}/v1",
        api_key=key or KEYS[scope],
        max_retries=0,
        default_headers={"x-sim-tag": tag, **headers},
    )


def claude(gw: Gateway, scope: str, tag: str, **headers: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=gw.url, api_key=KEYS[scope], max_retries=0, default_headers={"x-sim-tag": tag, **headers}
    )


SMALL = {"x-sim-input-tokens": "1200", "x-sim-output-tokens": "300"}


def mixed_traffic(gw: Gateway, tags: dict[str, str], *, ads_refused: bool) -> None:
    """One round of everything the dashboards show: priced and unpriced, streamed, embeddings, Anthropic,
    provider errors, a budget refusal (once ads is over budget) and an unauthenticated request."""
    ranker = oai(gw, "search/ranker", tags[WARN_TEAM], **SMALL)
    for _ in range(2):
        ranker.chat.completions.create(model="gpt-4o-mini", messages=CHAT)
    chunks = list(ranker.chat.completions.create(model="gpt-4o-mini", messages=CHAT, stream=True))
    assert chunks
    ranker.chat.completions.create(model=UNPRICED_MODEL, messages=CHAT)
    with pytest.raises(openai.InternalServerError):
        ranker.chat.completions.create(
            model="gpt-4o-mini",
            messages=CHAT,
            extra_headers={"x-sim-fail": "status:500"},
        )
    with pytest.raises(openai.RateLimitError):
        ranker.chat.completions.create(
            model="gpt-4o-mini",
            messages=CHAT,
            extra_headers={"x-sim-fail": "status:429"},
        )
    indexer = oai(gw, "search/indexer", tags[WARN_TEAM])
    indexer.embeddings.create(model="text-embedding-3-small", input=["metered", "tokens"])
    messages = claude(gw, "search/indexer", tags[WARN_TEAM], **SMALL)
    messages.messages.create(model="claude-haiku-4-5", max_tokens=400, messages=CLAUDE)
    with messages.messages.stream(model="claude-haiku-4-5", max_tokens=400, messages=CLAUDE) as stream:
        for _ in stream:
            pass

    bidder = oai(gw, "ads/bidder", tags[OVER_TEAM], **SMALL)
    if ads_refused:
        with pytest.raises(openai.RateLimitError) as refused:
            bidder.chat.completions.create(model="gpt-4o-mini", messages=CHAT)
        assert "budget" in str(refused.value).lower()
    else:
        bidder.chat.completions.create(model="gpt-4o-mini", messages=CHAT)

    stranger = oai(gw, "", "unauthenticated", key="mg-not-a-key")
    with pytest.raises(openai.AuthenticationError):
        stranger.chat.completions.create(model="gpt-4o-mini", messages=CHAT)


class Sender(threading.Thread):
    """Sends one request every `interval` seconds until stopped; keeps the errors for the test to report."""

    def __init__(self, send: Callable[[], object], interval: float, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.send = send
        self.interval = interval
        self.halt = threading.Event()
        self.errors: list[BaseException] = []
        self.sent = 0

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.send()
                self.sent += 1
            except Exception as exc:
                self.errors.append(exc)
            self.halt.wait(self.interval)

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=30)
        assert not self.is_alive(), f"{self.name} did not stop"


def gpt4o_request(gw: Gateway, scope: str, tag: str, input_tokens: int, output_tokens: int) -> Callable[[], object]:
    client = oai(gw, scope, tag, **{"x-sim-input-tokens": str(input_tokens), "x-sim-output-tokens": str(output_tokens)})
    return lambda: client.chat.completions.create(model="gpt-4o", messages=CHAT)


# --- the stack -----------------------------------------------------------------------------------------------------


@dataclass
class Stack:
    simulator: SimulatorThread
    gateway: Gateway  # budgets, ledger, all the traffic
    spare: Gateway  # scraped too, serves nothing: killed by the target-down test
    prom: Prometheus
    tags: dict[str, str]  # team -> the simulator tag of all its requests
    baseline: Sender

    def bills_by_team(self) -> dict[str, list[Bill]]:
        return {team: self.simulator.app.billed(tag) for team, tag in self.tags.items()}


def expected_tokens(bills: list[Bill]) -> int:
    return sum(b.reported.input + b.reported.output for b in bills if b.usage_readable)


def expected_cost(bills: list[Bill]) -> Decimal:
    total = Decimal(0)
    for b in bills:
        if not b.usage_readable or b.model == UNPRICED_MODEL:
            continue
        assert b.model in PRICES, f"traffic used {b.model!r}, which tests/pricesheet.py does not price"
        total += cost(b.model, b.reported)
    return total


def assert_seed_query_matches_bills(stack: Stack) -> None:
    # Bills first: a request in flight may be billed and not yet scraped, never the other way round.
    bills = stack.bills_by_team()
    got = stack.prom.by(SEED_QUERY, "team")
    want = {team: expected_tokens(b) * 0.00002 for team, b in bills.items()}
    want["unauthenticated"] = 0.0  # its requests were refused before reaching a provider: zero tokens
    assert set(got) == set(want), (got, want)
    for team, value in want.items():
        assert math.isclose(got[team], value, rel_tol=1e-9, abs_tol=1e-12), (team, got[team], value)


def assert_cost_matches_bills(stack: Stack) -> None:
    bills = stack.bills_by_team()
    got = stack.prom.by("sum by (team) (llm_total_cost_usd)", "team")
    want = {team: expected_cost(b) for team, b in bills.items()}
    want["unauthenticated"] = Decimal(0)
    assert set(got) == set(want), (got, want)
    for team, money in want.items():
        assert abs(Decimal(repr(got[team])) - money) <= Decimal("1e-9"), (team, got[team], money)


def midday_timezone() -> str:
    """A fixed-offset zone where it is around noon now, so the budgets' calendar day cannot end mid-test."""
    offset = 12 - time.gmtime().tm_hour  # -11..12 hours east of UTC
    return "Etc/GMT" if offset == 0 else f"Etc/GMT{-offset:+d}"  # POSIX sign: Etc/GMT-5 is UTC+5


@pytest.fixture(scope="module")
def stack(simulator: SimulatorThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    system_tool("prometheus")  # fail first, with the message, when it is missing
    tmp = tmp_path_factory.mktemp("prometheus-integration")
    run = uuid.uuid4().hex[:8]
    tags = {team: f"prom-{run}-{team}" for team in (WARN_TEAM, OVER_TEAM, SPIKE_TEAM)}
    with contextlib.ExitStack() as cleanup:
        gateway = make_gateway(
            tmp,
            simulator.url,
            server_extra=f', timezone: "{midday_timezone()}"',
            extra=BUDGETS + f'ledger: {{url: "sqlite:///{tmp / "ledger.db"}"}}\n',
        ).start()
        cleanup.callback(gateway.stop)
        spare = make_gateway(tmp, simulator.url).start()
        cleanup.callback(lambda: spare.stop(signal.SIGKILL))
        prom = start_prometheus(tmp, [gateway.metrics_listen, spare.metrics_listen])
        cleanup.callback(prom.stop)

        def targets_up() -> None:
            active = prom.get("/api/v1/targets")["activeTargets"]
            assert sorted((t["labels"]["instance"], t["health"]) for t in active) == sorted(
                [(gateway.metrics_listen, "up"), (spare.metrics_listen, "up")]
            ), active

        eventually(targets_up, "both gateways scraped")

        # The spike team's quiet history starts first: the spike alert needs more than an hour (here a minute).
        baseline = Sender(gpt4o_request(gateway, "support/assistant", tags[SPIKE_TEAM], 100, 10), 2.0, "baseline")
        baseline.start()
        cleanup.callback(lambda: baseline.stop() if baseline.is_alive() else None)
        stack = Stack(simulator, gateway, spare, prom, tags, baseline)

        # Round 1 creates every series; round 2, after Prometheus has seen them, makes rate()/increase() move.
        mixed_traffic(gateway, tags, ads_refused=False)
        # The warning team ends its day at ~89% of its $1 budget ($0.875 here); ads goes over its $0.01.
        gpt4o_request(gateway, "search/ranker", tags[WARN_TEAM], 350_000, 10)()
        gpt4o_request(gateway, "ads/bidder", tags[OVER_TEAM], 20_000, 10)()
        eventually(lambda: assert_seed_query_matches_bills(stack), "round 1 scraped")
        mixed_traffic(gateway, tags, ads_refused=True)
        eventually(lambda: assert_seed_query_matches_bills(stack), "round 2 scraped")
        yield stack
        assert not baseline.errors, f"baseline requests failed: {baseline.errors[:3]}"


# --- the tests -----------------------------------------------------------------------------------------------------


def test_prometheus_is_installed() -> None:
    """Never skipped: without Debian's prometheus this fails (and so does every test below, in setup)."""
    for name in ("prometheus", "promtool"):
        system_tool(name)


def test_time_compression_rewrites_every_duration() -> None:
    for literal, want in {
        "5m": "5s",
        "1h": "1m",
        "1d": "24m",
        "10m": "10s",
        "15m": "15s",
        "30s": "1s",
        "90s": "2s",
        "7d": "168m",
        "1h30m": "90s",
    }.items():
        assert compress_duration(literal) == want, literal
    text, count = compress_rules(
        "expr: max_over_time(x[1d] offset 1h) and rate(y[5m:1m] offset -1h)\nfor: 10m\n"
        'd: {{ with printf "avg_over_time(z{team=%q}[1h] offset 1h)" | query }}\n'
    )
    assert count == 8
    assert text == (
        "expr: max_over_time(x[24m] offset 1m) and rate(y[5s:1s] offset -1m)\nfor: 10s\n"
        'd: {{ with printf "avg_over_time(z{team=%q}[1m] offset 1m)" | query }}\n'
    )
    # The shipped rules: every range, offset and `for` of every rule, annotations included, is rewritten.
    for source in sorted(RULES_DIR.glob("*.yml")):
        original = yaml.safe_load(source.read_text())
        compressed = yaml.safe_load(compress_rules(source.read_text())[0])
        for group, new_group in zip(original["groups"], compressed["groups"], strict=True):
            for rule, new in zip(group["rules"], new_group["rules"], strict=True):
                if "for" in rule:
                    assert new["for"] == compress_duration(str(rule["for"])), rule
                texts = [(rule["expr"], new["expr"])] + [
                    (v, new["annotations"][k]) for k, v in rule.get("annotations", {}).items()
                ]
                for old_text, new_text in texts:
                    old_ranges = re.findall(r"\[([^\]]*)\]|offset\s+(\S+?)[)\s]", old_text)
                    new_ranges = re.findall(r"\[([^\]]*)\]|offset\s+(\S+?)[)\s]", new_text)
                    assert [compress_duration(a or b) for a, b in old_ranges] == [a or b for a, b in new_ranges]


def test_seed_query_matches_the_simulators_bills(stack: Stack) -> None:
    """The README's flat-rate estimate, verbatim: per team, every billed token (in + out) times $0.00002."""
    eventually(lambda: assert_seed_query_matches_bills(stack), "seed query per team")
    teams = stack.prom.by(SEED_QUERY, "team")
    assert {WARN_TEAM, OVER_TEAM, SPIKE_TEAM} <= {t for t, v in teams.items() if v > 0}

    def tokens_exact() -> None:  # and the tokens behind it, as integers
        bills = stack.bills_by_team()
        got = stack.prom.by("sum by (team) (llm_tokens_in + llm_tokens_out)", "team")
        assert got == {**{t: float(expected_tokens(b)) for t, b in bills.items()}, "unauthenticated": 0.0}

    eventually(tokens_exact, "tokens per team")


def test_cost_per_team_matches_the_price_sheet(stack: Stack) -> None:
    """llm_total_cost_usd summed per team is what the simulator billed, priced independently, to 1e-9 USD; the
    budget gauge (today's spend, from the ledger-backed tracker) agrees."""
    eventually(lambda: assert_cost_matches_bills(stack), "cost per team")

    def spend_gauges_agree() -> None:
        bills = stack.bills_by_team()
        got = stack.prom.by('max by (team) (llm_spend_usd{period="day", app=""})', "team")
        for team, b in bills.items():
            assert abs(Decimal(repr(got[team])) - expected_cost(b)) <= Decimal("1e-9"), (team, got[team])

    eventually(spend_gauges_agree, "llm_spend_usd per team")
    # No unpriced request leaks into the cost; they are counted apart.
    unpriced = stack.prom.by("sum by (team) (llm_unpriced_requests_total)", "team")
    assert unpriced == {WARN_TEAM: 2.0}


def load_dashboard_generator() -> ModuleType:
    name = "metergate_grafana_dashboards"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, DASHBOARD_GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# Panels whose query legitimately returns nothing with this traffic, by (dashboard uid, selection, panel title).
# Every other query must return at least one finite value; a listed one must return nothing (so the list stays
# true). None today: the traffic covers priced and unpriced models, streams, errors and budgets of every period.
NO_DATA: dict[tuple[str, str, str], str] = {}
SELECTIONS = {"all": {}, "one team": {"team": WARN_TEAM}}
DASHBOARDS = ["metergate-overview", "metergate-chargeback"]


@pytest.mark.parametrize("selection", sorted(SELECTIONS))
@pytest.mark.parametrize("dashboard", DASHBOARDS)
def test_every_dashboard_query_runs_and_returns_data(stack: Stack, dashboard: str, selection: str) -> None:
    assert sorted(p.stem for p in DASHBOARDS_DIR.glob("*.json")) == sorted(DASHBOARDS), "a dashboard is not tested"
    gen = load_dashboard_generator()
    data = json.loads((DASHBOARDS_DIR / f"{dashboard}.json").read_text())
    queries = gen.panel_queries(data)
    assert len(queries) >= 10, f"{dashboard}: only {len(queries)} queries"
    problems = []
    for title, expr in queries:
        promql = gen.substitute(expr, SELECTIONS[selection])
        body = stack.prom.raw("/api/v1/query", query=promql)
        if body.get("status") != "success":
            problems.append(f"{title}: rejected: {body.get('error')}\n    {promql}")
            continue
        result = body["data"]["result"]
        values = [float(s["value"][1]) for s in result] if body["data"]["resultType"] == "vector" else []
        if body["data"]["resultType"] == "scalar":
            values = [float(result[1])]
        has_data = any(math.isfinite(v) for v in values)
        reason = NO_DATA.get((data["uid"], selection, title))
        if reason is None and not has_data:
            problems.append(f"{title}: no data ({result})\n    {promql}")
        elif reason is not None and has_data:
            problems.append(f"{title}: listed as returning no data ({reason}) but returned {result}")
    assert not problems, f"{dashboard} ({selection}):\n" + "\n".join(problems)


def test_every_rule_evaluates_without_error(stack: Stack) -> None:
    shipped = {
        group["name"]: len(group["rules"])
        for path in sorted(RULES_DIR.glob("*.yml"))
        for group in yaml.safe_load(path.read_text())["groups"]
    }

    def healthy_after_evaluations(since: float) -> None:
        groups = stack.prom.get("/api/v1/rules")["groups"]
        assert {g["name"]: len(g["rules"]) for g in groups} == shipped
        for group in groups:
            assert group["interval"] == 1, group["name"]
            for rule in group["rules"]:
                name = rule.get("name")
                assert rule["health"] == "ok", (group["name"], name, rule.get("lastError"))
                assert not rule.get("lastError"), (group["name"], name, rule["lastError"])
                assert rfc3339(rule["lastEvaluation"]) > since, (name, rule["lastEvaluation"])

    since = time.time() + 3  # a few evaluations after the traffic
    eventually(lambda: healthy_after_evaluations(since), "every rule healthy", timeout=30)
    assert "Expanding alert template failed" not in stack.prom.log()


def rfc3339(stamp: str) -> float:
    """Prometheus's timestamps (nanoseconds, any zone) as Unix time."""
    stamp = re.sub(r"(\.\d{6})\d+", r"\1", stamp).replace("Z", "+00:00")
    return datetime.fromisoformat(stamp).timestamp()


def annotations_ok(alert: dict[str, Any], team: str) -> None:
    for key in ("summary", "description", "runbook_url"):
        assert alert["annotations"].get(key), (key, alert)
    for key, value in alert["annotations"].items():
        assert "error expanding" not in value, (key, value)
    assert team in alert["annotations"]["summary"] and team in alert["annotations"]["description"], alert


def test_daily_budget_exceeded_fires_for_the_team_over_budget(stack: Stack) -> None:
    def fired() -> dict[str, Any]:
        alerts = stack.prom.alerts("LLMDailyBudgetExceeded")
        assert {a["labels"]["team"] for a in alerts} == {OVER_TEAM}, alerts
        return alerts[0]

    alert = eventually(fired, "LLMDailyBudgetExceeded firing")
    assert alert["labels"]["severity"] == "page"
    assert alert["labels"].get("app", "") == ""  # a team-wide budget
    annotations_ok(alert, OVER_TEAM)
    spent = float(alert["value"])
    assert spent == pytest.approx(float(expected_cost(stack.simulator.app.billed(stack.tags[OVER_TEAM]))), abs=1e-9)
    assert f"spent ${spent:.2f} today" in alert["annotations"]["summary"]
    assert "$0.01 daily budget" in alert["annotations"]["summary"], alert["annotations"]
    # The gateway enforced the block: the refused requests are errors of type budget_exceeded.
    refused = stack.prom.by(
        f'sum by (team) (llm_errors_total{{error_type="budget_exceeded", team="{OVER_TEAM}"}})', "team"
    )
    assert refused == {OVER_TEAM: 1.0}


def test_daily_budget_warning_fires_between_80_and_100_percent(stack: Stack) -> None:
    spent = float(expected_cost(stack.simulator.app.billed(stack.tags[WARN_TEAM])))
    assert 0.8 <= spent < 1.0, f"the traffic must put {WARN_TEAM} between 80% and 100% of $1, not ${spent}"

    def fired() -> dict[str, Any]:
        alerts = [a for a in stack.prom.alerts("LLMDailyBudgetWarning") if a["labels"]["team"] == WARN_TEAM]
        assert len(alerts) == 1, alerts
        return alerts[0]

    alert = eventually(fired, f"LLMDailyBudgetWarning firing for {WARN_TEAM}")
    assert alert["labels"]["severity"] == "ticket" and alert["labels"].get("app", "") == ""
    annotations_ok(alert, WARN_TEAM)
    assert float(alert["value"]) == pytest.approx(spent, abs=1e-9)
    assert "$1.00 daily budget" in alert["annotations"]["summary"], alert["annotations"]
    assert f"{spent * 100:.4g}% of its" in alert["annotations"]["summary"], alert["annotations"]  # humanizePercentage
    assert "80%" in alert["annotations"]["description"], alert["annotations"]
    # Under its limit: no exceeded alert for this team, pending or firing.
    for state in ("pending", "firing"):
        assert not [a for a in stack.prom.alerts("LLMDailyBudgetExceeded", state) if a["labels"]["team"] == WARN_TEAM]


def test_target_down_fires_for_a_killed_gateway(stack: Stack) -> None:
    assert stack.prom.alerts("LLMGatewayTargetDown", "pending") == []
    assert stack.prom.alerts("LLMGatewayTargetDown") == []
    stack.spare.stop(signal.SIGKILL)

    def fired() -> dict[str, Any]:
        alerts = stack.prom.alerts("LLMGatewayTargetDown")
        assert len(alerts) == 1, alerts
        return alerts[0]

    alert = eventually(fired, "LLMGatewayTargetDown firing")
    assert alert["labels"]["instance"] == stack.spare.metrics_listen
    assert alert["labels"]["job"] == "metergate" and alert["labels"]["severity"] == "page"
    assert stack.spare.metrics_listen in alert["annotations"]["summary"]
    health = {t["labels"]["instance"]: t["health"] for t in stack.prom.get("/api/v1/targets")["activeTargets"]}
    assert health == {stack.gateway.metrics_listen: "up", stack.spare.metrics_listen: "down"}


def test_spike_alerts_fire_for_a_burst_after_a_quiet_baseline(stack: Stack) -> None:
    """The spike team has sent a cheap request every 2 s since the stack started; once Prometheus holds more than
    a (compressed) hour of its history, a burst of expensive requests pages (cost) and tickets (tokens)."""
    prom = stack.prom
    team = SPIKE_TEAM

    def history_is_old_enough() -> None:
        for rule in ("team:llm_cost_usd:rate5m", "team:llm_tokens:rate5m"):
            got = prom.by(f'count_over_time({rule}{{team="{team}"}}[1m] offset 1m)', "team")
            assert got.get(team, 0) >= 5, (rule, got)

    eventually(history_is_old_enough, f"a minute of {team}'s history", timeout=120, interval=1)
    stack.baseline.stop()
    for name in ("LLMTeamCostSpike", "LLMTeamTokenSpike"):  # quiet traffic: no spike, whatever its age
        assert prom.alerts(name, "pending") == [] and prom.alerts(name) == [], name
    assert not stack.baseline.errors, stack.baseline.errors[:3]
    assert stack.baseline.sent >= 20

    # $0.10 every 0.25 s: ~$1400/hour (floor $5/hour) and ~9.6M tokens/minute (floor 20,000), >100x the baseline.
    burst = Sender(gpt4o_request(stack.gateway, "support/assistant", stack.tags[team], 40_000, 10), 0.25, "burst")
    burst.start()
    try:

        def fired() -> dict[str, dict[str, Any]]:
            found = {}
            for name in ("LLMTeamCostSpike", "LLMTeamTokenSpike"):
                alerts = prom.alerts(name)
                assert [a["labels"]["team"] for a in alerts] == [team], (name, alerts)
                found[name] = alerts[0]
            return found

        alerts = eventually(fired, "spike alerts firing", timeout=60, interval=0.5)
    finally:
        burst.stop()
    assert not burst.errors, burst.errors[:3]

    cost_alert, token_alert = alerts["LLMTeamCostSpike"], alerts["LLMTeamTokenSpike"]
    assert cost_alert["labels"]["severity"] == "page" and token_alert["labels"]["severity"] == "ticket"
    for alert in (cost_alert, token_alert):
        annotations_ok(alert, team)
        # The baseline in the description is a query of its own (with compressed offsets): it must find data.
        assert "(unknown)" not in alert["annotations"]["description"], alert["annotations"]
    assert float(cost_alert["value"]) > 5 and float(token_alert["value"]) > 20000
    # The baseline is the quiet history (a $0.00035 request every 2 s, ~$0.6/hour), found through the offsets.
    baseline = re.search(r"baseline of \$([0-9.]+)/hour", cost_alert["annotations"]["description"])
    assert baseline is not None and 0.1 < float(baseline.group(1)) < 5, cost_alert["annotations"]["description"]

    # Everything billed, burst included, is in Prometheus to the token and to 1e-9 USD.
    eventually(lambda: assert_seed_query_matches_bills(stack), "seed query after the burst")
    eventually(lambda: assert_cost_matches_bills(stack), "cost after the burst")
