"""Retention for the big hourly tables: how much the store holds, and compaction of cold history into Parquet.

`usage_history` (one row per cluster-hour) and `power_telemetry` (one row per power-domain-hour) grow with the
fleet; the nightly plan reads only the last 182 days of usage and 8 days of power. `compact_history` moves rows
older than a cut-off to zstd Parquet, hive-partitioned by month::

    archive_dir/usage_history/month=2022-01/part-<UTC write time, µs>-<run_id>_0.parquet
    archive_dir/power_telemetry/month=2022-01/part-<UTC write time, µs>-<run_id>_0.parquet

Safety order (docs/storage.md): write this run's files → read them back and compare counts, per-column sums and
an exact order-free row checksum with the source, month by month → delete the same rows in the same DuckDB
transaction, recorded as a run of kind ``compact`` → COMMIT → CHECKPOINT. Anything failing before the commit
rolls the delete back and removes every file of this run, so the rows are always in DuckDB or verified in Parquet.

Idempotency: every run writes files with its own run id in the name and never touches earlier files. Re-running
the same compaction finds no rows older than the cut-off in DuckDB and writes nothing. If rows for an archived
month come back into DuckDB (a re-import upserts old telemetry), the next compaction archives them in a new
file; the read-back views `usage_history_all` / `power_telemetry_all` (`history_view`) keep one row per primary
key, preferring DuckDB's row, then the newest file, i.e. the same "last write wins" as the store's upserts.

The `cicm store` commands over these functions are in `cicm.data.retention`.
"""
from __future__ import annotations

import math
import os
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Optional

import pandas as pd

from cicm.errors import InputError
from cicm.store.core import TABLE_KEYS, Store

# The planner reads 182 days of usage (cicm.planning.stages.LOAD_HISTORY_DAYS) and 8 of power; keep 190 days hot.
HOT_WINDOW_DAYS = 190
HISTORY_TABLES = ("usage_history", "power_telemetry")
ARCHIVE_FILE_PREFIX = "part-"


# -- sizes ---------------------------------------------------------------------------------------------------
def store_size(store: Store) -> pd.DataFrame:
    """Rows and estimated bytes per table, plus a `(file)` row with the DuckDB file's bytes on disk.

    A table's bytes are the storage blocks its column segments live in (`pragma_storage_info`), a block shared
    by several tables' segments split by segment count; primary-key indexes and catalog are not in any table's
    figure, so the `(file)` row is larger than the sum. Rows not yet checkpointed (in the WAL) count 0 bytes.
    """
    con = store.con
    block_size = int(con.execute("SELECT block_size FROM pragma_database_size() WHERE database_name = "
                                 "current_database()").fetchone()[0] or 262144)
    tables = [r[0] for r in con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() AND schema_name = 'main'"
        " AND NOT temporary ORDER BY table_name").fetchall()]
    segments = []
    for table in tables:
        info = con.execute(f"SELECT block_id, additional_block_ids FROM pragma_storage_info('{table}')"
                           " WHERE persistent AND block_id >= 0").fetchall()
        for block_id, extra in info:
            segments.append((table, int(block_id)))
            segments.extend((table, int(b)) for b in (extra or []))
    per_block: dict[int, int] = {}
    for _, block in segments:
        per_block[block] = per_block.get(block, 0) + 1
    table_bytes = {t: 0.0 for t in tables}
    for table, block in segments:
        table_bytes[table] += block_size / per_block[block]
    rows = []
    for table in tables:
        count = con.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
        rows.append({"table": table, "rows": int(count), "estimated_bytes": int(round(table_bytes[table]))})
    db = con.execute("SELECT used_blocks, total_blocks, wal_size FROM pragma_database_size()"
                     " WHERE database_name = current_database()").fetchone()
    file_bytes = store.path.stat().st_size if store.path.exists() else 0
    frame = pd.DataFrame(rows, columns=["table", "rows", "estimated_bytes"])
    frame["bytes_per_row"] = (frame["estimated_bytes"] / frame["rows"].where(frame["rows"] > 0)).round(2)
    total = pd.DataFrame([{"table": "(file)", "rows": int(frame["rows"].sum()), "estimated_bytes": file_bytes,
                           "bytes_per_row": float("nan")}])
    frame = pd.concat([frame, total], ignore_index=True)
    frame.attrs.update(block_size=block_size, used_blocks=int(db[0]), total_blocks=int(db[1]), wal=str(db[2]),
                       file_bytes=file_bytes)
    return frame


def archive_bytes(archive_dir: Path | str, table: str | None = None) -> int:
    """Bytes of the Parquet files under archive_dir (one table's, or all)."""
    root = Path(archive_dir) / table if table else Path(archive_dir)
    return sum(p.stat().st_size for p in root.rglob("*.parquet")) if root.exists() else 0


# -- compaction ----------------------------------------------------------------------------------------------
def _sql_str(value: str | Path) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _cutoff_literal(before: date) -> str:
    return f"TIMESTAMPTZ '{before.isoformat()} 00:00:00+00'"


def _as_date(before) -> date:
    if isinstance(before, pd.Timestamp):
        return before.date()
    if isinstance(before, date):
        return before if type(before) is date else before.date()  # datetime -> its date
    try:
        return date.fromisoformat(str(before).strip())
    except ValueError as exc:
        raise InputError("before", f"not a date: {before!r} (use YYYY-MM-DD)") from exc


def _check_archive_dir(archive_dir: Path) -> None:
    if archive_dir.exists() and not archive_dir.is_dir():
        raise InputError("archive", f"{archive_dir} exists and is not a directory")
    try:
        archive_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError("archive", f"cannot create {archive_dir}: {exc.strerror or exc}") from exc
    probe = archive_dir / f".cicm-write-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError("archive", f"cannot write in {archive_dir}: {exc.strerror or exc}") from exc


def newest_hour(store: Store, tables=HISTORY_TABLES) -> pd.Timestamp | None:
    found = [store.con.execute(f"SELECT max(hour) FROM {t}").fetchone()[0] for t in tables]
    found = [pd.Timestamp(h) for h in found if h is not None]
    return max(found) if found else None


def latest_allowed_before(store: Store, tables=HISTORY_TABLES) -> date | None:
    """The latest cut-off that keeps the planner's window hot: the newest data's UTC day minus 190 days."""
    newest = newest_hour(store, tables)
    if newest is None:
        return None
    return newest.tz_convert("UTC").date() - timedelta(days=HOT_WINDOW_DAYS)


def _numeric_columns(store: Store, table: str) -> list[str]:
    rows = store.con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = ? AND data_type IN"
        " ('DOUBLE', 'FLOAT', 'INTEGER', 'BIGINT', 'HUGEINT', 'SMALLINT', 'DECIMAL') ORDER BY ordinal_position",
        [table]).fetchall()
    return [r[0] for r in rows]


def _month_checks(store: Store, relation: str, columns: list[str], numeric: list[str]) -> pd.DataFrame:
    """Per month: rows, the sum of each numeric column, and an exact, order-free checksum of whole rows."""
    sums = ", ".join(f'sum("{c}") AS "sum_{c}"' for c in numeric)
    row_hash = "hash(" + ", ".join(f'"{c}"' for c in columns) + ")"
    frame = store.con.execute(
        f"SELECT month, count(*) AS rows, {sums}, sum({row_hash})::VARCHAR AS row_checksum,"
        f" count(*) FILTER (WHERE strftime(hour, '%Y-%m') <> month) AS misplaced"
        f" FROM {relation} GROUP BY month ORDER BY month").df()
    return frame.set_index("month")


def _verify(store: Store, table: str, source: pd.DataFrame, archive_glob: str, columns: list[str],
            numeric: list[str]) -> None:
    """Raise unless the Parquet files of this run hold exactly the source rows, month by month."""
    written = _month_checks(
        store, f"read_parquet({_sql_str(archive_glob)}, hive_partitioning = 1)", columns, numeric)
    if list(written.index) != list(source.index):
        raise RuntimeError(f"{table}: archived months {list(written.index)} != source months {list(source.index)}")
    for month in source.index:
        a, b = source.loc[month], written.loc[month]
        if int(a["rows"]) != int(b["rows"]) or a["row_checksum"] != b["row_checksum"] or int(b["misplaced"]):
            raise RuntimeError(f"{table} {month}: Parquet read-back differs from the source "
                               f"({int(b['rows'])} vs {int(a['rows'])} rows)")
        for c in numeric:
            x, y = float(a[f"sum_{c}"]), float(b[f"sum_{c}"])
            if not math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-6):
                raise RuntimeError(f"{table} {month}: sum of {c} {y!r} in Parquet != {x!r} in DuckDB")


def _run_files(archive_dir: Path, table: str, run_id: str) -> list[Path]:
    root = archive_dir / table
    return sorted(root.glob(f"month=*/*{run_id}*")) if root.exists() else []


def _remove_run_files(archive_dir: Path, tables, run_id: str, dirs_before: set[Path]) -> None:
    for table in tables:
        for path in _run_files(archive_dir, table, run_id):
            path.unlink(missing_ok=True)
        root = archive_dir / table
        if root.exists():
            for month_dir in root.glob("month=*"):
                if month_dir not in dirs_before and month_dir.is_dir() and not any(month_dir.iterdir()):
                    month_dir.rmdir()
            if root not in dirs_before and not any(root.iterdir()):
                root.rmdir()


def compact_history(store: Store, before, archive_dir: Path | str, tables=HISTORY_TABLES,
                    force: bool = False) -> dict:
    """Move rows with hour < `before` (00:00 UTC) of `tables` to zstd Parquet under archive_dir, one directory
    per table and month; verify the files, then delete the rows in one transaction (a run of kind "compact")
    and CHECKPOINT. Returns a summary. Refuses a `before` later than the newest data's day minus 190 days (the
    planner's window) unless force=True."""
    started = time.perf_counter()
    before = _as_date(before)
    archive_dir = Path(archive_dir).expanduser().resolve()
    tables = tuple(tables)
    for table in tables:
        if table not in TABLE_KEYS or "hour" not in store.columns(table):
            raise InputError("tables", f"{table!r} is not an hourly history table")
    if store.read_only:
        raise InputError("db", f"{store.path} is open read-only")
    limit = latest_allowed_before(store, tables)
    if limit is not None and before > limit and not force:
        raise InputError(
            "before", f"{before} is too recent: it must be on or before {limit} (the newest data's day "
                      f"{limit + timedelta(days=HOT_WINDOW_DAYS)} minus {HOT_WINDOW_DAYS} days, so the planner's "
                      f"182 days of usage and 8 of power stay in DuckDB); pass --force (force=True) to override")
    _check_archive_dir(archive_dir)
    dirs_before = {p for t in tables for p in [archive_dir / t, *(archive_dir / t).glob("month=*")]
                   if p.exists()}
    file_bytes_before = store.path.stat().st_size
    cutoff = _cutoff_literal(before)
    params = {"before": before.isoformat(), "archive_dir": str(archive_dir), "tables": list(tables),
              "force": force}
    summary: dict = {"before": before.isoformat(), "archive_dir": str(archive_dir), "tables": {}}
    run_id: Optional[str] = None
    try:
        with store.run("compact", params) as run:
            run_id = run.run_id
            summary["run_id"] = run_id
            # file names sort by write time (µs), so the views can prefer the newest copy of a re-archived row
            stem = f"{ARCHIVE_FILE_PREFIX}{pd.Timestamp.now(tz='UTC'):%Y%m%dT%H%M%S%f}-{run_id}"
            plans = []
            for table in tables:
                columns = store.columns(table)
                numeric = _numeric_columns(store, table)
                names = ", ".join(f'"{c}"' for c in columns)
                selection = f"SELECT {names}, strftime(hour, '%Y-%m') AS month FROM {table} WHERE hour < {cutoff}"
                source = _month_checks(store, f"({selection})", columns, numeric)
                if source.empty:
                    summary["tables"][table] = {"rows": 0, "months": [], "files": [], "parquet_bytes": 0}
                    continue
                order = ", ".join(TABLE_KEYS[table][:-1] + ("hour",))
                store.con.execute(
                    f"COPY ({selection} ORDER BY {order}) TO {_sql_str(archive_dir / table)} (FORMAT PARQUET,"
                    f" PARTITION_BY (month), COMPRESSION zstd, FILENAME_PATTERN {_sql_str(stem + '_{i}')},"
                    f" OVERWRITE_OR_IGNORE)")
                plans.append((table, source, columns, numeric))
            for table, source, columns, numeric in plans:
                glob = str(archive_dir / table / "month=*" / f"{stem}_*.parquet")
                _verify(store, table, source, glob, columns, numeric)
            for table, source, columns, numeric in plans:
                deleted = store.con.execute(f"DELETE FROM {table} WHERE hour < {cutoff}").fetchone()[0]
                if int(deleted) != int(source["rows"].sum()):
                    raise RuntimeError(f"{table}: deleted {deleted} rows but archived {int(source['rows'].sum())}")
                files = _run_files(archive_dir, table, run_id)
                summary["tables"][table] = {
                    "rows": int(deleted), "months": list(source.index), "files": [str(f) for f in files],
                    "parquet_bytes": sum(f.stat().st_size for f in files)}
            run.summary = {t: {k: v for k, v in s.items() if k != "files"} for t, s in summary["tables"].items()}
    except BaseException:
        if run_id is not None:
            _remove_run_files(archive_dir, tables, run_id, dirs_before)
        raise
    store.con.execute("CHECKPOINT")
    summary["rows"] = sum(s["rows"] for s in summary["tables"].values())
    summary["parquet_bytes"] = sum(s["parquet_bytes"] for s in summary["tables"].values())
    summary["db_bytes_before"] = file_bytes_before
    summary["db_bytes_after"] = store.path.stat().st_size
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary


def rebuild_file(path: Path | str) -> dict:
    """Rewrite the DuckDB file compactly and swap it in place: DuckDB reuses the blocks that deletes free but
    never truncates the file, so after a first big compaction the file stays as large as before (measured in
    docs/storage.md) until it is rebuilt. Every table's row count is compared before the swap; the old file is
    held open read-only throughout, so no writer can slip in between the copy and the swap."""
    import duckdb

    path = Path(path)
    if not path.exists():
        raise InputError("db", f"no database at {path}")
    fresh = path.with_name(path.name + ".rebuild")
    fresh.unlink(missing_ok=True)
    bytes_before = path.stat().st_size
    con = duckdb.connect()
    try:
        try:
            con.execute(f"ATTACH {_sql_str(path)} AS old (READ_ONLY)")
        except duckdb.IOException as exc:
            raise InputError("db", f"{path} is locked by another process: {str(exc).splitlines()[0]}") from exc
        con.execute(f"ATTACH {_sql_str(fresh)} AS fresh")
        con.execute("COPY FROM DATABASE old TO fresh")
        con.execute("CHECKPOINT fresh")
        tables = [r[0] for r in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = 'old'").fetchall()]
        for table in tables:
            a = con.execute(f'SELECT count(*) FROM old."{table}"').fetchone()[0]
            b = con.execute(f'SELECT count(*) FROM fresh."{table}"').fetchone()[0]
            if a != b:
                raise RuntimeError(f"rebuild of {path}: {table} has {b} rows in the copy, {a} in the original")
        con.execute("DETACH fresh")
        os.replace(fresh, path)
    except BaseException:
        fresh.unlink(missing_ok=True)
        Path(str(fresh) + ".wal").unlink(missing_ok=True)
        raise
    finally:
        con.close()
    return {"db_bytes_before": bytes_before, "db_bytes_after": path.stat().st_size}


# -- reading cold history back -------------------------------------------------------------------------------
def history_view(store: Store, archive_dir: Path | str, tables=HISTORY_TABLES, dedupe: bool = True) -> list[str]:
    """Create or replace TEMP views `<table>_all` = the table UNION ALL its archived Parquet months.

    Temporary (per connection) on purpose: they work on read-only connections (dashboard, CLI, analysts), and
    the archive path is machine-local, so a persisted view would break every other reader of the file. With
    `dedupe` (default), one row per primary key: DuckDB's row wins over archived ones, a newer archive file
    over an older one. `dedupe=False` is a plain UNION ALL, cheaper on huge archives, exact when the archive
    was only ever written by compact_history without a re-import of archived months.
    """
    archive_dir = Path(archive_dir).expanduser().resolve()
    if archive_dir.exists() and not archive_dir.is_dir():
        raise InputError("archive", f"{archive_dir} is not a directory")
    created = []
    for table in tables:
        columns = store.columns(table)
        names = ", ".join(f'"{c}"' for c in columns)
        files = sorted((archive_dir / table).glob("month=*/*.parquet")) if archive_dir.exists() else []
        if not files:
            body = f"SELECT {names} FROM main.{table}"
        else:
            glob = _sql_str(archive_dir / table / "month=*" / "*.parquet")
            archived = f"SELECT {names} FROM read_parquet({glob}, hive_partitioning = 1, filename = true)"
            if dedupe:
                keys = ", ".join(TABLE_KEYS[table])
                body = (f"SELECT {names} FROM (SELECT {names}, 0 AS _tier, '' AS _file FROM main.{table} UNION ALL"
                        f" SELECT {names}, 1 AS _tier, filename AS _file FROM read_parquet({glob},"
                        f" hive_partitioning = 1, filename = true))"
                        f" QUALIFY row_number() OVER (PARTITION BY {keys} ORDER BY _tier, _file DESC) = 1")
            else:
                body = f"SELECT {names} FROM main.{table} UNION ALL {archived}"
        store.con.execute(f"CREATE OR REPLACE TEMP VIEW {table}_all AS {body}")
        created.append(f"{table}_all")
    return created


def restore_history(store: Store, archive_dir: Path | str, start, end, tables=HISTORY_TABLES) -> dict:
    """Copy archived rows with start <= hour < end back into DuckDB (upsert, one run of kind "restore"); the
    Parquet files stay, and the `_all` views prefer DuckDB's rows, so nothing is counted twice."""
    start, end = _as_date(start), _as_date(end)
    history_view(store, archive_dir, tables)
    restored = {}
    with store.run("restore", {"archive_dir": str(archive_dir), "start": str(start), "end": str(end)}) as run:
        for table in tables:
            names = ", ".join(store.columns(table))
            n = store.con.execute(
                f"INSERT OR REPLACE INTO {table} ({names}) SELECT {names} FROM {table}_all"
                f" WHERE hour >= {_cutoff_literal(start)} AND hour < {_cutoff_literal(end)}").fetchone()[0]
            restored[table] = int(n)
        run.summary = restored
    return {"run_id": run.run_id, "rows": restored}
