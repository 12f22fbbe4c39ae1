"""Issue 20, item 3: the store's write lock is never held during network I/O, and a locked store is waited for a
bounded time, then refused with a clear message (`cicm carbon fetch` against real loopback servers and a second
process holding the DuckDB file)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cicm.errors import InputError
from cicm.store import Store
from cicm.store.core import LOCK_WAIT_ENV, SCHEMA_VERSION, StoreLocked, lock_wait_s

try:
    from tests.fakeproviders import EM_TOKEN, NOW, fake, fake_server  # noqa: F401
except ImportError:  # pragma: no cover - run from tests/
    from fakeproviders import EM_TOKEN, NOW, fake, fake_server  # noqa: F401

HOLD = ("import duckdb, sys, time; con = duckdb.connect(sys.argv[1]); print('holding', flush=True); "
        "time.sleep(float(sys.argv[2]))")


def hold_store(db: Path, seconds: float) -> subprocess.Popen:
    """Another process that holds the store's write lock for ``seconds`` (returns once it holds it)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(db), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"
    return proc


def new_store(tmp_path: Path) -> Path:
    db = tmp_path / "c.duckdb"
    with Store(db):
        pass
    return db


def fetch_args(fake, db: Path) -> list[str]:
    return ["carbon", "fetch", "--provider", "electricitymaps", "--zone", "DE", "--date", "2026-11-23",
            "--base-url", fake.url, "--now", NOW.isoformat(), "--db", str(db)]


def env(**extra: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CICM_")}
    environ.update(ELECTRICITYMAPS_TOKEN=EM_TOKEN, **extra)
    return environ


def test_a_locked_store_is_waited_for_a_bounded_time_then_refused(tmp_path, monkeypatch):
    db = new_store(tmp_path)
    holder = hold_store(db, 30)
    try:
        monkeypatch.setenv(LOCK_WAIT_ENV, "1")
        t0 = time.monotonic()
        with pytest.raises(StoreLocked) as e:
            Store(db)
        took = time.monotonic() - t0
    finally:
        holder.kill()
        holder.wait()
    assert 1.0 <= took < 3.0
    assert e.value.field == "db" and isinstance(e.value, InputError)
    assert f"{db} is locked by another process (waited 1" in e.value.message
    assert f"PID {holder.pid}" in e.value.message and "nothing was recorded in it" in e.value.message


def test_a_store_released_during_the_wait_is_opened(tmp_path, monkeypatch):
    db = new_store(tmp_path)
    holder = hold_store(db, 1.0)
    monkeypatch.setenv(LOCK_WAIT_ENV, "10")
    t0 = time.monotonic()
    with Store(db) as st:
        assert st.schema_version() == SCHEMA_VERSION
    assert 0.5 <= time.monotonic() - t0 < 5.0
    holder.wait()


@pytest.mark.parametrize("value", ["soon", "-1", "inf", "nan"])
def test_a_bad_lock_wait_is_refused_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv(LOCK_WAIT_ENV, value)
    with pytest.raises(InputError, match=rf"^{LOCK_WAIT_ENV}: must be a number of seconds >= 0"):
        lock_wait_s()


def test_carbon_fetch_does_not_hold_the_store_while_it_fetches(tmp_path, fake):
    """The provider answers after 3 s; meanwhile another writer opens the store, writes a run and closes, without
    waiting (before the fix the fetch held the write lock from before the request until after the rows)."""
    cicm = Path(sys.executable).with_name("cicm")
    db = new_store(tmp_path)
    fake.set("electricitymaps", "timeout_then_ok", delay_s=3.0, failures=1)
    proc = subprocess.Popen([str(cicm), *fetch_args(fake, db)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env())
    try:
        deadline = time.monotonic() + 30
        while fake.hits("electricitymaps", "forecast") < 1:  # the request is in flight (and will take 3 s)
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        t0 = time.monotonic()
        with Store(db) as st, st.run("other-writer", {"why": "writes while the fetch waits"}):
            pass
        took = time.monotonic() - t0
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert took < 1.0  # not the fetch's 3 s (nor the 10 s lock wait)
    assert proc.returncode == 0, err
    assert len([line for line in out.splitlines() if line.startswith("  2026-11-23T")]) == 24
    with Store(db, read_only=True) as st:
        runs = st.runs().sort_values("finished_at")
        rows = st.query("SELECT count(*) AS n FROM carbon_forecasts")["n"][0]
    # the other writer finished while the fetch was still waiting on its provider; the fetch's run is timed from
    # the fetch's start, so it started first and finished last
    assert list(runs["kind"]) == ["other-writer", "carbon-fetch"] and set(runs["status"]) == {"ok"}
    fetch_run = runs.set_index("kind").loc["carbon-fetch"]
    assert (fetch_run["finished_at"] - fetch_run["started_at"]).total_seconds() >= 2.5  # the provider's 3 s
    assert rows == 24


def test_carbon_fetch_into_a_locked_store_prints_the_forecast_and_says_it_was_not_recorded(tmp_path, fake):
    cicm = Path(sys.executable).with_name("cicm")
    db = new_store(tmp_path)
    holder = hold_store(db, 60)
    try:
        t0 = time.monotonic()
        r = subprocess.run([str(cicm), *fetch_args(fake, db)], capture_output=True, text=True, timeout=60,
                           env=env(**{LOCK_WAIT_ENV: "1"}))
        took = time.monotonic() - t0
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 2, r.stderr  # degraded: fetched and printed, not stored
    assert len([line for line in r.stdout.splitlines() if line.startswith("  2026-11-23T")]) == 24
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: db: the carbon-fetch run and its 24 hours cannot be recorded in a locked store: "), r.stderr
    assert "is locked by another process (waited 1" in lines[0]
    assert took < 20
    with Store(db, read_only=True) as st:
        assert st.runs().empty and st.query("SELECT count(*) AS n FROM carbon_forecasts")["n"][0] == 0


def test_a_failed_fetch_into_a_locked_store_keeps_its_own_error(tmp_path, fake):
    cicm = Path(sys.executable).with_name("cicm")
    db = new_store(tmp_path)
    fake.set("electricitymaps", "always_500")
    holder = hold_store(db, 60)
    try:
        r = subprocess.run([str(cicm), *fetch_args(fake, db)], capture_output=True, text=True, timeout=90,
                           env=env(**{LOCK_WAIT_ENV: "1"}))
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 1
    warning, error = r.stderr.strip().splitlines()
    assert warning.startswith("warning: the failed carbon-fetch run was not recorded: db: ")
    assert error.startswith("error: electricitymaps: giving up after 4 attempt(s)") and "HTTP 500" in error


def test_sigterm_during_the_fetch_is_recorded_as_a_failed_run(tmp_path, fake):
    import signal

    cicm = Path(sys.executable).with_name("cicm")
    db = new_store(tmp_path)
    fake.set("electricitymaps", "timeout_then_ok", delay_s=5.0, failures=1)
    proc = subprocess.Popen([str(cicm), *fetch_args(fake, db)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env())
    try:
        deadline = time.monotonic() + 30
        while fake.hits("electricitymaps", "forecast") < 1:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 2 and "error: interrupted by SIGTERM" in err
    with Store(db, read_only=True) as st:
        runs = st.runs()
        assert st.query("SELECT count(*) AS n FROM carbon_forecasts")["n"][0] == 0
    assert list(runs["status"]) == ["failed"] and runs["message"][0] == "Interrupted: interrupted by SIGTERM"
