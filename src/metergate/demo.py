"""`metergate demo`: a working gateway with nothing to configure.

Starts simulated OpenAI, Anthropic and Gemini providers, a gateway in front of them with keys for a few teams,
and synthetic traffic with realistic token sizes, so /metrics has live, attributed, priced series within seconds.
The same keys work for anyone who points an SDK at the demo.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import shutil
import tempfile
from dataclasses import dataclass

import aiohttp
from rich.console import Console

from metergate.admin import ADMIN_TOKEN_ENV
from metergate.config import Config
from metergate.server import build_runtime, serve
from metergate.simulator import DEFAULT_KEYS, SimulatedProvider, free_port, serve_simulator


@dataclass(frozen=True)
class DemoApp:
    team: str
    app: str
    weight: float  # share of the traffic
    family: str  # openai | anthropic | gemini
    models: tuple[str, ...]
    stream_share: float
    input_tokens: tuple[int, int]
    output_tokens: tuple[int, int]
    cached_share: float = 0.0  # share of input served from the prompt cache

    @property
    def key(self) -> str:
        return f"mg-demo-{self.team}-{self.app}"


DEMO_APPS = (
    DemoApp("search", "ranker", 0.30, "openai", ("gpt-4o-mini",), 0.2, (400, 2500), (20, 120), cached_share=0.5),
    DemoApp("search", "summarizer", 0.10, "openai", ("gpt-4o",), 0.8, (1500, 6000), (200, 800)),
    DemoApp(
        "support",
        "assistant",
        0.25,
        "anthropic",
        ("claude-haiku-4-5", "claude-sonnet-4-5"),
        0.9,
        (800, 4000),
        (100, 700),
        0.6,
    ),
    DemoApp("ads", "copywriter", 0.15, "gemini", ("gemini-2.5-flash",), 0.5, (200, 1200), (50, 400)),
    DemoApp("ads", "embedder", 0.10, "openai", ("text-embedding-3-small",), 0.0, (50, 800), (0, 0)),
    DemoApp("research", "agent", 0.10, "openai", ("o4-mini",), 0.3, (2000, 12000), (300, 2500)),
)


DEMO_ADMIN_TOKEN = "mg-demo-admin"
DEMO_CUSTOMERS = ("acme", "globex", "initech")


def demo_config(sim_url: str, listen: str, metrics_listen: str, ledger_dir: str) -> Config:
    providers = {
        "openai": {"type": "openai", "base_url": sim_url, "api_key_env": "METERGATE_DEMO_OPENAI_KEY"},
        "anthropic": {
            "type": "anthropic",
            "base_url": sim_url,
            "api_key_env": "METERGATE_DEMO_ANTHROPIC_KEY",
        },
        "gemini": {"type": "gemini", "base_url": sim_url, "api_key_env": "METERGATE_DEMO_GEMINI_KEY"},
    }
    return Config.model_validate(
        {
            "server": {"listen": listen, "metrics_listen": metrics_listen, "shutdown_timeout_s": 2},
            "providers": providers,
            "routes": [
                {"model": "gpt-*", "provider": "openai"},
                {"model": "o4-*", "provider": "openai"},
                {"model": "text-embedding-*", "provider": "openai"},
                {"model": "claude-*", "provider": "anthropic"},
                {"model": "gemini-*", "provider": "gemini"},
            ],
            "keys": [
                {
                    "sha256": hashlib.sha256(a.key.encode()).hexdigest(),
                    "team": a.team,
                    "app": a.app,
                    "id": a.key[8:],
                }
                for a in DEMO_APPS
            ],
            "ledger": {"url": f"sqlite:///{ledger_dir}/metergate-demo.db"},
            # The synthetic traffic names end users and a customer tag, for reports by user and chargeback per
            # customer.
            "attribution": {"tags": ["customer"]},
            # Budgets the synthetic traffic runs into: research's hard daily cap starts refusing after a while.
            "budgets": [
                {"team": "research", "period": "day", "limit_usd": 5, "action": "block"},
                {"team": "search", "period": "month", "limit_usd": 500, "action": "alert", "warn_at": 0.8},
                {"team": "support", "app": "assistant", "period": "day", "limit_usd": 20, "action": "alert"},
                {"team": "support", "user": "*", "period": "day", "limit_usd": 1, "action": "alert"},
            ],
        }
    )


def _request(app: DemoApp, rng: random.Random, gateway: str) -> tuple[str, dict[str, str], dict[str, object]]:
    model = rng.choice(app.models)
    inp = rng.randint(*app.input_tokens)
    out = rng.randint(*app.output_tokens) if app.output_tokens[1] else 0
    headers = {"x-sim-input-tokens": str(inp), "x-sim-output-tokens": str(out), "x-sim-chunks": "12"}
    if app.cached_share and rng.random() < app.cached_share:
        headers["x-sim-cached-tokens"] = str(int(inp * rng.uniform(0.3, 0.9)))
    if model == "o4-mini":
        headers["x-sim-reasoning-tokens"] = str(int(out * 0.6))
    if rng.random() < 0.01:
        headers["x-sim-fail"] = rng.choice(["status:429", "status:500"])
    # Every request is for one of 40 end users of three customers (README "Attribution").
    user = rng.randrange(40)
    headers["x-metergate-user"] = f"user-{user:02d}"
    headers["x-metergate-tags"] = f"customer={DEMO_CUSTOMERS[user % len(DEMO_CUSTOMERS)]}"
    stream = rng.random() < app.stream_share
    prompt = [{"role": "user", "content": "demo request"}]
    if app.family == "anthropic":
        headers["x-api-key"] = app.key
        return (
            f"{gateway}/v1/messages",
            headers,
            {"model": model, "max_tokens": 1024, "messages": prompt, "stream": stream},
        )
    if app.family == "gemini":
        headers["x-goog-api-key"] = app.key
        method = "streamGenerateContent?alt=sse" if stream else "generateContent"
        return (
            f"{gateway}/v1beta/models/{model}:{method}",
            headers,
            {"contents": [{"parts": [{"text": "demo"}]}]},
        )
    headers["authorization"] = f"Bearer {app.key}"
    if model.startswith("text-embedding"):
        return f"{gateway}/v1/embeddings", headers, {"model": model, "input": ["demo document"]}
    return f"{gateway}/v1/chat/completions", headers, {"model": model, "messages": prompt, "stream": stream}


async def synthetic_traffic(gateway: str, rate: float, stop: asyncio.Event, seed: int = 7) -> None:
    """Poisson arrivals at `rate` per second, spread over the demo apps by weight."""
    rng = random.Random(seed)
    weights = [a.weight for a in DEMO_APPS]
    pending: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession() as session:

        async def one(app: DemoApp) -> None:
            url, headers, body = _request(app, rng, gateway)
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.post(url, json=body, headers=headers) as resp:
                    await resp.read()

        while not stop.is_set():
            app = rng.choices(DEMO_APPS, weights)[0]
            task = asyncio.create_task(one(app))
            pending.add(task)
            task.add_done_callback(pending.discard)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), rng.expovariate(rate))
        if pending:
            await asyncio.wait(pending, timeout=5)


def _banner(listen: str, metrics_listen: str, ledger_dir: str) -> str:
    example = DEMO_APPS[0]
    teams = len({a.team for a in DEMO_APPS})
    text = f"""[bold]metergate demo[/] is running: simulated providers, synthetic traffic from {teams} teams.

  Prometheus metrics   http://{metrics_listen}/metrics
  LLM API (OpenAI)     http://{listen}/v1        key: [bold]{example.key}[/] (team {example.team}, app {example.app})
  LLM API (Anthropic)  http://{listen}           key: {DEMO_APPS[2].key}
  LLM API (Gemini)     http://{listen}/v1beta    key: {DEMO_APPS[3].key}

Point an SDK at it:
  from openai import OpenAI
  client = OpenAI(base_url="http://{listen}/v1", api_key="{example.key}")
  client.chat.completions.create(model="gpt-4o-mini", messages=[{{"role": "user", "content": "hi"}}])

The seed's query, once Prometheus scrapes the metrics port:
  sum by (team) (llm_tokens_in + llm_tokens_out) * 0.00002
Cost priced per model instead of a flat rate:
  sum by (team) (llm_total_cost_usd)

Budgets: research has a $5/day hard cap (it starts getting 429s after a while), search a $500/month alert.
Console: http://{listen}/console/  (admin token: {os.environ.get(ADMIN_TOKEN_ENV, DEMO_ADMIN_TOKEN)})
Admin API: curl -H "Authorization: Bearer {os.environ.get(ADMIN_TOKEN_ENV, DEMO_ADMIN_TOKEN)}" http://{listen}/admin/budgets
  (reports too: /admin/reports?from=YYYY-MM-DD&to=YYYY-MM-DD&by=team,user,
   /admin/reports?...&by=tag.customer, /admin/reports/chargeback?tag=customer=acme)
Ledger: {ledger_dir}/metergate-demo.db (SQLite; removed when the demo stops)

Ctrl+C stops it."""
    return text


async def demo_main(listen: str, metrics_listen: str, rate: float, duration: float, console: Console) -> None:
    simulator = SimulatedProvider(DEFAULT_KEYS, max_bills=10_000)
    sim_port = free_port()
    sim_server = await serve_simulator(simulator, "127.0.0.1", sim_port)
    os.environ.setdefault("METERGATE_DEMO_OPENAI_KEY", DEFAULT_KEYS["openai"])
    os.environ.setdefault("METERGATE_DEMO_ANTHROPIC_KEY", DEFAULT_KEYS["anthropic"])
    os.environ.setdefault("METERGATE_DEMO_GEMINI_KEY", DEFAULT_KEYS["gemini"])
    os.environ.setdefault(ADMIN_TOKEN_ENV, DEMO_ADMIN_TOKEN)
    ledger_dir = tempfile.mkdtemp(prefix="metergate-demo-")
    config = demo_config(f"http://127.0.0.1:{sim_port}", listen, metrics_listen, ledger_dir)
    runtime = build_runtime(config)
    stop = asyncio.Event()
    traffic_stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    def ready() -> None:
        console.print(_banner(listen, metrics_listen, ledger_dir), soft_wrap=True, highlight=False)
        gateway_url = "http://" + listen.replace("0.0.0.0", "127.0.0.1")
        tasks.append(asyncio.create_task(synthetic_traffic(gateway_url, rate, traffic_stop)))
        if duration > 0:
            asyncio.get_running_loop().call_later(duration, stop.set)

    try:
        serving = asyncio.create_task(serve(runtime, on_ready=ready, stop=stop))
        await asyncio.wait({serving, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
        traffic_stop.set()
        for task in tasks:
            await task
        stop.set()
        await serving
        sim_server.should_exit = True
        await asyncio.sleep(0.1)
    finally:
        shutil.rmtree(ledger_dir, ignore_errors=True)  # the demo's ledger lives as long as the demo


def run_demo(listen: str, metrics_listen: str, rate: float, duration: float, console: Console) -> None:
    from metergate.server import run

    run(demo_main(listen, metrics_listen, rate, duration, console))
