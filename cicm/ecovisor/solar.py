"""Site solar power: pvlib clear sky on a fixed-tilt array, or a trace.

pvlib model (offline; the Linke turbidity climatology ships with pvlib): solar position -> Ineichen clear-sky
GHI/DNI/DHI -> plane-of-array irradiance (isotropic sky) -> Faiman cell temperature at a fixed air temperature and
wind speed -> PVWatts DC (``pdc0 = array_kwp``, ``gamma_pdc``) -> flat ``system_losses`` (wiring, inverter, soiling).
Clear sky is an upper bound on real output; that is the model, and it is documented as such.

Values are computed on a 1-minute grid per UTC day (cached) and averaged over each tick's interval.
"""
from __future__ import annotations

import math
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from cicm.errors import InputError

from .site import Location, Solar


class SolarModel:
    def power_kw(self, t: datetime) -> float:  # instantaneous
        raise NotImplementedError

    def mean_power_kw(self, start: datetime, end: datetime) -> float:
        """Average power over [start, end): the mean of samples at most one minute apart."""
        span = (end - start).total_seconds()
        if span <= 0:
            return self.power_kw(start)
        n = max(1, math.ceil(span / 60.0))
        step = span / n
        return float(np.mean([self.power_kw(start + timedelta(seconds=(i + 0.5) * step)) for i in range(n)]))


class PvlibClearSky(SolarModel):
    def __init__(self, location: Location, solar: Solar):
        import pvlib  # heavy import, only when used

        self._pvlib = pvlib
        self.loc = pvlib.location.Location(
            location.latitude, location.longitude, tz="UTC", altitude=location.altitude_m
        )
        self.cfg = solar
        self._day = lru_cache(maxsize=8)(self._day_series)

    def _day_series(self, day: pd.Timestamp) -> tuple[np.ndarray, np.ndarray]:
        pv = self._pvlib
        times = pd.date_range(day, day + pd.Timedelta(days=1), freq="1min", tz="UTC")
        cfg = self.cfg
        if cfg.array_kwp <= 0:
            return times.as_unit("ns").asi8.astype(np.float64), np.zeros(len(times))
        sp = self.loc.get_solarposition(times)
        cs = self.loc.get_clearsky(times, model="ineichen", solar_position=sp)
        poa = pv.irradiance.get_total_irradiance(
            cfg.tilt_deg, cfg.azimuth_deg, sp["apparent_zenith"], sp["azimuth"], cs["dni"], cs["ghi"], cs["dhi"]
        )["poa_global"].fillna(0.0).clip(lower=0.0)
        tcell = pv.temperature.faiman(poa, cfg.temp_air_c, cfg.wind_speed_m_s)
        pdc_kw = pv.pvsystem.pvwatts_dc(poa, tcell, cfg.array_kwp, cfg.gamma_pdc)
        p = np.clip(np.nan_to_num(np.asarray(pdc_kw, dtype=float)) * (1.0 - cfg.system_losses), 0.0, None)
        return times.as_unit("ns").asi8.astype(np.float64), p

    def power_kw(self, t: datetime) -> float:
        ts = pd.Timestamp(t)
        if ts.tzinfo is None:
            raise InputError("t", "time must be tz-aware")
        ts = ts.tz_convert("UTC")
        xs, ys = self._day(ts.floor("D"))
        return float(np.interp(float(ts.value), xs, ys))


class SolarTrace(SolarModel):
    def __init__(self, series: pd.Series):
        s = pd.to_numeric(series, errors="coerce").dropna().sort_index()
        if s.empty:
            raise InputError("solar.column", "solar trace has no values")
        if (s < 0).any():
            raise InputError("solar.column", "solar trace has negative power")
        self._x = s.index.tz_convert("UTC").as_unit("ns").asi8.astype(np.float64)
        self._y = s.to_numpy(dtype=float)

    def power_kw(self, t: datetime) -> float:
        v = float(pd.Timestamp(t).tz_convert("UTC").value)
        if v < self._x[0] or v > self._x[-1]:
            return 0.0
        return float(np.interp(v, self._x, self._y))


def load_solar(location: Location, solar: Solar, base_dir: Path | str = ".") -> SolarModel:
    if solar.source == "pvlib":
        return PvlibClearSky(location, solar)
    assert solar.path is not None  # Solar._need
    p = Path(solar.path)
    path = p if p.is_absolute() else Path(base_dir) / p
    try:
        df = pd.read_csv(path)
    except FileNotFoundError as e:
        raise InputError("solar.path", f"solar trace not found: {path}") from e
    for c, f in ((solar.timestamp_column, "solar.timestamp_column"), (solar.column, "solar.column")):
        if c not in df.columns:
            raise InputError(f, f"column {c!r} not in {path.name}")
    idx = pd.DatetimeIndex(pd.to_datetime(df[solar.timestamp_column], utc=True))
    return SolarTrace(pd.Series(df[solar.column].to_numpy(), index=idx))
