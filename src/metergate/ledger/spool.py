"""A bounded local spool: records wait on disk while the ledger database is unreachable.

An append-only file of JSON lines, fsynced per batch, so records survive a gateway restart while the database is
down; they are replayed (idempotently) as soon as it is back.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("metergate.ledger")


def _line(row: Sequence[Any]) -> bytes:
    try:
        return orjson.dumps(list(row)) + b"\n"
    except orjson.JSONEncodeError:
        # A value orjson refuses (an integer past 64 bits, a lone surrogate) must still be kept, not crash.
        return json.dumps(list(row), default=str).encode() + b"\n"


def _costs_nothing(row: Sequence[Any]) -> bool:
    """A row with no tokens, no cost and usage that was read: a request the gateway answered itself."""
    try:
        return not (row[11] or row[12] or row[16]) and bool(row[18])
    except (IndexError, TypeError):
        return False


class Spool:
    def __init__(self, path: Path, max_records: int) -> None:
        self.path = path
        self.max_records = max_records
        self.dropped = 0
        self._lock: int | None = None
        self._count = self._count_lines()

    def claim(self) -> Path:
        """Take this spool file for this process alone (an advisory lock held until `close`); when another
        process holds it (two replicas in one directory), take `<name>.1`, `<name>.2`... instead.

        Without this, one replica's replay could write another's records, or clear the file while the other
        appends to it. A spool left by a process that died is claimed, and replayed, by the next one to start."""
        base = self.path
        for n in range(32):
            candidate = base if n == 0 else base.with_name(f"{base.name}.{n}")
            try:
                candidate.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(candidate.with_name(candidate.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
            except OSError:
                return self.path  # an unusable directory: writing the spool will say so
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            self._lock = fd
            if candidate != self.path:
                log.info("ledger spool %s is held by another process: using %s", base, candidate)
                self.path = candidate
                self._count = self._count_lines()
            return self.path
        log.warning("ledger spool %s: 32 processes hold its variants; sharing %s", base, base)
        return self.path

    def close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # releases the claim
            self._lock = None

    def _count_lines(self) -> int:
        try:
            with self.path.open("rb") as f:
                return sum(1 for _ in f)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            log.error("ledger spool %s cannot be read (%s): records will wait in memory", self.path, exc)
            return 0

    def __len__(self) -> int:
        return self._count

    def add(self, rows: Sequence[tuple[Any, ...]]) -> None:
        room = self.max_records - self._count
        if room < len(rows):
            # Full: billed records keep their place before requests that cost nothing (refused by the gateway).
            rows = sorted(rows, key=_costs_nothing)
            lost = len(rows) - max(room, 0)
            self.dropped += lost
            log.error(
                "ledger spool %s is full (%d records): %d records dropped; raise ledger.spool_max_records or "
                "bring the ledger database back",
                self.path,
                self.max_records,
                lost,
            )
            rows = rows[: max(room, 0)]
        if not rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = b"".join(_line(row) for row in rows)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._count += len(rows)

    def batches(self, size: int) -> Iterator[list[tuple[Any, ...]]]:
        """The spooled records in order, `size` at a time, without loading the whole spool."""
        try:
            f = self.path.open("rb")
        except OSError:
            return
        with f:
            batch: list[tuple[Any, ...]] = []
            for line in f:
                try:
                    batch.append(tuple(orjson.loads(line)))
                except orjson.JSONDecodeError:
                    # A line torn by a crash while the batch was being spooled: that batch was in the loss window.
                    log.warning("ledger spool %s: skipping a torn line", self.path)
                    continue
                if len(batch) >= size:
                    yield batch
                    batch = []
            if batch:
                yield batch

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
        self._count = 0
