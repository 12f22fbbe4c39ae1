"""The canonical carbon-intensity forecast frame shared by every provider.

One row per (zone, hour): ``target_hour`` is the start of the hour (tz-aware UTC), ``issued_at`` is when the
forecast was issued (tz-aware UTC), ``gco2_per_kwh`` the forecast intensity, ``provider`` where it came from.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

FORECAST_COLUMNS: list[str] = ["zone", "target_hour", "issued_at", "gco2_per_kwh", "provider"]

UTC_NS = "datetime64[ns, UTC]"

#: Upper bound for a physically plausible grid carbon intensity. Lignite is about 1,100-1,200 g/kWh and marginal
#: (MOER) signals can exceed that, but nothing real approaches 2,000 g/kWh.
MAX_PLAUSIBLE_GCO2_PER_KWH = 2000.0


def empty_forecast_frame() -> pd.DataFrame:
    """A zero-row frame with the canonical columns and dtypes."""
    return pd.DataFrame(
        {
            "zone": pd.Series([], dtype=str),
            "target_hour": pd.Series([], dtype=UTC_NS),
            "issued_at": pd.Series([], dtype=UTC_NS),
            "gco2_per_kwh": pd.Series([], dtype="float64"),
            "provider": pd.Series([], dtype=str),
        }
    )[FORECAST_COLUMNS]


def make_forecast_frame(
    *, zone: str, target_times: pd.DatetimeIndex | pd.Series, issued_at, gco2_per_kwh, provider: str
) -> pd.DataFrame:
    """Build an (unvalidated) canonical-column frame. ``issued_at`` may be a scalar or one value per row.

    ``target_times`` may be sub-hourly here; :func:`cicm.carbon.validate.validate_forecast` makes it hourly.
    """
    n = len(target_times)
    issued = issued_at if isinstance(issued_at, (pd.Series, pd.Index, list)) else [issued_at] * n
    frame = pd.DataFrame(
        {
            "zone": [zone] * n,
            "target_hour": pd.DatetimeIndex(target_times).as_unit("ns"),
            "issued_at": pd.DatetimeIndex(issued).as_unit("ns"),
            "gco2_per_kwh": np.asarray(gco2_per_kwh, dtype="float64"),
            "provider": [provider] * n,
        }
    )
    return frame[FORECAST_COLUMNS]
