"""Power model per power domain (cicm.models.power)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cicm.errors import InputError
from cicm.models.power import (
    PowerModel,
    clean_power_samples,
    cluster_power_kw,
    cluster_slope_kw_per_core,
    fit_power_model,
    load_specpower,
    next_day_mape_pct,
    predict_power_kw,
    slope_kw_per_core,
    specpower_curve_w,
)
from cicm.paths import bundled_data_dir

SPEC_PATH = bundled_data_dir() / "server_power/specpower_ssj2008_619_servers_via_green-coding-solutions_cloud-energy.csv"
NOW = pd.Timestamp("2022-03-08", tz="UTC")


@pytest.fixture(scope="module")
def spec() -> pd.DataFrame:
    return load_specpower(SPEC_PATH)


def _index(days: float = 7, freq: str = "5min", end: pd.Timestamp = NOW) -> pd.DatetimeIndex:
    return pd.date_range(end - pd.Timedelta(days=days), end, freq=freq, inclusive="left", name="time")


def _triangle_load(idx: pd.DatetimeIndex, lo: float = 0.05, hi: float = 1.0) -> np.ndarray:
    """Load fraction sweeping lo -> hi -> lo once a day, linearly (uniform coverage of the range)."""
    t = (idx - idx[0]).total_seconds().to_numpy() / 86400.0
    return lo + (hi - lo) * (1 - np.abs(2 * (t % 1.0) - 1))


def _pwl_truth(u: np.ndarray) -> np.ndarray:
    """A 3-segment curve with breakpoints at 40, 70 (range 10..100 cores): 20 kW + 0.5/0.2/0.9 kW per core."""
    return 20 + 0.5 * u + (0.2 - 0.5) * np.maximum(0, u - 40) + (0.9 - 0.2) * np.maximum(0, u - 70)


def _pwl_samples(seed: int = 0, noise: float = 0.01, days: float = 8) -> tuple[pd.Series, pd.Series]:
    """15-minute samples of `_pwl_truth`, CPU sweeping 10 -> 100 -> 10 cores over the 7 days before NOW
    (slowly, as a large power domain does: the outlier rules keep every noise-only sample)."""
    idx = _index(days, "15min", NOW + pd.Timedelta(days=1))
    t = (idx - (NOW - pd.Timedelta(days=7))).total_seconds().to_numpy() / 86400 / 7
    u = 10 + 90 * (1 - np.abs(2 * (t % 1.0) - 1))
    rng = np.random.default_rng(seed)
    power = _pwl_truth(u) * (1 + noise * rng.standard_normal(len(u)))
    return pd.Series(u, idx), pd.Series(power, idx)


# ------------------------------------------------------------------------------------------ fitting


def test_recovers_a_three_segment_curve():
    cpu, power = _pwl_samples()
    model = fit_power_model(cpu, power, NOW)
    assert model.breakpoints_cpu_cores == pytest.approx((10, 40, 70, 100), abs=1.0)  # a few low ones cleaned
    grid = np.linspace(10, 100, 50)
    assert np.abs(predict_power_kw(model, grid) / _pwl_truth(grid) - 1).max() < 0.02
    assert model.segment_slopes_kw_per_core == pytest.approx((0.5, 0.2, 0.9), abs=0.05)
    assert model.r2 > 0.95
    assert model.mape_pct < 2
    assert model.fitted_at == NOW and model.window_end == NOW
    assert model.window_start == NOW - pd.Timedelta(days=7)


def test_uses_only_the_window_and_wls_weights():
    cpu, power = _pwl_samples(days=12)
    model = fit_power_model(cpu, power, NOW, clean=False)
    inside = (cpu.index >= NOW - pd.Timedelta(days=7)) & (cpu.index < NOW)
    assert model.n_samples == inside.sum()
    # data outside [now - 7 d, now) do not matter
    wild = power.copy()
    wild[~inside] = 1e6
    assert fit_power_model(cpu, wild, NOW, clean=False) == model
    # coefficients are the weighted least squares solution with weight 1/(1 + age in days)
    u, p = cpu[inside].to_numpy(), power[inside].to_numpy()
    b = model.breakpoints_cpu_cores
    X = np.column_stack([np.ones_like(u), u, np.maximum(0, u - b[1]), np.maximum(0, u - b[2])])
    w = 1 / (1 + (NOW - cpu.index[inside]).total_seconds().to_numpy() / 86400)
    expected = np.linalg.lstsq(X * np.sqrt(w)[:, None], p * np.sqrt(w), rcond=None)[0]
    assert np.allclose(model.coefficients, expected, rtol=1e-8, atol=1e-10)


def test_recent_days_weigh_more():
    idx = _index(7, "15min")
    u = 10 + 90 * _triangle_load(idx, 0.0, 1.0)
    age = (NOW - idx).total_seconds().to_numpy() / 86400
    power = np.where(age > 3.5, 1.0, 2.0) * u  # the curve doubled half-way through the window
    model = fit_power_model(pd.Series(u, idx), pd.Series(power, idx), NOW)
    assert predict_power_kw(model, 50.0) > 1.5 * 50  # closer to the recent 2.0·u than to the old 1.0·u


def test_predict_extrapolates_with_end_slopes_and_clips_at_zero():
    cpu, power = _pwl_samples(noise=0.0)
    model = fit_power_model(cpu, power, NOW)
    s1, _, s3 = model.segment_slopes_kw_per_core
    lo, hi = model.breakpoints_cpu_cores[0], model.breakpoints_cpu_cores[-1]
    assert predict_power_kw(model, hi + 50) == pytest.approx(predict_power_kw(model, hi) + 50 * s3)
    assert predict_power_kw(model, lo - 5) == pytest.approx(predict_power_kw(model, lo) - 5 * s1)
    steep = PowerModel((10, 20, 30, 40), (-50.0, 1.0, 0.0, 0.0), 100, 1.0, 0.0, NOW, NOW, NOW)
    assert predict_power_kw(steep, 10.0) == 0.0
    assert slope_kw_per_core(steep, 10.0) == 0.0
    assert slope_kw_per_core(steep, 60.0) == 1.0
    assert isinstance(predict_power_kw(model, 50), float)
    assert predict_power_kw(model, np.array([[20.0, 50.0]])).shape == (1, 2)


def test_slope_matches_numeric_derivative():
    cpu, power = _pwl_samples()
    model = fit_power_model(cpu, power, NOW)
    for u in [5.0, 25.0, 55.0, 90.0, 150.0]:
        numeric = (predict_power_kw(model, u + 1e-4) - predict_power_kw(model, u - 1e-4)) / 2e-4
        assert slope_kw_per_core(model, u) == pytest.approx(numeric, rel=1e-5)


def test_round_trips_through_json():
    cpu, power = _pwl_samples()
    model = fit_power_model(cpu, power, NOW)
    again = PowerModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert again == model
    bad = model.to_dict() | {"breakpoints_cpu_cores": [1, 1, 2, 3]}
    with pytest.raises(InputError) as err:
        PowerModel.from_dict(bad)
    assert err.value.field == "breakpoints_cpu_cores"
    with pytest.raises(InputError) as err:
        PowerModel.from_dict({k: v for k, v in model.to_dict().items() if k != "coefficients"})
    assert err.value.field == "coefficients"


# -------------------------------------------------------------------------------------- bad input


def _bad(field: str, cpu, power, now=NOW):
    with pytest.raises(InputError) as err:
        fit_power_model(cpu, power, now)
    assert err.value.field == field, str(err.value)


def test_rejects_bad_input():
    cpu, power = _pwl_samples()
    nan_cpu = cpu.copy()
    nan_cpu.iloc[5] = np.nan
    _bad("cpu_cores", nan_cpu, power)
    nan_power = power.copy()
    nan_power.iloc[5] = np.nan
    _bad("power_kw", cpu, nan_power)
    _bad("power_kw", cpu, power.where(power.index != power.index[7], -1.0))
    _bad("cpu_cores", cpu.where(cpu.index != cpu.index[7], -1.0), power)
    _bad("cpu_cores", pd.Series(50.0, cpu.index), power)  # constant CPU
    _bad("cpu_cores", cpu.iloc[-20:], power.iloc[-20:], now=cpu.index[-1] + pd.Timedelta(hours=1))  # < 24
    _bad("power_kw", cpu, power.iloc[::-1])  # misaligned
    _bad("cpu_cores", cpu.tz_localize(None), power.tz_localize(None))
    _bad("now", cpu, power, now=pd.Timestamp("2022-03-08"))
    with pytest.raises(InputError) as err:
        predict_power_kw(fit_power_model(cpu, power, NOW), -1.0)
    assert err.value.field == "cpu_cores"


# ------------------------------------------------------------------------------------- outliers


def test_outlier_rules():
    idx = _index(2, "1h")
    u = 100 + 2 * np.sin(np.arange(len(idx)) / 5)  # usage moves < 0.5% per hour
    p = 50 + 0.5 * u
    jump_u, ratio_p, low_p = u.copy(), p.copy(), p.copy()
    jump_u[10] *= 1.5  # usage jumps by 50%
    ratio_p[20] *= 1.3  # power +30% while usage moves < 0.5%
    low_p[30] = 0.5 * p[30]  # meter dropout
    cleaned = clean_power_samples(pd.Series(jump_u, idx), pd.Series(p, idx))
    assert cleaned.n_usage_jumps == 2  # up at 10 and back down at 11
    assert idx[10] not in cleaned.cpu_cores.index and len(cleaned.cpu_cores) == len(idx) - 2
    cleaned = clean_power_samples(pd.Series(u, idx), pd.Series(ratio_p, idx))
    assert cleaned.n_power_usage_mismatch == 2 and idx[20] not in cleaned.power_kw.index
    cleaned = clean_power_samples(pd.Series(u, idx), pd.Series(low_p, idx))
    assert cleaned.n_low_power == 1 and idx[30] not in cleaned.power_kw.index
    assert cleaned.n_usage_jumps == 0 and cleaned.n_power_usage_mismatch == 0  # the dropout's neighbours stay
    clean = clean_power_samples(pd.Series(u, idx), pd.Series(p, idx))
    assert len(clean.cpu_cores) == len(idx)
    # a lasting usage step costs one sample, not everything after it
    step_u = np.where(np.arange(len(idx)) >= 24, 1.6 * u, u)
    cleaned = clean_power_samples(pd.Series(step_u, idx), pd.Series(50 + 0.5 * step_u, idx))
    assert cleaned.n_usage_jumps == 1 and len(cleaned.cpu_cores) == len(idx) - 1


def test_cleaning_protects_the_fit():
    cpu, power = _pwl_samples()
    dirty = power.copy()
    rng = np.random.default_rng(1)
    hit = rng.choice(len(dirty), 40, replace=False)
    dirty.iloc[hit] = dirty.iloc[hit] * 0.3  # meter dropouts
    model = fit_power_model(cpu, dirty, NOW)
    grid = np.linspace(20, 100, 30)
    assert np.abs(predict_power_kw(model, grid) / _pwl_truth(grid) - 1).max() < 0.03


# -------------------------------------------------------------------------------------- clusters


def test_cluster_power_and_slope():
    cpu, power = _pwl_samples()
    a = fit_power_model(cpu, power, NOW)
    b = fit_power_model(cpu * 2, power * 3, NOW)
    shares = [0.25, 0.75]
    u = np.array([40.0, 100.0, 130.0])
    expected = predict_power_kw(a, 0.25 * u) + predict_power_kw(b, 0.75 * u)
    assert np.allclose(cluster_power_kw([a, b], shares, u), expected)
    assert isinstance(cluster_power_kw([a, b], shares, 80.0), float)
    for x in [30.0, 90.0, 140.0]:
        numeric = (cluster_power_kw([a, b], shares, x + 1e-4) - cluster_power_kw([a, b], shares, x - 1e-4)) / 2e-4
        assert cluster_slope_kw_per_core([a, b], shares, x) == pytest.approx(numeric, rel=1e-5)
    for bad in ([0.5, 0.6], [1.0], [-0.5, 1.5], [np.nan, 1.0]):
        with pytest.raises(InputError) as err:
            cluster_power_kw([a, b], bad, 10.0)
        assert err.value.field == "cpu_shares"
        with pytest.raises(InputError):
            cluster_slope_kw_per_core([a, b], bad, 10.0)


def test_next_day_mape():
    cpu, power = _pwl_samples(days=9)
    assert next_day_mape_pct(cpu, power, NOW) < 2.0
    with pytest.raises(InputError):
        next_day_mape_pct(cpu, power, NOW + pd.Timedelta(days=2))  # nothing to score


# ------------------------------------------------------------------------------------ SPECpower


def test_load_specpower(spec):
    assert len(spec) == 619
    assert spec.loc[0, "cores"] == 12 and spec.loc[0, "threads"] == 24
    load, watts = specpower_curve_w(spec.iloc[0])
    assert np.allclose(load, np.linspace(0, 1, 11))
    assert watts[0] == pytest.approx(69.2) and watts[-1] == pytest.approx(258.0)
    with pytest.raises(InputError):
        specpower_curve_w({"watts_active_idle": 1.0})


def _spec_samples(row, seed: int, noise: float):
    load, watts = specpower_curve_w(row)
    idx = _index(7, "5min")
    frac = _triangle_load(idx)  # 5% .. 100% load
    rng = np.random.default_rng(seed)
    cores = float(row["threads"])
    cpu = frac * cores * (1 + 0.5 * noise * rng.standard_normal(len(idx)))
    power_kw = np.interp(frac, load, watts) / 1000 * (1 + noise * rng.standard_normal(len(idx)))
    return pd.Series(cpu, idx), pd.Series(power_kw, idx), load, watts, cores


@settings(max_examples=60, deadline=None)
@given(server=st.integers(0, 618), seed=st.integers(0, 2**16))
def test_spec_servers_fit_within_tolerance(spec, server, seed):
    """Fitting on noisy telemetry (1% power noise, 0.5% usage noise) along a SPEC curve, 5%..100% load.

    The estimation error (noisy fit vs the fit on noise-free samples) stays within 2% at 10%..100% load.
    The three-segment model cannot follow every published SPEC curve within 2% (most curves bend more
    than three segments allow, see docs/models.md), so the error against the published watts is bounded by
    the structural error measured over all 619 servers (max 7.8%, mean over the 10 points 3.5%) plus 1 point.
    """
    row = spec.iloc[server]
    cpu, power, load, watts, cores = _spec_samples(row, seed, noise=0.01)
    clean_cpu, clean_power, *_ = _spec_samples(row, seed, noise=0.0)
    # clean=False: the 80%-of-daily-median rule would drop the low-load hours of a 5%..100% daily sweep
    noisy = fit_power_model(cpu, power, NOW, clean=False)
    exact = fit_power_model(clean_cpu, clean_power, NOW, clean=False)
    points = load[1:] * cores
    noisy_w = predict_power_kw(noisy, points) * 1000
    exact_w = predict_power_kw(exact, points) * 1000
    assert np.abs(noisy_w / exact_w - 1).max() < 0.02
    ape = np.abs(noisy_w / watts[1:] - 1)
    assert ape.max() < 0.088
    assert ape.mean() < 0.045


def test_spec_fleet_accuracy(spec):
    """Noise-free fits over all 619 servers: mean error at 10%..100% load ≤ 2% for at least 90% of them."""
    mean_ape, max_ape = [], []
    for _, row in spec.iterrows():
        cpu, power, load, watts, cores = _spec_samples(row, 0, noise=0.0)
        model = fit_power_model(cpu, power, NOW, clean=False)
        ape = np.abs(predict_power_kw(model, load[1:] * cores) * 1000 / watts[1:] - 1)
        mean_ape.append(ape.mean())
        max_ape.append(ape.max())
    mean_ape, max_ape = np.array(mean_ape), np.array(max_ape)
    assert (mean_ape <= 0.02).mean() >= 0.90
    assert np.median(max_ape) < 0.03
    assert max_ape.max() < 0.08
