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
