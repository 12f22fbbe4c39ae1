"""Retention: store sizes, lossless verified compaction of cold history to Parquet, the `_all` views, the CLI."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from datetime import date, timedelta
from pathlib import Path

import duckdb
import pandas as pd
import pytest
from typer.testing import CliRunner

from cicm.errors import InputError
from cicm.store import SCHEMA_VERSION, Store, retention
from cicm.store.retention import (compact_history, history_view, latest_allowed_before, rebuild_file,
                                  restore_history, store_size)

CLUSTERS = ("sj-a", "dl-a", "cb-a")
DAYS = 240  # 2022-01-01 .. 2022-08-28: January and most of February lie outside the 190-day hot window
USAGE_COLS = ["cluster", "hour", "inflexible_cpu_cores", "flexible_cpu_cores", "reserved_cpu_cores",
              "flexible_arrived_core_hours"]
POWER_COLS = ["cluster", "domain", "hour", "cpu_cores", "power_kw"]


@pytest.fixture(scope="module")
def telemetry() -> tuple[pd.DataFrame, pd.DataFrame]:
    from cicm.config import load_fleet
    from cicm.demo.telemetry import demo_power_telemetry, demo_usage_history

    fleet = load_fleet(None)
    usage = demo_usage_history(fleet)
    end = pd.Timestamp("2022-01-01", tz="UTC") + pd.Timedelta(days=DAYS)
    keep = [c for c in usage["cluster"].unique() if c in CLUSTERS]
    assert len(keep) >= 2, f"demo fleet clusters changed: {usage['cluster'].unique()}"
    usage = usage[usage["cluster"].isin(keep) & (usage["hour"] < end)].reset_index(drop=True)
    power = demo_power_telemetry(fleet, usage)
    power = power[power["cluster"].isin(keep) & (power["hour"] < end)].reset_index(drop=True)
    return usage, power


def _load(path: Path, usage: pd.DataFrame, power: pd.DataFrame) -> None:
    with Store(path) as store:
        with store.run("telemetry-import") as run:
            store.upsert("usage_history", usage, run.run_id)
            store.upsert("power_telemetry", power, run.run_id)
        store.con.execute("CHECKPOINT")


@pytest.fixture
def loaded(db_path, telemetry) -> Path:
    _load(db_path, *telemetry)
    return db_path


def _sorted(frame: pd.DataFrame, cols: list[str], keys: list[str]) -> pd.DataFrame:
    out = frame[cols].sort_values(keys).reset_index(drop=True)
    out["hour"] = pd.to_datetime(out["hour"], utc=True).astype("datetime64[us, UTC]")
    return out


def _parquet_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.parquet")) if root.exists() else []


def test_compaction_is_lossless_and_keeps_the_planners_window(loaded, telemetry, tmp_path):
    usage, power = telemetry
    archive = tmp_path / "archive"
    with Store(loaded) as store:
        limit = latest_allowed_before(store)
        assert limit == date(2022, 8, 28) - timedelta(days=190) == date(2022, 2, 19)
        summary = compact_history(store, limit, archive)
        cutoff = pd.Timestamp(limit, tz="UTC")
        old_usage, old_power = (usage["hour"] < cutoff).sum(), (power["hour"] < cutoff).sum()
        assert old_usage == len(usage["cluster"].unique()) * 49 * 24  # Jan 1 .. Feb 18
        assert summary["tables"]["usage_history"]["rows"] == old_usage
        assert summary["tables"]["power_telemetry"]["rows"] == old_power
        assert summary["tables"]["usage_history"]["months"] == ["2022-01", "2022-02"]
        run_id = summary["run_id"]
        files = [p.relative_to(archive).as_posix() for p in _parquet_files(archive)]
        assert sorted(f.split("/part-")[0] for f in files) == sorted(
            f"{t}/month={m}" for t in ("usage_history", "power_telemetry") for m in ("2022-01", "2022-02"))
        assert all(f.endswith(f"-{run_id}_0.parquet") for f in files)
        # the recent window stays in DuckDB, the archived rows are gone from it
        assert store.con.execute("SELECT min(hour), count(*) FROM usage_history").fetchone() == (
            cutoff.to_pydatetime(), len(usage) - old_usage)
        assert store.con.execute("SELECT count(*) FROM power_telemetry").fetchone()[0] == len(power) - old_power
        newest = usage["hour"].max() + pd.Timedelta(hours=1)
        for cluster in usage["cluster"].unique():
            window = store.usage_history(cluster, before=newest, days=182)
            expected = usage[(usage["cluster"] == cluster) & (usage["hour"] >= newest - pd.Timedelta(days=182))]
            assert len(window) == 182 * 24
            pd.testing.assert_frame_equal(_sorted(window, USAGE_COLS, ["hour"]), _sorted(expected, USAGE_COLS, ["hour"]))
            assert len(store.power_telemetry(cluster, before=newest, days=8)) == 8 * 24 * 2
        run = store.query("SELECT kind, status, summary FROM runs WHERE run_id = ?", [run_id]).iloc[0]
        assert (run["kind"], run["status"]) == ("compact", "ok")
        # every row reads back equal through the _all views: table + Parquet
        assert history_view(store, archive) == ["usage_history_all", "power_telemetry_all"]
        back_usage = store.query("SELECT * EXCLUDE (run_id) FROM usage_history_all")
        back_power = store.query("SELECT * EXCLUDE (run_id) FROM power_telemetry_all")
        pd.testing.assert_frame_equal(_sorted(back_usage, USAGE_COLS, ["cluster", "hour"]),
                                      _sorted(usage, USAGE_COLS, ["cluster", "hour"]))
        pd.testing.assert_frame_equal(_sorted(back_power, POWER_COLS, ["domain", "hour"]),
                                      _sorted(power, POWER_COLS, ["domain", "hour"]))
        archived = store.con.execute(
            f"SELECT count(*), sum(power_kw) FROM read_parquet('{archive}/power_telemetry/*/*.parquet',"
            " hive_partitioning = 1)").fetchone()
        assert archived[0] == old_power
        assert archived[1] == pytest.approx(power.loc[power["hour"] < cutoff, "power_kw"].sum(), rel=1e-12)


def test_before_inside_the_planners_window_is_refused(loaded, telemetry, tmp_path):
    usage, power = telemetry
    archive = tmp_path / "archive"
    with Store(loaded) as store:
        with pytest.raises(InputError) as err:
            compact_history(store, date(2022, 2, 20), archive)
        assert err.value.field == "before"
        assert "2022-02-19" in str(err.value) and "190" in str(err.value)
        assert store.con.execute("SELECT count(*) FROM usage_history").fetchone()[0] == len(usage)
        assert _parquet_files(archive) == []
        forced = compact_history(store, date(2022, 4, 1), archive, force=True)
        assert forced["tables"]["usage_history"]["months"] == ["2022-01", "2022-02", "2022-03"]
        assert store.con.execute("SELECT count(*) FROM usage_history").fetchone()[0] == (
            usage["hour"] >= pd.Timestamp("2022-04-01", tz="UTC")).sum()


def _counts(store: Store) -> tuple[int, int]:
    return (store.con.execute("SELECT count(*) FROM usage_history").fetchone()[0],
            store.con.execute("SELECT count(*) FROM power_telemetry").fetchone()[0])


def test_a_failed_verify_deletes_nothing_and_leaves_no_parquet(loaded, telemetry, tmp_path, monkeypatch):
    usage, power = telemetry
    archive = tmp_path / "archive"
    with Store(loaded) as store:
        first = compact_history(store, date(2022, 1, 15), archive)  # an earlier, good archive must survive
        earlier = _parquet_files(archive)
        assert len(earlier) == 2 and first["rows"] > 0
        before_counts = _counts(store)
        real_verify = retention._verify

        def verify_power_fails(store_, table, *args):
            if table == "power_telemetry":  # usage's files are already written and verified by now
                raise RuntimeError("simulated checksum mismatch")
            return real_verify(store_, table, *args)

        monkeypatch.setattr(retention, "_verify", verify_power_fails)
        with pytest.raises(RuntimeError, match="simulated"):
            compact_history(store, date(2022, 2, 10), archive)
        assert _counts(store) == before_counts
        assert _parquet_files(archive) == earlier
        assert not (archive / "usage_history" / "month=2022-02").exists()
        failed = store.query("SELECT status, message FROM runs WHERE kind = 'compact' ORDER BY started_at DESC")
        assert failed["status"].tolist() == ["failed", "ok"] and "simulated" in failed["message"].iloc[0]
        monkeypatch.setattr(retention, "_verify", real_verify)
        compact_history(store, date(2022, 2, 10), archive)
        history_view(store, archive)
        assert store.con.execute("SELECT count(*) FROM usage_history_all").fetchone()[0] == len(usage)


def test_an_archive_that_is_a_file_deletes_nothing(loaded, telemetry, tmp_path):
    usage, power = telemetry
    archive = tmp_path / "archive"
    archive.write_text("not a directory")
    with Store(loaded) as store:
        with pytest.raises(InputError) as err:
            compact_history(store, date(2022, 2, 1), archive)
        assert err.value.field == "archive"
        assert _counts(store) == (len(usage), len(power))
    assert archive.read_text() == "not a directory"


def test_a_failing_copy_deletes_nothing(loaded, telemetry, tmp_path, monkeypatch):
    """A failure inside the write itself (DuckDB's COPY) rolls back and cleans up too."""
    usage, power = telemetry
    archive = tmp_path / "archive"
    with Store(loaded) as store:
        (archive / "power_telemetry").mkdir(parents=True)
        (archive / "power_telemetry" / "month=2022-01").write_text("a file where a month directory goes")
        with pytest.raises(duckdb.Error):
            compact_history(store, date(2022, 2, 1), archive)
        assert _counts(store) == (len(usage), len(power))
        assert _parquet_files(archive) == []
        assert store.query("SELECT status FROM runs WHERE kind = 'compact'")["status"].tolist() == ["failed"]


def test_rerunning_a_compaction_does_not_duplicate(loaded, telemetry, tmp_path):
    usage, power = telemetry
    archive = tmp_path / "archive"
    with Store(loaded) as store:
        first = compact_history(store, date(2022, 2, 1), archive)
        files = _parquet_files(archive)
        again = compact_history(store, date(2022, 2, 1), archive)
        assert first["rows"] == 31 * 24 * len(usage["cluster"].unique()) * 3  # usage + 2 power domains
        assert again["rows"] == 0 and _parquet_files(archive) == files
        # a re-import brings January back into DuckDB (new values); compacting it again writes a second file per
        # month, and the views keep one row per key: the newest write
        january = usage[usage["hour"] < pd.Timestamp("2022-02-01", tz="UTC")].copy()
        january["inflexible_cpu_cores"] *= 2
        with store.run("telemetry-import") as run:
            store.upsert("usage_history", january, run.run_id)
        history_view(store, archive)
        assert store.con.execute("SELECT count(*) FROM usage_history_all").fetchone()[0] == len(usage)
        third = compact_history(store, date(2022, 2, 1), archive)
        assert third["tables"]["usage_history"]["rows"] == len(january)
        assert len(list((archive / "usage_history" / "month=2022-01").glob("*.parquet"))) == 2
        history_view(store, archive)
        n, total = store.con.execute(
            "SELECT count(*), sum(inflexible_cpu_cores) FROM usage_history_all").fetchone()
        assert n == len(usage)
        assert total == pytest.approx(usage["inflexible_cpu_cores"].sum() + january["inflexible_cpu_cores"].sum() / 2,
                                      rel=1e-12)
        history_view(store, archive, dedupe=False)  # the plain UNION ALL shows the re-archived month twice
        assert store.con.execute("SELECT count(*) FROM usage_history_all").fetchone()[0] == len(usage) + len(january)


def test_store_size_rebuild_and_restore(loaded, telemetry, tmp_path):
    usage, power = telemetry
    archive = tmp_path / "archive"
    with Store(loaded) as store:
        size = store_size(store).set_index("table")
        assert size.loc["usage_history", "rows"] == len(usage)
        assert size.loc["power_telemetry", "rows"] == len(power)
        assert 0 < size.loc["usage_history", "estimated_bytes"] < size.loc["(file)", "estimated_bytes"]
        assert size.loc["(file)", "estimated_bytes"] == loaded.stat().st_size
        compact_history(store, date(2022, 4, 1), archive, force=True)
    grown = loaded.stat().st_size
    rebuilt = rebuild_file(loaded)
    assert rebuilt["db_bytes_before"] == grown and rebuilt["db_bytes_after"] < grown
    with Store(loaded) as store:
        assert store.schema_version() == SCHEMA_VERSION
        kept = _counts(store)
        restored = restore_history(store, archive, date(2022, 3, 1), date(2022, 4, 1))
        assert restored["rows"]["usage_history"] == 31 * 24 * len(usage["cluster"].unique())
        assert _counts(store)[0] == kept[0] + restored["rows"]["usage_history"]
        history_view(store, archive)
        assert store.con.execute("SELECT count(*) FROM usage_history_all").fetchone()[0] == len(usage)


# -- CLI ----------------------------------------------------------------------------------------------------
def _cli(*args: str):
    from cicm.cli import app

    return CliRunner().invoke(app, ["store", *args])


def test_cli_size_and_compact(loaded, telemetry, tmp_path):
    usage, power = telemetry
    result = _cli("size", "--db", str(loaded))
    assert result.exit_code == 0, result.output
    assert "usage_history" in result.output and f"{len(usage):,}" in result.output
    archive = tmp_path / "arch"
    result = _cli("compact", "--before", "2022-02-01", "--archive", str(archive), "--db", str(loaded), "--rebuild")
    assert result.exit_code == 0, result.output
    assert f"{31 * 24 * len(usage['cluster'].unique()):,}" in result.output
    assert len(_parquet_files(archive)) == 2


@pytest.mark.parametrize("args, field", [
    (["--before", "2022-13-45"], "before"),
    (["--before", "yesterday"], "before"),
    (["--before", "2022-06-01"], "before"),  # inside the planner's window
])
def test_cli_bad_before_exits_2(loaded, tmp_path, args, field):
    result = _cli("compact", *args, "--archive", str(tmp_path / "arch"), "--db", str(loaded))
    assert result.exit_code == 1, result.output
    assert result.output.strip().startswith(f"error: {field}:")
    assert len(result.output.strip().splitlines()) == 1


def test_cli_compacts_one_table(loaded, telemetry, tmp_path):
    usage, power = telemetry
    archive = tmp_path / "arch"
    result = _cli("compact", "--before", "2022-08-21", "--archive", str(archive), "--db", str(loaded),
                  "--table", "power_telemetry", "--force")
    assert result.exit_code == 0, result.output
    with Store(loaded, read_only=True) as store:
        assert _counts(store) == (len(usage), 8 * 24 * 2 * len(usage["cluster"].unique()))
    assert not (archive / "usage_history").exists()
    result = _cli("compact", "--before", "2022-02-01", "--archive", str(archive), "--db", str(loaded),
                  "--table", "vccs")
    assert result.exit_code == 1 and "error: table:" in result.output


def test_cli_bad_archive_and_db_exit_2(loaded, tmp_path):
    not_dir = tmp_path / "file"
    not_dir.write_text("x")
    result = _cli("compact", "--before", "2022-02-01", "--archive", str(not_dir), "--db", str(loaded))
    assert result.exit_code == 1 and "error: archive:" in result.output
    result = _cli("size", "--db", str(tmp_path / "missing.duckdb"))
    assert result.exit_code == 1 and "error: db:" in result.output


def test_cli_locked_db_exits_2(loaded, tmp_path, monkeypatch):
    import cicm.store.core as store_module

    monkeypatch.setattr(store_module, "LOCK_RETRY_SECONDS", 0.3)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import duckdb, sys, time
        con = duckdb.connect({str(loaded)!r})
        print("locked", flush=True)
        time.sleep(30)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        result = _cli("compact", "--before", "2022-02-01", "--archive", str(tmp_path / "arch"), "--db", str(loaded))
        assert result.exit_code == 1, result.output
        assert "error: db:" in result.output and "locked" in result.output
        assert time.monotonic() - started < 10
    finally:
        holder.kill()
        holder.wait()
