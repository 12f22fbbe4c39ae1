"""Grid carbon intensity for the ecovisor: an hourly trace with every value's quality.

Qualities: ``measured`` (in the trace), ``interpolated`` (short gap, linear in time), ``filled-previous-day``
(gap longer than ``max_gap_hours``: the same hour of the previous day, or the next day at the trace's start),
and, for times outside the trace, ``replayed`` (same month/day/hour of the trace's year; 29 Feb -> 28 Feb) or
``held-nearest``. A value is the hourly average and holds for its whole hour.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd

from cicm.errors import InputError
from cicm.paths import bundled_data_dir

from .site import CarbonSource


@dataclass(frozen=True)
class CarbonValue:
    gco2_per_kwh: float
    quality: str
    trace_hour: datetime  # the trace hour the value came from (UTC)


class CarbonTrace:
    def __init__(self, series: pd.Series, max_gap_hours: int = 3, replay: str = "year", name: str = "trace"):
        """``series``: gCO2/kWh indexed by tz-aware timestamps; NaNs are gaps."""
        if not isinstance(series.index, pd.DatetimeIndex) or series.index.tz is None:
            raise InputError("timestamp", "carbon trace needs tz-aware timestamps")
        s = pd.to_numeric(series, errors="coerce").astype(float)
        s.index = s.index.tz_convert("UTC").floor("h")
        s = s[~s.index.duplicated(keep="first")].sort_index()
        if s.empty or s.notna().sum() == 0:
            raise InputError("column", f"carbon trace {name} has no values")
        if (s.dropna() < 0).any():
            raise InputError("column", f"carbon trace {name} has negative intensities")
        full = pd.date_range(s.index[0], s.index[-1], freq="h", tz="UTC")
        s = s.reindex(full)
        quality = pd.Series("measured", index=full, dtype=object)
        isna = s.isna()
        # run lengths of gaps
        run_id = (isna != isna.shift()).cumsum()
        run_len = isna.groupby(run_id).transform("sum")
        short = isna & (run_len <= max_gap_hours)
        interp = s.interpolate(method="time", limit_area="inside")
        s = s.where(~short, interp)
        quality[short & s.notna()] = "interpolated"
        still = s.isna()
        if still.any():
            prev = s.shift(24)
            nxt = s.shift(-24)
            for _ in range(60):  # walk back (or forward) day by day through long gaps
                fill = s.isna() & prev.notna()
                s = s.where(~fill, prev)
                prev = s.shift(24)
                fill2 = s.isna() & nxt.notna()
                s = s.where(~fill2, nxt)
                nxt = s.shift(-24)
                if not s.isna().any():
                    break
            quality[still] = "filled-previous-day"
        if s.isna().any():
            raise InputError("column", f"carbon trace {name} has gaps that cannot be filled")
        self.name = name
        self.replay = replay
        self._values = s.to_numpy(dtype=float)
        self._quality = quality.to_numpy()
        self._start = full[0]
        self._end = full[-1]
        self._ns0 = full[0].value
        self.year = full[0].year

    @property
    def start(self) -> pd.Timestamp:
        return self._start

    @property
    def end(self) -> pd.Timestamp:
        return self._end

    def at(self, t: datetime) -> CarbonValue:
        ts = pd.Timestamp(t)
        if ts.tzinfo is None:
            raise InputError("t", "time must be tz-aware")
        h = ts.tz_convert("UTC").floor("h")
        quality_override = None
        if h < self._start or h > self._end:
            if self.replay == "year":
                day = h.day
                if h.month == 2 and day == 29:
                    day = 28
                mapped = pd.Timestamp(year=self.year, month=h.month, day=day, hour=h.hour, tz="UTC")
                if self._start <= mapped <= self._end:
                    h = mapped
                    quality_override = "replayed"
            if quality_override is None:
                h = self._start if h < self._start else self._end
                quality_override = "held-nearest"
        i = int((h.value - self._ns0) // 3_600_000_000_000)
        q = str(self._quality[i])
        if quality_override == "held-nearest":
            q = quality_override
        elif quality_override == "replayed":
            q = "replayed" if q == "measured" else f"replayed/{q}"
        return CarbonValue(float(self._values[i]), q, h.to_pydatetime())

    def hourly(self) -> pd.Series:
        return pd.Series(self._values, index=pd.date_range(self._start, self._end, freq="h", tz="UTC"))


def eia_trace_path(zone: str) -> Path:
    return bundled_data_dir() / "carbon_intensity" / f"{zone}_2022_hourly_mix_and_ci.csv.gz"


def read_trace_csv(path: Path, timestamp_column: str, column: str) -> pd.Series:
    try:
        df = pd.read_csv(path)
    except FileNotFoundError as e:
        raise InputError("grid.carbon.path", f"carbon trace not found: {path}") from e
    for c, f in ((timestamp_column, "grid.carbon.timestamp_column"), (column, "grid.carbon.column")):
        if c not in df.columns:
            raise InputError(f, f"column {c!r} not in {path.name}")
    try:
        idx = pd.to_datetime(df[timestamp_column], utc=True)
    except (ValueError, TypeError) as e:
        raise InputError("grid.carbon.timestamp_column", f"unparseable timestamps in {path.name}: {e}") from e
    return pd.Series(pd.to_numeric(df[column], errors="coerce").to_numpy(), index=pd.DatetimeIndex(idx))


def load_carbon(src: CarbonSource, base_dir: Path | str = ".") -> CarbonTrace:
    if src.source == "eia":
        assert src.zone is not None  # CarbonSource._need
        zone = src.zone.upper()
        path = eia_trace_path(zone)
        if not path.exists():
            raise InputError("grid.carbon.zone", f"no bundled EIA trace for zone {zone!r} ({path})")
        s = read_trace_csv(path, "timestamp", "avg_CI")
        name = zone
    else:
        assert src.path is not None  # CarbonSource._need
        p = Path(src.path)
        path = p if p.is_absolute() else Path(base_dir) / p
        s = read_trace_csv(path, src.timestamp_column, src.column)
        name = path.name
    return CarbonTrace(s, max_gap_hours=src.max_gap_hours, replay=src.replay, name=name)


__all__ = ["CarbonTrace", "CarbonValue", "load_carbon", "eia_trace_path", "read_trace_csv"]
