"""Issue 20, item 6: telemetry that cannot be true is refused before it is stored, naming the field and the
cluster (domain): values past the fleet's physical capacity, reservations below usage, hours of the planned day,
and rows that would silently rewrite stored history (an explicit, audited option)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cicm.config import load_fleet
from cicm.errors import InputError
from cicm.planning.ingest import (check_telemetry_rows, ingest_telemetry, read_telemetry_dir)
from cicm.store import Store

START = pd.Timestamp("2026-06-01T00:00Z")


@pytest.fixture(scope="module")
def fleet():
    return load_fleet()


@pytest.fixture(scope="module")
def cluster(fleet):
    return fleet.clusters()[0]


def usage_rows(cluster, hours: int = 24, start: pd.Timestamp = START, **values) -> pd.DataFrame:
    cap = float(cluster.capacity_cores)
    frame = pd.DataFrame({
        "cluster": cluster.name, "hour": pd.date_range(start, periods=hours, freq="h"),
        "inflexible_cpu_cores": 0.4 * cap, "flexible_cpu_cores": 0.2 * cap, "reserved_cpu_cores": 0.8 * cap,
        "flexible_arrived_core_hours": 0.2 * cap})
    for k, v in values.items():
        frame[k] = v
    return frame


def power_rows(cluster, hours: int = 24, start: pd.Timestamp = START, **values) -> pd.DataFrame:
    frames = []
    for d in cluster.power_domains:
        frames.append(pd.DataFrame({"cluster": cluster.name, "domain": d.name,
                                    "hour": pd.date_range(start, periods=hours, freq="h"),
                                    "cpu_cores": 0.6 * d.capacity_cores, "power_kw": 0.01 * d.capacity_cores}))
    frame = pd.concat(frames, ignore_index=True)
    for k, v in values.items():
        frame[k] = v
    return frame


NO_POWER = pd.DataFrame(columns=["cluster", "domain", "hour", "cpu_cores", "power_kw"])


def test_plausible_rows_pass(fleet, cluster):
    check_telemetry_rows(usage_rows(cluster), power_rows(cluster), fleet)
    cap = cluster.capacity_cores
    # at capacity, within the 1% tolerance, reservations overcommitted 1.6x: all real
    check_telemetry_rows(usage_rows(cluster, inflexible_cpu_cores=0.5 * cap, flexible_cpu_cores=0.505 * cap,
                                    reserved_cpu_cores=1.6 * cap), NO_POWER, fleet)


def test_a_trillion_cores_is_refused_naming_the_field_and_cluster(fleet, cluster):
    with pytest.raises(InputError) as e:
        check_telemetry_rows(usage_rows(cluster, inflexible_cpu_cores=1e12), NO_POWER, fleet)
    assert e.value.field == "inflexible_cpu_cores"
    cap = cluster.capacity_cores
    assert e.value.message == (
        f"1e+12 cores at hour 2026-06-01T00:00:00+00:00 for cluster {cluster.name!r}: more than the cluster's "
        f"capacity (+1%): {cap * 1.01:,.6g} cores (24 rows in all)")


@pytest.mark.parametrize("share, refused", [(1.009, False), (1.02, True)])
def test_usage_past_capacity_has_a_small_tolerance(fleet, cluster, share, refused):
    cap = cluster.capacity_cores
    frame = usage_rows(cluster, flexible_cpu_cores=share * cap, inflexible_cpu_cores=0.0,
                       reserved_cpu_cores=1.1 * cap)
    if refused:
        with pytest.raises(InputError, match=r"^flexible_cpu_cores: .*more than the cluster's capacity"):
            check_telemetry_rows(frame, NO_POWER, fleet)
    else:
        check_telemetry_rows(frame, NO_POWER, fleet)


def test_inflexible_plus_flexible_past_capacity_is_refused(fleet, cluster):
    cap = cluster.capacity_cores
    frame = usage_rows(cluster, inflexible_cpu_cores=0.7 * cap, flexible_cpu_cores=0.7 * cap,
                       reserved_cpu_cores=1.5 * cap)
    with pytest.raises(InputError, match=r"^flexible_cpu_cores: .*inflexible \+ flexible usage is more than"):
        check_telemetry_rows(frame, NO_POWER, fleet)


def test_reservations_below_usage_are_refused(fleet, cluster):
    cap = cluster.capacity_cores
    frame = usage_rows(cluster)
    frame.loc[5, "reserved_cpu_cores"] = 0.5 * cap  # usage is 0.6 x capacity
    with pytest.raises(InputError) as e:
        check_telemetry_rows(frame, NO_POWER, fleet)
    assert e.value.field == "reserved_cpu_cores"
    assert f"at hour 2026-06-01T05:00:00+00:00 for cluster {cluster.name!r}: reservations below the cores in use" \
        in e.value.message and "(1 rows in all)" in e.value.message


@pytest.mark.parametrize("column, share, words", [
    ("reserved_cpu_cores", 11.0, "more than 10 x the cluster's capacity"),
    ("flexible_arrived_core_hours", 200.0, "more than 168 hours of the whole cluster arriving in one hour"),
])
def test_overcommit_and_arrivals_are_bounded(fleet, cluster, column, share, words):
    frame = usage_rows(cluster, **{column: share * cluster.capacity_cores})
    with pytest.raises(InputError, match=rf"^{column}: .*{words}"):
        check_telemetry_rows(frame, NO_POWER, fleet)


def test_power_domains_are_bounded_by_their_cores(fleet, cluster):
    domain = cluster.power_domains[0]
    frame = power_rows(cluster)
    frame.loc[frame["domain"] == domain.name, "cpu_cores"] = 2.0 * domain.capacity_cores
    with pytest.raises(InputError, match=rf"^cpu_cores: .* for domain {domain.name!r}: more than the power domain"):
        check_telemetry_rows(usage_rows(cluster), frame, fleet)
    frame = power_rows(cluster, power_kw=1e9)
    with pytest.raises(InputError, match=r"^power_kw: 1e\+09 kW .*more than 1 kW per core"):
        check_telemetry_rows(usage_rows(cluster), frame, fleet)


def test_hours_of_the_planned_day_are_refused(fleet, cluster):
    plan_start = START + pd.Timedelta(hours=20)
    frame = usage_rows(cluster)  # 00:00..23:00
    now = START + pd.Timedelta(days=3)  # the wall clock: all in the past
    check_telemetry_rows(frame, NO_POWER, fleet, now)
    with pytest.raises(InputError) as e:
        check_telemetry_rows(frame, NO_POWER, fleet, now, not_after=plan_start)
    assert e.value.field == "hour"
    assert e.value.message.startswith("4 rows for hours at or after the plan's start 2026-06-01T20:00:00+00:00 "
                                      "(up to 2026-06-01T23:00:00+00:00")
    check_telemetry_rows(frame.iloc[:20], NO_POWER, fleet, now, not_after=plan_start)


def test_the_drop_gets_the_same_checks(tmp_path, fleet, cluster):
    usage_rows(cluster, reserved_cpu_cores=1.0).to_parquet(tmp_path / "usage.parquet")
    with pytest.raises(InputError, match=r"^reserved_cpu_cores: "):
        read_telemetry_dir(tmp_path, fleet)
    usage_rows(cluster).to_parquet(tmp_path / "usage.parquet")
    with pytest.raises(InputError, match=r"^hour: 24 rows for hours at or after"):
        read_telemetry_dir(tmp_path, fleet, not_after=START)
    usage, _ = read_telemetry_dir(tmp_path, fleet, not_after=START + pd.Timedelta(days=1))
    assert len(usage) == 24


def _stored_usage(store: Store, cluster: str) -> pd.DataFrame:
    return store.query("SELECT * FROM usage_history WHERE cluster = ? ORDER BY hour", [cluster])


def test_zeros_over_old_history_are_refused_unless_rewriting_is_asked(tmp_path, cluster):
    old = START - pd.Timedelta(days=180)
    history = usage_rows(cluster, hours=48, start=old)
    zeros = usage_rows(cluster, hours=24, start=old, inflexible_cpu_cores=0.0, flexible_cpu_cores=0.0,
                       reserved_cpu_cores=0.0, flexible_arrived_core_hours=0.0)
    cap = float(cluster.capacity_cores)
    with Store(tmp_path / "s.duckdb") as st:
        first = ingest_telemetry(st, history, NO_POWER, source="drop-1")
        assert first["rewrites"] == {}
        # the same values again: nothing changes, nothing to refuse
        assert ingest_telemetry(st, history.iloc[:24], NO_POWER, source="drop-again")["rewrites"] == {}

        with pytest.raises(InputError) as e:
            ingest_telemetry(st, zeros, NO_POWER, source="drop-zeros")
        assert e.value.field == "inflexible_cpu_cores"
        assert e.value.message.startswith(
            f"0 at hour {old.isoformat()} for cluster {cluster.name!r} would overwrite the stored {0.4 * cap:,.6g} "
            f"(24 stored usage_history rows for {old.isoformat()}..{(old + pd.Timedelta(hours=23)).isoformat()} "
            "would change); rewriting history needs the explicit option")
        stored = _stored_usage(st, cluster.name)
        assert np.allclose(stored["inflexible_cpu_cores"], 0.4 * cap) and len(stored) == 48
        failed = st.runs().iloc[0]
        assert failed["status"] == "failed" and "would overwrite the stored" in failed["message"]

        info = ingest_telemetry(st, zeros, NO_POWER, source="drop-zeros", rewrite_history=True)
        stored = _stored_usage(st, cluster.name)
        run = st.runs().iloc[0]
    assert (stored["inflexible_cpu_cores"].iloc[:24] == 0).all()
    assert np.allclose(stored["inflexible_cpu_cores"].iloc[24:], 0.4 * cap)
    rewrite = {"rows": 24, "first_hour": old.isoformat(), "last_hour": (old + pd.Timedelta(hours=23)).isoformat(),
               "clusters": [cluster.name]}
    assert info["rewrites"] == {"usage_history": rewrite}
    assert run["run_id"] == info["run_id"] and run["status"] == "ok"
    assert json.loads(run["params"])["rewrite_history"] is True
    assert json.loads(run["summary"])["rewrites"] == {"usage_history": rewrite}
    assert run["message"] == (f"rewrote stored history: 24 usage_history rows for {old.isoformat()}.."
                              f"{(old + pd.Timedelta(hours=23)).isoformat()}")


def test_power_rewrites_are_refused_too(tmp_path, cluster):
    power = power_rows(cluster, hours=6)
    with Store(tmp_path / "s.duckdb") as st:
        ingest_telemetry(st, usage_rows(cluster, hours=6), power, source="drop-1")
        with pytest.raises(InputError, match=r"^power_kw: 0 at hour .* would overwrite the stored"):
            ingest_telemetry(st, usage_rows(cluster, hours=6), power.assign(power_kw=0.0), source="drop-2")
