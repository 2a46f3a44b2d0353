"""How much latency metergate adds and how much throughput it keeps, measured side by side in one run.

    python benchmarks/gateway_bench.py [--duration 8] [--budgets] [--limits local|redis]

Starts the simulated provider and a metergate gateway in front of it (separate processes), then drives both with
`wrk` (Debian package `wrk`): sequential requests (one connection) for latency percentiles and 32 connections for
throughput, non-streaming and streaming chat completions. Prints the added p50/p99 latency and the gateway's
throughput as a fraction of calling the simulator directly. Absolute figures depend on the machine; the ratios
are what to compare.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

GATEWAY_KEY = "mg-bench-key"
CHAT_BODY = (
    '{"model":"gpt-4o-mini","messages":[{"role":"user","content":'
    '"Summarise the quarterly report in three bullet points for the finance team."}],"max_tokens":200}'
)
STREAM_BODY = CHAT_BODY[:-1] + ',"stream":true}'
LUA = """
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_KEY")
wrk.headers["x-sim-output-tokens"] = "120"
"""


@dataclass
class Result:
    p50_ms: float
    p99_ms: float
    rps: float


# The reference hop the targets are set against: nginx proxying to the same simulator.
NGINX = """
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/nginx-body;
    proxy_temp_path {dir}/nginx-proxy;
    fastcgi_temp_path {dir}/nginx-fastcgi;
    uwsgi_temp_path {dir}/nginx-uwsgi;
    scgi_temp_path {dir}/nginx-scgi;
    upstream simulator {{ server 127.0.0.1:{sim_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://simulator;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 15.0) -> None:
    """Until the server answers at all (an HTTP error status counts: it is up)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return
        except Exception:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def _ms(value: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", value)
    if not m:
        raise ValueError(value)
    n, unit = float(m.group(1)), m.group(2)
    return n / 1000 if unit == "us" else n * 1000 if unit == "s" else n


def wrk(url: str, body: str, key: str, connections: int, duration: float, script: Path) -> Result:
    env = dict(os.environ, BENCH_BODY=body, BENCH_KEY=key)
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        raise SystemExit(f"{url}: {non2xx.group(1)} error responses during the benchmark:\n{out}")
    assert p50 and p99 and rps, out
    return Result(_ms(p50.group(1)), _ms(p99.group(1)), float(rps.group(1)))


def gateway_config(sim_url: str, listen: str, metrics: str, workdir: Path, mode: str, limits: str = "") -> str:
    digest = hashlib.sha256(GATEWAY_KEY.encode()).hexdigest()
    extra = ""
    if limits:
        # Limits far above what the benchmark sends: every request is checked and counted, none refused. Two
        # entries (a team's requests and tokens, an app's requests) as a real fleet would have.
        extra += textwrap.dedent(
            """
            rate_limits:
              - {team: bench, requests_per_minute: 100000000, tokens_per_minute: 1000000000000}
              - {team: bench, app: wrk, requests_per_minute: 100000000}
            """
        )
    if limits == "redis":
        extra += f'shared_state: {{redis_url: "redis://127.0.0.1:6379/0", key_prefix: "bench{os.getpid()}"}}\n'
    if mode in ("ledger", "budgets"):
        extra += f'ledger: {{url: "sqlite:///{workdir}/ledger.db"}}\n'
    if mode == "budgets":
        extra += textwrap.dedent(
            """
            budgets:
              - {team: bench, period: day, limit_usd: 1000000, action: block}
              - {team: bench, app: wrk, period: month, limit_usd: 1000000, action: alert}
            """
        )
    return (
        textwrap.dedent(
            f"""
        server: {{listen: "{listen}", metrics_listen: "{metrics}"}}
        providers:
          openai: {{type: openai, base_url: "{sim_url}", api_key_env: BENCH_OPENAI_KEY}}
        routes:
          - {{model: "gpt-*", provider: openai}}
        keys:
          - {{sha256: "{digest}", team: bench, app: wrk}}
        """
        )
        + extra
    )


def start_gateway(config: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "metergate", "serve", "--config", str(config), "--log-level", "warning"]
    return subprocess.Popen(command, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run")
    parser.add_argument("--budgets", action="store_true", help="run the gateway with budgets and the SQLite ledger on")
    parser.add_argument("--ledger", action="store_true", help="run the gateway with the SQLite ledger only")
    parser.add_argument(
        "--nginx", action="store_true", help="also measure one nginx proxy hop, the reference (apt-get install nginx)"
    )
    parser.add_argument(
        "--compare",
        metavar="SRC",
        help="also run a gateway from another checkout's src directory (e.g. the previous commit's), side by side",
    )
    parser.add_argument(
        "--limits",
        choices=("local", "redis"),
        help="run the gateway with rate limits (counted in process, or shared through Redis at 127.0.0.1:6379), "
        "beside the same gateway without them",
    )
    args = parser.parse_args()
    if args.limits and args.compare:
        raise SystemExit("--limits compares with the same gateway without limits: leave out --compare")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install -y wrk")
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if args.nginx and nginx is None:
        raise SystemExit("--nginx needs nginx: apt-get install -y nginx-light")
    mode = "budgets" if args.budgets else "ledger" if args.ledger else "plain"
    sim_port, gw_port, metrics_port, nginx_port = free_port(), free_port(), free_port(), free_port()
    base_port, base_metrics_port = free_port(), free_port()
    sim_url = f"http://127.0.0.1:{sim_port}"
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        script = workdir / "post.lua"
        script.write_text(LUA)
        config = workdir / "gateway.yaml"
        config.write_text(
            gateway_config(
                sim_url, f"127.0.0.1:{gw_port}", f"127.0.0.1:{metrics_port}", workdir, mode, args.limits or ""
            )
        )
        env = dict(os.environ, BENCH_OPENAI_KEY="sk-sim-openai")
        try:
            procs.append(
                subprocess.Popen([sys.executable, "-m", "metergate.simulator", "--port", str(sim_port)], env=env)
            )
            procs.append(start_gateway(config, env))
            compare = args.compare or args.limits
            if compare:
                base_dir = workdir / "baseline"
                base_dir.mkdir()
                base_config = base_dir / "gateway.yaml"
                base_config.write_text(
                    gateway_config(sim_url, f"127.0.0.1:{base_port}", f"127.0.0.1:{base_metrics_port}", base_dir, mode)
                )
                base_env = {**env, "PYTHONPATH": str(Path(args.compare).resolve())} if args.compare else env
                procs.append(start_gateway(base_config, base_env))
                wait_http(f"http://127.0.0.1:{base_metrics_port}/healthz")
            if args.nginx:
                assert nginx is not None
                nginx_conf = workdir / "nginx.conf"
                nginx_conf.write_text(NGINX.format(dir=workdir, port=nginx_port, sim_port=sim_port))
                procs.append(subprocess.Popen([nginx, "-c", str(nginx_conf), "-p", str(workdir)]))
            wait_http(f"http://127.0.0.1:{metrics_port}/healthz")
            wait_http(f"{sim_url}/")  # the simulator too: the first run must not race its start
            direct = f"{sim_url}/v1/chat/completions"
            via = f"http://127.0.0.1:{gw_port}/v1/chat/completions"
            via_nginx = f"http://127.0.0.1:{nginx_port}/v1/chat/completions"
            via_base = f"http://127.0.0.1:{base_port}/v1/chat/completions"
            # Warm both paths (connection pools, price cards, caches).
            wrk(direct, CHAT_BODY, "sk-sim-openai", 4, 1, script)
            wrk(via, CHAT_BODY, GATEWAY_KEY, 4, 1, script)
            if compare:
                wrk(via_base, CHAT_BODY, GATEWAY_KEY, 4, 1, script)
            if args.nginx:
                wrk(via_nginx, CHAT_BODY, "sk-sim-openai", 4, 1, script)
            rows, nginx_rows, base_rows = [], [], []
            for label, body in (("non-streaming", CHAT_BODY), ("streaming", STREAM_BODY)):
                d1 = wrk(direct, body, "sk-sim-openai", 1, args.duration, script)
                g1 = wrk(via, body, GATEWAY_KEY, 1, args.duration, script)
                if compare:
                    b1 = wrk(via_base, body, GATEWAY_KEY, 1, args.duration, script)
                d32 = wrk(direct, body, "sk-sim-openai", 32, args.duration, script)
                g32 = wrk(via, body, GATEWAY_KEY, 32, args.duration, script)
                rows.append((label, d1, g1, d32, g32))
                if compare:
                    b32 = wrk(via_base, body, GATEWAY_KEY, 32, args.duration, script)
                    base_rows.append((label, d1, b1, d32, b32))
                if args.nginx:
                    n1 = wrk(via_nginx, body, "sk-sim-openai", 1, args.duration, script)
                    n32 = wrk(via_nginx, body, "sk-sim-openai", 32, args.duration, script)
                    nginx_rows.append((label, d1, n1, d32, n32))
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(timeout=30)
    mode = {"budgets": "budgets + SQLite ledger on", "ledger": "SQLite ledger on", "plain": "no budgets, no ledger"}[
        mode
    ]
    if args.limits:
        mode += f"; rate limits {'shared through Redis' if args.limits == 'redis' else 'counted in process'}"
    print(f"\nmetergate gateway benchmark ({mode}; wrk, 1 thread; {args.duration:.0f}s per run)\n")
    header = (
        f"{'call':<21}{'direct p50':>11}{'gw p50':>9}{'added p50':>11}{'added p99':>11}"
        f"{'direct rps':>12}{'gw rps':>9}{'kept':>7}"
    )
    print(header)
    print("-" * len(header))
    for label, d1, g1, d32, g32 in rows:
        print(_row(label, d1, g1, d32, g32))
    for label, d1, b1, d32, b32 in base_rows:
        print(_row(f"{label} {'no limits' if args.limits else 'compared'}", d1, b1, d32, b32))
    for label, d1, n1, d32, n32 in nginx_rows:
        print(_row(f"{label} nginx", d1, n1, d32, n32))
    print("\nadded = gateway minus direct at one connection; kept = gateway rps / direct rps at 32 connections")
    if base_rows and args.limits:
        print("no-limits rows: the same gateway without rate limits, run alternately with this one")
    elif base_rows:
        print(f"compared rows: the gateway from {args.compare}, run alternately with this one")
    if nginx_rows:
        print("nginx rows: one nginx proxy_pass hop (1 worker, keepalive upstream) in place of the gateway")


def _row(label: str, d1: Result, g1: Result, d32: Result, g32: Result) -> str:
    return (
        f"{label:<21}{d1.p50_ms:>9.3f}ms{g1.p50_ms:>7.3f}ms{g1.p50_ms - d1.p50_ms:>9.3f}ms"
        f"{g1.p99_ms - d1.p99_ms:>9.3f}ms{d32.rps:>12.0f}{g32.rps:>9.0f}{g32.rps / d32.rps:>7.2f}"
    )


if __name__ == "__main__":
    main()
