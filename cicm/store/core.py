"""The system of record: one DuckDB file with a versioned schema, created on first use.

Every row carries the run that wrote it. A run's writes form one transaction (`Store.run`): if anything fails,
none of them land, and the run itself is still recorded as failed with its message. Re-planning a day replaces
the plan in force for that day (`current_plans`, and the views `current_vccs` / `current_vcc_status`); the VCCs
of every earlier run stay in `vccs` / `vcc_status`, and the runs table keeps every run.

Connections are short-lived: DuckDB lets one process write a file at a time, so readers (dashboard, CLI)
open, read and close.

This module is the store's core: connection, schema and its version, runs and transactions, and the generic
upsert. The named reads and writes, grouped by consumer, live beside it (`cicm.store.plan`, `.slo`, `.agent`,
`.dashboard`); the Store methods that read domain tables are kept as one-line delegates to them for their
callers. `cicm.data.store` is an alias of this module.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Callable, Iterator

import duckdb
import pandas as pd

from cicm import __version__
from cicm.errors import InputError
from cicm.reasons import split_reason
from cicm.paths import REPO_ROOT, default_db_path

SCHEMA_VERSION = 4

SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY, kind VARCHAR NOT NULL, plan_date DATE, started_at TIMESTAMPTZ NOT NULL,
    finished_at TIMESTAMPTZ, status VARCHAR NOT NULL, params VARCHAR, code_version VARCHAR,
    message VARCHAR, summary VARCHAR);
CREATE TABLE IF NOT EXISTS carbon_forecasts (
    run_id VARCHAR NOT NULL, provider VARCHAR NOT NULL, zone VARCHAR NOT NULL, target_hour TIMESTAMPTZ NOT NULL,
    issued_at TIMESTAMPTZ NOT NULL, gco2_per_kwh DOUBLE NOT NULL,
    PRIMARY KEY (provider, zone, target_hour, issued_at));
CREATE TABLE IF NOT EXISTS carbon_actuals (
    run_id VARCHAR NOT NULL, zone VARCHAR NOT NULL, hour TIMESTAMPTZ NOT NULL, gco2_per_kwh DOUBLE NOT NULL,
    source VARCHAR NOT NULL, PRIMARY KEY (zone, hour));
CREATE TABLE IF NOT EXISTS usage_history (
    run_id VARCHAR NOT NULL, cluster VARCHAR NOT NULL, hour TIMESTAMPTZ NOT NULL,
    inflexible_cpu_cores DOUBLE NOT NULL, flexible_cpu_cores DOUBLE NOT NULL, reserved_cpu_cores DOUBLE NOT NULL,
    flexible_arrived_core_hours DOUBLE NOT NULL, PRIMARY KEY (cluster, hour));
CREATE TABLE IF NOT EXISTS power_telemetry (
    run_id VARCHAR NOT NULL, cluster VARCHAR NOT NULL, domain VARCHAR NOT NULL, hour TIMESTAMPTZ NOT NULL,
    cpu_cores DOUBLE NOT NULL, power_kw DOUBLE NOT NULL, PRIMARY KEY (domain, hour));
CREATE TABLE IF NOT EXISTS power_models (
    run_id VARCHAR NOT NULL, cluster VARCHAR NOT NULL, domain VARCHAR NOT NULL, fitted_at TIMESTAMPTZ NOT NULL,
    status VARCHAR NOT NULL, reason VARCHAR, model VARCHAR, r2 DOUBLE, mape_pct DOUBLE, n_samples INTEGER,
    PRIMARY KEY (run_id, domain));
CREATE TABLE IF NOT EXISTS load_forecasts (
    run_id VARCHAR NOT NULL, plan_date DATE NOT NULL, cluster VARCHAR NOT NULL, hour TIMESTAMPTZ NOT NULL,
    inflexible_cpu_cores DOUBLE, inflexible_upper_cpu_cores DOUBLE, reservation_ratio DOUBLE,
    PRIMARY KEY (run_id, cluster, hour));
CREATE TABLE IF NOT EXISTS load_forecast_days (
    run_id VARCHAR NOT NULL, plan_date DATE NOT NULL, cluster VARCHAR NOT NULL, status VARCHAR NOT NULL,
    reason VARCHAR, flexible_core_hours DOUBLE, reservations_core_hours DOUBLE, theta_core_hours DOUBLE,
    reservations_rel_error_q97 DOUBLE, params VARCHAR, PRIMARY KEY (run_id, cluster));
CREATE TABLE IF NOT EXISTS vccs (
    run_id VARCHAR NOT NULL, plan_date DATE NOT NULL, cluster VARCHAR NOT NULL, hour TIMESTAMPTZ NOT NULL,
    hour_index INTEGER NOT NULL, vcc_cores DOUBLE NOT NULL, flexible_cpu_cores DOUBLE,
    inflexible_cpu_cores DOUBLE, power_kw DOUBLE, carbon_kgco2 DOUBLE, gco2_per_kwh DOUBLE,
    PRIMARY KEY (run_id, cluster, hour));
CREATE TABLE IF NOT EXISTS vcc_status (
    run_id VARCHAR NOT NULL, plan_date DATE NOT NULL, cluster VARCHAR NOT NULL, campus VARCHAR NOT NULL,
    status VARCHAR NOT NULL, reason VARCHAR, capacity_cores DOUBLE, theta_core_hours DOUBLE,
    tau_core_hours DOUBLE, expected_kgco2 DOUBLE, flat_kgco2 DOUBLE, saving_pct DOUBLE, peak_kw DOUBLE,
    PRIMARY KEY (run_id, cluster));
-- The plan in force for each (day, cluster): the newest plan run's. Older runs' VCCs stay in vccs/vcc_status.
CREATE TABLE IF NOT EXISTS current_plans (
    run_id VARCHAR NOT NULL, plan_date DATE NOT NULL, cluster VARCHAR NOT NULL, PRIMARY KEY (plan_date, cluster));
CREATE VIEW IF NOT EXISTS current_vccs AS
    SELECT v.* FROM vccs v JOIN current_plans c USING (run_id, plan_date, cluster);
CREATE VIEW IF NOT EXISTS current_vcc_status AS
    SELECT v.* FROM vcc_status v JOIN current_plans c USING (run_id, plan_date, cluster);
CREATE TABLE IF NOT EXISTS slo_events (
    run_id VARCHAR NOT NULL, cluster VARCHAR NOT NULL, day DATE NOT NULL, demand_core_hours DOUBLE,
    served_core_hours DOUBLE, theta_core_hours DOUBLE, violated BOOLEAN NOT NULL, close BOOLEAN NOT NULL,
    PRIMARY KEY (cluster, day));
CREATE TABLE IF NOT EXISTS agent_actions (
    run_id VARCHAR NOT NULL, cluster VARCHAR NOT NULL, acted_at TIMESTAMPTZ NOT NULL, hour TIMESTAMPTZ NOT NULL,
    plan_date DATE, mode VARCHAR NOT NULL, reason VARCHAR, vcc_cores DOUBLE, flexible_allowance_cores DOUBLE,
    caps VARCHAR, battery_charge_kw DOUBLE, battery_max_discharge_kw DOUBLE, result VARCHAR NOT NULL,
    detail VARCHAR, PRIMARY KEY (cluster, acted_at));
-- The agent's hourly correction: the flexible allowance it applied where it differs from the plan of record, one
-- row per cluster and hour (the hour's latest applied pass; acted_at links it to agent_actions).
CREATE TABLE IF NOT EXISTS intraday_deviations (
    run_id VARCHAR NOT NULL, cluster VARCHAR NOT NULL, hour TIMESTAMPTZ NOT NULL, plan_date DATE,
    acted_at TIMESTAMPTZ NOT NULL, plan_cores DOUBLE NOT NULL, applied_cores DOUBLE NOT NULL, vcc_cores DOUBLE,
    reason VARCHAR NOT NULL, detail VARCHAR, recorded_at TIMESTAMPTZ NOT NULL, PRIMARY KEY (cluster, hour));
CREATE TABLE IF NOT EXISTS backtest_results (
    run_id VARCHAR NOT NULL, zone VARCHAR NOT NULL, campus VARCHAR, start_day DATE NOT NULL, days INTEGER NOT NULL,
    seed INTEGER NOT NULL, policy VARCHAR NOT NULL, flexible_kgco2 DOUBLE, total_kgco2 DOUBLE,
    flexible_reduction_pct DOUBLE, shift_reduction_pct DOUBLE, total_reduction_pct DOUBLE, bound_kgco2 DOUBLE,
    bound_share_pct DOUBLE, oracle_share_pct DOUBLE, kwh_per_kcore_hour DOUBLE, peak_kw DOUBLE,
    slo_violations INTEGER, cluster_days INTEGER, late_work_pct DOUBLE, delay_mean_hours DOUBLE,
    delay_p95_hours DOUBLE, unfinished_core_hours DOUBLE, report_dir VARCHAR,
    PRIMARY KEY (zone, start_day, days, seed, policy));
-- The day-ahead storage plan of a campus with a battery or solar (issue 16), one row per campus and hour of the
-- planned day; kW = kWh in the hour. An additive table: files of earlier code gain it when a writer opens them.
CREATE TABLE IF NOT EXISTS storage_plans (
    run_id VARCHAR NOT NULL, plan_date DATE NOT NULL, campus VARCHAR NOT NULL, hour TIMESTAMPTZ NOT NULL,
    hour_index INTEGER NOT NULL, load_kw DOUBLE, solar_kw DOUBLE, solar_used_kw DOUBLE, curtailed_kw DOUBLE,
    charge_kw DOUBLE, discharge_kw DOUBLE, energy_kwh DOUBLE, grid_kw DOUBLE, status VARCHAR,
    PRIMARY KEY (run_id, campus, hour));
CREATE TABLE IF NOT EXISTS shaping_state (
    run_id VARCHAR NOT NULL, cluster VARCHAR NOT NULL, disabled_from DATE NOT NULL, disabled_until DATE NOT NULL,
    reason VARCHAR NOT NULL, PRIMARY KEY (cluster, disabled_from));
"""

# Version -> the statements that bring a file of the version before up to it.
MIGRATIONS = {
    # Fallback reasons as a code and a detail, in their own columns (cicm.reasons), beside the full text.
    2: """
ALTER TABLE vcc_status ADD COLUMN reason_code VARCHAR;
ALTER TABLE vcc_status ADD COLUMN reason_detail VARCHAR;
UPDATE vcc_status SET reason_code = CASE WHEN reason IS NULL OR reason = '' THEN NULL
                                         ELSE split_part(reason, ': ', 1) END,
                      reason_detail = CASE WHEN position(': ' IN coalesce(reason, '')) > 0
                                           THEN substr(reason, position(': ' IN reason) + 2) END;
CREATE OR REPLACE VIEW current_vcc_status AS
    SELECT v.* FROM vcc_status v JOIN current_plans c USING (run_id, plan_date, cluster);
""",
    # The writer of each run (pid, hostname), so that a later writer can tell a run whose process died (marked
    # 'abandoned', see Store.abandon_dead_runs) from a live one. The views show only plans of succeeded runs.
    # Runs left 'running' by earlier code (no pid to check) are abandoned here, once; the agent's long-lived run
    # is not (its process does not hold the file).
    3: """
ALTER TABLE runs ADD COLUMN pid INTEGER;
ALTER TABLE runs ADD COLUMN hostname VARCHAR;
UPDATE runs SET status = 'abandoned', finished_at = now(),
                message = 'abandoned: left running by an earlier version of cicm; its process no longer holds the store'
    WHERE status = 'running' AND kind <> 'agent';
CREATE OR REPLACE VIEW current_vccs AS
    SELECT v.* FROM vccs v JOIN current_plans c USING (run_id, plan_date, cluster)
    WHERE c.run_id IN (SELECT run_id FROM runs WHERE status IN ('ok', 'degraded'));
CREATE OR REPLACE VIEW current_vcc_status AS
    SELECT v.* FROM vcc_status v JOIN current_plans c USING (run_id, plan_date, cluster)
    WHERE c.run_id IN (SELECT run_id FROM runs WHERE status IN ('ok', 'degraded'));
""",
    # The writer's process start (``process_start``: the boot's id and the start time in clock ticks, from
    # /proc), so that a pid the kernel reused for another process does not keep a dead run 'running'. Runs of
    # earlier versions have none: their pid alone is checked.
    4: """
ALTER TABLE runs ADD COLUMN process_start VARCHAR;
""",
}

# The plan in force for a (day, cluster) whose run did not succeed (a run abandoned by earlier code, which wrote
# its status after its data) goes back to the newest succeeded plan run that planned it, or is dropped.
REPOINT_PLANS = """
CREATE OR REPLACE TEMP TABLE _repoint AS
    SELECT c.plan_date, c.cluster,
           (SELECT s.run_id FROM vcc_status s JOIN runs r USING (run_id)
             WHERE s.plan_date = c.plan_date AND s.cluster = c.cluster AND r.kind = 'plan'
               AND r.status IN ('ok', 'degraded')
             ORDER BY r.started_at DESC LIMIT 1) AS run_id
    FROM current_plans c WHERE c.run_id NOT IN (SELECT run_id FROM runs WHERE status IN ('ok', 'degraded'));
UPDATE current_plans c SET run_id = p.run_id FROM _repoint p
    WHERE p.plan_date = c.plan_date AND p.cluster = c.cluster AND p.run_id IS NOT NULL;
DELETE FROM current_plans c WHERE EXISTS (SELECT 1 FROM _repoint p
    WHERE p.plan_date = c.plan_date AND p.cluster = c.cluster AND p.run_id IS NULL);
DROP TABLE _repoint;
"""

# table -> primary key columns; writes replace rows with the same key (upsert).
TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "carbon_forecasts": ("provider", "zone", "target_hour", "issued_at"),
    "carbon_actuals": ("zone", "hour"),
    "usage_history": ("cluster", "hour"),
    "power_telemetry": ("domain", "hour"),
    "power_models": ("run_id", "domain"),
    "load_forecasts": ("run_id", "cluster", "hour"),
    "load_forecast_days": ("run_id", "cluster"),
    "vccs": ("run_id", "cluster", "hour"),
    "vcc_status": ("run_id", "cluster"),
    "current_plans": ("plan_date", "cluster"),
    "slo_events": ("cluster", "day"),
    "shaping_state": ("cluster", "disabled_from"),
    "agent_actions": ("cluster", "acted_at"),
    "intraday_deviations": ("cluster", "hour"),
    "backtest_results": ("zone", "start_day", "days", "seed", "policy"),
    "storage_plans": ("run_id", "campus", "hour"),
}


def code_version() -> str:
    try:
        sha = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        return f"{__version__}+{sha}"
    except (OSError, subprocess.SubprocessError):
        return __version__


def new_run_id(kind: str) -> str:
    stamp = pd.Timestamp.now(tz="UTC").strftime("%Y%m%dT%H%M%S")
    return f"{kind}-{stamp}-{uuid.uuid4().hex[:6]}"


LOCK_RETRY_SECONDS = 10.0
#: Environment variable that sets how long a command waits for a locked store (seconds; default 10).
LOCK_WAIT_ENV = "CICM_DB_LOCK_WAIT_S"


class StoreLocked(InputError):
    """The store stayed locked by another process for the whole bounded wait (field ``db``). Nothing this process
    would have recorded (a run, its rows) is in the store."""

    @classmethod
    def after(cls, path: Path, waited_s: float, detail: str) -> "StoreLocked":
        return cls("db", f"{path} is locked by another process (waited {waited_s:g} s; {detail}); nothing was "
                         f"recorded in it: run again when the other writer is done")


def lock_wait_s() -> float:
    """How long to wait for a locked store: ``$CICM_DB_LOCK_WAIT_S`` (a number >= 0), else LOCK_RETRY_SECONDS."""
    raw = os.environ.get(LOCK_WAIT_ENV)
    if raw is None or not raw.strip():
        return LOCK_RETRY_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise InputError(LOCK_WAIT_ENV, f"must be a number of seconds >= 0, got {raw!r}")
    return value


def _connect_with_retry(path: Path, read_only: bool, wait_s: float | None = None) -> duckdb.DuckDBPyConnection:
    """DuckDB lets one process hold a file for writing; another holder (a writer's run, the dashboard's brief
    reads, the agent) makes connect fail with a lock error. Retry for a bounded time (``wait_s``, default
    :func:`lock_wait_s`: 10 s), then raise :class:`StoreLocked` saying who is in the way."""
    wait = lock_wait_s() if wait_s is None else wait_s
    started = time.monotonic()
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower():
                raise InputError("db", f"cannot open {path}: {exc}") from exc
            waited = time.monotonic() - started
            if waited >= wait:
                raise StoreLocked.after(path, round(waited, 1), str(exc).splitlines()[0]) from exc
            time.sleep(min(0.1, max(wait - waited, 0.0)))


def failure_message(exc: BaseException) -> str:
    """A failed run's message. A termination signal reads "Interrupted: interrupted by SIGTERM" whether our
    handler (cicm.clikit.interruptible) or Prefect's, in force during a flow run (its TerminationSignal), raised."""
    sig = getattr(exc, "signal", None)
    if type(exc).__name__ == "TerminationSignal" and isinstance(sig, int):
        import signal

        return f"Interrupted: interrupted by {signal.Signals(sig).name}"
    return f"{type(exc).__name__}: {exc}"


def process_start(pid: int) -> str | None:
    """When a process started, as ``<boot id>:<start time in clock ticks since boot>`` (Linux: /proc/<pid>/stat
    field 22, and /proc/sys/kernel/random/boot_id), or None where /proc does not tell (another OS, no such
    process). A pid and this identify one process: the kernel reuses pids, not their start times."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold spaces: field 3 on
    return f"{boot}:{fields[22 - 3]}"


def _pid_alive(pid: int, started: str | None = None) -> bool:
    """Whether the process with this pid exists on this host (signal 0 checks without sending anything) and, given
    its recorded start (``process_start``), is still that process: a pid now used by a process that started at
    another time is a dead writer's."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive (its start is still checked below)
        pass
    except OSError:
        return False
    if started is None:
        return True
    now = process_start(pid)
    return now is None or now == started


from cicm.commitguard import COMMIT_CHECKS  # noqa: E402  (called before every transaction commits)

_STARTS: dict[int, str | None] = {}


def _my_start() -> str | None:
    """This process's ``process_start``, read once (per pid: a forked child reads its own)."""
    pid = os.getpid()
    if pid not in _STARTS:
        _STARTS[pid] = process_start(pid)
    return _STARTS[pid]


@dataclass
class RunRecord:
    run_id: str
    status: str = "ok"
    message: str | None = None
    summary: dict | None = None


class Store:
    """A handle on the DuckDB file. Use as a context manager; it closes the connection on exit."""

    def __init__(self, path: Path | str | None = None, read_only: bool = False):
        self.path = Path(path) if path else default_db_path()
        self.read_only = read_only
        if read_only and not self.path.exists():
            raise InputError("db", f"no database at {self.path}; run `cicm plan` first")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.con = _connect_with_retry(self.path, read_only)
        self.con.execute("SET TimeZone='UTC'")
        if not read_only:
            self._migrate()
        self._check_version()
        if not read_only:
            self.abandon_dead_runs()

    @contextmanager
    def released(self) -> Iterator[Path]:
        """Close the connection for a while, so that other processes (Dask workers) can open the file
        read-only; reconnect after. Not inside a transaction."""
        self.con.close()
        try:
            yield self.path
        finally:
            self.con = _connect_with_retry(self.path, self.read_only)
            self.con.execute("SET TimeZone='UTC'")

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.con.close()

    # -- schema -------------------------------------------------------------------------------------------
    def _migrate(self) -> None:
        """Create the schema (version 1), then apply each later migration the file has not had, in one
        transaction. A file from newer code is refused by ``_check_version``."""
        self.con.execute("BEGIN")
        try:
            self.con.execute(SCHEMA_V1)
            self.con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', '1')")
            found = int(self.con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])
            for version in range(found + 1, SCHEMA_VERSION + 1):
                self.con.execute(MIGRATIONS[version])
                self.con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(version)])
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        self.con.execute("COMMIT")

    def _check_version(self) -> None:
        found = self.con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if found is None or int(found[0]) != SCHEMA_VERSION:
            older = found is not None and int(found[0]) < SCHEMA_VERSION
            raise InputError(
                "db", f"{self.path} has schema version {found and found[0]}, this code needs {SCHEMA_VERSION}"
                + ("; a writer migrates it when it opens the file (e.g. `cicm plan`)" if older else ""))

    def schema_version(self) -> int:
        return int(self.con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])

    # -- runs and transactions ----------------------------------------------------------------------------
    def begin_run(self, kind: str, params: dict | None = None, plan_date: date | None = None,
                   status: str = "running", message: str | None = None,
                   started_at: pd.Timestamp | None = None) -> str:
        """Record a run, with this process's pid, hostname and start (``abandon_dead_runs`` checks them).
        ``started_at`` (default: now) is when the work began, so that the run's duration is the work's, not
        only its final write's."""
        run_id = new_run_id(kind)
        self.con.execute(
            "INSERT INTO runs (run_id, kind, plan_date, started_at, finished_at, status, params, code_version,"
            " message, pid, hostname, process_start)"
            " VALUES (?, ?, ?, COALESCE(?, now()), CASE WHEN ? = 'running' THEN NULL ELSE now() END, ?, ?, ?, ?, ?,"
            " ?, ?)",
            [run_id, kind, plan_date, started_at, status, status, json.dumps(params or {}, default=str),
             code_version(), message, os.getpid(), socket.gethostname(), _my_start()],
        )
        return run_id

    def finish_run(self, run_id: str, status: str, message: str | None = None, summary: dict | None = None):
        """Set a run's final status. Inside the transaction that holds the run's data (``Store.run`` does so),
        the status lands with the data or not at all."""
        self.con.execute(
            "UPDATE runs SET finished_at = now(), status = ?, message = ?, summary = ? WHERE run_id = ?",
            [status, message, json.dumps(summary, default=str) if summary is not None else None, run_id],
        )

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self.con.execute("BEGIN TRANSACTION")
        try:
            yield
            for check in COMMIT_CHECKS:  # one that raises rolls the transaction back
                check()
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        self.con.execute("COMMIT")

    def failed_run(self, kind: str, params: dict | None, plan_date: date | None, exc: BaseException,
                   started_at: pd.Timestamp | None = None) -> str:
        """Record a run that failed before it could write anything (one statement: never left 'running'), with
        the error as its message."""
        return self.begin_run(kind, params, plan_date, status="failed", message=failure_message(exc),
                              started_at=started_at)

    @contextmanager
    def run(self, kind: str, params: dict | None = None, plan_date: date | None = None,
            started_at: pd.Timestamp | None = None) -> Iterator["RunRecord"]:
        """Record a run and make its writes one transaction. On error: writes rolled back, run 'failed'.

        The run is recorded 'running' first (committed, so that a run that dies is still seen: the next writer
        marks it 'abandoned'); its final status is written in the transaction of its data, so data never lands
        under a run that is not finished. The caller may set `status` (e.g. 'degraded') and `summary` on the
        yielded record before the block ends.
        """
        record = RunRecord(self.begin_run(kind, params, plan_date, started_at=started_at))
        try:
            with self.transaction():
                yield record
                self.finish_run(record.run_id, record.status, record.message, record.summary)
        except BaseException as exc:
            self.finish_run(record.run_id, "failed", failure_message(exc))
            raise

    def abandon_dead_runs(self) -> list[str]:
        """Mark as 'abandoned', with the reason, every run left 'running' by a process that is gone; point any
        plan in force that does not belong to a succeeded run back at the newest succeeded one. Called when the
        store is opened for writing. A run of a live process (this host, pid alive and, where recorded, started
        when the run's writer did: a reused pid is not the writer) is not touched; runs without
        a pid (the agent's long-lived run) neither. A run of another host is abandoned: this process holds the
        file's write lock, and a run's writer holds it from its begin to its end. Returns the abandoned runs."""
        rows = self.con.execute("SELECT run_id, pid, hostname, process_start FROM runs"
                                " WHERE status = 'running' AND pid IS NOT NULL").fetchall()
        here, me = socket.gethostname(), os.getpid()
        gone: list[tuple[str, str]] = []
        for run_id, pid, host, started in rows:
            if host == here:
                if (pid == me and started in (None, _my_start())) or _pid_alive(pid, started):
                    continue
                reused = "" if started is None or process_start(pid) is None else \
                    f"; pid {pid} now belongs to a process started at another time"
                why = (f"abandoned: its process {pid} on {host} is gone{reused} (found by process {me} opening the"
                       " store)")
            else:
                why = (f"abandoned: its process {pid} on {host} no longer holds the store (found by process {me} on"
                       f" {here} opening it for writing)")
            gone.append((run_id, why))
        if not gone and self.plans_of_unsucceeded_runs().empty:
            return []
        with self.transaction():
            for run_id, why in gone:
                self.con.execute("UPDATE runs SET status = 'abandoned', finished_at = now(), message = ?"
                                 " WHERE run_id = ? AND status = 'running'", [why, run_id])
            if not self.plans_of_unsucceeded_runs().empty:
                self.con.execute(REPOINT_PLANS)
        return [r for r, _ in gone]

    def plans_of_unsucceeded_runs(self) -> pd.DataFrame:
        """The invariant check: plans in force (``current_plans``) whose run is not a succeeded one (status ok or
        degraded). Always empty. Columns: run_id, plan_date, cluster, status (null: no such run)."""
        return self.query(
            "SELECT c.run_id, c.plan_date, c.cluster, r.status FROM current_plans c LEFT JOIN runs r USING (run_id)"
            " WHERE r.status IS NULL OR r.status NOT IN ('ok', 'degraded')")

    # -- generic writes -----------------------------------------------------------------------------------
    def upsert(self, table: str, frame: pd.DataFrame, run_id: str) -> int:
        """Insert rows, replacing rows with the same primary key. Call inside a transaction."""
        if table not in TABLE_KEYS:
            raise InputError("table", f"unknown table {table!r}")
        if frame.empty:
            return 0
        columns = [c for c in self.columns(table) if c != "run_id"]
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise InputError(missing[0], f"missing column for table {table}")
        data = frame[columns].copy()
        data.insert(0, "run_id", run_id)
        self.con.register("_incoming", data)
        try:
            names = ", ".join(["run_id", *columns])
            self.con.execute(f"INSERT OR REPLACE INTO {table} ({names}) SELECT {names} FROM _incoming")
        finally:
            self.con.unregister("_incoming")
        return len(data)

    def delete_where(self, table: str, **equals) -> None:
        clause = " AND ".join(f"{k} = ?" for k in equals)
        self.con.execute(f"DELETE FROM {table} WHERE {clause}", list(equals.values()))

    def columns(self, table: str) -> list[str]:
        rows = self.con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ? ORDER BY ordinal_position",
            [table],
        ).fetchall()
        return [r[0] for r in rows]

    def query(self, sql: str, params: list | None = None) -> pd.DataFrame:
        return self.con.execute(sql, params or []).df()

    def query_bulk(self, sql: str, params: list | None = None) -> pd.DataFrame:
        """`query` for large results: through Arrow, about 2x faster for a campus's history."""
        with warnings.catch_warnings():  # DuckDB notes that a DB-API result copies once more: measured, it is cheap
            warnings.filterwarnings("ignore", message="Arrow output on a DB-API result")
            return self.con.execute(sql, params or []).to_arrow_table().to_pandas()

    # -- named writes -------------------------------------------------------------------------------------
    def write_carbon_forecast(self, frame: pd.DataFrame, run_id: str) -> int:
        return self.upsert("carbon_forecasts", frame, run_id)

    def replace_plan(self, plan_date: date, vccs: pd.DataFrame, status: pd.DataFrame, run_id: str) -> None:
        """Store a plan run's VCCs and make them the plan in force for `plan_date`. Earlier runs' rows stay."""
        self.upsert("vccs", vccs, run_id)
        if "reason" in status:  # one parser: the code and the detail get their own columns
            parts = [split_reason(r) for r in status["reason"]]
            status = status.assign(reason_code=[c for c, _ in parts], reason_detail=[d for _, d in parts])
        self.upsert("vcc_status", status, run_id)
        current = pd.DataFrame({"plan_date": plan_date, "cluster": status["cluster"].unique()})
        self.upsert("current_plans", current, run_id)

    # -- named reads (the SQL lives in the consumer modules; these delegate) ------------------------------
    def runs(self, limit: int = 50) -> pd.DataFrame:
        """The newest runs first. Columns: the runs table's (run_id, kind, plan_date, started_at, finished_at,
        status, params, code_version, message, summary, pid, hostname, process_start)."""
        return self.query("SELECT * FROM runs ORDER BY started_at DESC LIMIT ?", [limit])

    def has_table(self, name: str) -> bool:
        """Whether the database has a table or view of that name (older stores may lack newer tables)."""
        rows = self.con.execute("SELECT table_name FROM information_schema.tables").fetchall()
        return name in {r[0] for r in rows}

    def latest_carbon_forecast(self, zone: str, start: pd.Timestamp, end: pd.Timestamp,
                               issued_before: pd.Timestamp | None = None) -> pd.DataFrame:
        """`cicm.store.agent.latest_carbon_forecast`."""
        from cicm.store import agent

        return agent.latest_carbon_forecast(self, zone, start, end, issued_before)

    def day_ahead_forecasts(self, zone: str, start: pd.Timestamp, end: pd.Timestamp,
                            min_lead_hours: float = 6.0) -> pd.Series:
        """`cicm.store.plan.day_ahead_forecasts`."""
        from cicm.store import plan

        return plan.day_ahead_forecasts(self, zone, start, end, min_lead_hours)

    def carbon_actuals(self, zone: str, start: pd.Timestamp, end: pd.Timestamp) -> pd.Series:
        """`cicm.store.plan.carbon_actuals`."""
        from cicm.store import plan

        return plan.carbon_actuals(self, zone, start, end)

    def usage_history(self, cluster: str, before: pd.Timestamp, days: int | None = None) -> pd.DataFrame:
        return self.usage_histories([cluster], before, days)

    def usage_histories(self, clusters: list[str], before: pd.Timestamp, days: int | None = None) -> pd.DataFrame:
        """`cicm.store.plan.usage_histories`."""
        from cicm.store import plan

        return plan.usage_histories(self, clusters, before, days)

    def power_telemetry(self, cluster: str, before: pd.Timestamp, days: int) -> pd.DataFrame:
        return self.power_telemetries([cluster], before, days)

    def power_telemetries(self, clusters: list[str], before: pd.Timestamp, days: int) -> pd.DataFrame:
        """`cicm.store.plan.power_telemetries`."""
        from cicm.store import plan

        return plan.power_telemetries(self, clusters, before, days)

    def has_usage(self, clusters: list[str]) -> bool:
        """`cicm.store.plan.has_usage`."""
        from cicm.store import plan

        return plan.has_usage(self, clusters)

    def plan(self, cluster: str, plan_date: date) -> tuple[pd.DataFrame, pd.DataFrame]:
        """`cicm.store.plan.plan_in_force`."""
        from cicm.store import plan

        return plan.plan_in_force(self, cluster, plan_date)
