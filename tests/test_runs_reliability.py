"""Issue 20, item 2: no run stuck in 'running', and a plan in force always belongs to a succeeded run. Real
processes: `cicm demo seed`, a first `cicm plan`, then plans that are SIGKILLed or SIGTERMed mid-run."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cicm.store import Store

CICM = Path(sys.executable).with_name("cicm")

# Every test here runs `cicm` in subprocesses through the `planned` fixture (the conftest's source check does not
# see that in the test bodies): out of the fast loop.
pytestmark = pytest.mark.slow(reason="the cicm console script in subprocesses")

# `cicm plan` in a real process that kills itself at the worst point: its data written in the run's transaction,
# the final status about to be written (the place where version-2 code lost the status).
KILL_AT_STATUS = """
import os, signal, sys
from cicm.store import core
finish = core.Store.finish_run
def finish_run(self, run_id, status, *args, **kwargs):
    if run_id.startswith("plan-") and status in ("ok", "degraded"):
        os.kill(os.getpid(), getattr(signal, os.environ["KILL_WITH"]))
    return finish(self, run_id, status, *args, **kwargs)
core.Store.finish_run = finish_run
from cicm.cli import app
sys.argv = ["cicm", "plan"]
app()
"""


def _env(home: Path, **extra: str) -> dict:
    return {**os.environ, "CICM_HOME": str(home), **extra}


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> Path:
    """A demo store with one succeeded plan in force (the 'previous' plan)."""
    home = tmp_path_factory.mktemp("runs") / "home"
    for args in (["demo", "seed"], ["plan"]):
        out = subprocess.run([str(CICM), *args], capture_output=True, text=True, timeout=300, env=_env(home),
                             cwd=home.parent)
        assert out.returncode == 0, out.stderr[-2000:]
    return home / "cicm.duckdb"


def _copy(planned: Path, tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(planned, home / "cicm.duckdb")
    return home


def _run_plan(home: Path, kill_with: str) -> tuple[int, str]:
    """Run KILL_AT_STATUS in its own process group; stderr to a file (a killed plan's Prefect server would keep a
    pipe open); the group's leftovers (that server) are ended after."""
    err = home.parent / "stderr.txt"
    with open(err, "w") as handle:
        proc = subprocess.Popen([sys.executable, "-c", KILL_AT_STATUS], stdout=subprocess.DEVNULL, stderr=handle,
                                env=_env(home, KILL_WITH=kill_with), cwd=home.parent, start_new_session=True)
        try:
            code = proc.wait(timeout=120)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return code, err.read_text()


def _plan_in_force(db: Path):
    with Store(db, read_only=True) as store:
        return store.query("SELECT * FROM current_vcc_status ORDER BY cluster").drop(columns=[]), \
            store.query("SELECT * FROM current_plans ORDER BY cluster")


def test_a_plan_killed_with_its_data_written_is_abandoned_and_the_previous_plan_stays(planned, tmp_path):
    home = _copy(planned, tmp_path)
    db = home / "cicm.duckdb"
    before_status, before_current = _plan_in_force(db)
    code, err = _run_plan(home, "SIGKILL")
    assert code == -signal.SIGKILL, err[-2000:]
    with Store(db) as store:  # the next writer cleans up
        runs = store.query("SELECT run_id, status, message FROM runs WHERE kind = 'plan' ORDER BY started_at")
        assert store.plans_of_unsucceeded_runs().empty
        assert store.query("SELECT count(*) AS n FROM runs WHERE status = 'running'")["n"].iloc[0] == 0
    killed = runs.iloc[-1]
    assert killed["status"] == "abandoned" and "is gone" in killed["message"], runs
    after_status, after_current = _plan_in_force(db)
    assert killed["run_id"] not in set(after_current["run_id"])
    assert after_current.equals(before_current) and after_status.equals(before_status)  # the previous plan, intact
    assert set(after_current["run_id"]) == {runs.iloc[0]["run_id"]} and runs.iloc[0]["status"] == "ok"


def test_a_sigterm_rolls_back_records_the_interruption_and_exits_2(planned, tmp_path):
    home = _copy(planned, tmp_path)
    db = home / "cicm.duckdb"
    before_status, before_current = _plan_in_force(db)
    code, err = _run_plan(home, "SIGTERM")
    assert code == 2, err[-3000:]
    assert "error: interrupted by SIGTERM" in err
    with Store(db, read_only=True) as store:  # recorded by the process itself: no cleanup needed
        runs = store.query("SELECT run_id, status, message FROM runs WHERE kind = 'plan' ORDER BY started_at")
        assert store.plans_of_unsucceeded_runs().empty
    last = runs.iloc[-1]
    assert last["status"] == "failed" and last["message"] == "Interrupted: interrupted by SIGTERM", runs
    after_status, after_current = _plan_in_force(db)
    assert after_current.equals(before_current) and after_status.equals(before_status)
