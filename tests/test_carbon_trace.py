"""Bundled EIA-930 trace replay and the GB-calibrated day-ahead error model."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cicm.carbon import trace
from cicm.carbon.providers import fetch_forecast
from cicm.carbon.schema import FORECAST_COLUMNS
from cicm.carbon.validate import validate_forecast
from cicm.errors import InputError
from cicm.paths import bundled_data_dir

UTC = "UTC"
JUNE = (pd.Timestamp("2022-06-01", tz=UTC), pd.Timestamp("2022-07-01", tz=UTC))


def ts(text: str) -> pd.Timestamp:
    return pd.Timestamp(text, tz=UTC)


# ---------------------------------------------------------------- actuals and gaps

def test_actuals_are_hourly_utc_full_year():
    s = trace.load_actual_intensity("AZPS")
    assert len(s) == 8760 and str(s.index.dtype) == "datetime64[ns, UTC]"
    assert s.index[0] == ts("2022-01-01") and s.index[-1] == ts("2022-12-31T23:00")
    assert (s.index.to_series().diff().dropna() == pd.Timedelta(hours=1)).all()
    assert s.notna().all() and s.name == "gco2_per_kwh"


def test_real_gaps_found_where_documented():
    gap_sizes = {z: [n for *_, n in trace.find_gaps(trace.read_eia_trace(z))] for z in trace.TRACE_ZONES}
    assert gap_sizes == {"AZPS": [], "BPAT": [], "CISO": [1, 1, 1], "ERCO": [], "MISO": [1, 2], "NYIS": [],
                         "PJM": [22, 1], "SOCO": []}
    first, last, n = trace.find_gaps(trace.read_eia_trace("PJM"))[0]
    assert (first, last, n) == (ts("2022-03-13T07:00"), ts("2022-03-14T04:00"), 22)


def test_short_gaps_are_time_interpolated():
    raw = trace.read_eia_trace("MISO")
    filled = trace.load_actual_intensity("MISO")
    before, after = raw[ts("2022-06-09T19:00")], raw[ts("2022-06-09T22:00")]
    assert np.isnan(raw[ts("2022-06-09T20:00")])
    assert filled[ts("2022-06-09T20:00")] == pytest.approx(before + (after - before) / 3)
    assert filled[ts("2022-06-09T21:00")] == pytest.approx(before + 2 * (after - before) / 3)
    raw_ciso = trace.read_eia_trace("CISO")
    h = ts("2022-01-05T10:00")
    expected = (raw_ciso[h - pd.Timedelta(hours=1)] + raw_ciso[h + pd.Timedelta(hours=1)]) / 2
    assert trace.load_actual_intensity("CISO")[h] == pytest.approx(expected)


def test_long_gap_raises_naming_hours():
    with pytest.raises(InputError) as e:
        trace.load_actual_intensity("PJM")
    assert e.value.field == "gco2_per_kwh"
    assert "2022-03-13T07:00Z..2022-03-14T04:00Z (22 h)" in e.value.message


def test_window_avoiding_long_gap_is_fine_and_short_gap_filled():
    s = trace.load_actual_intensity("PJM", ts("2022-11-01"), ts("2022-12-01"))
    assert len(s) == 30 * 24 and s.notna().all()


def test_drop_long_gaps_leaves_holes_but_invents_nothing():
    s = trace.load_actual_intensity("PJM", drop_long_gaps=True)
    assert len(s) == 8760 - 22 and s.notna().all()
    assert ts("2022-03-13T12:00") not in s.index and ts("2022-11-07T05:00") in s.index


def test_max_gap_hours_is_respected():
    with pytest.raises(InputError):
        trace.load_actual_intensity("CISO", max_gap_hours=0)
    assert trace.load_actual_intensity("PJM", max_gap_hours=22).notna().all()


def test_fill_short_gaps_synthetic():
    idx = pd.date_range(ts("2022-01-01"), periods=30, freq="h")
    values = np.arange(30, dtype=float)
    values[[0]] = np.nan            # edge gap: never filled
    values[3:9] = np.nan            # 6 h: filled
    values[12:19] = np.nan          # 7 h: kept
    out = trace.fill_short_gaps(pd.Series(values, index=idx), max_gap_hours=6)
    assert np.isnan(out.iloc[0])
    np.testing.assert_allclose(out.iloc[3:9], np.arange(3, 9))
    assert out.iloc[12:19].isna().all() and out.iloc[19:].notna().all()


@pytest.mark.parametrize(
    "start, end, field",
    [(ts("2021-12-31T23:00"), ts("2022-01-02"), "start"), (ts("2022-12-31"), ts("2023-01-01T01:00"), "end")],
)
def test_window_beyond_trace(start, end, field):
    with pytest.raises(InputError) as e:
        trace.load_actual_intensity("CISO", start, end)
    assert e.value.field == field


def test_unknown_zone():
    with pytest.raises(InputError) as e:
        trace.load_actual_intensity("DE")
    assert e.value.field == "zone"


# ---------------------------------------------------------------- calibration

def test_calibration_matches_independent_recomputation():
    raw = pd.read_csv(bundled_data_dir() / trace.GB_SAMPLE_RELPATH)
    assert len(raw) == 144
    f = raw["dayahead_forecast_g_per_kwh"].to_numpy(float).reshape(72, 2).mean(axis=1)
    a = raw["actual_g_per_kwh"].to_numpy(float).reshape(72, 2).mean(axis=1)
    e = np.log(f / a)
    cal = trace.gb_error_calibration()
    assert cal["n_hours"] == 72
    assert cal["log_ratio_mean"] == pytest.approx(e.mean())
    assert cal["log_ratio_std"] == pytest.approx(e.std(ddof=1))
    assert cal["ar1_phi"] == pytest.approx(np.corrcoef(e[:-1], e[1:])[0, 1])
    assert cal["mape"] == pytest.approx(np.mean(np.abs(f - a) / a))
    # the fitted numbers written in docs/carbon_forecast_calibration.md
    assert round(cal["log_ratio_mean"], 3) == 0.061 and round(cal["log_ratio_std"], 3) == 0.277
    assert round(cal["ar1_phi"], 3) == 0.935 and round(cal["mape"], 3) == 0.270


def test_calibration_is_a_copy():
    cal = trace.gb_error_calibration()
    cal["log_ratio_mean"] = 99
    assert trace.gb_error_calibration()["log_ratio_mean"] != 99


def test_ar1_simulator_reproduces_its_parameters():
    rng = np.random.default_rng(1)
    e = trace.simulate_ar1_log_errors(200_000, mean=0.06, std=0.28, phi=0.93, rng=rng, clip_std=10)
    assert e.mean() == pytest.approx(0.06, abs=0.01)
    assert e.std() == pytest.approx(0.28, rel=0.03)
    assert np.corrcoef(e[:-1], e[1:])[0, 1] == pytest.approx(0.93, abs=0.01)


# ---------------------------------------------------------------- trace forecasts

def test_trace_forecast_is_canonical_and_valid():
    issued = ts("2022-05-31T18:00")
    out = trace.trace_forecast("CISO", ts("2022-06-01"), ts("2022-06-02"), issued, seed=3)
    assert list(out.columns) == FORECAST_COLUMNS and len(out) == 24
    assert (out["issued_at"] == issued).all() and (out["provider"] == "trace").all()
    validate_forecast(out, start=ts("2022-06-01"), end=ts("2022-06-02"), now=issued)


def test_trace_is_deterministic_and_seed_dependent():
    args = ("ERCO", *JUNE, ts("2022-05-31T18:00"))
    a = trace.trace_forecast(*args, seed=7)
    b = trace.trace_forecast(*args, seed=7)
    c = trace.trace_forecast(*args, seed=8)
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a["gco2_per_kwh"], c["gco2_per_kwh"])


def test_day_depends_only_on_seed_zone_and_day_not_on_window_or_order():
    issued = ts("2022-06-01")
    day = trace.trace_forecast("SOCO", ts("2022-06-10"), ts("2022-06-11"), issued, seed=5)
    trace.trace_forecast("SOCO", ts("2022-06-03"), ts("2022-06-04"), issued, seed=5)  # unrelated call first
    wide = trace.trace_forecast("SOCO", ts("2022-06-08"), ts("2022-06-13"), issued, seed=5)
    part = trace.trace_forecast("SOCO", ts("2022-06-10T05:00"), ts("2022-06-10T17:00"), issued, seed=5)
    sliced = wide.set_index("target_hour").loc[day["target_hour"], "gco2_per_kwh"].to_numpy()
    np.testing.assert_array_equal(day["gco2_per_kwh"].to_numpy(), sliced)
    np.testing.assert_array_equal(part["gco2_per_kwh"].to_numpy(), day["gco2_per_kwh"].to_numpy()[5:17])
    other_zone = trace.trace_forecast("AZPS", ts("2022-06-10"), ts("2022-06-11"), issued, seed=5)
    window = (ts("2022-06-10"), ts("2022-06-11"))
    ratio_soco = day["gco2_per_kwh"].to_numpy() / trace.load_actual_intensity("SOCO", *window).to_numpy()
    ratio_azps = other_zone["gco2_per_kwh"].to_numpy() / trace.load_actual_intensity("AZPS", *window).to_numpy()
    assert not np.allclose(ratio_soco, ratio_azps)  # zones get their own errors


def test_error_shrinks_with_lead_time():
    cal = trace.gb_error_calibration()
    start, end = ts("2022-01-01"), ts("2023-01-01")
    actual = trace.load_actual_intensity("CISO", start, end)
    log_err = {}
    for lead in (0.5, 6.5, 24.73, 36.5):  # every hour forecast exactly `lead` hours ahead (to its middle)
        f = np.concatenate([trace.simulated_forecast_gco2_per_kwh(actual.iloc[[i]], "CISO",
                                                                  actual.index[i] - pd.Timedelta(hours=lead - 0.5), 4)
                            for i in range(0, len(actual), 7)])
        log_err[lead] = np.log(f / actual.to_numpy()[::7])
    stds = [log_err[k].std(ddof=1) for k in sorted(log_err)]
    assert stds == sorted(stds)  # later forecasts are better
    assert stds[0] == pytest.approx(cal["final_log_ratio_std"], rel=0.15)  # the final vintage's error
    assert stds[2] == pytest.approx(cal["log_ratio_std"], rel=0.15)  # the day-ahead vintage's error
    # the same standardised path at every lead: vintages of one hour converge on the actual
    assert np.corrcoef(log_err[0.5], log_err[36.5])[0, 1] > 0.999


def test_lead_scaling_is_the_calibrated_line():
    cal = trace.gb_error_calibration()
    mean, std = trace.lead_scaling(np.array([0.0, cal["dayahead_lead_hours"], 1000.0]), cal)
    assert std[0] == pytest.approx(cal["final_log_ratio_std"]) and std[1] == pytest.approx(cal["log_ratio_std"])
    assert mean[1] == pytest.approx(cal["log_ratio_mean"])
    assert std[2] == pytest.approx(trace.lead_scaling(np.array([cal["max_lead_hours"]]), cal)[1][0])  # held
    assert round(cal["final_log_ratio_std"], 3) == 0.120 and round(cal["dayahead_lead_hours"], 2) == 24.73


def _errors(zone, start, end, seed):
    """Each UTC day forecast the evening before, at the GB day-ahead sample's mean lead (24.73 h)."""
    actual = trace.load_actual_intensity(zone, start, end)
    lead = pd.Timedelta(hours=trace.gb_error_calibration()["dayahead_lead_hours"] - 12)
    f = np.concatenate([trace.simulated_forecast_gco2_per_kwh(day, zone, d - lead, seed)
                        for d, day in actual.groupby(actual.index.floor("D"))])
    return f, actual.to_numpy()


@pytest.mark.parametrize("zone, seed", [("CISO", 0), ("ERCO", 1), ("PJM", 2), ("BPAT", 3)])
def test_month_mape_is_near_the_gb_sample(zone, seed):
    f, a = _errors(zone, *JUNE, seed)
    mape = np.mean(np.abs(f - a) / a)
    gb = trace.gb_error_calibration()["mape"]
    assert 0.5 * gb <= mape <= 1.5 * gb, (mape, gb)


def test_year_error_statistics_match_calibration():
    cal = trace.gb_error_calibration()
    f, a = _errors("CISO", ts("2022-01-01"), ts("2023-01-01"), seed=11)
    e = np.log(f / a).reshape(365, 24)
    assert e.mean() == pytest.approx(cal["log_ratio_mean"], abs=0.04)
    assert e.std(ddof=1) == pytest.approx(cal["log_ratio_std"], rel=0.12)
    within_day = np.corrcoef(e[:, :-1].ravel(), e[:, 1:].ravel())[0, 1]
    assert within_day == pytest.approx(cal["ar1_phi"], abs=0.04)
    _, longest = trace.lead_scaling(np.array([cal["max_lead_hours"]]), cal)
    assert np.abs(e - cal["log_ratio_mean"]).max() <= 3 * longest[0] + 0.05  # clipped tails


def test_trace_never_exceeds_plausibility_bound():
    f, _ = _errors("AZPS", ts("2022-01-01"), ts("2023-01-01"), seed=0)
    assert f.max() < 2000 and f.min() > 0


def test_trace_forecast_over_long_gap_raises():
    with pytest.raises(InputError) as e:
        trace.trace_forecast("PJM", ts("2022-03-13"), ts("2022-03-14"), ts("2022-03-12T18:00"), seed=0)
    assert e.value.field == "gco2_per_kwh"


@pytest.mark.parametrize("seed", [-1, 1.5, "3", True])
def test_bad_seed(seed):
    with pytest.raises(InputError) as e:
        trace.trace_forecast("CISO", ts("2022-06-01"), ts("2022-06-02"), ts("2022-05-31"), seed=seed)
    assert e.value.field == "seed"


def test_dispatcher_trace_defaults_issued_at_to_now_and_validates():
    now = ts("2022-06-30T18:00")
    out = fetch_forecast("trace", "CISO", ts("2022-07-01"), ts("2022-07-02"), now=now, seed=4)
    assert (out["issued_at"] == now).all() and len(out) == 24
    with pytest.raises(InputError) as e:  # issued long before "now": stale
        fetch_forecast("trace", "CISO", ts("2022-07-01"), ts("2022-07-02"), now=now, seed=4,
                       issued_at=now - pd.Timedelta(days=3))
    assert e.value.field == "issued_at"


def test_local_dst_day_window():
    start = pd.Timestamp("2022-11-06").tz_localize("America/Los_Angeles").tz_convert(UTC)
    end = pd.Timestamp("2022-11-07").tz_localize("America/Los_Angeles").tz_convert(UTC)
    out = fetch_forecast("trace", "CISO", start, end, now=start - pd.Timedelta(hours=6))
    assert len(out) == 25
