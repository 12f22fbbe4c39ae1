import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st

from cicm.config import load_fleet
from cicm.demo.telemetry import (capacity_limited_cpu_cores, cluster_usage_history, demo_power_telemetry,
                                 history_hours, specpower_watts)
from cicm.errors import InputError
from cicm.timeutil import local_day_hours_utc, planning_time_utc


@pytest.fixture(scope="module")
def fleet():
    return load_fleet()


def test_demo_fleet_shape(fleet):
    zones = {c.grid_zone for c in fleet.campuses}
    assert len(fleet.campuses) >= 3 and len(zones) == len(fleet.campuses)
    assert len(fleet.clusters()) >= 8
    assert all(len(c.power_domains) >= 2 for c in fleet.clusters())
    assert fleet.history_days >= 120


def test_bad_fleet_names_the_field(tmp_path):
    text = (load_fleet.__globals__["default_fleet_path"]()).read_text().replace('grid_zone = "MISO"',
                                                                               'grid_zone = "MARS"')
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    with pytest.raises(InputError) as err:
        load_fleet(path)
    assert err.value.field == "campuses.2.grid_zone" and "MARS" in str(err.value)


def test_wrong_server_row_is_caught(tmp_path):
    text = load_fleet.__globals__["default_fleet_path"]().read_text().replace("spec_row = 12", "spec_row = 13", 1)
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    with pytest.raises(InputError, match="spec_row 13 is"):
        load_fleet(path)


def test_telemetry_is_reproducible_and_within_capacity(fleet):
    hours = history_hours(fleet)[: 24 * 60]
    cluster = fleet.clusters()[0]
    a = cluster_usage_history(cluster, hours, seed=3)
    b = cluster_usage_history(cluster, hours, seed=3)
    c = cluster_usage_history(cluster, hours, seed=4)
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a["inflexible_cpu_cores"], c["inflexible_cpu_cores"])
    total = a["inflexible_cpu_cores"] + a["flexible_cpu_cores"]
    assert (total <= cluster.capacity_cores * (1 + 1e-9)).all()
    assert (a[["inflexible_cpu_cores", "flexible_cpu_cores", "reserved_cpu_cores"]] >= 0).all().all()
    assert (a["reserved_cpu_cores"] > total * 1.0).mean() > 0.9


def test_power_follows_specpower_curve(fleet):
    cluster = fleet.clusters()[0]
    hours = history_hours(fleet)[:48]
    usage = cluster_usage_history(cluster, hours, seed=0)
    power = demo_power_telemetry(fleet.model_copy(update={"campuses": [fleet.campuses[0]]}), usage, seed=0)
    domain = cluster.power_domains[0]
    rows = power[power["domain"] == domain.name]
    expected = specpower_watts(domain.spec_row, rows["cpu_cores"].to_numpy() / domain.capacity_cores)
    expected_kw = expected * domain.machines / 1000
    assert np.abs(rows["power_kw"].to_numpy() / expected_kw - 1).max() < 0.05  # 1% noise, 5 sd


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 100), min_size=1, max_size=48), st.floats(1, 100))
def test_capacity_queue_conserves_work_and_never_exceeds_room(wanted, room):
    wanted = np.array(wanted)
    served = capacity_limited_cpu_cores(wanted, np.full(len(wanted), room))
    assert (served <= room + 1e-9).all()
    assert served.sum() <= wanted.sum() + 1e-6
    backlog = wanted.sum() - served.sum()
    assert backlog >= -1e-6
    if backlog > 1e-6:  # work waits only when an hour was full
        assert np.isclose(served, room).any()


@pytest.mark.parametrize("day,hours", [("2022-03-13", 23), ("2022-11-06", 25), ("2022-06-15", 24)])
def test_local_days_have_dst_lengths(day, hours):
    idx = local_day_hours_utc(pd.Timestamp(day).date(), "America/Los_Angeles")
    assert len(idx) == hours and str(idx.tz) == "UTC"
    assert planning_time_utc(pd.Timestamp(day).date(), "America/Los_Angeles") < idx[0]
