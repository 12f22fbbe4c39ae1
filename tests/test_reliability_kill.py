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


# ------------------------------------------------------------------------- `cicm plan` in real processes (slow)
import random  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

CICM = Path(sys.executable).with_name("cicm")

# `cicm plan --telemetry DROP` with hooks: KILL_AT=method:what SIGKILLs the process itself at that store call (the
# run's 'running' row committed, its data written in its open transaction, or its final status about to be
# written); HOOK_SLOW_QUERY=function makes that function's first store query wait in a long DuckDB query after
# saying so on stderr (the test then sends SIGTERM from outside, while DuckDB runs).
HOOKED_PLAN = """
import os, signal, sys
from cicm.store import core
where = os.environ.get("KILL_AT", "")
def die():
    os.kill(os.getpid(), signal.SIGKILL)
def wrap(name, before=None, after=None):
    orig = getattr(core.Store, name)
    def hooked(self, *args, **kwargs):
        if before and before(*args, **kwargs):
            die()
        out = orig(self, *args, **kwargs)
        if after and after(*args, **kwargs):
            die()
        return out
    setattr(core.Store, name, hooked)
kind = lambda run_id: run_id.split("-20")[0]
if where.startswith("begin_run:"):
    wrap("begin_run", after=lambda k, *a, **kw: k == where.split(":")[1])
elif where.startswith("upsert:"):
    wrap("upsert", after=lambda table, *a, **kw: table == where.split(":")[1])
elif where == "replace_plan":
    wrap("replace_plan", after=lambda *a, **kw: True)
elif where == "finish_run:plan":
    wrap("finish_run", before=lambda run_id, status, *a, **kw: kind(run_id) == "plan" and status in ("ok", "degraded"))
slow = os.environ.get("HOOK_SLOW_QUERY")
if slow:
    query, said = core.Store.query, []
    def slow_query(self, sql, params=None):
        if not said and sys._getframe(1).f_code.co_name == slow:
            said.append(1)
            print("HOOK: in a DuckDB query of " + slow, file=sys.stderr, flush=True)
            self.con.execute("SELECT sum(i) FROM range(20000000000) t(i)").fetchall()
        return query(self, sql, params)
    core.Store.query = slow_query
from cicm.cli import app
sys.argv = ["cicm", "plan", *sys.argv[1:]]
app()
"""

SUCCEEDED = ("ok", "degraded")
DATA_TABLES = ("usage_history", "power_telemetry", "vccs", "vcc_status", "carbon_forecasts", "load_forecasts",
               "load_forecast_days", "power_models", "current_plans", "slo_events")


def _env(home: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return {**env, "CICM_HOME": str(home), **extra}


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> tuple[Path, Path]:
    """A demo store with one succeeded plan in force, and a telemetry drop of stored hours (the same values: its
    ingest is a real telemetry-ingest run that changes nothing)."""
    base = tmp_path_factory.mktemp("kill")
    home = base / "home"
    for args in (["demo", "seed"], ["plan"]):
        began = time.monotonic()
        out = subprocess.run([str(CICM), *args], capture_output=True, text=True, timeout=300, env=_env(home),
                             cwd=base)
        assert out.returncode == 0, out.stderr[-2000:]
    PLAN_SECONDS.append(time.monotonic() - began)  # the time-based kill points are fractions of it
    drop = base / "drop"
    drop.mkdir()
    with Store(home / "cicm.duckdb", read_only=True) as store:
        window = "hour >= TIMESTAMPTZ '2022-06-12 00:00:00+00' AND hour < TIMESTAMPTZ '2022-06-14 00:00:00+00'"
        store.query(f"SELECT * EXCLUDE (run_id) FROM usage_history WHERE {window}").to_parquet(drop / "usage.parquet")
        store.query(f"SELECT * EXCLUDE (run_id) FROM power_telemetry WHERE {window}").to_parquet(
            drop / "power.parquet")
    return home / "cicm.duckdb", drop


def _copy(db: Path, tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(db, home / "cicm.duckdb")
    return home


def _plan_process(home: Path, args: list[str], **env: str) -> tuple[subprocess.Popen, Path]:
    """HOOKED_PLAN in its own process group; stderr to a file (a killed process's children would keep a pipe)."""
    err = home.parent / "stderr.txt"
    proc = subprocess.Popen([sys.executable, "-c", HOOKED_PLAN, *args], stdout=subprocess.DEVNULL,
                            stderr=open(err, "w"), env=_env(home, **env), cwd=home.parent, start_new_session=True)
    return proc, err


def _end_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _in_force(db: Path):
    with Store(db, read_only=True) as store:
        return (store.query("SELECT * FROM current_plans ORDER BY plan_date, cluster"),
                store.query("SELECT * FROM current_vcc_status ORDER BY plan_date, cluster"))


def _check_invariants(db: Path, pid: int, before) -> dict:
    """The store after a killed `cicm plan` (process `pid`): it opens; its next writer abandons the dead runs with
    the reason; nothing of a run that did not succeed is stored or in force; the previous plan stays in force
    unless the new plan run succeeded. Returns the killed process's runs {kind: status}."""
    with Store(db) as store:  # the next writer
        runs = store.query("SELECT run_id, kind, status, message FROM runs WHERE pid = ? ORDER BY started_at", [pid])
        assert store.query("SELECT count(*) AS n FROM runs WHERE status = 'running'")["n"].iloc[0] == 0
        assert store.plans_of_unsucceeded_runs().empty
        for table in DATA_TABLES:  # a run's rows commit with its final status, so only succeeded runs have rows
            bad = store.query(f"SELECT count(*) AS n FROM {table} t JOIN runs r USING (run_id)"
                              " WHERE r.status NOT IN ('ok', 'degraded')")["n"].iloc[0]
            assert bad == 0, (table, runs)
        for view in ("current_vccs", "current_vcc_status"):
            assert store.query(f"SELECT count(*) AS n FROM {view} v JOIN runs r USING (run_id)"
                               " WHERE r.status NOT IN ('ok', 'degraded')")["n"].iloc[0] == 0
    for row in runs.itertuples():
        assert row.status in (*SUCCEEDED, "abandoned", "failed"), runs
        if row.status == "abandoned":
            assert f"its process {pid} on {socket.gethostname()} is gone" in row.message, runs
    current, status = _in_force(db)
    new_plans = runs[(runs["kind"] == "plan") & runs["status"].isin(SUCCEEDED)]
    if new_plans.empty:  # the previous plan, intact
        assert current.equals(before[0]) and status.equals(before[1]), runs
    else:
        assert set(current["run_id"]) == set(new_plans["run_id"])
    return dict(zip(runs["kind"], runs["status"]))


# Where `cicm plan --telemetry DROP` dies: at store calls (hooks), then at seeded-random times (SIGKILL of its
# process group from here), as fractions of a whole plan's wall time on this machine (measured by the fixture):
# 25-75% of it (the hooked plan also ingests a drop, so it takes longer than the measured one; a loaded machine
# varies): imports, the ingest, the SLO stage, the programs.
_RANDOM = random.Random(20)
KILL_POINTS = ["begin_run:telemetry-ingest", "upsert:usage_history", "replace_plan", "finish_run:plan",
               *(f"time:{_RANDOM.uniform(0.25, 0.75):.2f}" for _ in range(2))]
PLAN_SECONDS: list[float] = []  # the fixture fills it


@pytest.mark.slow(reason="the cicm console script in subprocesses")
@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_a_plan_killed_anywhere_leaves_a_consistent_store_and_the_next_plan_succeeds(seeded, tmp_path, kill_at):
    db0, drop = seeded
    home = _copy(db0, tmp_path)
    db = home / "cicm.duckdb"
    before = _in_force(db)
    proc, err = _plan_process(home, ["--telemetry", str(drop)], KILL_AT=kill_at)
    try:
        if kill_at.startswith("time:"):
            time.sleep(float(kill_at.split(":")[1]) * PLAN_SECONDS[0])
            _end_group(proc)
        code = proc.wait(timeout=120)
    finally:
        _end_group(proc)
    assert code == -signal.SIGKILL, err.read_text()[-2000:]
    kinds = _check_invariants(db, proc.pid, before)
    expected = {"begin_run:telemetry-ingest": {"telemetry-ingest": "abandoned"},
                "upsert:usage_history": {"telemetry-ingest": "abandoned"},
                "replace_plan": {"telemetry-ingest": "ok", "slo": "ok", "plan": "abandoned"},
                "finish_run:plan": {"telemetry-ingest": "ok", "slo": "ok", "plan": "abandoned"}}.get(kill_at)
    if expected is not None:
        assert kinds == expected, kinds
    again = subprocess.run([str(CICM), "plan"], capture_output=True, text=True, timeout=300, env=_env(home),
                           cwd=home.parent)
    assert again.returncode == 0, again.stderr[-2000:]
    with Store(db, read_only=True) as store:
        last = store.query("SELECT run_id, status FROM runs WHERE kind = 'plan' ORDER BY started_at DESC LIMIT 1")
        assert store.plans_of_unsucceeded_runs().empty
    assert last["status"].iloc[0] == "ok" and set(_in_force(db)[0]["run_id"]) == {last["run_id"].iloc[0]}


@pytest.mark.slow(reason="the cicm console script in a subprocess")
def test_an_external_sigterm_during_a_duckdb_query_rolls_back_is_recorded_and_exits_2(seeded, tmp_path):
    """SIGTERM from another process while the SLO stage waits in a DuckDB query. DuckDB turned the handler's
    exception into `RuntimeError: Query interrupted`, the SLO stage's fallback swallowed it and the plan was
    committed 'degraded' (exit 2 for the wrong reason). Now: nothing commits after the signal, the plan run is
    failed 'Interrupted: interrupted by SIGTERM', the previous plan stays, exit 2 with the error line."""
    home = _copy(seeded[0], tmp_path)
    db = home / "cicm.duckdb"
    before = _in_force(db)
    proc, err = _plan_process(home, [], HOOK_SLOW_QUERY="last_switch_offs")
    try:
        deadline = time.monotonic() + 120
        while "HOOK: in a DuckDB query" not in err.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()[-2000:]
            time.sleep(0.05)
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        _end_group(proc)
    text = err.read_text()
    assert code == 2 and "error: interrupted by SIGTERM" in text, text[-3000:]
    kinds = _check_invariants(db, proc.pid, before)
    with Store(db, read_only=True) as store:
        runs = store.query("SELECT kind, status, message FROM runs WHERE pid = ? ORDER BY started_at", [proc.pid])
    assert kinds.get("plan", "failed") == "failed", runs
    assert (runs["message"] == "Interrupted: interrupted by SIGTERM").any(), runs
    assert not runs["status"].isin(SUCCEEDED).any(), runs


@pytest.fixture(scope="module")
def prefect_server_url(tmp_path_factory):
    """A Prefect server of its own (`prefect server start` on a free port): with PREFECT_API_URL set, `cicm plan`
    runs the plan as the Prefect flow, whose engine installs Prefect's SIGTERM handler."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    home = tmp_path_factory.mktemp("prefect")
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false", "DO_NOT_TRACK": "1"}
    env.pop("PREFECT_API_URL", None)
    server = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "server", "start", "--host",
                               "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=open(home / "server.log", "w"), env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        import urllib.request

        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None and time.monotonic() < deadline, (home / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        _end_group(server)
        server.wait()


@pytest.mark.slow(reason="a Prefect server and the cicm console script in a subprocess")
def test_an_external_sigterm_during_the_prefect_flow_rolls_back_is_recorded_and_exits_2(seeded, tmp_path,
                                                                                         prefect_server_url):
    """The same SIGTERM while the plan runs as a Prefect flow (PREFECT_API_URL set): Prefect's handler raised its
    TerminationSignal inside the DuckDB query, DuckDB made it a RuntimeError, and the plan committed 'degraded'.
    Now the flow body puts `cicm plan`'s handler back (cicm.clikit.reinstate_interrupt_handler)."""
    home = _copy(seeded[0], tmp_path)
    db = home / "cicm.duckdb"
    before = _in_force(db)
    proc, err = _plan_process(home, [], HOOK_SLOW_QUERY="last_switch_offs", PREFECT_API_URL=prefect_server_url)
    try:
        deadline = time.monotonic() + 120
        while "HOOK: in a DuckDB query" not in err.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()[-2000:]
            time.sleep(0.05)
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        _end_group(proc)
    text = err.read_text()
    assert "Flow run 'nightly-plan-" in text  # it ran as the flow
    assert code == 2 and "error: interrupted by SIGTERM" in text, text[-3000:]
    kinds = _check_invariants(db, proc.pid, before)
    assert kinds.get("plan", "failed") == "failed", kinds
    with Store(db, read_only=True) as store:
        runs = store.query("SELECT kind, status, message FROM runs WHERE pid = ?", [proc.pid])
    assert (runs["message"] == "Interrupted: interrupted by SIGTERM").any(), runs
    assert not runs["status"].isin(SUCCEEDED).any(), runs
