"""Realtime sessions through the gateway: what each turn costs in latency, and what each open session costs in
memory.

Starts the simulated provider (`python -m metergate.simulator`) and one `metergate serve` in front of it, then
opens `--sessions` concurrent WebSocket sessions, directly and through the gateway, each running `--turns` turns
(`response.create`, then the provider's deltas and `response.done` with usage, which the gateway prices and
records). Prints the turn latency percentiles both ways, the added latency, and the gateway's RSS before, with all
sessions open, and after they close.

    .venv/bin/python benchmarks/realtime_bench.py                  # 100 sessions x 5 turns
    .venv/bin/python benchmarks/realtime_bench.py --sessions 500
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx
import websockets.asyncio.client

from metergate.simulator import DEFAULT_KEYS, free_port

KEY = "mg-bench-realtime"


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def session(
    url: str, headers: dict[str, str], turns: int, opened: asyncio.Barrier, latencies: list[float]
) -> None:
    async with websockets.asyncio.client.connect(url, additional_headers=headers, max_size=None) as ws:
        await ws.recv()  # session.created
        await opened.wait()  # every session open at once: the memory figure
        for _ in range(turns):
            start = time.perf_counter()
            await ws.send('{"type": "response.create"}')
            while True:
                message = await ws.recv()
                if '"response.done"' in str(message)[:200]:
                    break
            latencies.append(time.perf_counter() - start)
        await opened.wait()


async def run(url: str, headers: dict[str, str], sessions: int, turns: int, pid: int | None) -> tuple[list[float], int]:
    latencies: list[float] = []
    barrier = asyncio.Barrier(sessions + 1)
    tasks = [asyncio.create_task(session(url, headers, turns, barrier, latencies)) for _ in range(sessions)]
    await barrier.wait()  # all open
    await barrier.wait()  # all done with their turns, still open
    peak = rss(pid) if pid else 0
    await asyncio.gather(*tasks)
    return latencies, peak


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--turns", type=int, default=5)
    args = parser.parse_args()
    sim_port, listen, metrics = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "gw.yaml"
        config.write_text(
            textwrap.dedent(
                f"""\
                server: {{listen: "127.0.0.1:{listen}", metrics_listen: "127.0.0.1:{metrics}"}}
                providers:
                  openai: {{type: openai, base_url: "http://127.0.0.1:{sim_port}", api_key_env: SIM_KEY}}
                routes:
                  - {{model: "gpt-realtime*", provider: openai}}
                keys:
                  - {{sha256: "{hashlib.sha256(KEY.encode()).hexdigest()}", team: bench, app: voice}}
                """
            )
        )
        env = {**os.environ, "SIM_KEY": DEFAULT_KEYS["openai"]}
        try:
            procs.append(subprocess.Popen([sys.executable, "-m", "metergate.simulator", "--port", str(sim_port)]))
            gateway = subprocess.Popen([sys.executable, "-m", "metergate", "serve", "--config", str(config)], env=env)
            procs.append(gateway)
            for _ in range(200):
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{metrics}/readyz", timeout=1).status_code == 200:
                        break
                time.sleep(0.05)
            time.sleep(0.5)
            path = "/v1/realtime?model=gpt-realtime"
            direct = f"ws://127.0.0.1:{sim_port}{path}"
            via = f"ws://127.0.0.1:{listen}{path}"
            sim_auth = {"authorization": f"Bearer {DEFAULT_KEYS['openai']}", "x-sim-output-tokens": "40"}
            gw_auth = {"authorization": f"Bearer {KEY}", "x-sim-output-tokens": "40"}
            asyncio.run(run(via, gw_auth, 4, 2, None))  # warm up
            before = rss(gateway.pid)
            direct_lat, _ = asyncio.run(run(direct, sim_auth, args.sessions, args.turns, None))
            via_lat, peak = asyncio.run(run(via, gw_auth, args.sessions, args.turns, gateway.pid))
            time.sleep(0.5)
            after = rss(gateway.pid)
            print(f"{args.sessions} concurrent sessions x {args.turns} turns (16 deltas + response.done each)")
            for name, lat in (("direct", direct_lat), ("via gateway", via_lat)):
                mean = statistics.mean(lat) * 1000
                print(
                    f"  {name:12s} turn p50 {pct(lat, 0.5):7.2f} ms  p99 {pct(lat, 0.99):7.2f} ms  mean {mean:7.2f} ms"
                )
            print(f"  added p50 {pct(via_lat, 0.5) - pct(direct_lat, 0.5):.2f} ms per turn")
            print(
                f"  gateway RSS: {before / 2**20:.1f} MB before, "
                f"{peak / 2**20:.1f} MB with {args.sessions} sessions open "
                f"({(peak - before) / args.sessions / 1024:.0f} KB per session), {after / 2**20:.1f} MB after"
            )
            billed = httpx.get(f"http://127.0.0.1:{metrics}/metrics").text
            turns = sum(
                float(line.split()[-1])
                for line in billed.splitlines()
                if line.startswith("llm_requests_total{") and 'endpoint="/v1/realtime"' in line
            )
            print(f"  responses metered by the gateway: {turns:.0f} (expected {args.sessions * args.turns + 8})")
        finally:
            for proc in procs:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=20)


if __name__ == "__main__":
    main()
