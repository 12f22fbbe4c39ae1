"""A campus's battery and solar in the nightly plan (issue 16): the queue program's storage input from the fleet
file, and the storage plan's rows for the store. The program itself is ``cicm.optimize.storage``."""
from __future__ import annotations

import numpy as np
import pandas as pd

from cicm.config import Campus
from cicm.errors import InputError

#: Columns of the ``storage_plans`` table (one row per campus and hour of the planned day), besides the keys.
STORAGE_COLUMNS = ("load_kw", "solar_kw", "solar_used_kw", "curtailed_kw", "charge_kw", "discharge_kw",
                   "energy_kwh", "grid_kw")


def has_storage(campus: Campus) -> bool:
    return campus.battery is not None or campus.solar is not None


def solar_forecast_kw(campus: Campus, hours: pd.DatetimeIndex) -> np.ndarray | None:
    """The campus's solar forecast over ``hours`` (kW, hourly means): pvlib's clear sky times the cloud factor of
    its ``cloud_csv``, or clear sky alone without one; None without solar."""
    if campus.solar is None:
        return None
    from cicm.models.solar import SolarSite, clear_sky_kw, read_cloud_csv
    from cicm.models.solar import solar_forecast_kw as forecast

    spec = campus.solar
    site = SolarSite(spec.latitude, spec.longitude, spec.kwp, spec.tilt_deg, spec.azimuth_deg)
    if spec.cloud_csv is None:
        return clear_sky_kw(site, hours)
    return forecast(site, hours, read_cloud_csv(spec.cloud_csv))


def campus_storage(campus: Campus, hours: pd.DatetimeIndex):
    """The queue program's ``CampusStorage`` for the campus over ``hours``, or None without battery or solar.
    Raises InputError naming the field when the solar forecast cannot be made (e.g. the cloud feed misses an
    hour)."""
    if not has_storage(campus):
        return None
    from cicm.optimize.storage import Battery, CampusStorage

    battery = None
    if campus.battery is not None:
        b = campus.battery
        leg = float(np.sqrt(b.round_trip_efficiency))
        battery = Battery(b.capacity_kwh, b.max_charge_kw, b.max_discharge_kw, leg, leg, b.reserve_soc,
                          b.initial_soc)
    try:
        solar = solar_forecast_kw(campus, hours)
    except InputError as exc:
        raise InputError(f"solar.{exc.field}", f"campus {campus.name!r}: {exc.message}") from exc
    return CampusStorage(battery=battery, solar_kw=solar)


def storage_plan_rows(plan_date, campus: str, hours: pd.DatetimeIndex, plan) -> pd.DataFrame:
    """The ``storage_plans`` rows of the planned day's ``hours`` (the first len(hours) of the plan's horizon)."""
    n = len(hours)
    rows = {"plan_date": plan_date, "campus": campus, "hour": hours, "hour_index": np.arange(n)}
    rows.update({c: np.asarray(getattr(plan, c), dtype=float)[:n] for c in STORAGE_COLUMNS})
    rows["status"] = plan.status
    return pd.DataFrame(rows)
