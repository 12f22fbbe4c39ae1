"""The on-site solar forecast: pvlib clear sky for the site's array, times a cloud factor from a forecast source.

- **Clear sky.** Solar position, Ineichen clear-sky GHI/DNI/DHI with the Linke turbidity climatology that pvlib
  ships (offline), plane-of-array irradiance on a fixed tilt and azimuth (isotropic sky), Faiman cell temperature,
  PVWatts DC (``pdc0 = kwp``, ``gamma_pdc``), then flat ``system_losses``: the ecovisor's model
  (cicm/ecovisor/solar.py), averaged over each hour on a 5-minute grid.
- **Cloud factor.** Larson, Nonnenmacher and Coimbra, "Day-ahead forecasting of solar power output from
  photovoltaic plants in the American Southwest", Renewable Energy 91 (2016): GHI = (0.35 + 0.65 (1 - cc)) x
  clear-sky GHI for cloud cover cc in [0, 1] (the relation pvlib's former forecast module used). We apply it to
  the clear-sky PV power, not to GHI before transposition; the score below measures the whole error.
- **Forecast source.** A CSV of hourly cloud cover (``timestamp``, ``cloud_cover`` in percent, 0..100), as
  weather services publish it (e.g. a numerical weather model's total cloud cover); :func:`read_cloud_csv`.
- **Score.** :func:`score_tmy` scores the forecast against the real hourly irradiance of an NREL TMY3 file that
  pvlib ships (Greensboro NC, measured GHI/DNI/DHI and total cloud cover): the "actual" PV is the same array
  model driven by the measured irradiance. docs/storage_coplan.md has the figures.

Times are UTC hour starts; every value is the mean kW over that hour. Pure except the file readers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cicm.errors import InputError

#: Larson et al. (2016): the share of clear-sky irradiance left under full cloud cover.
CLOUD_OFFSET = 0.35
TMY3_GREENSBORO = "723170TYA.CSV"


@dataclass(frozen=True)
class SolarSite:
    """A fixed-tilt array. ``azimuth_deg``: 180 = facing south. ``kwp``: DC nameplate at STC."""

    latitude: float
    longitude: float
    kwp: float
    tilt_deg: float = 20.0
    azimuth_deg: float = 180.0
    altitude_m: float = 0.0
    gamma_pdc: float = -0.004
    system_losses: float = 0.14
    temp_air_c: float = 20.0
    wind_speed_m_s: float = 1.0

    def __post_init__(self):
        checks = {"latitude": (-90, 90), "longitude": (-180, 180), "kwp": (0, math.inf), "tilt_deg": (0, 90),
                  "azimuth_deg": (0, 360), "system_losses": (0, 1), "gamma_pdc": (-0.05, 0.0)}
        for name, (lo, hi) in checks.items():
            v = float(getattr(self, name))
            if not math.isfinite(v) or not (lo <= v <= hi):
                raise InputError(name, f"must be in [{lo}, {hi}], got {getattr(self, name)!r}")


def _hours(hours) -> pd.DatetimeIndex:
    idx = pd.DatetimeIndex(hours)
    if idx.tz is None:
        raise InputError("hours", "must be tz-aware")
    return idx.tz_convert("UTC")


def pv_kw(site: SolarSite, times, ghi, dni, dhi, temp_air_c=None, wind_speed_m_s=None) -> np.ndarray:
    """The array's AC-side power (kW) for irradiance (W/m2) at ``times`` (the sun's position there)."""
    import pvlib  # heavy import, only when used

    t = pd.DatetimeIndex(times)
    if site.kwp <= 0:
        return np.zeros(len(t))
    loc = pvlib.location.Location(site.latitude, site.longitude, tz="UTC", altitude=site.altitude_m)
    sp = loc.get_solarposition(t)
    poa = pvlib.irradiance.get_total_irradiance(
        site.tilt_deg, site.azimuth_deg, sp["apparent_zenith"], sp["azimuth"],
        pd.Series(np.asarray(dni, float), t), pd.Series(np.asarray(ghi, float), t),
        pd.Series(np.asarray(dhi, float), t))["poa_global"].fillna(0.0).clip(lower=0.0)
    ta = site.temp_air_c if temp_air_c is None else pd.Series(np.asarray(temp_air_c, float), t)
    ws = site.wind_speed_m_s if wind_speed_m_s is None else pd.Series(np.asarray(wind_speed_m_s, float), t)
    tcell = pvlib.temperature.faiman(poa, ta, ws)
    pdc = pvlib.pvsystem.pvwatts_dc(poa, tcell, site.kwp, site.gamma_pdc)
    out = np.nan_to_num(np.asarray(pdc, float)) * (1.0 - site.system_losses)
    out[np.asarray(sp["apparent_zenith"]) >= 90] = 0.0
    return np.clip(out, 0.0, None)


def clear_sky_kw(site: SolarSite, hours, samples_per_hour: int = 12) -> np.ndarray:
    """Mean clear-sky power (kW) over each hour starting at ``hours`` (UTC hour starts)."""
    import pvlib

    idx = _hours(hours)
    if len(idx) == 0:
        return np.zeros(0)
    offsets = pd.to_timedelta((np.arange(samples_per_hour) + 0.5) * (3600.0 / samples_per_hour), unit="s")
    times = pd.DatetimeIndex((idx.tz_localize(None).values[:, None] + offsets.values[None, :]).ravel()).tz_localize("UTC")
    loc = pvlib.location.Location(site.latitude, site.longitude, tz="UTC", altitude=site.altitude_m)
    cs = loc.get_clearsky(times, model="ineichen")
    p = pv_kw(site, times, cs["ghi"], cs["dni"], cs["dhi"])
    return p.reshape(len(idx), samples_per_hour).mean(axis=1)


def cloud_factor(cloud_cover) -> np.ndarray:
    """Larson et al. (2016): the share of clear-sky output left under cloud cover ``cloud_cover`` in [0, 1]."""
    cc = np.asarray(cloud_cover, float)
    if np.isnan(cc).any() or (cc < 0).any() or (cc > 1).any():
        raise InputError("cloud_cover", "must be fractions in [0, 1] (the CSV gives percent)")
    return CLOUD_OFFSET + (1.0 - CLOUD_OFFSET) * (1.0 - cc)


def read_cloud_csv(path: str | Path) -> pd.Series:
    """A cloud-cover forecast: CSV columns ``timestamp`` (ISO 8601 with offset, or UTC) and ``cloud_cover``
    (percent). Returns fractions on a UTC index."""
    p = Path(path)
    try:
        df = pd.read_csv(p)
    except FileNotFoundError:
        raise InputError("cloud_csv", f"no such file: {p}") from None
    for col in ("timestamp", "cloud_cover"):
        if col not in df.columns:
            raise InputError(col, f"column missing from {p.name} (have {', '.join(map(str, df.columns))})")
    try:
        idx = pd.DatetimeIndex(pd.to_datetime(df["timestamp"], utc=True))
    except (ValueError, TypeError) as exc:
        raise InputError("timestamp", f"unreadable time in {p.name}: {exc}") from None
    cc = pd.to_numeric(df["cloud_cover"], errors="coerce")
    if cc.isna().any() or (cc < 0).any() or (cc > 100).any():
        raise InputError("cloud_cover", f"{p.name}: must be percent in [0, 100], no gaps")
    if idx.duplicated().any():
        raise InputError("timestamp", f"{p.name}: duplicate hours")
    return pd.Series(cc.to_numpy(float) / 100.0, index=idx).sort_index()


def write_cloud_csv(cloud_cover: pd.Series, path: str | Path) -> Path:
    """Write fractions on a UTC index as the CSV :func:`read_cloud_csv` reads (percent)."""
    p = Path(path)
    pd.DataFrame({"timestamp": pd.DatetimeIndex(cloud_cover.index).tz_convert("UTC").strftime("%Y-%m-%dT%H:%M:%SZ"),
                  "cloud_cover": np.round(cloud_cover.to_numpy(float) * 100.0, 3)}).to_csv(p, index=False)
    return p


def solar_forecast_kw(site: SolarSite, hours, cloud_cover: pd.Series, clear_kw: np.ndarray | None = None
                      ) -> np.ndarray:
    """Clear sky x cloud factor for each UTC hour start in ``hours``; ``cloud_cover`` (fractions, UTC index)
    must cover every hour. ``clear_kw``: the hours' clear sky, when already computed."""
    idx = _hours(hours)
    cc = cloud_cover.reindex(idx)
    if cc.isna().any():
        first = idx[np.flatnonzero(cc.isna().to_numpy())[0]]
        raise InputError("cloud_cover", f"the forecast has no cloud cover for {first:%Y-%m-%d %H:%M}Z")
    clear = clear_sky_kw(site, idx) if clear_kw is None else np.asarray(clear_kw, float)
    return clear * cloud_factor(cc.to_numpy())


# ------------------------------------------------------------------------------------------------ real data


def tmy3_path(name: str = TMY3_GREENSBORO) -> Path:
    import pvlib

    return Path(pvlib.__file__).parent / "data" / name


def read_tmy(path: str | Path | None = None, year: int = 2022) -> tuple[pd.DataFrame, dict]:
    """An NREL TMY3 file (default: Greensboro NC, shipped with pvlib) as hourly means on UTC hour starts:
    ``ghi, dni, dhi`` (W/m2), ``temp_air`` (C), ``wind_speed`` (m/s), ``cloud_cover`` (fraction), and its
    metadata. TMY3 stamps each hour at its end in local standard time; the year is set to ``year``."""
    import pvlib

    df, meta = pvlib.iotools.read_tmy3(str(path or tmy3_path()), coerce_year=year, map_variables=True)
    out = pd.DataFrame({
        "ghi": df["ghi"].astype(float), "dni": df["dni"].astype(float), "dhi": df["dhi"].astype(float),
        "temp_air": df["temp_air"].astype(float), "wind_speed": df["wind_speed"].astype(float),
        "cloud_cover": df["TotCld (tenths)"].astype(float).clip(0, 10) / 10.0,
    })
    out.index = (pd.DatetimeIndex(df.index) - pd.Timedelta(hours=1)).tz_convert("UTC")
    return out.sort_index(), dict(meta)


def measured_pv_kw(site: SolarSite, weather: pd.DataFrame) -> np.ndarray:
    """The array's output under measured hourly irradiance (the TMY's), the sun at mid-hour."""
    mid = pd.DatetimeIndex(weather.index) + pd.Timedelta(minutes=30)
    return pv_kw(site, mid, weather["ghi"], weather["dni"], weather["dhi"], weather["temp_air"],
                 weather["wind_speed"])


def persistence_cloud(cloud_cover: pd.Series, lag_hours: int = 24) -> pd.Series:
    """The naive day-ahead forecast: the cloud cover observed ``lag_hours`` earlier (same hour yesterday)."""
    s = cloud_cover.sort_index()
    out = s.shift(freq=pd.Timedelta(hours=lag_hours))
    return out.reindex(s.index).fillna(s.iloc[0])


def error_metrics(forecast_kw: np.ndarray, actual_kw: np.ndarray, kwp: float) -> dict[str, float]:
    """Daylight-hour errors (hours where either is above 0.1% of kWp): MAE and RMSE in % of kWp, MBE in % of
    kWp, and the daily-energy MAPE (days with actual energy above 0.1 kWh per kWp)."""
    f, a = np.asarray(forecast_kw, float), np.asarray(actual_kw, float)
    day = (f > 1e-3 * kwp) | (a > 1e-3 * kwp)
    e = f[day] - a[day]
    out = {"mae_pct_kwp": 100 * float(np.abs(e).mean()) / kwp, "rmse_pct_kwp": 100 * float(np.sqrt((e ** 2).mean())) / kwp,
           "mbe_pct_kwp": 100 * float(e.mean()) / kwp, "daylight_hours": int(day.sum())}
    if f.size % 24 == 0:
        fd, ad = f.reshape(-1, 24).sum(axis=1), a.reshape(-1, 24).sum(axis=1)
        ok = ad > 0.1 * kwp
        out["daily_energy_mape_pct"] = 100 * float(np.mean(np.abs(fd[ok] - ad[ok]) / ad[ok]))
    return out


def score_tmy(path: str | Path | None = None, kwp: float = 1000.0, tilt_deg: float = 20.0) -> dict:
    """Score clear sky x cloud factor against a TMY3 year's measured-irradiance PV (same array model): with the
    observed cloud cover (the cloud model's own error, a perfect cloud forecast), with yesterday's cover
    (persistence, a real day-ahead forecast from the same data), clear sky alone, and yesterday's actual PV."""
    weather, meta = read_tmy(path)
    site = SolarSite(float(meta["latitude"]), float(meta["longitude"]), kwp, tilt_deg=tilt_deg,
                     altitude_m=float(meta.get("altitude", 0.0)))
    hours = weather.index
    actual = measured_pv_kw(site, weather)
    clear = clear_sky_kw(site, hours)
    cc = weather["cloud_cover"]
    forecasts = {
        "clear sky x cloud factor (observed cover)": clear * cloud_factor(cc.to_numpy()),
        "clear sky x cloud factor (persistence cover)": clear * cloud_factor(persistence_cloud(cc).to_numpy()),
        "clear sky alone": clear,
        "persistence of PV (yesterday's actual)": np.concatenate([actual[:24], actual[:-24]]),
    }
    skip = 24  # the first day has no yesterday
    rows = {name: error_metrics(f[skip:], actual[skip:], kwp) for name, f in forecasts.items()}
    return {"site": str(meta.get("Name", "")).strip('"'), "latitude": site.latitude, "longitude": site.longitude,
            "hours": int(len(hours) - skip), "kwp": kwp, "tilt_deg": tilt_deg, "scores": rows,
            "actual_capacity_factor_pct": 100 * float(actual.mean()) / kwp}
