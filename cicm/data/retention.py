"""`cicm store`: the store's size and the compaction of cold history (the commands).

The maintenance itself, and all of its SQL, is in ``cicm.store.retention``; its names are re-exported here for
existing callers. Patch ``cicm.store.retention`` (not this module) to change what ``compact_history`` calls.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from cicm.clikit import db_option, fail
from cicm.errors import InputError
from cicm.store.core import Store
from cicm.store.retention import (ARCHIVE_FILE_PREFIX, HISTORY_TABLES, HOT_WINDOW_DAYS, _as_date,  # noqa: F401
                                  archive_bytes, compact_history, history_view, latest_allowed_before,
                                  newest_hour, rebuild_file, restore_history, store_size)


# -- CLI: `cicm store` ---------------------------------------------------------------------------------------
store_app = typer.Typer(no_args_is_help=True, help="The DuckDB store: size, and compaction of cold history.")
console = Console(width=None if sys.stdout.isatty() else 160)
DbOption = db_option()


_bad_input = fail


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def _open_store(db: Optional[Path], read_only: bool) -> Store:
    import duckdb

    from cicm.paths import default_db_path

    path = Path(db) if db else default_db_path()
    if not path.exists():
        raise InputError("db", f"no database at {path}")
    try:
        return Store(path, read_only=read_only)
    except duckdb.Error as exc:
        raise InputError("db", f"cannot open {path}: {str(exc).splitlines()[0]}") from exc


@store_app.command("size")
def size_command(db: Optional[Path] = DbOption) -> None:
    """Rows and estimated bytes per table, and the file's size."""
    try:
        with _open_store(db, read_only=True) as store:
            frame = store_size(store)
    except InputError as exc:
        _bad_input(exc)
    table = Table(title=f"Store {db or 'default'}: {_human(frame.attrs['file_bytes'])} on disk")
    for col in ("table", "rows", "estimated bytes", "bytes/row"):
        table.add_column(col, justify="left" if col == "table" else "right")
    for r in frame.itertuples():
        table.add_row(r.table, f"{r.rows:,}", _human(r.estimated_bytes),
                      "—" if r.bytes_per_row != r.bytes_per_row else f"{r.bytes_per_row:,.1f}")
    console.print(table)


@store_app.command("compact")
def compact_command(
    before: str = typer.Option(..., "--before", help="archive rows with hour before this UTC day (YYYY-MM-DD)"),
    archive: Path = typer.Option(..., "--archive", help="directory of the Parquet archive"),
    db: Optional[Path] = DbOption,
    force: bool = typer.Option(False, "--force", help="allow a --before inside the planner's 190-day window"),
    rebuild: bool = typer.Option(False, "--rebuild", help="then rewrite the DuckDB file so it shrinks on disk"),
    table: Optional[list[str]] = typer.Option(
        None, "--table", help="compact only this table (repeatable; default: usage_history and power_telemetry)"),
) -> None:
    """Move usage and power rows older than --before to Parquet (verified), then delete them from DuckDB."""
    try:
        day = _as_date(before)
        tables = tuple(table) if table else HISTORY_TABLES
        for name in tables:
            if name not in HISTORY_TABLES:
                raise InputError("table", f"{name!r} is not one of {', '.join(HISTORY_TABLES)}")
        with _open_store(db, read_only=False) as store:
            summary = compact_history(store, day, archive, tables=tables, force=force)
            path = store.path
        if rebuild:
            summary["db_bytes_after"] = rebuild_file(path)["db_bytes_after"]
    except InputError as exc:
        _bad_input(exc)
    table = Table(title=f"Compaction {summary['run_id']}: rows before {summary['before']} → {summary['archive_dir']}")
    for col in ("table", "rows archived", "months", "Parquet bytes"):
        table.add_column(col, justify="left" if col in ("table", "months") else "right")
    for name, s in summary["tables"].items():
        months = ("—" if not s["months"] else s["months"][0] if len(s["months"]) == 1
                  else f"{s['months'][0]} … {s['months'][-1]} ({len(s['months'])})")
        table.add_row(name, f"{s['rows']:,}", months, _human(s["parquet_bytes"]))
    console.print(table)
    console.print(f"DuckDB file {_human(summary['db_bytes_before'])} → {_human(summary['db_bytes_after'])} "
                  f"after CHECKPOINT{' and rebuild' if rebuild else ''}; compaction {summary['seconds']:.1f} s")
