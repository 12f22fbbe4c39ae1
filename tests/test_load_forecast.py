"""Load forecasts per cluster (cicm.models.load)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cicm.errors import InputError
from cicm.models.load import (
    forecast_load,
    holt_winters_core_hours,
    holt_winters_forecast,
    local_day_hours,
    seasonal_naive_core_hours,
    seasonal_naive_forecast,
)

TZ = "America/Los_Angeles"


def synthetic_history(
    start: str = "2022-01-03",
    days: int = 70,
    tz: str = TZ,
    noise: float = 0.01,
    seed: int = 0,
    level: float = 1000.0,
    amplitude: float = 0.3,
    weekend: float = 0.8,
) -> tuple[pd.DataFrame, pd.Series, pd.Series]:
    """Hourly history with a known weekly pattern in local time; also the noise-free inflexible and flexible."""
    first = pd.Timestamp(start).tz_localize(tz).tz_convert("UTC")
    hours = pd.date_range(first, periods=days * 24, freq="h", name="hour")
    local = hours.tz_convert(tz)
    is_weekend = local.dayofweek.to_numpy() >= 5
    truth = level * (1 + amplitude * np.sin(2 * np.pi * (local.hour.to_numpy() - 6) / 24))
    truth = truth * np.where(is_weekend, weekend, 1.0)
    rng = np.random.default_rng(seed)
    inflexible = truth * np.exp(noise * rng.standard_normal(len(hours)))
    flexible_truth = 0.4 * level * np.where(is_weekend, 1.2, 1.0)
    flexible = flexible_truth * np.exp(5 * noise * rng.standard_normal(len(hours)))
    reserved = 1.3 * (inflexible + flexible) * np.exp(2 * noise * rng.standard_normal(len(hours)))
    frame = pd.DataFrame(
        {"inflexible_cpu_cores": inflexible, "flexible_cpu_cores": flexible, "reserved_cpu_cores": reserved},
        index=hours,
    )
    return frame, pd.Series(truth, hours), pd.Series(flexible_truth, hours)


def eve(day: str, tz: str = TZ, hour: int = 18) -> pd.Timestamp:
    """Issue time: `hour`:00 local on the day before `day`."""
    return (pd.Timestamp(day) - pd.Timedelta(days=1) + pd.Timedelta(hours=hour)).tz_localize(tz).tz_convert("UTC")


@pytest.fixture(scope="module")
def history():
    return synthetic_history()


def test_recovers_a_known_weekly_pattern(history):
    frame, truth, flexible_truth = history
    for day in ["2022-03-05", "2022-03-08"]:  # a Saturday and a Tuesday
        hours = local_day_hours(day, TZ)
        fc = forecast_load(frame, hours, TZ, 0.05, eve(day))
        assert fc.status == "ok" and fc.reason is None and fc.ok
        assert fc.inflexible_cpu_cores.index.equals(hours)
        mape = np.mean(np.abs(fc.inflexible_cpu_cores / truth.reindex(hours) - 1)) * 100
        assert mape < 2
        assert fc.flexible_core_hours == pytest.approx(flexible_truth.reindex(hours).sum(), rel=0.05)
        assert fc.reservation_ratio.to_numpy() == pytest.approx(1.3, rel=0.02)
        assert fc.reservations_core_hours > 0 and fc.theta_core_hours >= fc.reservations_core_hours
        assert (fc.inflexible_upper_cpu_cores >= fc.inflexible_cpu_cores).all()
        assert 0 <= fc.inflexible_rel_error_upper < 0.1 and 0 <= fc.reservations_rel_error_q97 < 0.1
        assert fc.parameters["lag_days"] == 2  # 18:00 on the eve: the eve itself is not complete yet
        assert fc.parameters["inflexible"]["alpha"] in (0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9)
        assert not fc.inflexible_cpu_cores.isna().any()


def test_issue_at_midnight_uses_lag_one(history):
    frame, truth, _ = history
    hours = local_day_hours("2022-03-08", TZ)
    fc = forecast_load(frame, hours, TZ, 0.05, hours[0])
    assert fc.parameters["lag_days"] == 1
    assert np.mean(np.abs(fc.inflexible_cpu_cores / truth.reindex(hours) - 1)) < 0.02


def test_insufficient_history_is_flagged_not_invented(history):
    frame, _, _ = history
    hours = local_day_hours("2022-01-25", TZ)  # 21 complete days before
    fc = forecast_load(frame, hours, TZ, 0.05, eve("2022-01-25"))
    assert fc.status == "insufficient-history" and not fc.ok
    assert "need 28" in fc.reason
    assert fc.inflexible_cpu_cores.empty and fc.inflexible_upper_cpu_cores.empty and fc.reservation_ratio.empty
    for value in (fc.flexible_core_hours, fc.reservations_core_hours, fc.theta_core_hours,
                  fc.reservations_rel_error_q97, fc.inflexible_rel_error_upper):
        assert value is None
    # configurable
    assert forecast_load(frame, hours, TZ, 0.05, eve("2022-01-25"), min_history_days=21).ok
    # stale history: data stop more than a week before the target day
    late = local_day_hours("2022-03-25", TZ)
    stale = forecast_load(frame, late, TZ, 0.05, eve("2022-03-25"))
    assert stale.status == "insufficient-history" and "7 allowed" in stale.reason


def test_no_look_ahead(history):
    frame, _, _ = history
    day = "2022-03-08"
    hours = local_day_hours(day, TZ)
    now = eve(day) + pd.Timedelta(minutes=30)  # mid-hour: the hour that started at 17:00 local has not ended
    base = forecast_load(frame, hours, TZ, 0.05, now)
    changed = frame.copy()
    future = changed.index + pd.Timedelta(hours=1) > now
    assert future.sum() > 24
    changed.loc[future, :] = np.nan  # even NaN is never read
    changed.loc[changed.index[future][:3], "inflexible_cpu_cores"] = 1e9
    again = forecast_load(changed, hours, TZ, 0.05, now)
    pd.testing.assert_series_equal(base.inflexible_cpu_cores, again.inflexible_cpu_cores)
    pd.testing.assert_series_equal(base.inflexible_upper_cpu_cores, again.inflexible_upper_cpu_cores)
    assert base.flexible_core_hours == again.flexible_core_hours
    assert base.theta_core_hours == again.theta_core_hours
    # whereas the last hour that ended by `now` is read
    touched = frame.copy()
    last = touched.index[touched.index + pd.Timedelta(hours=1) <= now][-1]
    touched.loc[last, "inflexible_cpu_cores"] = np.nan
    with pytest.raises(InputError):
        forecast_load(touched, hours, TZ, 0.05, now)


@pytest.mark.parametrize("day, n_hours, start", [("2022-03-13", 23, "2022-01-03"), ("2022-11-06", 25, "2022-09-01")])
def test_dst_days(day, n_hours, start):
    frame, truth, flexible_truth = synthetic_history(start=start, days=80)
    hours = local_day_hours(day, TZ)
    assert len(hours) == n_hours
    fc = forecast_load(frame, hours, TZ, 0.05, eve(day))
    assert fc.ok
    for series in (fc.inflexible_cpu_cores, fc.inflexible_upper_cpu_cores, fc.reservation_ratio):
        assert len(series) == n_hours and series.index.equals(hours) and not series.isna().any()
    assert np.mean(np.abs(fc.inflexible_cpu_cores / truth.reindex(hours) - 1)) < 0.02
    assert fc.flexible_core_hours == pytest.approx(flexible_truth.reindex(hours).sum(), rel=0.05)
    # the DST days inside the history are handled too
    later = local_day_hours(pd.Timestamp(day) + pd.Timedelta(days=8), TZ)
    assert forecast_load(frame, later, TZ, 0.05, eve(str((pd.Timestamp(day) + pd.Timedelta(days=8)).date()))).ok


def test_local_day_hours():
    assert [len(local_day_hours(d, TZ)) for d in ("2022-03-12", "2022-03-13", "2022-11-06")] == [24, 23, 25]
    hours = local_day_hours("2022-06-01", "Europe/Berlin")
    assert hours[0] == pd.Timestamp("2022-05-31 22:00", tz="UTC") and str(hours.tz) == "UTC"
    with pytest.raises(InputError) as err:
        local_day_hours("2022-06-01", "Mars/Olympus")
    assert err.value.field == "tz"


def _field(call) -> str:
    with pytest.raises(InputError) as err:
        call()
    return err.value.field


def test_bad_history_names_the_column(history):
    frame, _, _ = history
    day = "2022-03-08"
    hours, now = local_day_hours(day, TZ), eve(day)
    nan = frame.copy()
    nan.iloc[100, 1] = np.nan
    assert _field(lambda: forecast_load(nan, hours, TZ, 0.05, now)) == "flexible_cpu_cores"
    negative = frame.copy()
    negative.iloc[100, 2] = -1
    assert _field(lambda: forecast_load(negative, hours, TZ, 0.05, now)) == "reserved_cpu_cores"
    duplicated = pd.concat([frame.iloc[:500], frame.iloc[499:]])
    assert _field(lambda: forecast_load(duplicated, hours, TZ, 0.05, now)) == "hour"
    gap = frame.drop(frame.index[300])
    assert _field(lambda: forecast_load(gap, hours, TZ, 0.05, now)) == "hour"
    assert _field(lambda: forecast_load(frame.tz_localize(None), hours, TZ, 0.05, now)) == "hour"
    missing = frame.drop(columns="inflexible_cpu_cores")
    assert _field(lambda: forecast_load(missing, hours, TZ, 0.05, now)) == "inflexible_cpu_cores"
    two = pd.concat([frame.assign(cluster="a"), frame.assign(cluster="b")])
    assert _field(lambda: forecast_load(two, hours, TZ, 0.05, now)) == "cluster"


def test_bad_arguments(history):
    frame, _, _ = history
    day = "2022-03-08"
    hours, now = local_day_hours(day, TZ), eve(day)
    assert _field(lambda: forecast_load(frame, hours[:-1], TZ, 0.05, now)) == "target_hours"
    assert _field(lambda: forecast_load(frame, hours + pd.Timedelta(hours=3), TZ, 0.05, now)) == "target_hours"
    assert _field(lambda: forecast_load(frame, hours.tz_localize(None), TZ, 0.05, now)) == "target_hours"
    assert _field(lambda: forecast_load(frame, hours, TZ, 0.05, hours[5])) == "now"
    assert _field(lambda: forecast_load(frame, hours, TZ, 0.05, now.tz_localize(None))) == "now"
    assert _field(lambda: forecast_load(frame, hours, TZ, 1.5, now)) == "gamma"
    assert _field(lambda: forecast_load(frame, hours, "Nowhere/City", 0.05, now)) == "tz"
    assert _field(lambda: forecast_load(frame, hours, TZ, 0.05, now, min_history_days=3)) == "min_history_days"


def test_history_with_hour_and_cluster_columns(history):
    frame, _, _ = history
    day = "2022-03-08"
    hours, now = local_day_hours(day, TZ), eve(day)
    long = frame.reset_index().assign(cluster="sj-a")
    a = forecast_load(long, hours, TZ, 0.05, now)
    b = forecast_load(frame, hours, TZ, 0.05, now)
    pd.testing.assert_series_equal(a.inflexible_cpu_cores, b.inflexible_cpu_cores)


@settings(max_examples=25, deadline=None)
@given(
    k=st.floats(0.01, 1000),
    seed=st.integers(0, 10_000),
    noise=st.floats(0.0, 0.08),
    amplitude=st.floats(0.0, 0.6),
    gamma=st.sampled_from([0.01, 0.05, 0.2]),
)
def test_scaling_and_bounds(k, seed, noise, amplitude, gamma):
    frame, _, _ = synthetic_history(days=45, seed=seed, noise=noise, amplitude=amplitude)
    day = "2022-02-16"
    hours, now = local_day_hours(day, TZ), eve(day)
    base = forecast_load(frame, hours, TZ, gamma, now)
    scaled = forecast_load(frame * k, hours, TZ, gamma, now)
    assert base.ok and scaled.ok
    np.testing.assert_allclose(scaled.inflexible_cpu_cores, k * base.inflexible_cpu_cores, rtol=1e-6)
    np.testing.assert_allclose(scaled.inflexible_upper_cpu_cores, k * base.inflexible_upper_cpu_cores, rtol=1e-6)
    assert scaled.flexible_core_hours == pytest.approx(k * base.flexible_core_hours, rel=1e-6)
    assert scaled.theta_core_hours == pytest.approx(k * base.theta_core_hours, rel=1e-6)
    np.testing.assert_allclose(scaled.reservation_ratio, base.reservation_ratio, rtol=1e-9)
    for fc in (base, scaled):
        assert (fc.inflexible_upper_cpu_cores >= fc.inflexible_cpu_cores).all()
        assert (fc.inflexible_cpu_cores >= 0).all()
        assert fc.theta_core_hours >= fc.reservations_core_hours >= 0
        assert fc.flexible_core_hours >= 0


# -------------------------------------------------------------------------------------- baselines


def test_seasonal_naive(history):
    frame, _, _ = history
    day = "2022-03-13"  # 23 hours; a week before has 24
    hours = local_day_hours(day, TZ)
    past = frame[frame.index < eve(day)]
    fc = seasonal_naive_forecast(past["inflexible_cpu_cores"], hours, TZ)
    week_before = local_day_hours("2022-03-06", TZ)
    by_hour = dict(zip(week_before.tz_convert(TZ).hour, frame.loc[week_before, "inflexible_cpu_cores"]))
    assert fc.index.equals(hours)
    assert fc.to_numpy() == pytest.approx([by_hour[h] for h in hours.tz_convert(TZ).hour])
    total = seasonal_naive_core_hours(past["flexible_cpu_cores"], hours, TZ)
    assert total == pytest.approx(frame.loc[week_before, "flexible_cpu_cores"].mean() * 23)


def test_holt_winters(history):
    frame, truth, flexible_truth = history
    day = "2022-03-08"
    hours = local_day_hours(day, TZ)
    past = frame[frame.index < eve(day)]
    fc = holt_winters_forecast(past["inflexible_cpu_cores"], hours, TZ)
    assert fc.index.equals(hours)
    assert np.mean(np.abs(fc / truth.reindex(hours) - 1)) < 0.05
    total = holt_winters_core_hours(past["flexible_cpu_cores"], hours, TZ)
    assert total == pytest.approx(flexible_truth.reindex(hours).sum(), rel=0.1)


# ------------------------------------------------------------------------ daily model selection


def with_daily_flexible(frame: pd.DataFrame, daily: np.ndarray, seed: int, tz: str = TZ) -> pd.DataFrame:
    """`frame` with flexible CPU daily[i] × (5 % hourly noise) on the i-th local day of the frame."""
    local_days = frame.index.tz_convert(tz).tz_localize(None).normalize()
    day_number = ((local_days - local_days[0]) // pd.Timedelta(days=1)).to_numpy()
    noise = np.exp(0.05 * np.random.default_rng(seed).standard_normal(len(frame)))
    return frame.assign(flexible_cpu_cores=daily[day_number] * noise)


def rolling_daily_mape(frame: pd.DataFrame, days: pd.DatetimeIndex) -> tuple[float, float, list[dict]]:
    """MAPE % of cicm's flexible core-hours and of seasonal naive's over the target `days`, and the
    flexible parameters of each forecast."""
    ours, naive, params = [], [], []
    for day in days:
        hours, now = local_day_hours(day, TZ), eve(str(day.date()))
        actual = frame.loc[hours, "flexible_cpu_cores"].sum()
        fc = forecast_load(frame, hours, TZ, 0.05, now)
        assert fc.ok
        past = frame[frame.index + pd.Timedelta(hours=1) <= now]
        ours.append(abs(fc.flexible_core_hours / actual - 1))
        naive.append(abs(seasonal_naive_core_hours(past["flexible_cpu_cores"], hours, TZ) / actual - 1))
        params.append(fc.parameters["flexible"])
    return 100 * np.mean(ours), 100 * np.mean(naive), params


def test_flexible_without_weekly_pattern_selects_a_level_model():
    # no weekly pattern in the daily flexible total: a slowly wandering level (random walk, 4 %/day) and
    # 25 % independent day-to-day noise. A day-of-week model only adds noise here.
    rng = np.random.default_rng(3)
    days = 110
    level = 400 * np.exp(np.cumsum(rng.normal(0, 0.04, days + 1)))
    frame = with_daily_flexible(synthetic_history(days=days)[0], level * np.exp(rng.normal(0, 0.25, days + 1)), 3)
    targets = pd.date_range("2022-04-08", periods=12, freq="D")
    ours, naive, params = rolling_daily_mape(frame, targets)
    assert ours < 0.85 * naive
    chosen = [p["model"] for p in params]
    assert sum(m in ("level-ewma", "moving-average") for m in chosen) >= 10, chosen
    for p in params:
        # the choice is the candidate with the lowest out-of-sample MAPE, all scored on the same days
        scores = p["selection_mape_pct"]
        label = p["model"] + ("+adjust" if p["adjusted"] else "")
        assert scores[label] == min(scores.values())
        assert set(scores) == {"seasonal+adjust", "seasonal", "level-ewma+adjust", "level-ewma",
                               "moving-average+adjust", "moving-average"}
        assert p["n_selection_days"] > 60
        assert (p["adjust_a_b_c"] is None) == (not p["adjusted"])


def test_flexible_with_strong_weekly_pattern_selects_the_seasonal_model():
    # flexible work mostly on weekdays (weekends 35 % of a weekday), 8 % day-to-day noise
    rng = np.random.default_rng(4)
    days = 110
    weekday = pd.date_range("2022-01-03", periods=days + 1).day_of_week.to_numpy()
    daily = 400 * np.where(weekday >= 5, 0.35, 1.0) * np.exp(rng.normal(0, 0.08, days + 1))
    frame = with_daily_flexible(synthetic_history(days=days)[0], daily, 4)
    targets = pd.date_range("2022-04-08", periods=7, freq="D")  # every day of the week once
    ours, naive, params = rolling_daily_mape(frame, targets)
    assert all(p["model"] == "seasonal" for p in params), [p["model"] for p in params]
    assert ours < naive
    moving = [p["selection_mape_pct"]["moving-average"] for p in params]
    seasonal = [min(p["selection_mape_pct"]["seasonal"], p["selection_mape_pct"]["seasonal+adjust"]) for p in params]
    assert np.all(np.array(seasonal) < 0.5 * np.array(moving))


def test_model_choice_is_recorded_and_the_hourly_series_stays_seasonal(history):
    frame, _, _ = history
    day = "2022-03-08"
    fc = forecast_load(frame, local_day_hours(day, TZ), TZ, 0.05, eve(day))
    for series in ("inflexible", "reservations"):  # not selected: the seasonal model with adjustment
        p = fc.parameters[series]
        assert p["model"] == "seasonal" and p["adjusted"] is True and "selection_mape_pct" not in p
        assert len(p["adjust_a_b_c"]) == 3 and p["n_adjust_days"] > 0
    p = fc.parameters["flexible"]
    assert p["model"] in ("seasonal", "level-ewma", "moving-average")
    assert p["level_alpha"] in (0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9)
    assert p["window_days"] in (7, 14, 28, 56, 91)
    assert p["n_backtest_days"] > 0 and p["backtest_day_ahead_mape_pct"] is not None
    json.dumps(fc.parameters)  # stored as JSON by the planning flow
