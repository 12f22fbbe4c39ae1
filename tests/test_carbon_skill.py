import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st

from cicm.carbon.trace import load_actual_intensity
from cicm.errors import InputError
from cicm.models.carbon_skill import forecast_value, half_day_shift_cut_pct

DESIGN_CEILING_PCT = {"CISO": 20.6, "ERCO": 9.1, "BPAT": 6.5, "MISO": 4.3}


@pytest.mark.parametrize("zone", sorted(DESIGN_CEILING_PCT))
def test_perfect_forecast_reaches_the_design_ceiling(zone):
    actual = load_actual_intensity(zone)
    value = forecast_value(actual, actual, "UTC", delta=1.0)
    assert value.days >= 360
    # The DESIGN table: the same shift over the 2022 UTC days.
    assert value.ceiling_cut_pct == pytest.approx(DESIGN_CEILING_PCT[zone], abs=0.1)
    assert value.realised_cut_pct == pytest.approx(value.ceiling_cut_pct)


def test_noise_only_forecast_is_worth_about_nothing():
    actual = load_actual_intensity("MISO")
    rng = np.random.default_rng(1)
    noise = pd.Series(rng.uniform(size=len(actual)), index=actual.index)
    value = forecast_value(noise, actual, "America/Chicago")
    assert abs(value.realised_cut_pct) < 0.5 < value.ceiling_cut_pct


def test_too_few_days_is_unknown_not_zero():
    actual = load_actual_intensity("CISO").iloc[: 24 * 5]
    assert forecast_value(actual, actual, "UTC") is None


def test_negative_intensity_is_rejected():
    actual = load_actual_intensity("CISO").iloc[: 24 * 10].copy()
    actual.iloc[3] = -1.0
    with pytest.raises(InputError, match="gco2_per_kwh"):
        forecast_value(actual, actual, "UTC")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(1, 1000), min_size=24, max_size=24), st.lists(st.floats(-1, 1), min_size=24,
                                                                         max_size=24))
def test_following_any_forecast_never_beats_perfect_foresight(actual, forecast):
    actual, forecast = np.array(actual), np.array(forecast)
    assert half_day_shift_cut_pct(forecast, actual, 1.0) <= half_day_shift_cut_pct(actual, actual, 1.0) + 1e-9
