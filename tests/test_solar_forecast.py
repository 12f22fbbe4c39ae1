"""The solar forecast (cicm.models.solar): pvlib clear sky for the site x a cloud factor from a CSV, scored on the
real irradiance of the TMY3 file that pvlib ships."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cicm.errors import InputError
from cicm.models.solar import (
    SolarSite,
    clear_sky_kw,
    cloud_factor,
    persistence_cloud,
    read_cloud_csv,
    score_tmy,
    solar_forecast_kw,
    write_cloud_csv,
)

SJ = SolarSite(37.34, -121.89, 1000.0, tilt_deg=20.0, azimuth_deg=180.0)


def test_clear_sky_is_zero_at_night_below_nameplate_and_peaks_near_solar_noon():
    hours = pd.date_range("2022-06-21", periods=24, freq="h", tz="America/Los_Angeles").tz_convert("UTC")
    p = clear_sky_kw(SJ, hours)
    local = hours.tz_convert("America/Los_Angeles").hour
    assert (p >= 0).all() and p.max() < SJ.kwp
    assert p[(local < 5) | (local >= 21)].max() == 0.0
    assert 11 <= local[int(np.argmax(p))] <= 13  # solar noon in San Jose is ~13:10 PDT
    winter = clear_sky_kw(SJ, pd.date_range("2022-12-21", periods=24, freq="h", tz="America/Los_Angeles"))
    assert winter.sum() < p.sum()


def test_cloud_factor_follows_larson_and_rejects_percent():
    np.testing.assert_allclose(cloud_factor([0.0, 0.5, 1.0]), [1.0, 0.675, 0.35])
    with pytest.raises(InputError, match="cloud_cover"):
        cloud_factor([50.0])


def test_the_forecast_reads_its_cloud_cover_from_a_csv(tmp_path):
    hours = pd.date_range("2022-06-21 00:00", periods=48, freq="h", tz="UTC")
    cover = pd.Series(np.linspace(0, 1, 48), index=hours)
    path = write_cloud_csv(cover, tmp_path / "cloud.csv")
    back = read_cloud_csv(path)
    np.testing.assert_allclose(back.to_numpy(), cover.to_numpy(), atol=1e-5)
    f = solar_forecast_kw(SJ, hours, back)
    clear = clear_sky_kw(SJ, hours)
    np.testing.assert_allclose(f, clear * cloud_factor(back.to_numpy()))
    with pytest.raises(InputError, match="cloud_cover"):
        solar_forecast_kw(SJ, hours + pd.Timedelta(days=1), back)
    (tmp_path / "bad.csv").write_text("timestamp,cloud_cover\n2022-06-21T00:00Z,120\n")
    with pytest.raises(InputError, match="cloud_cover"):
        read_cloud_csv(tmp_path / "bad.csv")
    (tmp_path / "nocol.csv").write_text("timestamp,cover\n2022-06-21T00:00Z,10\n")
    with pytest.raises(InputError, match="cloud_cover"):
        read_cloud_csv(tmp_path / "nocol.csv")


def test_bad_sites_name_the_field():
    with pytest.raises(InputError, match="tilt_deg"):
        SolarSite(37.0, -122.0, 100.0, tilt_deg=120.0)
    with pytest.raises(InputError, match="latitude"):
        SolarSite(97.0, -122.0, 100.0)


def test_persistence_is_yesterdays_cover():
    hours = pd.date_range("2022-01-01", periods=72, freq="h", tz="UTC")
    cc = pd.Series(np.arange(72) / 100.0, index=hours)
    p = persistence_cloud(cc)
    assert p.iloc[30] == pytest.approx(cc.iloc[6])


def test_scored_on_real_irradiance_the_cloud_factor_beats_clear_sky():
    s = score_tmy()
    assert s["hours"] == 8736 and "GREENSBORO" in s["site"]
    rows = s["scores"]
    observed = rows["clear sky x cloud factor (observed cover)"]
    persist = rows["clear sky x cloud factor (persistence cover)"]
    clear = rows["clear sky alone"]
    # the measured figures of docs/storage_coplan.md (to the tenth)
    assert observed["mae_pct_kwp"] == pytest.approx(7.5, abs=0.1)
    assert persist["mae_pct_kwp"] == pytest.approx(11.9, abs=0.1)
    assert observed["daily_energy_mape_pct"] < persist["daily_energy_mape_pct"] < clear["daily_energy_mape_pct"]
    assert clear["mbe_pct_kwp"] > 0  # clear sky is an upper bound on real output
    assert 10 < s["actual_capacity_factor_pct"] < 25
