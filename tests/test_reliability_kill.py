"""Issue 20, item 2: runs are never stuck, whatever kills `cicm plan` and wherever.

* a reused pid does not keep a dead run 'running' (the run records its process's start time, schema 4);
* an external SIGTERM while the Prefect flow runs rolls the plan back, records it and exits 2;
* SIGKILL at several points (hooks at the store's calls, and seeded-random times) leaves a store that opens, whose
  next writer abandons the dead runs, whose plan in force is the previous one unless the new run succeeded, and
  where the next `cicm plan` succeeds.

The `cicm plan` tests are real processes (each in its own process group, SIGKILLed as a whole after) on copies of
one demo store (`cicm demo seed`, then a first `cicm plan`).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from cicm.store import Store
from cicm.store.core import process_start


# ------------------------------------------------------------------------------------------ reused pids (fast)
def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def test_a_reused_pid_does_not_keep_a_dead_run_running(db_path):
    """A run whose pid now belongs to another live process (recorded start time differs) is abandoned, naming the
    reuse; a run of that same live process (its start time) is kept. Before schema 4 both stayed 'running'."""
    child = _sleeper()
    try:
        started = process_start(child.pid)
        assert started is not None and started != process_start(os.getpid())
        boot, ticks = started.rsplit(":", 1)
        with Store(db_path) as store:
            dead, alive = store.begin_run("plan"), store.begin_run("carbon-fetch")
            store.con.execute("UPDATE runs SET pid = ?, process_start = ? WHERE run_id = ?",
                              [child.pid, f"{boot}:{int(ticks) - 500}", dead])  # an earlier process, same pid
            store.con.execute("UPDATE runs SET pid = ?, process_start = ? WHERE run_id = ?",
                              [child.pid, started, alive])
        with Store(db_path) as store:
            runs = store.query("SELECT run_id, status, message FROM runs").set_index("run_id")
        assert runs.loc[dead, "status"] == "abandoned", runs
        assert (f"its process {child.pid} on {socket.gethostname()} is gone; pid {child.pid} now belongs to a "
                "process started at another time") in runs.loc[dead, "message"]
        assert runs.loc[alive, "status"] == "running"
    finally:
        child.kill()
        child.wait()


def test_this_processs_own_runs_record_its_start_and_stay(db_path):
    with Store(db_path) as store:
        mine = store.begin_run("plan")
    with Store(db_path) as store:
        row = store.query("SELECT status, pid, process_start FROM runs WHERE run_id = ?", [mine]).iloc[0]
    assert row["status"] == "running" and row["pid"] == os.getpid()
    assert row["process_start"] == process_start(os.getpid())


def test_a_version_3_run_without_a_start_time_is_checked_by_its_pid_alone(db_path):
    """Migrated rows (version 3: pid, no start) keep the pid-only check: alive is kept, dead is abandoned."""
    child = _sleeper()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    try:
        with Store(db_path) as store:
            alive, dead = store.begin_run("plan"), store.begin_run("plan")
            store.con.execute("UPDATE runs SET pid = ?, process_start = NULL WHERE run_id = ?", [child.pid, alive])
            store.con.execute("UPDATE runs SET pid = ?, process_start = NULL WHERE run_id = ?",
                              [int(gone.stdout), dead])
        with Store(db_path) as store:
            runs = store.query("SELECT run_id, status FROM runs").set_index("run_id")["status"]
        assert runs[alive] == "running" and runs[dead] == "abandoned"
    finally:
        child.kill()
        child.wait()


def test_process_start_reads_proc_and_names_no_process_that_is_gone():
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert process_start(int(gone.stdout)) is None
    me = process_start(os.getpid())
    assert me is not None and me == process_start(os.getpid())
