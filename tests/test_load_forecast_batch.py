"""Batched load forecasts (cicm.models.load.forecast_load_batch): the same numbers as forecast_load per cluster."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cicm.errors import InputError
from cicm.models.load import LoadForecast, forecast_load, forecast_load_batch, local_day_hours

from load_reference import naive_adjust_fits, naive_week_ahead, naive_week_ahead_mape, reference_week_ahead_mape
from test_load_forecast import TZ, eve, synthetic_history, with_daily_flexible

DAY = "2022-04-12"
HOURS, NOW = local_day_hours(DAY, TZ), eve(DAY)


def cluster_frame(seed: int, days: int = 110, start: str = "2022-01-03", **kw) -> pd.DataFrame:
    """A realistic cluster: weekly hourly pattern, its own level, noise and a wandering daily flexible load."""
    rng = np.random.default_rng(seed)
    frame = synthetic_history(start=start, days=days, seed=seed, level=float(rng.uniform(50, 5000)),
                              noise=float(rng.uniform(0.005, 0.06)), amplitude=float(rng.uniform(0, 0.5)), **kw)[0]
    daily = frame["flexible_cpu_cores"].mean() * np.exp(np.cumsum(rng.normal(0, 0.04, days + 1)))
    daily *= np.exp(rng.normal(0, 0.15, days + 1))
    return with_daily_flexible(frame, daily, seed)


def long_frame(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """As the store's query returns it: cluster, hour, the three columns, ordered by cluster, hour."""
    return pd.concat([f.rename_axis("hour").reset_index().assign(cluster=name) for name, f in frames.items()],
                     ignore_index=True)[["cluster", "hour", "inflexible_cpu_cores", "flexible_cpu_cores",
                                         "reserved_cpu_cores"]]


def assert_params_close(a, b, path="parameters"):
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        for key in a:
            assert_params_close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_params_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-9, abs=1e-12), path
    else:
        assert a == b and type(a) is type(b), path


def assert_same_forecast(got: LoadForecast, want: LoadForecast):
    assert isinstance(got, LoadForecast)
    assert (got.status, got.reason, got.gamma, got.issued_at) == (want.status, want.reason, want.gamma, want.issued_at)
    assert got.target_hours.equals(want.target_hours)
    for name in ("inflexible_cpu_cores", "inflexible_upper_cpu_cores", "reservation_ratio"):
        g, w = getattr(got, name), getattr(want, name)
        assert g.index.equals(w.index) and g.name == w.name
        np.testing.assert_allclose(g.to_numpy(), w.to_numpy(), rtol=1e-9, atol=0)
    for name in ("flexible_core_hours", "reservations_core_hours", "theta_core_hours",
                 "reservations_rel_error_q97", "inflexible_rel_error_upper"):
        g, w = getattr(got, name), getattr(want, name)
        assert (g is None) == (w is None), name
        if w is not None:
            assert g == pytest.approx(w, rel=1e-9, abs=1e-12), name
    assert_params_close(got.parameters, want.parameters)


def assert_same_error(got, frame, hours=HOURS, now=NOW, **kw):
    with pytest.raises(InputError) as err:
        forecast_load(frame, hours, TZ, 0.05, now, **kw)
    assert isinstance(got, InputError)
    assert (got.field, got.message) == (err.value.field, err.value.message)


@pytest.fixture(scope="module")
def fleet() -> dict[str, pd.DataFrame]:
    return {f"sj-{i:02d}": cluster_frame(i) for i in range(12)}


@pytest.fixture(scope="module")
def singles(fleet) -> dict[str, LoadForecast]:
    return {name: forecast_load(frame, HOURS, TZ, 0.05, NOW) for name, frame in fleet.items()}


def test_batch_equals_forecast_load_per_cluster(fleet, singles):
    out = forecast_load_batch(long_frame(fleet), HOURS, TZ, 0.05, NOW)
    assert list(out) == list(fleet)
    for name, want in singles.items():
        assert want.ok
        assert_same_forecast(out[name], want)
    # real numbers, not just agreement: the flexible model is selected per cluster, the parameters differ
    assert len({fc.parameters["inflexible"]["alpha"] * 10 + fc.parameters["inflexible"]["beta"]
                for fc in out.values()}) > 1
    assert all(fc.theta_core_hours >= fc.reservations_core_hours > 0 for fc in out.values())


def test_batch_with_options_and_unsorted_rows(fleet):
    frames = dict(list(fleet.items())[:4])
    options = dict(adjust_window_days=20, error_window_days=30, ratio_days=7, alpha_grid=(0.1, 0.5),
                   beta_grid=(0.2, 0.7))
    now = HOURS[0]  # at midnight: lag 1
    long = long_frame(frames).sample(frac=1.0, random_state=1)  # any row order
    out = forecast_load_batch(long, HOURS, TZ, 0.2, now, **options)
    for name, frame in frames.items():
        want = forecast_load(frame, HOURS, TZ, 0.2, now, **options)
        assert want.parameters["lag_days"] == 1
        assert_same_forecast(out[name], want)


def test_mixed_batch_errors_and_short_histories_leave_the_others_alone(fleet, singles):
    good = dict(list(fleet.items())[:3])
    frames = dict(good)
    base = fleet["sj-05"]
    frames["gap"] = base.drop(base.index[300])
    nan = base.copy()
    nan.iloc[400, 1] = np.nan
    frames["nan"] = nan
    frames["dup"] = pd.concat([base.iloc[:500], base.iloc[499:]])
    negative = base.copy()
    negative.iloc[100, 2] = -1.0
    frames["negative"] = negative
    frames["short"] = cluster_frame(40, days=110, start="2022-03-20")  # 22 complete days before the target
    frames["stale"] = cluster_frame(41, days=60)  # data stop 6 weeks before the target day
    out = forecast_load_batch(long_frame(frames), HOURS, TZ, 0.05, NOW)
    assert list(out) == list(frames)
    for name in good:
        assert_same_forecast(out[name], singles[name])
    for name in ("gap", "nan", "dup", "negative"):
        assert_same_error(out[name], frames[name])
    assert out["gap"].field == "hour" and out["nan"].field == "flexible_cpu_cores"
    assert out["dup"].field == "hour" and out["negative"].field == "reserved_cpu_cores"
    for name, words in (("short", "need 28"), ("stale", "7 allowed")):
        want = forecast_load(frames[name], HOURS, TZ, 0.05, NOW)
        assert want.status == "insufficient-history" and words in want.reason
        assert_same_forecast(out[name], want)
    # a NaN after `now` is never read, in a batch as alone
    future = base.copy()
    future.loc[future.index + pd.Timedelta(hours=1) > NOW, "inflexible_cpu_cores"] = np.nan
    assert_same_forecast(forecast_load_batch(long_frame({"f": future}), HOURS, TZ, 0.05, NOW)["f"],
                         singles["sj-05"])


def test_different_history_lengths_in_one_batch():
    frames = {
        "long": cluster_frame(50, days=200, start="2021-09-20"),  # longer than max_history_days
        "mid": cluster_frame(51, days=75, start="2022-01-28"),
        "late": cluster_frame(52, days=40, start="2022-03-09"),  # starts mid-day before the DST change
        "mid2": cluster_frame(53, days=75, start="2022-01-28"),
    }
    frames["late"] = frames["late"].iloc[7:]
    out = forecast_load_batch(long_frame(frames), HOURS, TZ, 0.05, NOW)
    days = []
    for name, frame in frames.items():
        want = forecast_load(frame, HOURS, TZ, 0.05, NOW)
        assert want.ok
        assert_same_forecast(out[name], want)
        days.append(want.parameters["history_days"])
    assert len(set(days)) == 3


@pytest.mark.parametrize("day, n_hours, start", [("2022-03-13", 23, "2022-01-03"), ("2022-11-06", 25, "2022-08-01")])
def test_dst_target_days(day, n_hours, start):
    hours, now = local_day_hours(day, TZ), eve(day)
    assert len(hours) == n_hours
    frames = {f"c{i}": cluster_frame(60 + i, days=110, start=start) for i in range(3)}
    out = forecast_load_batch(long_frame(frames), hours, TZ, 0.05, now)
    for name, frame in frames.items():
        want = forecast_load(frame, hours, TZ, 0.05, now)
        assert want.ok and len(want.inflexible_cpu_cores) == n_hours
        assert_same_forecast(out[name], want)


def test_shared_arguments_raise(fleet):
    long = long_frame(dict(list(fleet.items())[:2]))
    for call, field in (
        (lambda: forecast_load_batch(long, HOURS, "Nowhere/City", 0.05, NOW), "tz"),
        (lambda: forecast_load_batch(long, HOURS, TZ, 1.5, NOW), "gamma"),
        (lambda: forecast_load_batch(long, HOURS, TZ, 0.05, HOURS[5]), "now"),
        (lambda: forecast_load_batch(long, HOURS[:-1], TZ, 0.05, NOW), "target_hours"),
        (lambda: forecast_load_batch(long.drop(columns="cluster"), HOURS, TZ, 0.05, NOW), "cluster"),
        (lambda: forecast_load_batch(long.drop(columns="flexible_cpu_cores"), HOURS, TZ, 0.05, NOW),
         "flexible_cpu_cores"),
        (lambda: forecast_load_batch(long.assign(hour=long["hour"].dt.tz_localize(None)), HOURS, TZ, 0.05, NOW),
         "hour"),
    ):
        with pytest.raises(InputError) as err:
            call()
        assert err.value.field == field


POOL = [f"p{i}" for i in range(6)]


@pytest.fixture(scope="module")
def pool():
    frames = {name: cluster_frame(70 + i, days=75 + 5 * (i % 3), start="2022-01-20") for i, name in enumerate(POOL)}
    gap = frames["p5"]
    frames["p5"] = gap.drop(gap.index[100])  # one error in the pool
    return frames, forecast_load_batch(long_frame(frames), HOURS, TZ, 0.05, NOW)


@settings(max_examples=8, deadline=None)
@given(order=st.permutations(POOL), split=st.integers(1, len(POOL) - 1))
def test_order_and_splitting_do_not_change_results(pool, order, split):
    frames, reference = pool
    first = forecast_load_batch(long_frame({n: frames[n] for n in order[:split]}), HOURS, TZ, 0.05, NOW)
    second = forecast_load_batch(long_frame({n: frames[n] for n in order[split:]}), HOURS, TZ, 0.05, NOW)
    assert list(first) + list(second) == list(order)
    for name, got in {**first, **second}.items():
        want = reference[name]
        if isinstance(want, InputError):
            assert isinstance(got, InputError) and (got.field, got.message) == (want.field, want.message)
        else:
            assert_same_forecast(got, want)


# ------------------------------------------------------------------------------ the engine's shortcuts


@pytest.mark.parametrize("lag", [1, 2])
@pytest.mark.parametrize("periods", [24, 1])
def test_week_ahead_grid_mape_equals_the_reference_arithmetic(lag, periods):
    """The one-pass identity of `_week_ahead_ape_sums_fast` gives the grid's MAPE to round-off and the same
    choice; clusters whose best members are within round-off of each other (noise-free, constant) and zero
    clusters get the reference arithmetic's numbers exactly."""
    from cicm.models.load.series import ALPHA_GRID, BETA_GRID, _week_ahead_pick

    rng = np.random.default_rng(periods + lag)
    n = 130
    days = np.arange(n)[:, None]
    hod = np.arange(periods)[None, :]
    shape = (1 + 0.3 * np.sin(2 * np.pi * hod / 24)) * np.where(days % 7 >= 5, 0.8, 1.0)
    noisy = [rng.uniform(10, 1000) * shape * np.exp(rng.normal(0, rng.uniform(0.005, 0.1), (n, periods)))
             for _ in range(20)]
    sparse = noisy[0] * (rng.random((n, periods)) < 0.7)  # zero hours: not scored
    X = np.stack(noisy + [sparse, 100 * shape, np.full((n, periods), 50.0), np.zeros((n, periods))])
    got, n_scored = _week_ahead_pick(X, lag, ALPHA_GRID, BETA_GRID)
    want = reference_week_ahead_mape(X, lag, ALPHA_GRID, BETA_GRID)
    assert n_scored == n - 6 - lag and got.shape == (len(ALPHA_GRID) * len(BETA_GRID), len(X))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(got.argmin(axis=0), want.argmin(axis=0))
    np.testing.assert_array_equal(got[:, -3:], want[:, -3:])  # noise-free, constant, zero: the reference's


def test_factorize_clusters_equals_pandas():
    from cicm.models.load.history import factorize_clusters

    names = pd.Series([f"c{i % 37:02d}" for i in range(5000)]).sort_values(kind="stable").reset_index(drop=True)
    with_nan = names.astype(object).where(names.index % 700 != 3)
    for column in (names, names.astype("string[pyarrow]"), names.astype(object), names.sample(frac=1.0, random_state=0),
                   with_nan, with_nan.astype("string[pyarrow]"), names.iloc[17:4000]):
        codes, uniques = factorize_clusters(column)
        want_codes, want_uniques = pd.factorize(column, sort=False)
        np.testing.assert_array_equal(codes, want_codes)
        assert uniques.equals(want_uniques) and uniques.dtype == want_uniques.dtype


# ------------------------------------------------------------------- the engine against plain oracles


def _weekly_series(seed: int, n: int, periods: int, clusters: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    days = np.arange(n)[:, None]
    shape = (1 + 0.3 * np.sin(2 * np.pi * np.arange(periods)[None, :] / 24)) * np.where(days % 7 >= 5, 0.8, 1.0)
    return np.stack([rng.uniform(10, 1000) * shape * np.exp(rng.normal(0, rng.uniform(0.01, 0.1), (n, periods)))
                     for _ in range(clusters)])


@pytest.mark.parametrize("lag", [1, 2, 7])
@pytest.mark.parametrize("periods", [24, 1])
def test_week_ahead_equals_the_plain_per_cluster_ewma(lag, periods):
    """The seven interleaved chains over a cluster axis (`_week_ahead_all`) and the grid's MAPE
    (`_week_ahead_pick`) are the week-ahead EWMA of the method, computed one cluster, origin and block at a time."""
    from cicm.models.load.series import _week_ahead_all, _week_ahead_pick

    X = _weekly_series(10 * lag + periods, 60, periods)
    alphas, betas = (0.1, 0.5, 0.9), (0.05, 0.35, 0.7)
    for a, b in ((0.1, 0.05), (0.5, 0.7), (0.9, 0.35)):
        got = _week_ahead_all(X, lag, np.array([a]), np.array([b]))[0]
        for c in range(len(X)):
            np.testing.assert_allclose(got[c], naive_week_ahead(X[c], lag, a, b), rtol=1e-12, equal_nan=True)
    scores, n_scored = _week_ahead_pick(X, lag, alphas, betas)
    assert n_scored == 60 - 6 - lag
    np.testing.assert_allclose(scores, naive_week_ahead_mape(X, lag, alphas, betas), rtol=1e-10)


@pytest.mark.parametrize("periods", [24, 1])
def test_rolling_adjustment_equals_a_least_squares_fit_per_origin(periods):
    """The closed-form fits from window sums (`_rolling_adjust_fits`) are, origin by origin, the least-squares
    fits over each origin's own training window."""
    from cicm.models.load.series import _adjust_rows, _rolling_adjust_fits, _week_ahead_all

    lag, window = 2, 20
    X = _weekly_series(3 + periods, 70, periods)
    WA = _week_ahead_all(X, lag, np.array([0.35]), np.array([0.2]))[0]
    lagged, ok = _adjust_rows(X, WA, lag)
    days = np.arange(70 + lag)
    coef, fitted, n_train = _rolling_adjust_fits(WA, lagged, ok, X, lag, days, window)
    assert fitted[:, -10:].all()
    for c in range(len(X)):
        want = naive_adjust_fits(X[c], WA[c], lag, days, window)
        np.testing.assert_array_equal(np.isnan(coef[c]).any(axis=1), np.isnan(want).any(axis=1))
        np.testing.assert_allclose(coef[c], want, rtol=1e-6, atol=1e-9 * np.abs(X[c]).max(), equal_nan=True)


def test_arrays_entry_equals_the_batch_in_any_row_order(fleet, singles):
    """`forecast_load_arrays` (the nightly plan's partition reads: codes, ns hours, a (3, N) value matrix) gives
    what `forecast_load` gives per cluster, whatever the row order; a name without rows gets the insufficient
    forecast of an empty history; a bad cluster its own error, worded as alone."""
    from cicm.models.load import HISTORY_COLUMNS, forecast_load_arrays

    frames = dict(fleet)
    bad = frames["sj-03"].copy()
    bad.iloc[40, 0] = -1.0  # a negative inflexible value
    frames["sj-03"] = bad
    long = long_frame(frames).sample(frac=1.0, random_state=2)
    names = [*frames, "no-rows"]
    codes = pd.Index(names).get_indexer(long["cluster"])
    hour_ns = pd.DatetimeIndex(long["hour"]).tz_convert("UTC").as_unit("ns").asi8
    values = long[list(HISTORY_COLUMNS)].to_numpy().T
    out = forecast_load_arrays(codes, names, hour_ns, values, HOURS, TZ, 0.05, NOW)
    assert list(out) == names
    for name, want in singles.items():
        if name != "sj-03":
            assert_same_forecast(out[name], want)
    assert_same_error(out["sj-03"], bad)
    empty = forecast_load(long_frame(fleet).iloc[:0].set_index("hour")[list(HISTORY_COLUMNS)], HOURS, TZ, 0.05, NOW)
    assert not out["no-rows"].ok
    assert_same_forecast(out["no-rows"], empty)
    with pytest.raises(InputError):
        forecast_load_arrays(codes, names[:2], hour_ns, values, HOURS, TZ, 0.05, NOW)
