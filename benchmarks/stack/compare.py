"""Server and client stacks compared for a metering proxy, side by side in one run.

    python benchmarks/stack/compare.py   # needs wrk; granian is optional (pip install granian)

Each candidate runs the same minimal proxy (proxies.py) in front of the same minimal upstream (upstream.py) and is
driven by wrk: 32 connections for throughput, 1 connection for latency. The figures chose metergate's stack.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
LUA = 'wrk.method = "POST"\nwrk.body = os.getenv("BODY")\nwrk.headers["Content-Type"] = "application/json"\n'
PLAIN = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
STREAM = '{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}'


def wrk(port: int, body: str, connections: int, seconds: int = 5) -> tuple[float, str]:
    script = HERE / ".post.lua"
    script.write_text(LUA)
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}/v1/chat/completions",
        ],
        env=dict(os.environ, BODY=body),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)  # type: ignore[union-attr]
    return rps, p50


def measure(label: str, cmd: list[str], env: dict[str, str]) -> None:
    proc = subprocess.Popen(cmd, env=env, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2.5)
    try:
        plain = wrk(9002, PLAIN, 32)
        stream = wrk(9002, STREAM, 32)
        lat = wrk(9002, PLAIN, 1)
        print(f"{label:<28}{plain[0]:>12.0f}{stream[0]:>12.0f}{lat[1]:>12}")
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    py = sys.executable
    env = dict(os.environ, UPSTREAM="http://127.0.0.1:9001")
    up = subprocess.Popen([py, "upstream.py", "9001"], cwd=HERE)
    time.sleep(2)
    try:
        print(f"{'stack (server + client)':<28}{'rps plain':>12}{'rps stream':>12}{'p50 c=1':>12}")
        alone = (wrk(9001, PLAIN, 32)[0], wrk(9001, STREAM, 32)[0], wrk(9001, PLAIN, 1)[1])
        print(f"{'(upstream alone)':<28}{alone[0]:>12.0f}{alone[1]:>12.0f}{alone[2]:>12}")
        measure("uvicorn+httptools + aiohttp", [py, "proxies.py", "uvicorn", "9002"], dict(env, CLIENT="aiohttp"))
        measure("aiohttp server + aiohttp", [py, "proxies.py", "aiohttp", "9002"], dict(env, CLIENT="aiohttp"))
        measure("uvicorn+httptools + httpx", [py, "proxies.py", "uvicorn", "9002"], dict(env, CLIENT="httpx"))
        if importlib.util.find_spec("httpx2"):
            measure("uvicorn+httptools + httpx2", [py, "proxies.py", "uvicorn", "9002"], dict(env, CLIENT="httpx2"))
        if importlib.util.find_spec("granian"):
            granian = [
                py,
                "-m",
                "granian",
                "--interface",
                "asgi",
                "--loop",
                "uvloop",
                "--host",
                "127.0.0.1",
                "--port",
                "9002",
                "--log-level",
                "warning",
                "proxies:asgi_app",
            ]
            measure("granian + aiohttp", granian, dict(env, CLIENT="aiohttp"))
        else:
            print("granian not installed (pip install granian) - skipped")
    finally:
        up.terminate()
        up.wait()


if __name__ == "__main__":
    main()
