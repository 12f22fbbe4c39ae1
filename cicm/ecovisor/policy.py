"""Carbon policies (Table 2) as pure functions of an app's settings: the rate limit in force, the carbon-free
supply it may use, and the container caps that keep to it."""
from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime

from . import energy
from .state import AppState


def budget_binds(budget: dict, now: datetime) -> bool:
    """True while ``now`` is inside the budget's window [start, end)."""
    return now >= budget["start"] and (budget["end"] is None or now < budget["end"])


def rate_limit_gco2_per_h(app: AppState, now: datetime) -> float:
    """The carbon rate limit in force at ``now``: the rate policy and the paced budget, whichever is lower
    (``inf`` without either)."""
    rate = math.inf if app.carbon_rate_gco2_per_h is None else app.carbon_rate_gco2_per_h
    b = app.carbon_budget
    if b is not None and budget_binds(b, now):
        hours_left = None if b["end"] is None else (b["end"] - now).total_seconds() / 3600.0
        rate = min(rate, energy.budget_rate_gco2_per_h(b["kgco2"], b["used_kgco2"], hours_left))
    return rate


def clean_supply_kw(app: AppState, site_solar_kw: float, dt_h: float) -> float:
    """The app's carbon-free supply: its solar share, plus what its battery can discharge over ``dt_h`` unless
    it is charging from the grid."""
    clean = app.solar_fraction * site_solar_kw
    if app.charge_rate_kw <= 0:
        lim = math.inf if app.max_discharge_kw is None else app.max_discharge_kw
        clean += energy.available_discharge_kw(app.battery, app.battery_energy_kwh, dt_h, lim)
    return clean


def policy_caps_kw(
    caps_kw: Mapping[str, float],
    idle_kw: Mapping[str, float],
    rate_gco2_per_h: float,
    clean_kw: float,
    grid_gco2_per_kwh: float,
) -> tuple[dict[str, float], bool]:
    """The caps after the carbon rate limit, and whether the limit is met (see
    :func:`energy.carbon_limited_caps`)."""
    return energy.carbon_limited_caps(dict(caps_kw), dict(idle_kw), clean_kw, grid_gco2_per_kwh, rate_gco2_per_h)


__all__ = ["budget_binds", "rate_limit_gco2_per_h", "clean_supply_kw", "policy_caps_kw"]
