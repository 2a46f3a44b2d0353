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
import hashlib
import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from metergate.config import LedgerConfig
from metergate.ledger.schema import RECORD_COLUMNS
from metergate.ledger.spool import Spool
from metergate.ledger.store import (
    ApiKey,
    BatchRow,
    LedgerError,
    Rejected,
    Store,
    open_store,
    sqlite_path,
    tags_json,
)
from metergate.usage import UsageRecord

log = logging.getLogger("metergate.ledger")
T = TypeVar("T")


# Column bounds: a row the database would refuse must never be built. Counts and costs are clamped to BIGINT,
# client-influenced text is cut and stripped of NUL (PostgreSQL TEXT cannot hold it).
MAX_BIGINT = 2**63 - 1
MAX_TEXT = 256


def bounded_text(value: str, limit: int = MAX_TEXT) -> str:
    if len(value) > limit:
        value = value[: limit - 1] + "…"
    if not value.isascii():
        value = value.encode("utf-8", "replace").decode()  # lone surrogates cannot be stored or spooled
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def _big(value: int) -> int:
    return value if 0 <= value <= MAX_BIGINT else max(0, min(value, MAX_BIGINT))


def record_row(rec: UsageRecord, replica: str) -> tuple[Any, ...]:
    u = rec.usage
    return (
        rec.request_id,
        rec.started_at,
        rec.team,
        rec.app,
        rec.key_id,
        rec.provider,
        bounded_text(rec.model),
        bounded_text(rec.upstream_model),
        rec.endpoint,
        rec.code,
        int(rec.stream),
        _big(u.input_tokens),
        _big(u.output_tokens),
        _big(u.cache_read_tokens),
        _big(u.cache_write_tokens),
        _big(u.reasoning_tokens),
        _big(rec.cost_pusd),
        int(rec.priced),
        int(rec.metered),
        rec.latency_s,
        rec.ttft_s,
        rec.error_type,
        replica,
        record_details(rec),
        bounded_text(rec.user) if rec.user is not None else None,
        tags_json(rec.tags),
    )


_MAX_PARTS = 64


def record_details(rec: UsageRecord) -> str | None:
    """What a row's columns cannot hold, as JSON (None for the usual request): non-token units, the passes billed
    at their own model, the price modifiers that applied, modality counts and usage flags. Bounded in size."""
    u = rec.usage
    details: dict[str, Any] = {}
    if u.units:
        details["units"] = {unit: n for unit, n in u.units.items() if n}
    modalities = {
        name: n
        for name, n in (
            ("input_audio", u.input_audio_tokens),
            ("cache_audio_read", u.cache_audio_read_tokens),
            ("input_image", u.input_image_tokens),
            ("cache_image_read", u.cache_image_read_tokens),
            ("output_audio", u.output_audio_tokens),
            ("output_image", u.output_image_tokens),
        )
        if n
    }
    if modalities:
        details["modalities"] = modalities
    if u.parts:
        details["parts"] = [
            {
                "kind": p.kind,
                "model": bounded_text(p.model) if p.model else None,
                "tokens_in": p.usage.input_tokens,
                "tokens_out": p.usage.output_tokens,
                "tokens_cached": p.usage.cache_read_tokens,
                "tokens_cache_write": p.usage.cache_write_tokens,
            }
            for p in u.parts[:_MAX_PARTS]
        ]
        if len(u.parts) > _MAX_PARTS:
            details["parts_omitted"] = len(u.parts) - _MAX_PARTS
    if rec.price_notes:
        details["pricing"] = [bounded_text(n, 120) for n in rec.price_notes[:16]]
    if u.flags:
        details["flags"] = list(u.flags)
    return orjson.dumps(details).decode() if details else None


def _full_row(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """A spooled row written by an older metergate, padded with the columns added since."""
    missing = len(RECORD_COLUMNS) - len(row)
    return row + (None,) * missing if missing > 0 else row


def default_spool_path(config: LedgerConfig) -> Path:
    """Beside a SQLite file; for a database server, named after the database (never shared by two ledgers that
    happen to run in one directory: a replay would write one's records into the other)."""
    if config.spool_path:
        return Path(config.spool_path)
    path = sqlite_path(config.url)
    if path is not None:
        return path.with_name(path.name + ".spool")
    digest = hashlib.sha256(redact_url(config.url).encode()).hexdigest()[:12]
    return Path(f"metergate-ledger-{digest}.spool")


class Ledger:
    """The store, its worker thread, the batching writer and the spool."""

    def __init__(self, config: LedgerConfig, replica: str | None = None) -> None:
        self.config = config
        self.replica = replica or f"{socket.gethostname()}-{os.getpid()}"
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metergate-ledger")
        self._store: Store | None = None
        # Reports and the console read on a connection and thread of their own: a long query never holds up the
        # writer, and a busy writer never holds up a page (SQLite in WAL mode, PostgreSQL: concurrent readers).
        self._read_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metergate-ledger-read")
        self._reader: Store | None = None
        self._pending: list[tuple[Any, ...]] = []
        # The batch being written; if shutdown cuts the write short it is spooled, not lost (replay is idempotent).
        self._inflight: list[tuple[Any, ...]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.spool = Spool(default_spool_path(config), config.spool_max_records)
        self.rejected = self._rejected_spool()
        self.written = 0
        self.write_errors = 0
        self.rejected_count = 0
        self.lost = 0  # records neither written, spooled nor kept in memory (reported, never silent)
        self.up = False
        self._last_error_log = 0.0
        self._stopping = False

    # --- lifecycle -------------------------------------------------------------------------------------------

    def _rejected_spool(self) -> Spool:
        """Rows the database refused (not an outage: the row itself), kept beside the spool for an operator."""
        path = self.spool.path
        return Spool(path.with_name(path.name + ".rejected"), self.config.spool_max_records)

    async def start(self) -> None:
        """Start writing: claim the spool (replaying what a previous process left in it) and start the writer."""
        self.spool.claim()
        self.rejected = self._rejected_spool()
        await self._ensure_store()
        self._task = asyncio.create_task(self._run(), name="metergate-ledger-writer")

    async def stop(self, flush_timeout_s: float = 30.0) -> None:
        """Flush what is pending; whatever the database does not take goes to the spool (or, if the spool cannot
        be written, to a file in the temporary directory), so nothing is lost silently."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._task, flush_timeout_s)
        remaining, self._inflight, self._pending = self._inflight + self._pending, [], []
        if remaining:
            self._keep(remaining, last_chance=True)
        if self._store is not None:
            with contextlib.suppress(Exception):
                await self.call(self._store.close)
        self._executor.shutdown(wait=True)
        reader, self._reader = self._reader, None
        if reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.get_running_loop().run_in_executor(self._read_executor, reader.close)
        self._read_executor.shutdown(wait=True)
        self.spool.close()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a store operation on the ledger's own thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def read(self, query: Callable[[Store], T]) -> T:
        """Run a read-only query on the reading connection (opened on first use, reopened after an error)."""
        await self.store()  # the database exists and is migrated

        def run() -> T:
            if self._reader is None:
                self._reader = open_store(self.config.url)
            try:
                return query(self._reader)
            except LedgerError:
                with contextlib.suppress(Exception):
                    self._reader.close()
                self._reader = None
                raise

        return await asyncio.get_running_loop().run_in_executor(self._read_executor, run)

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
                redact_url(self.config.url),
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
            try:
                ok = await self._flush()
                if ok and len(self.spool):
                    ok = await self._replay_spool()
            except Exception:
                # Nothing may stop the writer: later records would silently never be written.
                log.exception("ledger writer: unexpected error; pending records are kept and retried")
                self.write_errors += 1
                self.up = False
                ok = False
            backoff = self.config.flush_interval_s if ok else min(max(backoff * 2, 0.5), 10.0)
            if self._stopping and (not self._pending or not ok):
                return

    async def _flush(self) -> bool:
        if not self._pending:
            return True
        batch, self._pending = self._pending, []
        # Until the write is done the batch is `_inflight`: if shutdown cancels the write, stop() spools it.
        self._inflight = batch
        store = await self._ensure_store()
        if store is None:
            self._inflight = []
            self._keep(batch)
            return False
        rejected: list[Rejected] = []
        try:
            for chunk in _chunks(batch, 5000):
                rejected += await self.call(store.write, chunk)
        except LedgerError as exc:
            self.write_errors += 1
            self._reset_store(store)
            self._inflight = []
            self._keep(batch)  # idempotent on request_id: rows already written are skipped on replay
            self._report_down(exc)
            return False
        except Exception:
            self.write_errors += 1
            self._inflight = []
            self._keep(batch)
            raise
        self._inflight = []
        self._quarantine(rejected)
        self.written += len(batch) - len(rejected)
        self.up = True
        return True

    def _keep(self, rows: list[tuple[Any, ...]], last_chance: bool = False) -> None:
        """Rows that could not be written now: to the spool, or back into memory while the spool cannot be
        written (bounded by spool_max_records); at shutdown, to a file in the temporary directory."""
        try:
            self.spool.add(rows)
            return
        except OSError as exc:
            self.up = False
            log.error("ledger spool %s cannot be written (%s): %d records", self.spool.path, exc, len(rows))
        if not last_chance:
            room = self.config.spool_max_records - len(self._pending)
            kept = rows[: max(room, 0)]
            self._pending[:0] = kept
            self.lost += len(rows) - len(kept)
            return
        fallback = Path(tempfile.gettempdir()) / f"metergate-ledger-{self.replica}-{int(time.time())}.spool"
        try:
            Spool(fallback, len(rows)).add(rows)
            log.error(
                "ledger: %d records written to %s; replay them with that file as ledger.spool_path", len(rows), fallback
            )
        except OSError as exc:
            self.lost += len(rows)
            log.critical("ledger: %d records could not be written anywhere (%s)", len(rows), exc)

    def _quarantine(self, rejected: list[Rejected]) -> None:
        if not rejected:
            return
        self.rejected_count += len(rejected)
        log.error(
            "ledger: the database refused %d record(s), e.g. request %s (%s); kept in %s",
            len(rejected),
            rejected[0].row[0],
            rejected[0].reason,
            self.rejected.path,
        )
        try:
            self.rejected.add([(*r.row, r.reason) for r in rejected])
        except OSError as exc:
            self.lost += len(rejected)
            log.error("ledger: cannot keep refused records in %s: %s", self.rejected.path, exc)

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
            self._keep(batch)
            raise LedgerError(f"the ledger database is not available: {redact_url(self.config.url)}")

        def write_then_query() -> tuple[list[Rejected], T]:
            rejected = store.write(batch)
            return rejected, query(store)

        try:
            rejected, result = await self.call(write_then_query)
        except LedgerError:
            self._keep(batch)
            self._reset_store(store)
            raise
        except Exception:
            self._keep(batch)
            raise
        self._quarantine(rejected)
        self.written += len(batch) - len(rejected)
        return result

    async def _replay_spool(self) -> bool:
        store = await self._ensure_store()
        if store is None:
            return False
        replayed = 0
        rejected: list[Rejected] = []
        try:
            for chunk in self.spool.batches(5000):
                rejected += await self.call(store.write, [_full_row(row) for row in chunk])
                replayed += len(chunk)
        except LedgerError as exc:
            self.write_errors += 1
            self._reset_store(store)
            self._report_down(exc)
            return False
        self._quarantine(rejected)
        self.spool.clear()
        self.written += replayed - len(rejected)
        log.info("ledger is back: %d spooled records written", replayed - len(rejected))
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
        writing = self._task is None or not self._task.done()
        up = GaugeMetricFamily(
            "metergate_ledger_up", "1 when the ledger database took the last write and the writer is running."
        )
        up.add_metric([], 1 if self.up and writing else 0)
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
        rejected = CounterMetricFamily(
            "metergate_ledger_rejected_records",
            "Records the database refused (kept in the .rejected file beside the spool, not written).",
        )
        rejected.add_metric([], self.rejected_count)
        yield rejected
        dropped = CounterMetricFamily(
            "metergate_ledger_dropped_records", "Records lost: the spool was full or could not be written."
        )
        dropped.add_metric([], self.spool.dropped + self.lost)
        yield dropped


def _chunks(rows: list[tuple[Any, ...]], size: int) -> Iterator[list[tuple[Any, ...]]]:
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


def redact_url(url: str) -> str:
    """A database (or Redis) URL without its password, for logs."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}" if ":" in creds else url
    return url


__all__ = ["ApiKey", "BatchRow", "Ledger", "LedgerError", "Rejected", "record_row", "redact_url", "sqlite_path"]
