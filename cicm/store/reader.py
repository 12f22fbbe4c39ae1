"""Read-only access to the store for the dashboard, safe while the nightly flow or the agent writes.

DuckDB lets one process hold a database file for writing, and while it does no other process can open the file
at all, not even read-only (the file lock conflicts). So the dashboard:

1. opens a short-lived read-only connection per request (one per page render or export) and closes it at once,
   so it never holds the file's lock between requests and never blocks the writer for long;
2. on a lock conflict retries a few times with a short back-off (a writer's transaction is usually short);
3. if the file is still locked, copies it to a private snapshot (once per file version: size + mtime) and reads
   the copy, which holds the state of the writer's last checkpoint. The page then says so ("store busy");
4. if even the snapshot cannot be read (say the copy caught a checkpoint half-written: DuckDB's block checksums
   reject it), raises `StoreBusy`; the page shows "store busy, retrying" and retries on a timer.

What the dashboard reads through a `Reading` is in `cicm.store.dashboard`. `cicm.dashboards.reader` re-exports
this module's names.
"""
from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import duckdb
import pandas as pd

from cicm.store.core import SCHEMA_VERSION

log = logging.getLogger(__name__)


class StoreMissing(Exception):
    """No database file at the configured path."""


class StoreBusy(Exception):
    """The file is locked by a writer and no readable snapshot could be made."""


class StoreIncompatible(Exception):
    """The file is a DuckDB database, but not a cicm store of the schema this code reads."""


def _is_lock_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "lock" in text and ("conflicting" in text or "could not set" in text or "held" in text)


@dataclass
class Reading:
    """One open read-only connection, and where it reads from."""

    con: duckdb.DuckDBPyConnection
    source: str  # "live" | "snapshot"
    snapshot_taken_at: pd.Timestamp | None = None
    busy_detail: str | None = None
    _tables: set[str] | None = field(default=None, repr=False)

    def query(self, sql: str, params: list | None = None) -> pd.DataFrame:
        """As ``Store.query``, so the named reads of ``cicm.store.dashboard`` take a ``Reading`` or a ``Store``."""
        return self.con.execute(sql, params or []).df()

    q = query

    def scalar(self, sql: str, params: list | None = None):
        row = self.con.execute(sql, params or []).fetchone()
        return None if row is None else row[0]

    def has_table(self, name: str) -> bool:
        if self._tables is None:
            rows = self.con.execute("SELECT table_name FROM information_schema.tables").fetchall()
            self._tables = {r[0] for r in rows}
        return name in self._tables


class StoreReader:
    """Opens the store read-only, per request. See the module doc for the busy strategy."""

    def __init__(self, path: Path | str, retries: int = 4, retry_delay_s: float = 0.15,
                 allow_snapshot: bool = True, snapshot_dir: Path | str | None = None):
        self.path = Path(path)
        self.retries = max(1, retries)
        self.retry_delay_s = retry_delay_s
        self.allow_snapshot = allow_snapshot
        self._snapshot_dir = Path(snapshot_dir) if snapshot_dir else None
        self._snapshot_lock = threading.Lock()
        self._snapshot: tuple[tuple[int, int], Path, pd.Timestamp] | None = None

    # -- opening ------------------------------------------------------------------------------------------
    @contextmanager
    def read(self) -> Iterator[Reading]:
        """A read-only connection for one request; closed on exit."""
        reading = self._open()
        try:
            yield reading
        finally:
            reading.con.close()

    def _open(self) -> Reading:
        if not self.path.exists():
            raise StoreMissing(f"no store at {self.path}: run `cicm plan` first (or pass --db)")
        last: BaseException | None = None
        for attempt in range(self.retries):
            try:
                con = duckdb.connect(str(self.path), read_only=True)
            except duckdb.Error as exc:
                if not _is_lock_error(exc):
                    raise StoreIncompatible(f"cannot open {self.path}: {exc}") from exc
                last = exc
                if attempt + 1 < self.retries:
                    time.sleep(self.retry_delay_s * (attempt + 1))
                continue
            return self._prepare(con, "live")
        detail = _holder(last)
        if self.allow_snapshot:
            try:
                return self._open_snapshot(detail)
            except Exception as exc:  # noqa: BLE001 - any failure of the copy means "busy, retry later"
                log.info("snapshot of %s failed: %s", self.path, exc)
                raise StoreBusy(f"the store is locked by a writer ({detail}) and no snapshot could be read: "
                                f"{exc}") from exc
        raise StoreBusy(f"the store is locked by a writer ({detail})")

    def _prepare(self, con: duckdb.DuckDBPyConnection, source: str, **extra) -> Reading:
        try:
            con.execute("SET TimeZone='UTC'")
            found = con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except duckdb.Error as exc:
            con.close()
            raise StoreIncompatible(f"{self.path} is not a cicm store: {exc}") from exc
        if found is None or int(found[0]) != SCHEMA_VERSION:
            con.close()
            raise StoreIncompatible(
                f"{self.path} has schema version {found and found[0]}, this dashboard reads {SCHEMA_VERSION}")
        return Reading(con, source, **extra)

    # -- snapshots ----------------------------------------------------------------------------------------
    def _snapshot_folder(self) -> Path:
        if self._snapshot_dir is None:
            self._snapshot_dir = Path(tempfile.mkdtemp(prefix="cicm-dashboard-snapshot-"))
            atexit.register(shutil.rmtree, self._snapshot_dir, True)
        self._snapshot_dir.mkdir(parents=True, exist_ok=True)
        return self._snapshot_dir

    def _open_snapshot(self, detail: str) -> Reading:
        with self._snapshot_lock:
            stat = self.path.stat()
            version = (stat.st_size, stat.st_mtime_ns)
            if self._snapshot is None or self._snapshot[0] != version or not self._snapshot[1].exists():
                folder = self._snapshot_folder()
                target = folder / f"snapshot-{stat.st_mtime_ns}-{stat.st_size}.duckdb"
                partial = target.with_suffix(".partial")
                shutil.copyfile(self.path, partial)
                os.replace(partial, target)
                previous = self._snapshot
                self._snapshot = (version, target, pd.Timestamp.now(tz="UTC"))
                if previous is not None and previous[1] != target:
                    _remove_quietly(previous[1])
            _, target, taken = self._snapshot
        con = duckdb.connect(str(target), read_only=True)
        return self._prepare(con, "snapshot", snapshot_taken_at=taken, busy_detail=detail)


def _holder(exc: BaseException | None) -> str:
    """The lock error's 'held in <program> (PID n)' part, when DuckDB says it."""
    if exc is None:
        return "lock conflict"
    text = str(exc)
    marker = "Conflicting lock is held in "
    if marker in text:
        return "held by " + text.split(marker, 1)[1].split(". See", 1)[0].strip()
    return text.splitlines()[0][:200]


def _remove_quietly(path: Path) -> None:
    for p in (path, Path(str(path) + ".wal")):
        try:
            p.unlink()
        except OSError:
            pass
