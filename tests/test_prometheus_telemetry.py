"""Telemetry from a real Prometheus (cicm.telemetry_sources.prometheus).

A module fixture writes three days of hourly OpenMetrics samples (July 2022) for two planned clusters with three
power domains, plus clusters that exist only to break the reader (a stale series, a duplicate series, NaN,
negative values, too few hours), backfills them with ``promtool tsdb create-blocks-from openmetrics``, starts
Debian's ``prometheus`` on a free loopback port with a 10-year retention and no scrape targets, and stops it
afterwards (tests/prometheus_server.py). Needs ``prometheus`` and ``promtool`` (``.ci/setup-prometheus``, run
there when promtool is missing); skips with the setup's reason when they cannot be installed.
"""
from __future__ import annotations

import pandas as pd
import pytest

from cicm.errors import InputError, ProviderError
from cicm.planning.ingest import POWER_FILE_COLUMNS, USAGE_FILE_COLUMNS, read_telemetry_dir
from cicm.httpclient import make_session
from cicm.telemetry_sources import PrometheusMapping, SeriesQuery, read_prometheus_telemetry
from cicm.telemetry_sources.prometheus import render

try:
    from tests.prometheus_server import free_port as _free_port, prometheus_server
except ImportError:
    from prometheus_server import free_port as _free_port, prometheus_server

START = pd.Timestamp("2022-07-01 00:00", tz="UTC")
DAYS = 3
HOURS = pd.date_range(START, periods=24 * DAYS, freq="h")
END = START + pd.Timedelta(days=DAYS)

PLANNED = {"alpha": ["alpha-a", "alpha-b"], "beta": ["beta-a"]}
INFLEXIBLE_GAP = set(HOURS[34:37])  # alpha's inflexible series has no samples in these hours
POWER_GAP = set(HOURS[50:52])  # alpha-b's power series has none in these
RESET_AT = 40  # alpha's arrivals counter restarts from zero during hour 40
STALE_HOURS = 10  # gamma's reserved series stops this many hours before END
NAN_HOUR, NEG_HOUR = HOURS[20], HOURS[45]


# --- the data written ------------------------------------------------------------------------------------------

def value(metric: str, name: str, h: int) -> float:
    """A distinct, exactly representable value (multiples of 1/8) for each metric, series and hour."""
    base = {"inflexible": 100, "flexible": 40, "reserved": 190, "arrived": 30, "cpu": 60, "power": 9}[metric]
    spread = sum(map(ord, name)) % 17
    return base + spread + ((h * 37 + spread * 11) % 29) / 8


def usage_expected(cluster: str, h: int) -> dict:
    return {"inflexible_cpu_cores": value("inflexible", cluster, h),
            "flexible_cpu_cores": value("flexible", cluster, h),
            "reserved_cpu_cores": value("reserved", cluster, h),
            "flexible_arrived_core_hours": value("arrived", cluster, h)}


def counter(cluster: str) -> list[float]:
    """The arrivals counter at every hour boundary START..END: +arrivals each hour, restarting at RESET_AT."""
    total, out = 1000.0, [1000.0]
    for h in range(len(HOURS)):
        total = value("arrived", cluster, h) if h == RESET_AT else total + value("arrived", cluster, h)
        out.append(total)
    return out


def openmetrics() -> str:
    ts = [int(t.timestamp()) for t in HOURS]
    lines: list[str] = []

    def family(name: str, kind: str, series: list[tuple[str, list[tuple[int, str]]]]) -> None:
        lines.append(f"# TYPE {name} {kind}")
        sample_name = name + ("_total" if kind == "counter" else "")
        for labels, points in series:
            lines.extend(f"{sample_name}{{{labels}}} {v} {t}" for t, v in points)

    def hourly(metric: str, name: str, skip: set = frozenset(), last: int | None = None,
               override: dict | None = None) -> list[tuple[int, str]]:
        override = override or {}
        return [(t, override.get(h, repr(value(metric, name, h)))) for h, t in enumerate(ts[:last])
                if HOURS[h] not in skip]

    family("cicm_inflexible_cpu_cores", "gauge", [
        ('cluster="alpha"', hourly("inflexible", "alpha", skip=INFLEXIBLE_GAP)),
        ('cluster="beta"', hourly("inflexible", "beta")),
        ('cluster="gamma"', hourly("inflexible", "gamma")),
        ('cluster="delta",instance="node-1:9100"', hourly("inflexible", "delta")),
        ('cluster="delta",instance="node-2:9100"', hourly("inflexible", "delta-2")),
        ('cluster="eps_nan"', hourly("inflexible", "eps_nan")),
        ('cluster="eps_neg"', hourly("inflexible", "eps_neg")),
        ('cluster="zeta"', hourly("inflexible", "zeta")),
    ])
    family("cicm_flexible_cpu_cores", "gauge", [
        ('cluster="alpha"', hourly("flexible", "alpha")),
        ('cluster="beta"', hourly("flexible", "beta")),
        ('cluster="gamma"', hourly("flexible", "gamma")),
        ('cluster="eps_nan"', hourly("flexible", "eps_nan", override={ts.index(int(NAN_HOUR.timestamp())): "NaN"})),
        ('cluster="eps_neg"', hourly("flexible", "eps_neg")),
        ('cluster="zeta"', hourly("flexible", "zeta", skip=set(HOURS[: len(HOURS) - 10]))),  # 10 of 72 hours
    ])
    family("cicm_reserved_cpu_cores", "gauge", [
        ('cluster="alpha"', hourly("reserved", "alpha")),
        ('cluster="beta"', hourly("reserved", "beta")),
        ('cluster="gamma"', hourly("reserved", "gamma", last=len(HOURS) - STALE_HOURS)),
        ('cluster="eps_neg"', hourly("reserved", "eps_neg", override={ts.index(int(NEG_HOUR.timestamp())): "-5"})),
    ])
    family("cicm_flexible_arrived_core_hours", "counter", [
        (f'cluster="{c}"', list(zip(ts + [int(END.timestamp())], map(repr, counter(c))))) for c in PLANNED])
    family("cicm_domain_cpu_cores", "gauge", [
        (f'cluster="{c}",domain="{d}"', hourly("cpu", d)) for c, ds in PLANNED.items() for d in ds])
    family("cicm_domain_power_kw", "gauge", [
        (f'cluster="{c}",domain="{d}"', hourly("power", d, skip=POWER_GAP if d == "alpha-b" else set()))
        for c, ds in PLANNED.items() for d in ds])
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


# The test data are hourly gauges stamped at the hour's start (hour = "start") and a counter read with
# increase() over the hour ending at T (hour = "end"). With one counter sample an hour, increase(...[1h]) sees
# the samples at T - 1 h and T because Prometheus 2.x (Debian 12: 2.42) closes the range on both ends; 3.x
# leaves T - 1 h out and would need [61m].
MAPPING = PrometheusMapping(
    inflexible_cpu_cores=SeriesQuery(query='cicm_inflexible_cpu_cores{cluster="{cluster}"}', hour="start"),
    flexible_cpu_cores=SeriesQuery(query='cicm_flexible_cpu_cores{cluster="{cluster}"}', hour="start"),
    reserved_cpu_cores=SeriesQuery(query='cicm_reserved_cpu_cores{cluster="{cluster}"}', hour="start"),
    flexible_arrived_core_hours='increase(cicm_flexible_arrived_core_hours_total{cluster="{cluster}"}[1h])',
    domain_cpu_cores={"query": 'cicm_domain_cpu_cores{cluster="{cluster}",domain="{domain}"}', "hour": "start"},
    power_kw={"query": 'cicm_domain_power_kw{domain="{domain}"}', "hour": "start"},
)


# --- the server -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    with prometheus_server(tmp_path_factory.mktemp("prometheus"), openmetrics()) as url:
        yield url


@pytest.fixture(scope="module")
def telemetry(prometheus):
    return read_prometheus_telemetry(prometheus, MAPPING, PLANNED, START, END)


def _read(url, clusters, mapping=MAPPING, **kw):
    return read_prometheus_telemetry(url, mapping, clusters, START, END, **kw)


# --- what is read equals what was written ---------------------------------------------------------------------

def test_usage_equals_the_samples_written(telemetry):
    usage, _ = telemetry
    assert tuple(usage.columns) == USAGE_FILE_COLUMNS
    assert str(usage["hour"].dt.tz) == "UTC"
    for cluster in PLANNED:
        rows = usage[usage["cluster"] == cluster].set_index("hour")
        expected_hours = [h for h in HOURS if cluster != "alpha" or h not in INFLEXIBLE_GAP]
        assert list(rows.index) == expected_hours
        for h, hour in enumerate(HOURS):
            if hour not in rows.index:
                continue
            got, want = rows.loc[hour], usage_expected(cluster, h)
            for column in ("inflexible_cpu_cores", "flexible_cpu_cores", "reserved_cpu_cores"):
                assert got[column] == want[column], (cluster, hour, column)
            # through increase() over the counter: exact here (samples on the window's edges, values in 1/8)
            assert got["flexible_arrived_core_hours"] == pytest.approx(want["flexible_arrived_core_hours"], abs=1e-9)
    assert usage.attrs["arrivals"] == "query"


def test_gaps_stay_missing(telemetry):
    usage, power = telemetry
    alpha = usage[usage["cluster"] == "alpha"]
    assert len(alpha) == len(HOURS) - len(INFLEXIBLE_GAP)
    assert not set(alpha["hour"]) & INFLEXIBLE_GAP  # the other series have these hours: the row is left out
    assert len(usage[usage["cluster"] == "beta"]) == len(HOURS)
    assert usage.attrs["missing_hours"] == {"alpha": 3, "beta": 0}
    b = power[power["domain"] == "alpha-b"]
    assert not set(b["hour"]) & POWER_GAP and len(b) == len(HOURS) - len(POWER_GAP)
    assert power.attrs["missing_hours"] == {"alpha-a": 0, "alpha-b": 2, "beta-a": 0}
    assert not usage.isna().any().any() and not power.isna().any().any()


def test_counter_reset_is_prometheus_job(telemetry):
    usage, _ = telemetry
    alpha = usage[usage["cluster"] == "alpha"].set_index("hour")["flexible_arrived_core_hours"]
    c = counter("alpha")
    assert c[RESET_AT + 1] < c[RESET_AT]  # the counter really dropped
    assert alpha[HOURS[RESET_AT]] == pytest.approx(value("arrived", "alpha", RESET_AT), abs=1e-9)
    assert (alpha >= 0).all()


def test_power_equals_the_samples_written(telemetry):
    _, power = telemetry
    assert tuple(power.columns) == POWER_FILE_COLUMNS
    assert sorted(power["domain"].unique()) == ["alpha-a", "alpha-b", "beta-a"]
    for (cluster, domain), rows in power.groupby(["cluster", "domain"]):
        assert domain in PLANNED[cluster]
        for hour, cpu, kw in rows[["hour", "cpu_cores", "power_kw"]].itertuples(index=False):
            h = HOURS.get_loc(hour)
            assert cpu == value("cpu", domain, h) and kw == value("power", domain, h), (domain, hour)


def test_frames_are_the_parquet_drop(telemetry, tmp_path):
    """Written as the monitoring pipeline's drop, the frames read back unchanged through read_telemetry_dir."""
    usage, power = telemetry
    usage.to_parquet(tmp_path / "usage-prom.parquet")
    power.to_parquet(tmp_path / "power-prom.parquet")
    u, p = read_telemetry_dir(tmp_path)
    pd.testing.assert_frame_equal(u.reset_index(drop=True), usage.reset_index(drop=True), check_dtype=False)
    pd.testing.assert_frame_equal(p.reset_index(drop=True), power.reset_index(drop=True), check_dtype=False)


def test_without_an_arrivals_query_arrivals_are_the_served_work(prometheus):
    mapping = MAPPING.model_copy(update={"flexible_arrived_core_hours": None})
    usage, _ = _read(prometheus, {"beta": ["beta-a"]}, mapping)
    assert (usage["flexible_arrived_core_hours"] == usage["flexible_cpu_cores"]).all()
    assert usage.attrs["arrivals"] == "flexible_cpu_cores"


# --- every error names its field -------------------------------------------------------------------------------

def test_stale_series_names_its_field(prometheus):
    with pytest.raises(InputError) as err:
        _read(prometheus, {"gamma": []})
    assert err.value.field == "reserved_cpu_cores"
    assert "stale" in err.value.message and "'gamma'" in err.value.message
    assert HOURS[-STALE_HOURS - 1].isoformat() in err.value.message  # the newest hour it has
    # a looser max age accepts it (the hours it has are read, the rest stay missing)
    usage, _ = _read(prometheus, {"gamma": []},
                     MAPPING.model_copy(update={"max_age_hours": STALE_HOURS,
                                                "flexible_arrived_core_hours": None}))
    assert len(usage) == len(HOURS) - STALE_HOURS


def test_duplicate_series_name_the_query_and_labels(prometheus):
    with pytest.raises(InputError) as err:
        _read(prometheus, {"delta": []})
    assert err.value.field == "inflexible_cpu_cores"
    message = err.value.message
    assert "2 series" in message and 'cicm_inflexible_cpu_cores{cluster="delta"}' in message
    assert 'instance="node-1:9100"' in message and 'instance="node-2:9100"' in message


def test_nan_names_field_and_hour(prometheus):
    with pytest.raises(InputError) as err:
        _read(prometheus, {"eps_nan": []})
    assert err.value.field == "flexible_cpu_cores"
    assert "NaN" in err.value.message and NAN_HOUR.isoformat() in err.value.message


def test_negative_names_field_and_hour(prometheus):
    with pytest.raises(InputError) as err:
        _read(prometheus, {"eps_neg": []})
    assert err.value.field == "reserved_cpu_cores"
    assert "negative" in err.value.message and NEG_HOUR.isoformat() in err.value.message


def test_too_few_hours_names_the_field(prometheus):
    with pytest.raises(InputError) as err:
        _read(prometheus, {"zeta": []})
    assert err.value.field == "flexible_cpu_cores"
    assert "too few hours" in err.value.message and "10 of 72" in err.value.message


def test_query_returning_nothing_names_the_field(prometheus):
    with pytest.raises(InputError) as err:
        _read(prometheus, {"beta": ["beta-a", "no-such-domain"]})
    assert err.value.field == "domain_cpu_cores"
    assert "returned nothing" in err.value.message and "no-such-domain" in err.value.message
    typo = MAPPING.model_copy(update={"power_kw": SeriesQuery(query='cicm_domain_power_kilowatts{domain="{domain}"}')})
    with pytest.raises(InputError) as err:
        _read(prometheus, {"beta": ["beta-a"]}, typo)
    assert err.value.field == "power_kw" and "cicm_domain_power_kilowatts" in err.value.message


def test_window_outside_the_data_returns_nothing(prometheus):
    with pytest.raises(InputError) as err:
        read_prometheus_telemetry(prometheus, MAPPING, {"beta": []}, START - pd.Timedelta(days=30),
                                  START - pd.Timedelta(days=29))
    assert err.value.field == "inflexible_cpu_cores" and "returned nothing" in err.value.message


def test_malformed_query_is_an_input_error(prometheus):
    unclosed = SeriesQuery(query='sum(cicm_reserved_cpu_cores{cluster="{cluster}"}')
    bad = MAPPING.model_copy(update={"reserved_cpu_cores": unclosed})
    with pytest.raises(InputError) as err:
        _read(prometheus, {"beta": []}, bad)
    assert err.value.field == "reserved_cpu_cores" and "rejected" in err.value.message


def test_http_errors_name_the_url(prometheus):
    with pytest.raises(ProviderError) as err:  # a path Prometheus does not serve
        _read(prometheus + "/not-prometheus", {"beta": []})
    assert err.value.status_code == 404 and f"{prometheus}/not-prometheus/api/v1/query_range" in str(err.value)
    closed = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(ProviderError) as err:  # nothing listens there
        _read(closed, {"beta": []}, session=make_session(retries=1, backoff_s=0.01))
    assert f"{closed}/api/v1/query_range" in str(err.value) and "connection error" in str(err.value)


# --- the mapping and the window (no server) --------------------------------------------------------------------

def test_default_mapping_follows_the_label_conventions():
    m = PrometheusMapping()
    assert render(m.inflexible_cpu_cores.query, "c1") == 'avg_over_time(cicm_inflexible_cpu_cores{cluster="c1"}[1h])'
    assert render(m.power_kw.query, "c1", "d1") == \
        'avg_over_time(cicm_domain_power_watts{cluster="c1",domain="d1"}[1h]) / 1000'
    assert m.flexible_arrived_core_hours is None and m.power_kw.hour == "end"
    assert render('x{cluster="{cluster}"}', 'we"ird\\') == 'x{cluster="we\\"ird\\\\"}'


@pytest.mark.parametrize("update, field, message", [
    ({"inflexible_cpu_cores": "cicm_inflexible_cpu_cores"}, "inflexible_cpu_cores", "must contain {cluster}"),
    ({"power_kw": 'x{cluster="{cluster}"}'}, "power_kw", "must contain {domain}"),
    ({"reserved_cpu_cores": 'x{cluster="{cluster}",domain="{domain}"}'}, "reserved_cpu_cores",
     "unknown placeholder {domain}"),
    ({"flexible_cpu_cores": 'x{cluster="{clustr}"}'}, "flexible_cpu_cores", "unknown placeholder {clustr}"),
    ({"flexible_cpu_cores": {"query": "x", "hour": "middle"}}, "flexible_cpu_cores.hour", "'start' or 'end'"),
    ({"min_coverage": 0}, "min_coverage", "greater than 0"),
    ({"power_watts": "x"}, "power_watts", "Extra inputs are not permitted"),
])
def test_bad_mappings_are_refused(update, field, message):
    with pytest.raises(InputError) as err:
        read_prometheus_telemetry("http://127.0.0.1:9", {**MAPPING.model_dump(), **update}, {"a": []}, START, END)
    assert err.value.field == f"prometheus.{field}" and message in err.value.message


@pytest.mark.parametrize("start, end, field", [
    (START.tz_localize(None), END, "start"),
    (START + pd.Timedelta(minutes=30), END, "start"),
    (START, START, "end"),
])
def test_bad_windows_are_refused(start, end, field):
    with pytest.raises(InputError) as err:
        read_prometheus_telemetry("http://127.0.0.1:9", MAPPING, {"a": []}, start, end)
    assert err.value.field == field


def test_a_domain_in_two_clusters_is_refused():
    with pytest.raises(InputError) as err:
        read_prometheus_telemetry("http://127.0.0.1:9", MAPPING, {"a": ["d"], "b": ["d"]}, START, END)
    assert err.value.field == "domain"
