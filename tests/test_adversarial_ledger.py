"""Attacks on the ledger: requests that used to keep records out of the database or kill its writer.

The ledger's promise: every request is recorded, once. A row the database refuses is isolated (the rest of its
batch is written), kept in a `.rejected` file beside the spool and counted; the writer survives any error; and
stop() leaves every pending record in the database, the spool, or a file in the temporary directory.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest

from metergate.config import LedgerConfig
from metergate.ledger import Ledger, record_row
from metergate.ledger.store import open_store
from metergate.simulator import SimulatorThread, free_port
from tests.conftest import KEYS, Gateway, create_pg_database, drop_pg_database, make_gateway, wait_for
from tests.test_ledger import ledger_url, record

__all__ = ["ledger_url"]  # the fixture, shared with test_ledger

AUTH = {"authorization": f"Bearer {KEYS['search/ranker']}"}


def chat(gw: Gateway, model: str = "gpt-4o-mini", **headers: str) -> int:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
    return httpx.post(
        f"{gw.url}/v1/chat/completions", content=body, headers={**AUTH, **headers}, timeout=30
    ).status_code


def bad_rows(url: str) -> list[tuple[object, ...]]:
    """Rows no code path of the gateway builds any more (record_row bounds them), written raw to prove that a row
    the database refuses cannot strand the rest of its batch."""
    past_bigint = list(record_row(record(1000), "t"))
    past_bigint[0], past_bigint[16] = "bad-bigint", 2**64
    rows = [tuple(past_bigint)]
    if url.startswith("postgresql"):
        nul = list(record_row(record(1001), "t"))
        nul[0], nul[6] = "bad-nul", "zz\x00"
        rows.append(tuple(nul))
    return rows


def test_a_row_the_database_refuses_is_isolated_from_its_batch(ledger_url: str) -> None:
    store = open_store(ledger_url)
    store.migrate()
    bad = bad_rows(ledger_url)
    good = [record_row(record(i), "t") for i in range(9)]
    rejected = store.write([*good[:4], *bad, *good[4:]])
    assert sorted(r.row[0] for r in rejected) == sorted(str(b[0]) for b in bad)
    assert store.count() == 9
    store.close()


def test_the_ledger_quarantines_refused_rows_counts_them_and_stays_up(ledger_url: str, tmp_path: Path) -> None:
    async def main() -> Ledger:
        ledger = Ledger(
            LedgerConfig(url=ledger_url, flush_interval_s=0.02, spool_path=str(tmp_path / "spool")), replica="t"
        )
        await ledger.start()
        for i in range(30):
            ledger.submit(record(i))
            if i % 10 == 0:
                ledger._pending.extend(bad_rows(ledger_url))
        # Until the writer has isolated every refused row: on a loaded machine a batch can still be in flight
        # after the queue is empty.
        for _ in range(300):
            metrics = {m.name: m.samples[0].value for m in ledger.collect()}
            if not ledger._pending and metrics["metergate_ledger_rejected_records"] >= 3 * len(bad_rows(ledger_url)):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)
        metrics = {m.name: m.samples[0].value for m in ledger.collect()}
        assert metrics["metergate_ledger_up"] == 1
        assert metrics["metergate_ledger_rejected_records"] == 3 * len(bad_rows(ledger_url))
        assert metrics["metergate_ledger_spooled_records"] == 0
        await ledger.stop()
        return ledger

    ledger = asyncio.run(main())
    assert open_store(ledger_url).count() == 30
    kept = (tmp_path / "spool.rejected").read_text().splitlines()
    assert len(kept) == 3 * len(bad_rows(ledger_url))
    assert len(ledger.spool) == 0


def test_a_nul_model_name_does_not_keep_records_out_of_postgresql(
    simulator: SimulatorThread, tmp_path: Path, tag: str
) -> None:
    """One `"zz\\u0000"` model per second kept 95% of all records out of PostgreSQL, with metergate_ledger_up at 1."""
    url = create_pg_database()
    gw = make_gateway(tmp_path, simulator.url, extra=f'ledger: {{url: "{url}", flush_interval_s: 0.05}}\n').start()
    try:
        statuses = []
        for i in range(50):
            statuses.append(chat(gw, "zz\u0000" if i % 5 == 0 else "gpt-4o-mini", **{"x-sim-tag": tag}))
            time.sleep(0.01)
        assert statuses.count(200) == 40 and statuses.count(400) == 10
        assert wait_for(lambda: gw.metrics().sum("metergate_ledger_records_written_total") == 50)
        assert gw.metrics().sum("metergate_ledger_up") == 1
        assert gw.stop() == 0
        assert open_store(url).count() == 50
        assert [p.stat().st_size for p in tmp_path.glob("metergate-ledger-*.spool")] in ([], [0])
    finally:
        gw.stop()
        drop_pg_database(url)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_usage_figure_past_bigint_neither_kills_the_writer_nor_strands_records(
    simulator: SimulatorThread, tmp_path: Path, tag: str, backend: str
) -> None:
    """An upstream reporting 2**63+5 output tokens: the SQLite writer thread died (every later record lost and
    SIGTERM exited 1); PostgreSQL refused the batch. Such a figure is now malformed usage, recorded as such."""
    url = create_pg_database() if backend == "postgresql" else f"sqlite:///{tmp_path}/ledger.db"
    gw = make_gateway(tmp_path, simulator.url, extra=f'ledger: {{url: "{url}", flush_interval_s: 0.05}}\n').start()
    try:
        assert chat(gw, **{"x-sim-tag": tag, "x-sim-output-tokens": str(2**63 + 5)}) == 502
        assert [chat(gw, **{"x-sim-tag": tag}) for _ in range(10)] == [200] * 10
        assert wait_for(lambda: gw.metrics().sum("metergate_ledger_records_written_total") == 11)
        assert gw.metrics().sum("llm_errors_total", error_type="upstream_malformed_usage") == 1
        assert gw.stop() == 0
        assert open_store(url).count() == 11
    finally:
        gw.stop()
        if backend == "postgresql":
            drop_pg_database(url)


def test_a_spool_that_cannot_be_written_loses_nothing(simulator: SimulatorThread, tmp_path: Path, tag: str) -> None:
    """Database down and spool unwritable: the writer used to die; now records wait in memory, the gauges say the
    ledger is down, and SIGTERM writes them to a file in the temporary directory (named in the log)."""
    (tmp_path / "not-a-dir").write_text("a file where the spool's directory should be")
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/none"
    gw = make_gateway(
        tmp_path,
        simulator.url,
        env={"TMPDIR": str(tmpdir)},
        extra=f'ledger: {{url: "{dead}", flush_interval_s: 0.05, spool_path: "{tmp_path}/not-a-dir/spool"}}\n',
    ).start()
    assert [chat(gw, **{"x-sim-tag": tag}) for _ in range(10)] == [200] * 10
    assert wait_for(lambda: gw.metrics().sum("metergate_ledger_pending_records") == 10)
    metrics = gw.metrics()
    assert metrics.sum("metergate_ledger_up") == 0
    assert metrics.sum("metergate_ledger_dropped_records_total") == 0
    assert gw.stop() == 0
    [saved] = list(tmpdir.glob("metergate-ledger-*.spool"))
    assert len(saved.read_text().splitlines()) == 10
    assert str(saved) in gw.log()


def test_a_full_spool_keeps_billed_records_before_requests_that_cost_nothing(tmp_path: Path) -> None:
    """During an outage a flood of refused requests filled the spool and the billed records after it were dropped."""
    from metergate.ledger.spool import Spool

    spool = Spool(tmp_path / "s.spool", max_records=5)
    refused = []
    for i in range(4):
        row = list(record_row(record(i), "t"))
        row[0], row[11], row[12], row[16] = f"refused-{i}", 0, 0, 0
        refused.append(tuple(row))
    billed = [record_row(record(10 + i), "t") for i in range(4)]
    spool.add(refused[:2])
    spool.add([*refused[2:], *billed])
    kept = [row[0] for batch in spool.batches(100) for row in batch]
    assert kept == ["refused-0", "refused-1", "r-10", "r-11", "r-12"]
    assert spool.dropped == 3
