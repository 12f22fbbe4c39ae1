import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st

from cicm.config import check_fleet_zones, load_fleet
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
    fleet = load_fleet(path)  # a zone is checked against the campus's provider: here the run's
    with pytest.raises(InputError) as err:
        check_fleet_zones(fleet, "trace")
    assert err.value.field == "campuses.2.grid_zone" and "MARS" in str(err.value)
    check_fleet_zones(load_fleet(), "trace")  # the demo's zones are the trace's


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


# --- the fleet file's [telemetry] table --------------------------------------------------------------------------

TELEMETRY = '''
[telemetry]
source = "prometheus"
url = "http://127.0.0.1:9090/"
lookback_hours = 48

[telemetry.mapping]
power_kw = { query = 'sum(pdu_power_kw{room="{domain}"})', hour = "start" }
max_age_hours = 6
'''


def _fleet_with(tmp_path, telemetry: str, text: str | None = None):
    text = text if text is not None else load_fleet.__globals__["default_fleet_path"]().read_text()
    path = tmp_path / "fleet.toml"
    path.write_text(text + telemetry)
    return load_fleet(path)


def test_a_fleet_names_its_prometheus(tmp_path, fleet):
    from cicm.planning.pipeline import prometheus_mapping

    assert fleet.telemetry is None  # the demo fleet: the store and --telemetry drops
    own = _fleet_with(tmp_path, TELEMETRY)
    assert own.telemetry.source == "prometheus" and own.telemetry.url == "http://127.0.0.1:9090"
    assert own.telemetry.lookback_hours == 48
    mapping = prometheus_mapping(own)
    assert mapping.power_kw.query == 'sum(pdu_power_kw{room="{domain}"})' and mapping.power_kw.hour == "start"
    assert mapping.max_age_hours == 6 and mapping.inflexible_cpu_cores.hour == "end"  # the rest: the defaults
    default = _fleet_with(tmp_path, '\n[telemetry]\nsource = "prometheus"\nurl = "https://prom.example:9090"\n')
    assert default.telemetry.lookback_hours == 35 * 24 and prometheus_mapping(default) == type(mapping)()


@pytest.mark.parametrize("old, new, field, message", [
    ('url = "http://127.0.0.1:9090/"', 'url = "127.0.0.1:9090"', "telemetry.url", "http(s) URL"),
    ('source = "prometheus"', 'source = "influxdb"', "telemetry.source", "'prometheus'"),
    ("lookback_hours = 48", "lookback_hours = 0", "telemetry.lookback_hours", "greater than or equal to 1"),
    ("lookback_hours = 48", 'lookback_hours = 48\ntoken = "x"', "telemetry.token", "Extra inputs"),
    ('source = "prometheus"\n', "", "telemetry.source", "Field required"),
])
def test_a_bad_telemetry_table_names_the_field(tmp_path, old, new, field, message):
    with pytest.raises(InputError) as err:
        _fleet_with(tmp_path, TELEMETRY.replace(old, new))
    assert err.value.field == field and message in err.value.message


@pytest.mark.parametrize("line, field, message", [
    ("url = 'http://x'", "telemetry.mapping.url", "Extra inputs are not permitted"),  # the url is not the mapping's
    ("domain_cpu_cores = 'cpu{cluster=\"{cluster}\"}'", "telemetry.mapping.domain_cpu_cores", "must contain {domain}"),
    ("inflexible_cpu_cores = { query = 'x{cluster=\"{cluster}\"}', hour = 'mid' }",
     "telemetry.mapping.inflexible_cpu_cores.hour", "'start' or 'end'"),
    ("min_coverage = 2", "telemetry.mapping.min_coverage", "less than or equal to 1"),
])
def test_a_bad_mapping_names_its_field(tmp_path, line, field, message):
    from cicm.planning.pipeline import prometheus_mapping

    own = _fleet_with(tmp_path, TELEMETRY + line + "\n")  # the mapping is parsed where it is read
    with pytest.raises(InputError) as err:
        prometheus_mapping(own)
    assert err.value.field == field and message in err.value.message


def test_a_mapping_that_is_not_a_table_is_refused(tmp_path):
    with pytest.raises(InputError) as err:
        _fleet_with(tmp_path, '\n[telemetry]\nsource = "prometheus"\nurl = "http://p:9090"\nmapping = "x"\n')
    assert err.value.field == "telemetry.mapping"


def test_power_domain_names_are_unique_for_prometheus(tmp_path):
    text = load_fleet.__globals__["default_fleet_path"]().read_text()
    twice = text.replace('name = "sj-b-pd1"', 'name = "sj-a-pd1"', 1)
    with pytest.raises(InputError) as err:
        _fleet_with(tmp_path, TELEMETRY, twice)
    assert err.value.field == "campuses.0.clusters.1.power_domains.0.name"
    assert "'sj-a-pd1'" in err.value.message and "unique" in err.value.message


# ------------------------------------------------------------------ issue 20 item 1: bad fleet files are refused

def _demo_text() -> str:
    return load_fleet.__globals__["default_fleet_path"]().read_text()


# (old, new, count, field, words): the demo fleet with `old` replaced by `new` (the first `count` times)
BAD_FLEETS = [
    # names unique in their scope: the silent wrong plan of issue 20 is the repeated power domain
    ('name = "sj-b-pd1"', 'name = "sj-a-pd1"', 1, "campuses.0.clusters.1.power_domains.0.name", "sj-a-pd1"),
    ('name = "sj-a-pd2"', 'name = "sj-a-pd1"', 1, "campuses.0.clusters.0.power_domains.1.name", "same cluster"),
    ('name = "sj-b"', 'name = "sj-a"', 1, "campuses.0.clusters.1.name", "'sj-a' is also at campuses.0.clusters.0"),
    ('name = "or-dalles"', 'name = "ca-sj"', 1, "campuses.1.name", "campus name 'ca-sj' is repeated"),
    # empty and whitespace names
    ('name = "demo"', 'name = ""', 1, "name", "empty name"),
    ('name = "ca-sj"', 'name = "   "', 1, "campuses.0.name", "empty name"),
    ('name = "sj-a"', 'name = " sj-a"', 1, "campuses.0.clusters.0.name", "whitespace"),
    ('name = "sj-a-pd1"', 'name = "sj-a-pd1\\t"', 1, "campuses.0.clusters.0.power_domains.0.name", "whitespace"),
    ('name = "sj-a-pd1"', 'name = "sj\\u0000pd1"', 1, "campuses.0.clusters.0.power_domains.0.name", "control"),
    ('name = "sj-a-pd1"', f'name = "{"p" * 201}"', 1, "campuses.0.clusters.0.power_domains.0.name", "longer than"),
    # absurd values
    ("machines = 400", "machines = 0", 1, "campuses.0.clusters.0.power_domains.0.machines", "greater than or equal"),
    ("machines = 400", "machines = -3", 1, "campuses.0.clusters.0.power_domains.0.machines", "greater than or equal"),
    ("machines = 400", "machines = 1000001", 1, "campuses.0.clusters.0.power_domains.0.machines", "less than or"),
    ("machines = 400", "machines = " + "9" * 400, 1, "campuses.0.clusters.0.power_domains.0.machines", ""),
    ("spec_row = 12", "spec_row = -1", 1, "campuses.0.clusters.0.power_domains.0.spec_row", "greater than or"),
    ("contract_limit_kw = 850.0", "contract_limit_kw = 0.0", 1, "campuses.0.contract_limit_kw", "greater than 0"),
    ("contract_limit_kw = 850.0", "contract_limit_kw = -5.0", 1, "campuses.0.contract_limit_kw", "greater than 0"),
    ("contract_limit_kw = 850.0", "contract_limit_kw = 1e12", 1, "campuses.0.contract_limit_kw", "less than or"),
    ("contract_limit_kw = 850.0", "contract_limit_kw = nan", 1, "campuses.0.contract_limit_kw", "finite"),
    ("contract_limit_kw = 850.0", "contract_limit_kw = inf", 1, "campuses.0.contract_limit_kw", "finite"),
    ("inflexible_peak_share = 0.55", "inflexible_peak_share = 1.5", 1,
     "campuses.0.clusters.0.inflexible_peak_share", "less than or equal to 0.9"),
    ("inflexible_peak_share = 0.55", "inflexible_peak_share = 0", 1,
     "campuses.0.clusters.0.inflexible_peak_share", "greater than 0"),
    ("flexible_mean_share = 0.20", "flexible_mean_share = -0.1", 1,
     "campuses.0.clusters.0.flexible_mean_share", "greater than 0"),
    ("flexible_mean_share = 0.20", "flexible_mean_share = nan", 1,
     "campuses.0.clusters.0.flexible_mean_share", "finite"),
    ("reservation_ratio = 1.35", "reservation_ratio = 0.5", 1,
     "campuses.0.clusters.0.reservation_ratio", "greater than or equal to 1"),
    ("reservation_ratio = 1.35", "reservation_ratio = 40", 1,
     "campuses.0.clusters.0.reservation_ratio", "less than or equal to 3"),
    ("history_days = 365", "history_days = 0", 1, "history_days", "greater than or equal to 7"),
    ("history_days = 365", "history_days = 100000", 1, "history_days", "less than or equal to 3660"),
    ('history_start = "2022-01-01"', 'history_start = "1066-10-14"', 1, "history_start", "outside"),
    ('history_start = "2022-01-01"', 'history_start = "soon"', 1, "history_start", "not a date"),
    ('default_plan_date = "2022-06-15"', 'default_plan_date = "9999-06-15"', 1, "default_plan_date", "outside"),
]


@pytest.mark.parametrize("old, new, count, field, words", BAD_FLEETS, ids=[f"{b[3]}:{b[1][:30]}" for b in BAD_FLEETS])
def test_a_bad_fleet_is_refused_naming_its_field(tmp_path, old, new, count, field, words):
    text = _demo_text()
    assert old in text, f"the demo fleet changed: {old!r} is gone"
    path = tmp_path / "fleet.toml"
    path.write_text(text.replace(old, new, count))
    with pytest.raises(InputError) as err:
        load_fleet(path)
    assert err.value.field == field, str(err.value)
    assert words in err.value.message


def test_repeated_power_domains_are_refused_without_a_telemetry_table_too(tmp_path):
    """The silent wrong plan of issue 20: two clusters sharing a domain name shared its power telemetry."""
    path = tmp_path / "fleet.toml"
    path.write_text(_demo_text().replace('name = "sj-b-pd1"', 'name = "sj-a-pd1"', 1))
    with pytest.raises(InputError, match="power domain 'sj-a-pd1' of cluster 'sj-b' is also in cluster 'sj-a'"):
        load_fleet(path)


def test_the_demo_and_scale_fleets_stay_valid(tmp_path):
    from cicm.demo.scale_fleet import scale_fleet, write_fleet_toml

    demo = load_fleet()
    assert len(demo.clusters()) >= 8
    big = scale_fleet(300, seed=1)
    assert len(big.clusters()) == 300
    again = load_fleet(write_fleet_toml(big, tmp_path / "scale.toml"))
    assert again.power_domains_by_cluster() == big.power_domains_by_cluster()
