"""The durable usage ledger: one record per request, written in batches off the request path.

`Ledger.submit` only appends to an in-memory batch. A background task writes batches every `flush_interval_s`
(or as soon as `batch_size` records wait) from a dedicated thread. When the database fails, the batch goes to the
on-disk spool and traffic keeps flowing; spooled records are replayed when the database answers again. On SIGTERM
the pending batch is flushed (or spooled). What a `kill -9` can lose is what was submitted in the last
`flush_interval_s` and not yet written: see deploy/README.md for the measured window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from metergate.config import LedgerConfig
from metergate.ledger.spool import Spool
from metergate.ledger.store import ApiKey, LedgerError, Store, open_store, sqlite_path
from metergate.usage import UsageRecord

log = logging.getLogger("metergate.ledger")
T = TypeVar("T")


def record_row(rec: UsageRecord, replica: str) -> tuple[Any, ...]:
    u = rec.usage
    return (
        rec.request_id,
        rec.started_at,
        rec.team,
        rec.app,
        rec.key_id,
        rec.provider,
        rec.model,
        rec.upstream_model,
        rec.endpoint,
        rec.code,
        int(rec.stream),
        u.input_tokens,
        u.output_tokens,
        u.cache_read_tokens,
        u.cache_write_tokens,
        u.reasoning_tokens,
        rec.cost_pusd,
        int(rec.priced),
        int(rec.metered),
        rec.latency_s,
        rec.ttft_s,
        rec.error_type,
        replica,
    )


def default_spool_path(config: LedgerConfig) -> Path:
    if config.spool_path:
        return Path(config.spool_path)
    path = sqlite_path(config.url)
    return path.with_name(path.name + ".spool") if path is not None else Path("metergate-ledger.spool")


class Ledger:
    """The store, its worker thread, the batching writer and the spool."""

    def __init__(self, config: LedgerConfig, replica: str | None = None) -> None:
        self.config = config
        self.replica = replica or f"{socket.gethostname()}-{os.getpid()}"
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metergate-ledger")
        self._store: Store | None = None
        self._pending: list[tuple[Any, ...]] = []
        # The batch being written; if shutdown cuts the write short it is spooled, not lost (replay is idempotent).
        self._inflight: list[tuple[Any, ...]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.spool = Spool(default_spool_path(config), config.spool_max_records)
        self.written = 0
        self.write_errors = 0
        self.up = False
        self._last_error_log = 0.0
        self._stopping = False

    # --- lifecycle -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self._ensure_store()
        self._task = asyncio.create_task(self._run(), name="metergate-ledger-writer")

    async def stop(self, flush_timeout_s: float = 30.0) -> None:
        """Flush what is pending; whatever the database does not take goes to the spool, so nothing is lost."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._task, flush_timeout_s)
        if self._inflight:
            self.spool.add(self._inflight)
            self._inflight = []
        if self._pending:
            self.spool.add(self._pending)
            self._pending = []
        if self._store is not None:
            await self.call(self._store.close)
        self._executor.shutdown(wait=True)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a store operation on the ledger's own thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def store(self) -> Store:
        store = await self._ensure_store()
        if store is None:
            raise LedgerError(f"the ledger database is not available: {self.config.url}")
        return store

    async def _ensure_store(self) -> Store | None:
        if self._store is not None:
            return self._store
        try:
            store = await self.call(open_store, self.config.url)
            await self.call(store.migrate)
        except LedgerError as exc:
            self._report_down(exc)
            return None
        self._store = store
        self.up = True
        return store

    def _report_down(self, exc: Exception) -> None:
        self.up = False
        now = time.monotonic()
        if now - self._last_error_log > 30:
            self._last_error_log = now
            log.error(
                "ledger %s is not usable (%s); records wait in the spool %s (%d records) until it is back",
                _redact(self.config.url),
                exc,
                self.spool.path,
                len(self.spool) + len(self._pending),
            )

    # --- writing ---------------------------------------------------------------------------------------------

    def submit(self, record: UsageRecord) -> None:
        self._pending.append(record_row(record, self.replica))
        if len(self._pending) >= self.config.batch_size:
            self._wake.set()

    def sink(self, record: UsageRecord) -> None:
        self.submit(record)

    async def _run(self) -> None:
        backoff = self.config.flush_interval_s
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), backoff)
            self._wake.clear()
            ok = await self._flush()
            if ok and len(self.spool):
                ok = await self._replay_spool()
            backoff = self.config.flush_interval_s if ok else min(max(backoff * 2, 0.5), 10.0)
            if self._stopping and (not self._pending or not ok):
                return

    async def _flush(self) -> bool:
        if not self._pending:
            return True
        batch, self._pending = self._pending, []
        self._inflight = batch
        store = await self._ensure_store()
        if store is None:
            self.spool.add(batch)
            self._inflight = []
            return False
        try:
            for chunk in _chunks(batch, 5000):
                await self.call(store.write, chunk)
        except LedgerError as exc:
            self.write_errors += 1
            self._reset_store(store)
            self.spool.add(batch)  # idempotent on request_id: rows already written are skipped on replay
            self._inflight = []
            self._report_down(exc)
            return False
        self._inflight = []
        self.written += len(batch)
        self.up = True
        return True

    async def flush_then(self, query: Callable[[Store], T]) -> T:
        """Write everything submitted so far, then run `query`, with no other write in between.

        The pending batch is taken before the first await, so a caller that snapshots its own state right before
        calling knows exactly which records the query sees: those submitted before the call (earlier batches are
        ahead of this one on the ledger's single thread). Raises LedgerError if the write fails (the batch is
        spooled).
        """
        batch, self._pending = self._pending, []
        store = await self._ensure_store()
        if store is None:
            self.spool.add(batch)
            raise LedgerError(f"the ledger database is not available: {_redact(self.config.url)}")

        def write_then_query() -> T:
            store.write(batch)
            return query(store)

        try:
            result = await self.call(write_then_query)
        except LedgerError:
            self.spool.add(batch)
            self._reset_store(store)
            raise
        self.written += len(batch)
        return result

    async def _replay_spool(self) -> bool:
        store = await self._ensure_store()
        if store is None:
            return False
        replayed = 0
        try:
            for chunk in self.spool.batches(5000):
                await self.call(store.write, chunk)
                replayed += len(chunk)
        except LedgerError as exc:
            self.write_errors += 1
            self._reset_store(store)
            self._report_down(exc)
            return False
        self.spool.clear()
        self.written += replayed
        log.info("ledger is back: %d spooled records written", replayed)
        return True

    def _reset_store(self, store: Store) -> None:
        # Reopen on the next attempt: a locked or restarted database needs a fresh connection.
        self._store = None
        self._executor.submit(store.close)

    async def flush_now(self) -> None:
        """Write everything pending (used by reports and tests that need read-your-writes)."""
        ok = await self._flush()
        if ok and len(self.spool):
            await self._replay_spool()

    # --- keys ------------------------------------------------------------------------------------------------

    async def active_keys(self) -> list[ApiKey]:
        store = await self.store()
        return await self.call(store.keys, False)

    # --- metrics ---------------------------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("metergate_ledger_up", "1 when the ledger database accepts writes.")
        up.add_metric([], 1 if self.up else 0)
        yield up
        written = CounterMetricFamily("metergate_ledger_records_written", "Records written to the ledger database.")
        written.add_metric([], self.written)
        yield written
        errors = CounterMetricFamily("metergate_ledger_write_errors", "Failed ledger batch writes (then spooled).")
        errors.add_metric([], self.write_errors)
        yield errors
        spooled = GaugeMetricFamily("metergate_ledger_spooled_records", "Records waiting in the local spool.")
        spooled.add_metric([], len(self.spool))
        yield spooled
        pending = GaugeMetricFamily("metergate_ledger_pending_records", "Records waiting for the next batch.")
        pending.add_metric([], len(self._pending))
        yield pending
        dropped = CounterMetricFamily("metergate_ledger_dropped_records", "Records lost to a full spool.")
        dropped.add_metric([], self.spool.dropped)
        yield dropped


def _chunks(rows: list[tuple[Any, ...]], size: int) -> Iterator[list[tuple[Any, ...]]]:
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


def _redact(url: str) -> str:
    """A database URL without its password, for logs."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}" if ":" in creds else url
    return url


__all__ = ["ApiKey", "Ledger", "LedgerError", "record_row", "sqlite_path"]
