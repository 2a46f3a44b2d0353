"""Ledger write throughput (SQLite and PostgreSQL) and the records a `kill -9` can lose.

    python benchmarks/ledger_bench.py [--records 200000] [--pg postgresql://postgres@127.0.0.1:5432]

1. Store throughput: records written per second in the batches the writer uses (1000), through the same
   `Store.write` the gateway uses (SQLite executemany in one transaction; PostgreSQL COPY into a staging table).
2. End to end: `Ledger.submit` for every record, then time until the background writer has written them all.
3. Loss window: a gateway under load from 16 concurrent clients is killed with SIGKILL; acknowledged responses
   minus ledger rows is what was lost, also shown as milliseconds of traffic at the measured rate.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
import uuid
from decimal import Decimal
from pathlib import Path

import aiohttp
import psycopg

from metergate.config import LedgerConfig
from metergate.ledger import Ledger, record_row
from metergate.ledger.store import open_store
from metergate.simulator import SimulatorThread, free_port
from metergate.usage import Usage, UsageRecord


def make_record(i: int) -> UsageRecord:
    rec = UsageRecord(
        request_id=f"{uuid.uuid4().hex}-{i}",
        started_at=time.time(),
        team=f"team-{i % 7}",
        app=f"app-{i % 3}",
        key_id="bench",
        provider="openai",
        model="gpt-4o-mini",
        upstream_model="gpt-4o-mini",
        endpoint="/v1/chat/completions",
        code=200,
        stream=bool(i % 2),
        usage=Usage(input_tokens=1200 + i % 500, output_tokens=300, cache_read_tokens=i % 100),
        latency_s=0.42,
        ttft_s=0.1,
    )
    rec.set_cost(Decimal("0.000387"))
    return rec


def store_throughput(url: str, n: int) -> float:
    store = open_store(url)
    store.migrate()
    rows = [record_row(make_record(i), "bench") for i in range(n)]
    started = time.perf_counter()
    for i in range(0, n, 1000):
        store.write(rows[i : i + 1000])
    elapsed = time.perf_counter() - started
    store.close()
    return n / elapsed


async def end_to_end(url: str, n: int) -> float:
    ledger = Ledger(LedgerConfig(url=url, flush_interval_s=0.05), replica="bench")
    await ledger.start()
    base = ledger.written
    records = [make_record(i) for i in range(n)]
    started = time.perf_counter()
    for i, rec in enumerate(records):
        ledger.submit(rec)
        if i % 5000 == 0:
            await asyncio.sleep(0)  # let the writer run, as a serving event loop would
    while ledger.written - base < n:  # noqa: ASYNC110 - polling the writer's progress is the measurement
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - started
    await ledger.stop()
    return n / elapsed


def kill9_loss(tmp: Path, seconds: float, flush_s: float) -> tuple[int, int, float]:
    sim = SimulatorThread().start()
    key = "mg-bench"
    listen, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    db = tmp / "kill9.db"
    config = tmp / "kill9.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            server: {{listen: "{listen}", metrics_listen: "{metrics}"}}
            providers: {{openai: {{type: openai, base_url: "{sim.url}", api_key_env: BENCH_KEY}}}}
            routes: [{{model: "gpt-*", provider: openai}}]
            keys: [{{sha256: "{hashlib.sha256(key.encode()).hexdigest()}", team: bench, app: load}}]
            ledger: {{url: "sqlite:///{db}", flush_interval_s: {flush_s}}}
            """
        )
    )
    env = dict(os.environ, BENCH_KEY="sk-sim-openai")
    gw = subprocess.Popen([sys.executable, "-m", "metergate", "serve", "--config", str(config)], env=env)
    for _ in range(200):
        try:
            urllib.request.urlopen(f"http://{metrics}/readyz", timeout=1)
            break
        except OSError:
            time.sleep(0.05)
    acknowledged = 0

    async def client(session: aiohttp.ClientSession, stop_at: float) -> None:
        nonlocal acknowledged
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}
        while time.time() < stop_at:
            try:
                async with session.post(
                    f"http://{listen}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}
                ) as r:
                    await r.read()
                    if r.status == 200:
                        acknowledged += 1
            except aiohttp.ClientError:
                return

    async def load() -> None:
        async with aiohttp.ClientSession() as session:
            stop_at = time.time() + seconds + 5
            tasks = [asyncio.create_task(client(session, stop_at)) for _ in range(16)]
            await asyncio.sleep(seconds)
            gw.send_signal(signal.SIGKILL)
            await asyncio.gather(*tasks)

    asyncio.run(load())
    gw.wait()
    sim.stop()
    written = open_store(f"sqlite:///{db}").count()
    rate = acknowledged / seconds
    return acknowledged, written, rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        db_name = f"mg_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(f"{args.pg}/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{db_name}"')
        pg_url = f"{args.pg}/{db_name}"
        try:
            results = [
                ("SQLite store.write", store_throughput(f"sqlite:///{tmp}/a.db", args.records)),
                ("SQLite submit -> written", asyncio.run(end_to_end(f"sqlite:///{tmp}/b.db", args.records))),
                ("PostgreSQL store.write", store_throughput(pg_url, args.records)),
                ("PostgreSQL submit -> written", asyncio.run(end_to_end(pg_url, args.records))),
            ]
        finally:
            with psycopg.connect(f"{args.pg}/postgres", autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        print(f"\nledger write throughput ({args.records:,} records, batches of 1000)\n")
        for label, rate in results:
            print(f"  {label:<30}{rate:>12,.0f} records/s")
        acknowledged, written, rate = kill9_loss(tmp, seconds=4.0, flush_s=0.2)
        lost = acknowledged - written
        print(
            f"\nkill -9 under load (16 clients, flush_interval_s 0.2): {acknowledged} responses acknowledged, "
            f"{written} in the ledger, {lost} lost = {1000 * lost / rate:.0f} ms of traffic at {rate:,.0f} req/s\n"
        )


if __name__ == "__main__":
    main()
