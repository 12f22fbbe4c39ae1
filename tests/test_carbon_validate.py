"""validate_forecast / to_hourly: example-based and property-based tests."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cicm.carbon.schema import FORECAST_COLUMNS, make_forecast_frame
from cicm.carbon.validate import describe_hours, to_hourly, validate_forecast
from cicm.errors import InputError

START = pd.Timestamp("2026-11-23T00:00Z")
NOW = pd.Timestamp("2026-11-22T18:00Z")


def frame(values, *, start=START, freq="h", issued=NOW, zone="Z") -> pd.DataFrame:
    times = pd.date_range(start, periods=len(values), freq=freq)
    return make_forecast_frame(zone=zone, target_times=times, issued_at=issued, gco2_per_kwh=values, provider="t")


def validate(df, hours=24, start=START, now=NOW, **kw):
    return validate_forecast(df, start=start, end=start + pd.Timedelta(hours=hours), now=now, **kw)


def field_of(excinfo) -> str:
    return excinfo.value.field


# ---------------------------------------------------------------- examples

def test_ok_returns_canonical_columns_and_dtypes():
    out = validate(frame(np.linspace(100, 400, 24)))
    assert list(out.columns) == FORECAST_COLUMNS
    assert str(out["target_hour"].dtype) == "datetime64[ns, UTC]"
    assert str(out["issued_at"].dtype) == "datetime64[ns, UTC]"
    assert out["gco2_per_kwh"].dtype == np.float64
    assert out["target_hour"].is_monotonic_increasing and len(out) == 24
    np.testing.assert_allclose(out["gco2_per_kwh"], np.linspace(100, 400, 24))


def test_rows_outside_window_are_dropped_and_ignored():
    values = [300.0] * 48
    values[40] = np.nan  # beyond the window: irrelevant
    out = validate(frame(values))
    assert len(out) == 24 and out["target_hour"].max() == START + pd.Timedelta(hours=23)


def test_five_minute_points_become_hourly_means_numerically():
    ramp = np.arange(24 * 12, dtype=float)  # 0,1,2,... per 5 minutes
    out = validate(frame(ramp, freq="5min"))
    expected = ramp.reshape(24, 12).mean(axis=1)  # 5.5, 17.5, ...
    np.testing.assert_allclose(out["gco2_per_kwh"], expected)
    assert out["gco2_per_kwh"].iloc[0] == pytest.approx(5.5)


def test_thirty_minute_points_become_hourly_means():
    values = np.array([100.0, 200.0] * 24)
    out = validate(frame(values, freq="30min"))
    np.testing.assert_allclose(out["gco2_per_kwh"], 150.0)


def test_partial_hour_of_subhourly_points_counts_as_missing():
    df = frame(np.full(24 * 12, 300.0), freq="5min").drop(index=[50])  # hour 4 loses one point
    with pytest.raises(InputError) as e:
        validate(df)
    assert field_of(e) == "target_hour" and "2026-11-23T04:00Z" in str(e.value)


def test_missing_hour_named():
    df = frame(np.full(24, 300.0)).drop(index=[7])
    with pytest.raises(InputError) as e:
        validate(df)
    assert field_of(e) == "target_hour" and "2026-11-23T07:00Z" in e.value.message


def test_missing_run_is_described_as_range():
    df = frame(np.full(24, 300.0)).drop(index=[3, 4, 5])
    with pytest.raises(InputError, match=r"2026-11-23T03:00Z\.\.2026-11-23T05:00Z \(3 h\)"):
        validate(df)


def test_duplicate_timestamp_in_raw_input():
    df = frame(np.full(24, 300.0))
    df = pd.concat([df, df.iloc[[9]]], ignore_index=True)
    with pytest.raises(InputError) as e:
        validate(df)
    assert field_of(e) == "target_hour" and "duplicate" in e.value.message and "09:00Z" in e.value.message


def test_duplicate_subhourly_point():
    df = frame(np.full(24 * 12, 300.0), freq="5min")
    df = pd.concat([df, df.iloc[[13]]], ignore_index=True)
    with pytest.raises(InputError) as e:
        validate(df)
    assert field_of(e) == "target_hour"


@pytest.mark.parametrize(
    "bad, words", [(np.nan, "NaN"), (-1.0, "negative"), (2500.0, "impossible"), (np.inf, "infinite")]
)
def test_bad_values_named(bad, words):
    values = np.full(24, 300.0)
    values[11] = bad
    with pytest.raises(InputError) as e:
        validate(frame(values))
    assert field_of(e) == "gco2_per_kwh"
    assert words in e.value.message and "2026-11-23T11:00Z" in e.value.message


def test_two_thousand_is_still_plausible_but_not_more():
    values = np.full(24, 2000.0)
    assert len(validate(frame(values))) == 24
    values[0] = 2000.5
    with pytest.raises(InputError):
        validate(frame(values))


def test_nan_in_subhourly_point_is_not_averaged_away():
    values = np.full(24 * 12, 300.0)
    values[30] = np.nan
    with pytest.raises(InputError) as e:
        validate(frame(values, freq="5min"))
    assert field_of(e) == "gco2_per_kwh"


def test_stale_forecast():
    df = frame(np.full(24, 300.0), issued=NOW - pd.Timedelta(hours=37))
    with pytest.raises(InputError) as e:
        validate(df)
    assert field_of(e) == "issued_at" and "stale" in e.value.message
    assert len(validate(df, max_age=pd.Timedelta(hours=40))) == 24


def test_forecast_from_the_future():
    with pytest.raises(InputError) as e:
        validate(frame(np.full(24, 300.0), issued=NOW + pd.Timedelta(hours=2)))
    assert field_of(e) == "issued_at"


def test_naive_target_hour_column():
    df = frame(np.full(24, 300.0))
    df["target_hour"] = df["target_hour"].dt.tz_localize(None)
    with pytest.raises(InputError) as e:
        validate(df)
    assert field_of(e) == "target_hour" and "naive" in e.value.message


def test_naive_issued_at_column():
    df = frame(np.full(24, 300.0))
    df["issued_at"] = df["issued_at"].dt.tz_localize(None)
    with pytest.raises(InputError) as e:
        validate(df)
    assert field_of(e) == "issued_at"


@pytest.mark.parametrize("name", ["start", "end", "now"])
def test_naive_window_arguments(name):
    args = {"start": START, "end": START + pd.Timedelta(hours=24), "now": NOW}
    args[name] = args[name].tz_localize(None)
    with pytest.raises(InputError) as e:
        validate_forecast(frame(np.full(24, 300.0)), **args)
    assert field_of(e) == name


def test_window_must_be_hour_aligned_and_ordered():
    df = frame(np.full(24, 300.0))
    with pytest.raises(InputError) as e:
        validate_forecast(df, start=START + pd.Timedelta(minutes=30), end=START + pd.Timedelta(hours=2), now=NOW)
    assert field_of(e) == "start"
    with pytest.raises(InputError) as e:
        validate_forecast(df, start=START, end=START, now=NOW)
    assert field_of(e) == "end"


def test_missing_column():
    with pytest.raises(InputError) as e:
        validate(frame(np.full(24, 300.0)).drop(columns=["issued_at"]))
    assert field_of(e) == "issued_at"


def test_several_zones_rejected():
    df = frame(np.full(24, 300.0))
    df.loc[3, "zone"] = "OTHER"
    with pytest.raises(InputError) as e:
        validate(df)
    assert field_of(e) == "zone"


def test_hourly_points_off_the_hour_rejected():
    df = frame(np.full(25, 300.0), start=START - pd.Timedelta(minutes=30))
    with pytest.raises(InputError) as e:
        validate(df)
    assert field_of(e) == "target_hour"


def test_dst_day_has_23_hours():
    # US/Pacific spring-forward 2026-03-08: local day = 23 UTC hours
    start = pd.Timestamp("2026-03-08").tz_localize("America/Los_Angeles").tz_convert("UTC")
    end = pd.Timestamp("2026-03-09").tz_localize("America/Los_Angeles").tz_convert("UTC")
    now = start - pd.Timedelta(hours=6)
    df = frame(np.full(30, 250.0), start=start, issued=now)
    out = validate_forecast(df, start=start, end=end, now=now)
    assert len(out) == 23


def test_to_hourly_is_pure():
    df = frame(np.arange(24 * 12, dtype=float), freq="5min")
    before = df.copy()
    to_hourly(df)
    pd.testing.assert_frame_equal(df, before)


def test_describe_hours_truncates_long_lists():
    hours = pd.date_range(START, periods=20, freq="2h")
    text = describe_hours(hours, limit=3)
    assert "(20 in total)" in text


# ---------------------------------------------------------------- properties

positive_values = st.floats(min_value=0.001, max_value=2000.0, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(positive_values, min_size=1, max_size=72), offset_h=st.integers(-48, 48))
def test_property_any_positive_finite_hourly_series_passes(values, offset_h):
    start = START + pd.Timedelta(hours=offset_h)
    out = validate(frame(values, start=start), hours=len(values), start=start)
    np.testing.assert_allclose(out["gco2_per_kwh"].to_numpy(), values)
    assert list(out["target_hour"]) == list(pd.date_range(start, periods=len(values), freq="h"))


@settings(max_examples=60, deadline=None)
@given(data=st.data(), values=st.lists(positive_values, min_size=1, max_size=48))
def test_property_a_nan_anywhere_fails_naming_gco2(data, values):
    i = data.draw(st.integers(0, len(values) - 1))
    values = list(values)
    values[i] = float("nan")
    with pytest.raises(InputError) as e:
        validate(frame(values), hours=len(values))
    assert e.value.field == "gco2_per_kwh"
    assert (START + pd.Timedelta(hours=i)).strftime("%Y-%m-%dT%H:%MZ") in e.value.message


@settings(max_examples=40, deadline=None)
@given(data=st.data(), values=st.lists(positive_values, min_size=2, max_size=48))
def test_property_dropping_any_hour_fails_naming_it(data, values):
    i = data.draw(st.integers(0, len(values) - 1))
    df = frame(values).drop(index=[i])
    with pytest.raises(InputError) as e:
        validate(df, hours=len(values))
    assert e.value.field == "target_hour"
    assert (START + pd.Timedelta(hours=i)).strftime("%Y-%m-%dT%H:%MZ") in e.value.message


@settings(max_examples=40, deadline=None)
@given(data=st.data(), values=st.lists(positive_values, min_size=1, max_size=48))
def test_property_duplicating_any_row_fails(data, values):
    i = data.draw(st.integers(0, len(values) - 1))
    df = frame(values)
    df = pd.concat([df, df.iloc[[i]]], ignore_index=True)
    with pytest.raises(InputError) as e:
        validate(df, hours=len(values))
    assert e.value.field == "target_hour"


@settings(max_examples=40, deadline=None)
@given(
    step_min=st.sampled_from([1, 5, 10, 15, 20, 30]),
    hours=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_subhourly_resampling_equals_block_means(step_min, hours, seed):
    per_hour = 60 // step_min
    values = np.random.default_rng(seed).uniform(0, 2000, hours * per_hour)
    out = validate(frame(values, freq=f"{step_min}min"), hours=hours)
    np.testing.assert_allclose(out["gco2_per_kwh"], values.reshape(hours, per_hour).mean(axis=1), rtol=1e-12)


@settings(max_examples=30, deadline=None)
@given(values=st.lists(positive_values, min_size=1, max_size=48), seed=st.integers(0, 2**32 - 1))
def test_property_row_order_does_not_matter(values, seed):
    df = frame(values)
    shuffled = df.sample(frac=1.0, random_state=seed % (2**32 - 1)).reset_index(drop=True)
    pd.testing.assert_frame_equal(validate(df, hours=len(values)), validate(shuffled, hours=len(values)))


@settings(max_examples=30, deadline=None)
@given(data=st.data(), values=st.lists(positive_values, min_size=1, max_size=48))
def test_property_a_negative_anywhere_fails(data, values):
    i = data.draw(st.integers(0, len(values) - 1))
    bad = data.draw(st.floats(max_value=-1e-9, min_value=-1e6))
    values = list(values)
    values[i] = bad
    with pytest.raises(InputError) as e:
        validate(frame(values), hours=len(values))
    assert e.value.field == "gco2_per_kwh" and "negative" in e.value.message
