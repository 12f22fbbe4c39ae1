"""fit_power_models_batch: many power domains at once, the same numbers as fit_power_model and statsmodels."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from hypothesis import given, settings
from hypothesis import strategies as st

from cicm.errors import InputError
from cicm.models.power import (
    PowerModel,
    clean_power_samples,
    fit_power_model,
    fit_power_models_batch,
    load_specpower,
    specpower_curve_w,
)
from cicm.paths import bundled_data_dir

SPEC_PATH = bundled_data_dir() / "server_power/specpower_ssj2008_619_servers_via_green-coding-solutions_cloud-energy.csv"
NOW = pd.Timestamp("2022-03-08", tz="UTC")
HOURS = pd.date_range(NOW - pd.Timedelta(days=8), NOW, freq="1h", inclusive="left")


def _domain(spec: pd.DataFrame, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hour positions, cpu cores, kW) of a power domain of n servers of one SPECpower model: a daily load
    cycle with noise, meter dropouts, usage jumps, power/usage mismatches, missing hours, a late start."""
    server = spec.iloc[rng.integers(len(spec))]
    load, watts = specpower_curve_w(server)
    servers = int(rng.integers(20, 400))
    cores = float(server["threads"]) * servers
    t = np.arange(len(HOURS))
    lo, hi = rng.uniform(0.1, 0.4), rng.uniform(0.6, 0.95)
    frac = lo + (hi - lo) * (0.5 + 0.5 * np.sin(2 * np.pi * (t / 24 + rng.uniform())))
    frac = np.clip(frac + 0.02 * rng.standard_normal(len(t)), 0.01, 1.0)
    cpu = frac * cores
    kw = np.interp(frac, load, watts) * servers / 1000 * (1 + 0.01 * rng.standard_normal(len(t)))
    kw[rng.choice(len(t), rng.integers(0, 5), replace=False)] *= 0.3  # meter dropouts
    cpu[rng.choice(len(t), rng.integers(0, 4), replace=False)] *= 1.6  # usage jumps
    kw[rng.choice(len(t), rng.integers(0, 4), replace=False)] *= 1.4  # power/usage mismatches
    keep = rng.uniform(size=len(t)) > rng.uniform(0, 0.15)  # missing hours
    keep[: int(rng.integers(0, 60)) if rng.uniform() < 0.3 else 0] = False  # shorter histories
    return t[keep], cpu[keep], kw[keep]


def _fleet(spec: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """A long telemetry frame as the DuckDB query returns it (ORDER BY domain, hour), with a cluster column."""
    rng = np.random.default_rng(seed)
    parts = []
    for i in range(n):
        t, cpu, kw = _domain(spec, rng)
        parts.append(pd.DataFrame({"cluster": f"c{i // 2:04d}", "domain": f"c{i // 2:04d}-pd{i % 2}",
                                   "hour": HOURS[t], "cpu_cores": cpu, "power_kw": kw}))
    return pd.concat(parts, ignore_index=True)


@pytest.fixture(scope="module")
def spec() -> pd.DataFrame:
    return load_specpower(SPEC_PATH)


@pytest.fixture(scope="module")
def fleet(spec) -> pd.DataFrame:
    return _fleet(spec, 160, seed=7)


def _one(telemetry: pd.DataFrame, domain: str) -> tuple[pd.Series, pd.Series]:
    data = telemetry[telemetry["domain"] == domain].set_index("hour")
    return data["cpu_cores"], data["power_kw"]


def _single(telemetry: pd.DataFrame, domain: str, **kwargs) -> PowerModel | InputError:
    try:
        return fit_power_model(*_one(telemetry, domain), NOW, **kwargs)
    except InputError as exc:
        return exc


def _assert_same(a: PowerModel | InputError, b: PowerModel | InputError, rtol: float = 1e-9) -> None:
    """Same error (field and message), or the same model: counts and breakpoints exactly, floats to rtol."""
    if isinstance(a, InputError) or isinstance(b, InputError):
        assert isinstance(a, InputError) and isinstance(b, InputError), (a, b)
        assert (a.field, a.message) == (b.field, b.message)
        return
    assert a.n_samples == b.n_samples
    assert a.breakpoints_cpu_cores == b.breakpoints_cpu_cores
    assert (a.fitted_at, a.window_start, a.window_end) == (b.fitted_at, b.window_start, b.window_end)
    _assert_coefficients(np.array(a.coefficients), np.array(b.coefficients), a.breakpoints_cpu_cores[3], rtol)
    assert a.r2 == pytest.approx(b.r2, rel=rtol, abs=rtol)
    assert a.mape_pct == pytest.approx(b.mape_pct, rel=rtol, abs=rtol)


def _assert_coefficients(got: np.ndarray, want: np.ndarray, cpu_max: float, rtol: float) -> None:
    """Relative to the size of the model: slopes to the largest slope, the intercept to the kW it spans."""
    slope_scale = np.abs(want[1:]).max()
    scale = np.array([max(abs(want[0]), slope_scale * cpu_max)] + [slope_scale] * 3)
    assert np.all(np.abs(got - want) <= rtol * scale), (got, want)


# -------------------------------------------------------------------------------------- references


def _statsmodels_fit(cpu: pd.Series, power: pd.Series, now=NOW, window_days=7, clean=True):
    """The reference: statsmodels WLS on the samples clean_power_samples keeps in the window."""
    start = now - pd.Timedelta(days=window_days)
    inside = (cpu.index >= start) & (cpu.index < now)
    cpu, power = cpu[inside], power[inside]
    if clean:
        kept = clean_power_samples(cpu, power)
        cpu, power = kept.cpu_cores, kept.power_kw
    u, p = cpu.to_numpy(), power.to_numpy()
    b = np.linspace(u.min(), u.max(), 4)
    X = np.column_stack([np.ones_like(u), u, np.maximum(0, u - b[1]), np.maximum(0, u - b[2])])
    w = 1 / (1 + (now - cpu.index).total_seconds().to_numpy() / 86400)
    result = sm.WLS(p, X, weights=w).fit()
    fitted = np.maximum(X @ result.params, 0)
    return tuple(b), result.params, len(u), result.rsquared, float(np.mean(np.abs(fitted - p) / p) * 100)


def _reference_clean(cpu: pd.Series, power: pd.Series) -> tuple[pd.DatetimeIndex, int, int, int]:
    """The outlier rules one sample at a time: (kept times, n low power, n usage jumps, n mismatches)."""
    day_median = power.groupby(power.index.floor("D")).transform("median")
    kept1 = [t for t in power.index if power[t] >= 0.8 * day_median[t]]
    kept2, prev = [], None
    for t in kept1:  # rule 2 compares with the previous sample that survived rule 1
        u, u0 = cpu[t], (None if prev is None else cpu[prev])
        jump = u0 is not None and (u != 0 if u0 == 0 else abs(u - u0) / u0 > 0.30)
        if not jump:
            kept2.append(t)
        prev = t
    kept3, prev = [], None
    for t in kept2:  # rule 3 compares with the previous sample that survived rule 2
        if prev is None:
            kept3.append(t)
        else:
            du = abs(cpu[t] - cpu[prev]) / cpu[prev] if cpu[prev] else (0.0 if cpu[t] == cpu[prev] else np.inf)
            dp = abs(power[t] - power[prev]) / power[prev] if power[prev] else (0.0 if power[t] == 0 else np.inf)
            if not (dp > 0.05 and dp > 20 * du):
                kept3.append(t)
        prev = t
    n = len(power)
    return pd.DatetimeIndex(kept3), n - len(kept1), len(kept1) - len(kept2), len(kept2) - len(kept3)


# ------------------------------------------------------------------------------------------ numbers


def test_cleaning_follows_the_rules_sample_by_sample(fleet):
    for domain in fleet["domain"].unique()[:40]:
        cpu, power = _one(fleet, domain)
        inside = cpu.index >= NOW - pd.Timedelta(days=7)
        cleaned = clean_power_samples(cpu[inside], power[inside])
        kept, n_low, n_jump, n_mismatch = _reference_clean(cpu[inside], power[inside])
        assert cleaned.cpu_cores.index.equals(kept) and cleaned.power_kw.index.equals(kept)
        assert (cleaned.n_low_power, cleaned.n_usage_jumps, cleaned.n_power_usage_mismatch) == (
            n_low, n_jump, n_mismatch)


@pytest.mark.parametrize("clean", [True, False])
def test_batch_equals_fit_power_model_and_statsmodels(fleet, clean):
    models = fit_power_models_batch(fleet, NOW, clean=clean)
    assert list(models) == list(fleet["domain"].unique())
    n_fitted = 0
    for domain, model in models.items():
        _assert_same(model, _single(fleet, domain, clean=clean), rtol=1e-12)
        if isinstance(model, InputError):
            continue
        n_fitted += 1
        breakpoints, params, n, r2, mape = _statsmodels_fit(*_one(fleet, domain), clean=clean)
        assert model.n_samples == n and model.breakpoints_cpu_cores == breakpoints
        _assert_coefficients(np.array(model.coefficients), params, breakpoints[3], 1e-9)
        assert model.r2 == pytest.approx(r2, abs=1e-12)
        assert model.mape_pct == pytest.approx(mape, rel=1e-9)
        if clean:  # and the fits are real fits
            assert model.r2 > 0.5 and model.mape_pct < 5
    assert n_fitted >= 150


@pytest.mark.filterwarnings("ignore:The design matrix is rank-deficient")
def test_singular_fits_take_the_statsmodels_pseudo_inverse():
    """CPU at three levels only: 4 coefficients, rank 3; statsmodels WLS returns the minimum-norm solution."""
    hours = HOURS[-72:]
    cpu = np.tile([10.0, 40.0, 100.0], 24)
    kw = 5 + 0.1 * cpu + 0.01 * np.sin(np.arange(72))
    frame = pd.DataFrame({"domain": "three-levels", "hour": hours, "cpu_cores": cpu, "power_kw": kw})
    model = fit_power_models_batch(frame, NOW, clean=False)["three-levels"]
    breakpoints, params, n, r2, mape = _statsmodels_fit(*_one(frame, "three-levels"), clean=False)
    assert model.n_samples == n == 72
    _assert_coefficients(np.array(model.coefficients), params, breakpoints[3], 1e-9)
    assert model.r2 == pytest.approx(r2, abs=1e-12) and model.mape_pct == pytest.approx(mape, rel=1e-9)
    _assert_same(model, fit_power_model(*_one(frame, "three-levels"), NOW, clean=False))


# -------------------------------------------------------------------------------------- failures


def test_failing_domains_get_their_error_and_leave_the_others_alone(fleet):
    good = fleet[fleet["domain"].isin(fleet["domain"].unique()[:20])]
    template = good[good["domain"] == good["domain"].iloc[0]].drop(columns="domain")
    bad = {
        "too-few": template.iloc[-20:],
        "constant-cpu": template.assign(cpu_cores=50.0),
        "nan-cpu-before-window": template.assign(cpu_cores=template["cpu_cores"].where(
            template["hour"] != template["hour"].iloc[2])),
        "negative-power": template.assign(power_kw=template["power_kw"].where(
            template["hour"] != template["hour"].iloc[-3], -1.0)),
        "infinite-cpu": template.assign(cpu_cores=template["cpu_cores"].replace(
            template["cpu_cores"].iloc[5], np.inf)),
        "duplicate-hour": pd.concat([template, template.iloc[[10]]]),
        "nothing-in-window": template.assign(hour=template["hour"] - pd.Timedelta(days=30)),
    }
    frame = pd.concat([good] + [rows.assign(domain=name) for name, rows in bad.items()], ignore_index=True)
    models = fit_power_models_batch(frame, NOW)
    alone = fit_power_models_batch(good, NOW)
    for name in bad:
        error = models[name]
        assert isinstance(error, InputError), name
        with pytest.raises(InputError) as raised:
            fit_power_model(*_one(frame, name), NOW)
        assert (error.field, error.message) == (raised.value.field, raised.value.message)
    assert "usable samples" in models["too-few"].message and "constant" in models["constant-cpu"].message
    assert "NaN" in models["nan-cpu-before-window"].message and "duplicate" in models["duplicate-hour"].message
    for domain, model in alone.items():
        _assert_same(models[domain], model, rtol=1e-12)


def test_shared_arguments_raise(fleet):
    for kwargs, field in (({"now": pd.Timestamp("2022-03-08")}, "now"), ({"window_days": 0}, "window_days"),
                          ({"window_days": float("nan")}, "window_days")):
        with pytest.raises(InputError) as err:
            fit_power_models_batch(fleet, **({"now": NOW} | kwargs))
        assert err.value.field == field
    with pytest.raises(InputError) as err:
        fit_power_models_batch(fleet.drop(columns="power_kw"), NOW)
    assert err.value.field == "telemetry"
    assert fit_power_models_batch(fleet.iloc[:0], NOW) == {}


def test_other_timestamp_units_and_zones_and_row_orders(fleet):
    part = fleet[fleet["domain"].isin(fleet["domain"].unique()[:12])]
    want = fit_power_models_batch(part, NOW)
    for other in (part.assign(hour=part["hour"].dt.as_unit("ns")),
                  part.assign(hour=part["hour"].dt.tz_convert("America/New_York")),
                  part.sample(frac=1.0, random_state=3)):
        got = fit_power_models_batch(other, NOW, window_days=7)
        assert set(got) == set(want)
        for domain in want:
            _assert_same(got[domain], want[domain], rtol=1e-12)


# ------------------------------------------------------------------------------------- properties


@settings(max_examples=12, deadline=None)
@given(order_seed=st.integers(0, 2**16), splits=st.lists(st.integers(1, 39), max_size=3))
def test_domain_order_and_splitting_change_nothing(fleet, order_seed, splits):
    names = fleet["domain"].unique()[:40]
    part = fleet[fleet["domain"].isin(names)]
    want = fit_power_models_batch(part, NOW)
    shuffled = np.random.default_rng(order_seed).permutation(names)
    got: dict = {}
    for chunk in np.split(shuffled, sorted(set(splits))):
        rows = pd.concat([part[part["domain"] == name] for name in chunk])
        got |= fit_power_models_batch(rows, NOW)
    assert list(got) == list(shuffled)
    for domain in names:
        _assert_same(got[domain], want[domain], rtol=1e-12)
