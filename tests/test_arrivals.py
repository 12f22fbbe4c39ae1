"""Hourly arrival forecasts (cicm.models.arrivals) and `cicm backtest --json` through a real subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cicm.errors import InputError
from cicm.models.arrivals import forecast_arrivals, hourly_arrivals, seasonal_ewma


def weekly_history(weeks=6, noise=0.0, seed=0):
    hours = pd.date_range("2022-03-01", periods=weeks * 168, freq="h", tz="UTC")
    base = 100 + 80 * np.sin(np.arange(168) / 168 * 2 * np.pi * 7)  # a daily shape, the same every week
    rng = np.random.default_rng(seed)
    values = np.tile(base, weeks) * (1 + noise * rng.standard_normal(weeks * 168)).clip(0)
    return pd.Series(values, index=hours)


def test_a_weekly_pattern_is_forecast_exactly_and_the_upper_quantile_is_zero():
    history = weekly_history()
    target = pd.date_range(history.index[-1] + pd.Timedelta(hours=1), periods=48, freq="h")
    fc = forecast_arrivals(history, target)
    expected = history.reindex(target - pd.Timedelta(days=7)).to_numpy()
    np.testing.assert_allclose(fc.core_hours, expected)
    assert fc.rel_error_quantile == pytest.approx(0.0, abs=1e-12)


def test_noise_widens_the_upper_quantile():
    history = weekly_history(noise=0.3)
    target = pd.date_range(history.index[-1] + pd.Timedelta(hours=1), periods=24, freq="h")
    fc = forecast_arrivals(history, target, quantile=0.9)
    assert fc.rel_error_quantile > 0
    assert (fc.upper_core_hours >= fc.core_hours).all()


def test_the_forecast_uses_only_the_past():
    history = weekly_history()
    target = history.index[-48:]
    spoiled = history.copy()
    spoiled.iloc[-48:] = 1e6  # the future must not leak in
    np.testing.assert_allclose(forecast_arrivals(spoiled, target).core_hours,
                               forecast_arrivals(history, target).core_hours)


def test_ewma_weights_the_newest_week_most():
    hours = pd.date_range("2022-03-01", periods=3 * 168, freq="h", tz="UTC")
    history = pd.Series(np.repeat([10.0, 20.0, 40.0], 168), index=hours)
    target = pd.date_range(hours[-1] + pd.Timedelta(hours=1), periods=1, freq="h")
    # weights 0.5, 0.25, 0.125 on 40, 20, 10
    assert seasonal_ewma(history, target, weeks=3)[0] == pytest.approx((20 + 5 + 1.25) / 0.875)


@pytest.mark.parametrize("bad, field", [
    (lambda s: s.where(s.index != s.index[5]), "flexible_arrived_core_hours"),
    (lambda s: s * -1, "flexible_arrived_core_hours"),
    (lambda s: s.tz_localize(None), "hour"),
])
def test_bad_history_names_the_field(bad, field):
    history = weekly_history(weeks=2)
    target = pd.date_range(history.index[-1] + pd.Timedelta(hours=1), periods=24, freq="h")
    with pytest.raises(InputError) as err:
        forecast_arrivals(bad(history), target)
    assert err.value.field == field


def test_no_history_is_refused():
    history = weekly_history(weeks=2)
    far = pd.date_range("2023-01-01", periods=24, freq="h", tz="UTC")
    with pytest.raises(InputError, match="no arrival history"):
        forecast_arrivals(history, far)


def test_hourly_arrivals_sums_jobs_into_their_hours():
    hours = pd.date_range("2022-03-01", periods=3, freq="h", tz="UTC")
    arrival = pd.Series(pd.to_datetime(["2022-03-01T00:10Z", "2022-03-01T00:50Z", "2022-03-01T02:00Z"]))
    np.testing.assert_allclose(hourly_arrivals(arrival, np.array([1.0, 2.0, 4.0]), hours), [3.0, 0.0, 4.0])


def test_backtest_json_is_clean_on_stdout(tmp_path):
    """As a user runs it: the console script in a subprocess, whose stdout must be one JSON document."""
    cicm = Path(sys.executable).with_name("cicm")
    proc = subprocess.run([str(cicm), "backtest", "--zone", "BPAT", "--start", "2022-07-01", "--days", "1",
                           "--json", "--no-experiment", "--no-plots", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "CICM_HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)  # the whole of stdout: no banner before, nothing after
    assert doc["zone"] == "BPAT"
    assert {p["policy"] for p in doc["policies"]} >= {"carbon-agnostic", "cicm-ceiling", "planner", "oracle"}


# --- quantile regression (method="qr") ----------------------------------------------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

from cicm.models.arrivals import QR_MIN_HISTORY_H, forecast_arrivals_qr  # noqa: E402


def daily_history(days=63, noise=0.0, seed=0, level=100.0):
    """A strongly daily-periodic history (peak-to-trough 9:1), multiplicative noise, UTC hours."""
    hours = pd.date_range("2022-03-01", periods=days * 24, freq="h", tz="UTC")
    shape = 1 + 0.8 * np.sin(np.arange(days * 24) / 24 * 2 * np.pi)
    rng = np.random.default_rng(seed)
    return pd.Series(level * shape * np.exp(noise * rng.standard_normal(days * 24)), index=hours)


def next_day(history, gap_h=6):
    """The 24 target hours starting ``gap_h`` h after the history, as when planning at 18:00 for the next day."""
    return pd.date_range(history.index[-1] + pd.Timedelta(hours=1 + gap_h), periods=24, freq="h")


@pytest.fixture(scope="module")
def noisy_qr():
    history = daily_history(noise=0.5, seed=1)
    return forecast_arrivals(history, next_day(history), quantile=0.9, method="qr")


def test_qr_is_non_negative_and_its_upper_quantiles_are_above_the_central(noisy_qr):
    fc = noisy_qr
    assert fc.method == "qr" and len(fc.core_hours) == 24
    for values in (fc.core_hours, fc.median_core_hours, fc.hourly_upper_core_hours, fc.upper_core_hours):
        assert np.isfinite(values).all() and (values >= 0).all()
    assert (fc.hourly_upper_core_hours >= fc.median_core_hours).all()
    assert (fc.hourly_upper_core_hours >= fc.core_hours).all()
    assert fc.rel_error_quantile >= 0
    np.testing.assert_allclose(fc.upper_core_hours, fc.core_hours * (1 + fc.rel_error_quantile))


def test_ewma_stays_the_default_and_a_bad_method_is_refused():
    history = weekly_history()
    target = next_day(history)
    fc = forecast_arrivals(history, target)
    assert fc.method == "ewma"
    np.testing.assert_allclose(fc.median_core_hours, fc.core_hours)  # one point forecast: median = central
    with pytest.raises(InputError) as err:
        forecast_arrivals(history, target, method="arima")
    assert err.value.field == "method"


def test_qr_of_a_constant_history_is_that_constant():
    history = pd.Series(50.0, index=daily_history().index)
    fc = forecast_arrivals_qr(history, next_day(history))
    for values in (fc.core_hours, fc.median_core_hours, fc.hourly_upper_core_hours, fc.upper_core_hours):
        np.testing.assert_allclose(values, 50.0, rtol=1e-6)
    assert fc.rel_error_quantile == pytest.approx(0.0, abs=1e-9)


def test_qr_learns_a_daily_shape_that_a_flat_mean_misses():
    full = daily_history(days=64, noise=0.1, seed=2)
    target = full.index[-24:]
    history = full.iloc[:-30]  # the history ends 6 h before the target day
    actual = full.reindex(target).to_numpy()
    fc = forecast_arrivals_qr(history, target)
    wape = lambda f: np.abs(actual - f).sum() / actual.sum()  # noqa: E731
    assert wape(fc.core_hours) < 0.15
    assert wape(fc.core_hours) < 0.3 * wape(np.full(24, history.mean()))
    assert fc.core_hours.sum() == pytest.approx(actual.sum(), rel=0.1)


def test_qr_reads_only_the_history_before_the_target():
    history = daily_history(days=64, noise=0.3)
    target = history.index[-24:]
    spoiled = history.copy()
    spoiled.iloc[-24:] = 1e6
    np.testing.assert_allclose(forecast_arrivals_qr(spoiled, target).core_hours,
                               forecast_arrivals_qr(history, target).core_hours)


@pytest.mark.parametrize("bad, field", [
    (lambda s: s.where(s.index != s.index[100]), "flexible_arrived_core_hours"),  # NaN
    (lambda s: s.iloc[-(QR_MIN_HISTORY_H - 1):], "flexible_arrived_core_hours"),  # too short
    (lambda s: s.resample("30min").ffill(), "hour"),  # half-hourly
    (lambda s: s.resample("D").sum(), "hour"),  # daily
    (lambda s: s.tz_localize(None), "hour"),  # naive times
])
def test_qr_bad_history_names_the_field(bad, field):
    history = daily_history(days=35)
    with pytest.raises(InputError) as err:
        forecast_arrivals_qr(bad(history), next_day(history))
    assert err.value.field == field


@pytest.mark.parametrize("hours, field", [
    (lambda t: t[::2], "hours"),  # not consecutive
    (lambda t: t + pd.Timedelta(days=7), "hours"),  # a week or more ahead
    (lambda t: t[:0], "hours"),  # none
])
def test_qr_bad_target_hours_name_the_field(hours, field):
    history = daily_history(days=35)
    with pytest.raises(InputError) as err:
        forecast_arrivals_qr(history, hours(next_day(history)))
    assert err.value.field == field


@settings(max_examples=5)
@given(seed=st.integers(0, 2**16), scale=st.floats(0.01, 1e4), zero_share=st.floats(0.0, 0.5))
def test_qr_is_scale_equivariant_and_ordered(seed, scale, zero_share):
    """Heavy-tailed arrivals with zero hours: scaling the history scales every forecast, and the bands hold."""
    rng = np.random.default_rng(seed)
    hours = pd.date_range("2022-03-01", periods=QR_MIN_HISTORY_H, freq="h", tz="UTC")
    values = rng.lognormal(0.0, 1.0, len(hours)) * (rng.random(len(hours)) >= zero_share)
    history = pd.Series(values, index=hours)
    target = next_day(history)
    base = forecast_arrivals_qr(history, target)
    scaled = forecast_arrivals_qr(history * scale, target)
    for name in ("core_hours", "median_core_hours", "hourly_upper_core_hours", "upper_core_hours"):
        assert (getattr(base, name) >= 0).all()
        np.testing.assert_allclose(getattr(scaled, name), getattr(base, name) * scale, rtol=1e-6, atol=1e-9 * scale)
    assert (base.hourly_upper_core_hours >= base.median_core_hours).all()
    assert base.rel_error_quantile == pytest.approx(scaled.rel_error_quantile, rel=1e-6, abs=1e-9)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 200), st.integers(-300, 300), st.integers(1, 100), st.sampled_from(["s", "us", "ns"]),
       st.booleans())
def test_values_at_is_reindex(n, shift, m, unit, half_hour):
    """The fast lookup the EWMA uses answers exactly as pandas' reindex, whatever the datetime unit, with gaps,
    and off the history's grid (a half-hour target grid matches nothing)."""
    from cicm.models.arrivals import values_at

    idx = pd.date_range("2022-01-01", periods=n, freq="h", tz="UTC").as_unit(unit)
    if n > 3:
        idx = idx.delete([1])
    history = pd.Series(np.random.default_rng(n).random(len(idx)), index=idx)
    at = pd.date_range(pd.Timestamp("2022-01-01", tz="UTC") + pd.Timedelta(hours=shift, minutes=30 * half_hour),
                       periods=m, freq="h")
    assert np.array_equal(values_at(history, at), history.reindex(at).to_numpy(float), equal_nan=True)


# --- the batched EWMA (forecast_arrivals_grid) is THE implementation: each row equals forecast_arrivals alone ---

def _reference_forecast(history: pd.Series, hours: pd.DatetimeIndex, quantile: float = 0.9):
    """The per-series pandas forecast as it was before the grid engine (reindex by timestamp, groupby by day)."""
    from cicm.models.arrivals import values_at

    values = history.astype(float).sort_index()
    values = values[values.index < hours[0]]

    def ewma(at):
        num, den = np.zeros(len(at)), np.zeros(len(at))
        for k in range(1, 5):
            past = values_at(values, at - k * pd.Timedelta(days=7))
            ok = ~np.isnan(past)
            num[ok] += 0.5 ** k * past[ok]
            den[ok] += 0.5 ** k
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / den, np.nan)

    central = ewma(hours)
    central = np.where(np.isnan(central), np.nanmean(central), central)
    end = hours[0].floor("D")
    past = pd.date_range(end - pd.Timedelta(days=28), end, freq="h", inclusive="left")
    frame = pd.DataFrame({"f": ewma(past), "a": values_at(values, past)}, index=past).dropna()
    daily = frame.groupby(frame.index.floor("D")).sum()
    daily = daily[daily["f"] > 0]
    q = max(float(np.quantile(daily["a"] / daily["f"] - 1.0, quantile)), 0.0) if len(daily) >= 7 else 0.0
    return central, q


def _random_histories(seed: int, n: int = 6):
    rng = np.random.default_rng(seed)
    end = pd.Timestamp("2022-06-14 01:00", tz="UTC")
    out = []
    for i in range(n):
        length = int(rng.integers(24 * 8, 24 * 70))
        idx = pd.date_range(end - pd.Timedelta(hours=length), periods=length, freq="h")
        values = rng.gamma(2.0, 10.0, length) * (rng.random(length) > 0.3) * (1 + i)
        s = pd.Series(values, index=idx)
        if i % 2:
            s = s.drop(s.index[rng.choice(length, length // 5, replace=False)])  # gaps
        out.append(s)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tz", ["UTC", "America/Los_Angeles"])
def test_the_grid_forecast_equals_each_history_alone_and_the_pandas_reference(seed, tz):
    from cicm.models.arrivals import forecast_arrivals_grid, history_grid

    histories = _random_histories(seed)
    hours = pd.date_range(pd.Timestamp("2022-06-15", tz=tz), periods=42, freq="h")
    singles = [forecast_arrivals(h, hours) for h in histories]
    for h, fc in zip(histories, singles):
        central, q = _reference_forecast(h, hours)
        np.testing.assert_allclose(fc.core_hours, central, rtol=1e-12)
        assert fc.rel_error_quantile == pytest.approx(q, rel=1e-12, abs=1e-15)
        raw = seasonal_ewma(h, hours)
        np.testing.assert_allclose(raw[~np.isnan(raw)], central[~np.isnan(raw)], rtol=1e-12)
    # one grid for all histories (a common start), plus a row with no history at all
    start = min(h.index[0] for h in histories)
    grid = np.full((len(histories) + 1, int((hours[0] - start) / pd.Timedelta(hours=1))), np.nan)
    for i, h in enumerate(histories):
        row, row_start = history_grid(h, hours)
        offset = int((row_start - start.value) // 3_600_000_000_000)
        grid[i, offset:offset + row.size] = row
    batch = forecast_arrivals_grid(grid, start.value, hours)
    for i, fc in enumerate(singles):
        assert batch.problems[i] is None
        np.testing.assert_allclose(batch.core_hours[i], fc.core_hours, rtol=1e-12)
        np.testing.assert_allclose(batch.upper_core_hours[i], fc.upper_core_hours, rtol=1e-12)
        assert batch.rel_error_quantile[i] == pytest.approx(fc.rel_error_quantile, rel=1e-12, abs=1e-15)
    assert isinstance(batch.problems[-1], InputError) and np.isnan(batch.core_hours[-1]).all()
    with pytest.raises(InputError, match="no arrival history"):
        batch.row(len(histories))
    # row order does not matter
    flipped = forecast_arrivals_grid(grid[::-1], start.value, hours)
    np.testing.assert_allclose(flipped.core_hours[1:][::-1], batch.core_hours[:-1], rtol=1e-12)
