"""Checks of the apps' settings (Tables 1 and 2). Each returns the value to store or raises
:class:`cicm.errors.InputError` naming the field; none changes anything."""
from __future__ import annotations

import math
from datetime import datetime

from cicm.errors import InputError

from .clock import as_utc
from .power import PowerModel
from .state import AppState

_TOL = 1e-12


def _finite_nonneg(field: str, v: float) -> None:
    if not math.isfinite(v) or v < 0:
        raise InputError(field, "must be a finite number >= 0")


def check_powercap_kw(model: PowerModel, kw: float) -> float:
    """A container cap in [idle, max] kW."""
    if not (isinstance(kw, (int, float)) and math.isfinite(kw)) or kw < 0:
        raise InputError("kw", "must be a finite number >= 0")
    if kw > model.max_kw + _TOL:
        raise InputError("kw", f"{kw} kW is above the container's max power {model.max_kw} kW")
    if kw < model.idle_kw - _TOL:
        raise InputError("kw", f"{kw} kW is below the container's idle power {model.idle_kw} kW")
    return float(kw)


def check_charge_rate_kw(app: AppState, kw: float) -> float:
    """A grid charge rate within the battery's C-rate and the app's grid share."""
    _finite_nonneg("kw", kw)
    if kw > app.battery.max_charge_kw + _TOL:
        raise InputError(
            "kw", f"{kw} kW is above the battery's max charge rate {app.battery.max_charge_kw} kW (C-rate)"
        )
    if kw > app.grid_share_kw + _TOL:
        raise InputError("kw", f"{kw} kW is above the app's grid share {app.grid_share_kw} kW")
    return float(kw)


def check_max_discharge_kw(app: AppState, kw: float) -> float:
    """A discharge limit within the battery's C-rate."""
    _finite_nonneg("kw", kw)
    if kw > app.battery.max_discharge_kw + _TOL:
        raise InputError(
            "kw",
            f"{kw} kW is above the battery's max discharge rate {app.battery.max_discharge_kw} kW (C-rate)",
        )
    return float(kw)


def check_carbon_rate_gco2_per_h(gco2_per_h: float | None) -> float | None:
    """A carbon rate limit >= 0, or None to clear it."""
    if gco2_per_h is not None:
        _finite_nonneg("gco2_per_h", gco2_per_h)
    return gco2_per_h


def check_budget_window(
    kgco2: float, start: datetime | None, end: datetime | None, now: datetime
) -> tuple[float, datetime, datetime | None]:
    """A carbon budget's (kgco2, start, end) in UTC; start defaults to ``now``, end may be open (None)."""
    _finite_nonneg("kgco2", kgco2)
    s = as_utc(start) if start else now
    e = as_utc(end) if end else None
    if e is not None and e <= s:
        raise InputError("end", "must be after start")
    return float(kgco2), s, e


__all__ = [
    "check_powercap_kw",
    "check_charge_rate_kw",
    "check_max_discharge_kw",
    "check_carbon_rate_gco2_per_h",
    "check_budget_window",
]
