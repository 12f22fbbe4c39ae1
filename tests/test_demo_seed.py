"""The demo is explicit: `cicm demo seed` creates the demo store; `cicm plan` on a store without telemetry stops
with a clear message and never invents data. Run as a user runs them: the console script in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import duckdb

CICM = Path(sys.executable).with_name("cicm")


def cicm(args: list[str], home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(CICM), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "CICM_HOME": str(home)}, cwd=home.parent)


def count(db: Path, table: str) -> int:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    finally:
        con.close()


def test_plan_on_an_empty_store_says_what_to_provide_and_stores_nothing(tmp_path):
    home = tmp_path / "home"
    out = cicm(["plan", "--json"], home)
    assert out.returncode == 1, out.stderr[-2000:]
    assert out.stdout.strip() == ""
    error = next(line for line in out.stderr.splitlines() if line.startswith("error: "))
    assert error.startswith("error: telemetry:") and "cicm demo seed" in error and "--telemetry DIR" in error
    db = home / "cicm.duckdb"
    for table in ("usage_history", "power_telemetry", "carbon_actuals", "vccs"):
        assert count(db, table) == 0, table  # no demo data was invented


def test_demo_seed_then_plan(tmp_path):
    home = tmp_path / "home"
    first = cicm(["demo", "seed"], home)
    assert first.returncode == 0 and "seeded demo" in first.stdout, first.stderr[-2000:]
    db = home / "cicm.duckdb"
    rows = count(db, "usage_history")
    assert rows == 10 * 365 * 24  # the demo fleet: 10 clusters, a year of hourly history
    again = cicm(["demo", "seed"], home)
    assert again.returncode == 0 and "already holds telemetry" in again.stdout
    assert count(db, "usage_history") == rows and count(db, "runs") == 1  # nothing imported twice
    plan = cicm(["plan"], home)
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert count(db, "vccs") > 0
