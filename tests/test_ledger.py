"""The durable ledger: schema, exact records, batching, spool on failure, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest

from metergate.config import LedgerConfig
from metergate.ledger import Ledger, LedgerError, record_row
from metergate.ledger.schema import SCHEMA_VERSION
from metergate.ledger.store import open_store
from metergate.simulator import free_port
from metergate.usage import Usage, UsageRecord, from_pusd, to_pusd
from tests.conftest import KEYS, Gateway, Metrics, make_gateway, wait_for
from tests.pricesheet import cost

MESSAGES = [{"role": "user", "content": "ledger"}]


def record(i: int, team: str = "search", cost_usd: str = "0.000123") -> UsageRecord:
    rec = UsageRecord(
        request_id=f"r-{i}",
        started_at=time.time(),
        team=team,
        app="ranker",
        key_id="k",
        provider="openai",
        model="gpt-4o-mini",
        upstream_model="gpt-4o-mini",
        endpoint="/v1/chat/completions",
        code=200,
        stream=False,
        usage=Usage(input_tokens=100 + i, output_tokens=10),
        latency_s=0.01,
    )
    rec.set_cost(Decimal(cost_usd))
    return rec


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/ledger.db"
        return
    from tests.conftest import create_pg_database, drop_pg_database

    url = create_pg_database()
    yield url
    drop_pg_database(url)


def test_pico_dollars_are_exact() -> None:
    for text in ("0.000000020", "0.0000000375", "1234.567890123456", "0"):
        assert from_pusd(to_pusd(Decimal(text))) == Decimal(text)


def test_migrations_and_idempotent_writes(ledger_url: str) -> None:
    store = open_store(ledger_url)
    assert store.migrate() == 0
    assert store.migrate() == SCHEMA_VERSION  # a second run applies nothing
    assert store.schema_version() == SCHEMA_VERSION
    rows = [record_row(record(i), "test") for i in range(50)]
    store.write(rows)
    store.write(rows[:20])  # a replayed batch is not counted twice
    assert store.count() == 50
    spend = store.spend(0, time.time() + 10)
    assert spend == {("search", "ranker"): 50 * to_pusd(Decimal("0.000123"))}
    store.close()


def test_a_newer_schema_is_refused_clearly(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/l.db"
    store = open_store(url)
    store.migrate()
    store._execute("INSERT INTO schema_migrations VALUES (999, 'from the future', 0)")
    with pytest.raises(LedgerError, match="newer than this metergate"):
        store.migrate()


def test_corrupted_sqlite_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(LedgerError, match="not a database"):
        store = open_store(f"sqlite:///{path}")
        store.migrate()


def test_writer_spools_while_the_database_is_down_and_replays(tmp_path: Path) -> None:
    """In-process: a locked SQLite file makes writes fail; records wait in the spool, then all arrive."""

    async def main() -> None:
        url = f"sqlite:///{tmp_path}/l.db"
        ledger = Ledger(LedgerConfig(url=url, flush_interval_s=0.05), replica="t")
        await ledger.start()
        blocker = sqlite3.connect(tmp_path / "l.db", timeout=0.1, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        store = await ledger.store()
        store._conn.execute("PRAGMA busy_timeout = 100")  # type: ignore[attr-defined]
        for i in range(300):
            ledger.submit(record(i))
        await asyncio.sleep(0.5)
        assert len(ledger.spool) == 300 and not ledger.up
        blocker.execute("ROLLBACK")
        blocker.close()
        for _ in range(100):
            if len(ledger.spool) == 0 and ledger.up:
                break
            await asyncio.sleep(0.1)
        await ledger.stop()
        assert open_store(url).count() == 300

    asyncio.run(main())


def test_stop_spools_what_the_database_refuses(tmp_path: Path) -> None:
    async def main() -> None:
        url = f"sqlite:///{tmp_path}/l.db"
        ledger = Ledger(LedgerConfig(url=url, flush_interval_s=10), replica="t")
        await ledger.start()
        blocker = sqlite3.connect(tmp_path / "l.db", isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        (await ledger.store())._conn.execute("PRAGMA busy_timeout = 50")  # type: ignore[attr-defined]
        for i in range(10):
            ledger.submit(record(i))
        await ledger.stop(flush_timeout_s=2)
        blocker.execute("ROLLBACK")
        assert len(ledger.spool) == 10
        # The next start replays the spool.
        again = Ledger(LedgerConfig(url=url, flush_interval_s=0.05), replica="t")
        await again.start()
        for _ in range(50):
            if len(again.spool) == 0:
                break
            await asyncio.sleep(0.1)
        await again.stop()
        assert open_store(url).count() == 10

    asyncio.run(main())


# --- through the gateway -----------------------------------------------------------------------------------


@pytest.fixture
def ledger_gateway(simulator, tmp_path: Path, ledger_url: str) -> Iterator[Gateway]:
    gw = make_gateway(
        tmp_path, simulator.url, extra=f'ledger: {{url: "{ledger_url}", flush_interval_s: 0.1}}\n'
    ).start()
    yield gw
    gw.stop()


def _send(gw: Gateway, tag: str, n: int) -> None:
    for i, scope in zip(range(n), list(KEYS) * n, strict=False):
        c = openai.OpenAI(
            base_url=f"{gw.url}/v1",
            api_key=KEYS[scope],
            max_retries=0,
            default_headers={"x-sim-tag": f"{tag}|{scope}", "x-sim-cached-tokens": str(i % 3)},
        )
        c.chat.completions.create(
            model="gpt-4o-mini" if i % 2 else "gpt-4o", messages=MESSAGES, stream=bool(i % 3 == 0)
        )


def test_every_request_is_recorded_exactly(ledger_gateway: Gateway, simulator, tag: str, ledger_url: str) -> None:
    _send(ledger_gateway, tag, 24)
    counters = ledger_gateway.metrics()
    assert ledger_gateway.stop() == 0  # SIGTERM flushes the pending batch
    store = open_store(ledger_url)
    rows = store.aggregate(0, time.time() + 60, ["team", "app", "model"])
    got = {r.group: (r.requests, r.tokens_in, r.tokens_out, r.tokens_cached, from_pusd(r.cost_pusd)) for r in rows}
    want: dict[tuple[str, ...], list] = {}  # type: ignore[type-arg]
    for b in simulator.app.billed():
        if not (b.tag and b.tag.startswith(tag)):
            continue
        team, app = b.tag.split("|")[1].split("/")
        w = want.setdefault((team, app, b.model), [0, 0, 0, 0, Decimal(0)])
        w[0] += 1
        w[1] += b.reported.input
        w[2] += b.reported.output
        w[3] += b.reported.cached
        w[4] += cost(b.model, b.reported)
    # The ledger holds exactly what the provider billed, per team, app and model, to the pico-dollar...
    assert got == {k: tuple(v) for k, v in want.items()}
    # ...and agrees with the gateway's own counters for the same traffic.
    for (team, app, model), (requests, tokens_in, tokens_out, _, money) in got.items():
        labels = {"team": team, "app": app, "model": model}
        assert counters.sum("llm_requests_total", **labels) == requests
        assert counters.sum("llm_tokens_in", **labels) == tokens_in
        assert counters.sum("llm_tokens_out", **labels) == tokens_out
        assert abs(Decimal(repr(counters.sum("llm_total_cost_usd", **labels))) - money) <= Decimal("1e-12")


def test_sigterm_loses_nothing_already_counted(simulator, tmp_path: Path, tag: str) -> None:
    url = f"sqlite:///{tmp_path}/l.db"
    gw = make_gateway(tmp_path, simulator.url, extra=f'ledger: {{url: "{url}", flush_interval_s: 30}}\n').start()
    _send(gw, tag, 12)  # with a 30 s flush interval, everything is still pending when SIGTERM arrives
    metrics = gw.metrics()
    assert gw.stop(signal.SIGTERM) == 0
    assert open_store(url).count() == metrics.sum("llm_requests_total") == 12


def test_kill_9_loses_at_most_the_last_flush_interval(simulator, tmp_path: Path, tag: str) -> None:
    url = f"sqlite:///{tmp_path}/l.db"
    gw = make_gateway(tmp_path, simulator.url, extra=f'ledger: {{url: "{url}", flush_interval_s: 0.2}}\n').start()
    done: list[float] = []
    c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEYS["search/ranker"], max_retries=0)
    deadline = time.time() + 2.0
    while time.time() < deadline:
        c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        done.append(time.time())
    killed_at = time.time()
    gw.stop(signal.SIGKILL)
    written = open_store(url).count()
    lost = len(done) - written
    recent = sum(1 for t in done if t > killed_at - 0.5)  # requests answered in the last 0.5 s
    assert 0 <= lost <= recent, (len(done), written, recent)


class TcpCut:
    """A TCP relay to PostgreSQL that a test can cut and restore, to take the database away mid-load."""

    def __init__(self, target_port: int = 5432) -> None:
        self.port = free_port()
        self.target = target_port
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._server.settimeout(0.1)
        self._conns: list[socket.socket] = []
        self.open = True
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self._server.accept()
            except OSError:
                continue
            if not self.open:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                b.sendall(data)
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.open = False
        for s in self._conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self._conns = []

    def restore(self) -> None:
        self.open = True

    def close(self) -> None:
        self._stop = True
        self.cut()
        self._server.close()


def test_postgres_connection_cut_mid_load_loses_nothing(simulator, tmp_path: Path, tag: str, pg_url: str) -> None:
    relay = TcpCut()
    via_relay = pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}")
    gw = make_gateway(tmp_path, simulator.url, extra=f'ledger: {{url: "{via_relay}", flush_interval_s: 0.1}}\n').start()
    try:
        c = openai.OpenAI(
            base_url=f"{gw.url}/v1", api_key=KEYS["ads/bidder"], max_retries=0, default_headers={"x-sim-tag": tag}
        )
        for i in range(90):
            if i == 30:
                relay.cut()
            if i == 70:
                relay.restore()
            c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # traffic keeps flowing
        errors = Metrics.parse(httpx.get(gw.metrics_url).text).sum("metergate_ledger_write_errors_total")
        assert errors > 0  # the cut really happened while traffic flowed
        assert wait_for(lambda: open_store(pg_url).count() == 90, timeout=30)
        assert wait_for(lambda: "metergate_ledger_spooled_records 0.0" in httpx.get(gw.metrics_url).text)
    finally:
        gw.stop()
        relay.close()
    assert open_store(pg_url).count() == 90
    assert "records wait in the spool" in gw.log()


def test_corrupted_sqlite_at_startup_keeps_traffic_flowing(simulator, tmp_path: Path, tag: str) -> None:
    path = tmp_path / "corrupt.db"
    path.write_bytes(b"garbage" * 1000)
    gw = make_gateway(tmp_path, simulator.url, extra=f'ledger: {{url: "sqlite:///{path}"}}\n').start()
    try:
        c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEYS["ads/bidder"], max_retries=0)
        for _ in range(5):
            c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        text = httpx.get(gw.metrics_url).text
        assert "metergate_ledger_up 0.0" in text
    finally:
        gw.stop()
    assert "not a database" in gw.log() and "Traceback" not in gw.log()
    # Nothing was lost: the five records wait in the spool for a usable database.
    spool = Path(str(path) + ".spool")
    assert len(spool.read_text().splitlines()) == 5


def test_a_filter_with_a_nul_is_refused_before_it_reaches_the_database(ledger_url: str) -> None:
    """PostgreSQL refuses a NUL in a parameter (the query would fail with a 500); no stored value has one."""
    store = open_store(ledger_url)
    store.migrate()
    for query in (
        lambda: store.aggregate(0, 1e10, ["team"], {"team": "a\x00b"}),
        lambda: store.recent(0, 1e10, 10, {"tag.customer": "\x00"}),
        lambda: store.cost_series(0, 1e10, 900, "team", {"team": "x" * 2000}),
    ):
        with pytest.raises(ValueError, match="NUL or past 1024"):
            query()
    assert store.recent(0, 1e10, 10, {"team": "nobody"}) == []
    store.close()
