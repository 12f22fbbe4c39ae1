"""Inputs of the VCC program as plain, validated, immutable data.

Every array is converted to a read-only float64 numpy array when the dataclass is built, and every field is
checked there: bad input raises :class:`cicm.errors.InputError` naming the field (``"capacity_cores"``; campus-level
checks of a cluster name it as ``"clusters[3].name"``). Nothing here does I/O.

Units follow the repository convention: usage in CPU cores (``*_cpu_cores``), reservations and machine capacity in
reservation cores, power in kW, carbon intensity in gCO2/kWh.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from cicm.errors import InputError

#: Lengths of a local day: 23 (spring DST), 24, 25 (autumn DST).
DAY_LENGTHS = (23, 24, 25)

#: Solvers the program accepts (cvxpy names).
SOLVERS = ("HIGHS", "CLARABEL")


def _as_array(field_name: str, value, *, length: int | None = None, allow_scalar: bool = False,
              allow_inf: bool = False, minimum: float | None = None, strict: bool = False) -> np.ndarray:
    """A finite 1-D float64 array (read-only copy), or raise InputError naming ``field_name``.

    With ``allow_scalar`` a scalar is accepted and returned as a 0-d array (the caller broadcasts it).
    """
    if value is None:
        raise InputError(field_name, "is required")
    try:
        arr = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(field_name, f"is not numeric ({exc})") from None
    if arr.ndim == 0:
        if not allow_scalar:
            raise InputError(field_name, "must be a 1-D array of hourly values, got a scalar")
    elif arr.ndim != 1:
        raise InputError(field_name, f"must be 1-D, got shape {arr.shape}")
    elif length is not None and arr.shape[0] != length:
        raise InputError(field_name, f"has {arr.shape[0]} values, expected {length} (one per hour)")
    if np.isnan(arr).any():
        raise InputError(field_name, "contains NaN")
    if not allow_inf and np.isinf(arr).any():
        raise InputError(field_name, "contains an infinite value")
    if minimum is not None:
        bad = arr <= minimum if strict else arr < minimum
        if bad.any():
            worst = float(np.min(arr))
            op = ">" if strict else ">="
            raise InputError(field_name, f"must be {op} {minimum:g}, got {worst:g}")
    arr.setflags(write=False)
    return arr


def _as_float(field_name: str, value, *, minimum: float | None = None, strict: bool = False,
              maximum: float | None = None, allow_inf: bool = False) -> float:
    if value is None or isinstance(value, (bool, np.bool_)):
        raise InputError(field_name, f"must be a number, got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise InputError(field_name, f"must be a number, got {value!r}") from None
    if np.isnan(x):
        raise InputError(field_name, "is NaN")
    if np.isinf(x) and not allow_inf:
        raise InputError(field_name, "is infinite")
    if minimum is not None and (x <= minimum if strict else x < minimum):
        raise InputError(field_name, f"must be {'>' if strict else '>='} {minimum:g}, got {x:g}")
    if maximum is not None and x > maximum:
        raise InputError(field_name, f"must be <= {maximum:g}, got {x:g}")
    return x


@dataclass(frozen=True, eq=False)
class PowerCurve:
    """Piecewise-linear cluster power P(u) in kW as a function of CPU usage u in cores.

    ``cpu_cores`` are strictly increasing breakpoints, ``power_kw`` the power at each. Outside the breakpoints the
    first/last segment is extended linearly (the models fit three segments between the observed min and max CPU;
    a plan may step slightly outside that range).
    """

    cpu_cores: np.ndarray
    power_kw: np.ndarray

    def __post_init__(self):
        x = _as_array("cpu_cores", self.cpu_cores, minimum=0.0)
        if x.ndim != 1 or x.shape[0] < 2:
            raise InputError("cpu_cores", "needs at least two breakpoints")
        if np.any(np.diff(x) <= 0):
            raise InputError("cpu_cores", "breakpoints must be strictly increasing")
        y = _as_array("power_kw", self.power_kw, length=x.shape[0], minimum=0.0)
        object.__setattr__(self, "cpu_cores", x)
        object.__setattr__(self, "power_kw", y)

    def slope_at(self, u) -> np.ndarray:
        """dP/du (kW per core) of the segment that holds u (the end segments beyond the breakpoints)."""
        x, y = self.cpu_cores, self.power_kw
        slopes = np.diff(y) / np.diff(x)
        seg = np.clip(np.searchsorted(x, np.asarray(u, dtype=float), side="right") - 1, 0, len(slopes) - 1)
        return slopes[seg]

    def __call__(self, u) -> np.ndarray:
        u = np.asarray(u, dtype=float)
        x, y = self.cpu_cores, self.power_kw
        seg = np.clip(np.searchsorted(x, u, side="right") - 1, 0, len(x) - 2)
        return y[seg] + self.slope_at(u) * (u - x[seg])


@dataclass(frozen=True, eq=False)
class ClusterInput:
    """One cluster's forecasts, capacities and power model for the planning day (H hours).

    Fields (H = number of hours of the local day; arrays have H values):

    - ``name``: cluster id, unique in its campus.
    - ``inflexible_cpu_cores[H]``: forecast inflexible usage U_IF(h), cores.
    - ``inflexible_upper_cpu_cores[H]``: the (1-gamma) quantile of inflexible usage, cores. The program uses
      ``max(U_IF, upper)`` as "the inflexible usage the cap must always admit".
    - ``flexible_core_hours``: forecast daily flexible usage T_UF, core-hours (>= 0).
    - ``reservations_core_hours``: forecast daily reservations T_R, reservation core-hours (>= 0).
    - ``reservation_ratio[H]``: R(h), reservations per unit usage (> 0, typically >= 1).
    - ``reservations_rel_error_q97``: 97th percentile of the relative forecast error of T_R (> -1).
    - ``capacity_cores``: machine capacity in reservation cores (> 0); a scalar or H values.
    - ``power_capped_capacity_cores``: usage (cores) the power caps allow (>= 0, may be ``inf``); scalar or H values.
    - ``slope_kw_per_core``: pi_c, marginal kW per core of usage (>= 0), required with ``nominal_power_kw`` (the
      linear power model). With a ``power_curve`` it is optional and not used by the program (which models the
      curve itself); ``campus_targets`` reports it, or the curve's slope at the day's mean nominal usage.
    - ``nominal_power_kw[H]``: P_c(U_nom(h)), the power at the nominal (unshaped) usage
      U_nom = U_IF + tau/H. Give either this or ``power_curve``.
    - ``power_curve``: a :class:`PowerCurve` instead of ``nominal_power_kw``: the program plans with the curve
      (its lower convex hull over the usage the plan can reach) and reports power and carbon from the curve at the
      planned usage U_IF + (1 + delta) * tau/H.
    - ``fallback_reason``: set by the caller to force the fallback (e.g. ``"insufficient-history"``,
      ``"slo-feedback"``); passed through to the plan. ``None`` to let the program shape the cluster.
    - ``fallback_detail``: optional free text stored with a preset ``fallback_reason``.

    For a preset fallback the forecasts are still required (they give the flat power that counts against the
    campus contract and the reported carbon); pass the best numbers available.
    """

    name: str
    inflexible_cpu_cores: np.ndarray
    inflexible_upper_cpu_cores: np.ndarray
    flexible_core_hours: float
    reservations_core_hours: float
    reservation_ratio: np.ndarray
    reservations_rel_error_q97: float
    capacity_cores: float | np.ndarray
    power_capped_capacity_cores: float | np.ndarray
    slope_kw_per_core: float | None = None
    nominal_power_kw: np.ndarray | None = None
    power_curve: PowerCurve | None = None
    fallback_reason: str | None = None
    fallback_detail: str | None = None

    def __post_init__(self):
        self.validate()

    @property
    def hours(self) -> int:
        return int(self.inflexible_cpu_cores.shape[0])

    def validate(self, prefix: str = "") -> None:
        """Check and normalise every field; raise InputError naming ``prefix + field``."""
        p = prefix
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if not isinstance(self.name, str) or not self.name.strip():
            raise InputError(p + "name", f"must be a non-empty string, got {self.name!r}")
        u = _as_array(p + "inflexible_cpu_cores", self.inflexible_cpu_cores, minimum=0.0)
        h = u.shape[0]
        if h not in DAY_LENGTHS:
            raise InputError(p + "inflexible_cpu_cores",
                             f"has {h} values; a planning day has 23, 24 or 25 hours")
        set_("inflexible_cpu_cores", u)
        set_("inflexible_upper_cpu_cores",
             _as_array(p + "inflexible_upper_cpu_cores", self.inflexible_upper_cpu_cores, length=h, minimum=0.0))
        set_("flexible_core_hours", _as_float(p + "flexible_core_hours", self.flexible_core_hours, minimum=0.0))
        set_("reservations_core_hours",
             _as_float(p + "reservations_core_hours", self.reservations_core_hours, minimum=0.0))
        set_("reservation_ratio",
             _as_array(p + "reservation_ratio", self.reservation_ratio, length=h, minimum=0.0, strict=True))
        set_("reservations_rel_error_q97",
             _as_float(p + "reservations_rel_error_q97", self.reservations_rel_error_q97, minimum=-1.0,
                       strict=True))
        set_("capacity_cores", _as_array(p + "capacity_cores", self.capacity_cores, length=h, allow_scalar=True,
                                         minimum=0.0, strict=True))
        set_("power_capped_capacity_cores",
             _as_array(p + "power_capped_capacity_cores", self.power_capped_capacity_cores, length=h,
                       allow_scalar=True, allow_inf=True, minimum=0.0))
        if self.power_curve is not None and not isinstance(self.power_curve, PowerCurve):
            raise InputError(p + "power_curve", f"must be a PowerCurve, got {type(self.power_curve).__name__}")
        if self.nominal_power_kw is None and self.power_curve is None:
            raise InputError(p + "nominal_power_kw", "give nominal_power_kw[H] or a power_curve")
        if self.nominal_power_kw is not None and self.power_curve is not None:
            raise InputError(p + "nominal_power_kw", "give nominal_power_kw or power_curve, not both")
        if self.nominal_power_kw is not None:
            set_("nominal_power_kw",
                 _as_array(p + "nominal_power_kw", self.nominal_power_kw, length=h, minimum=0.0))
        if self.slope_kw_per_core is None:
            if self.power_curve is None:
                raise InputError(p + "slope_kw_per_core", "is required with nominal_power_kw")
        else:
            set_("slope_kw_per_core", _as_float(p + "slope_kw_per_core", self.slope_kw_per_core, minimum=0.0))
        if self.fallback_reason is not None and (not isinstance(self.fallback_reason, str)
                                                 or not self.fallback_reason.strip()):
            raise InputError(p + "fallback_reason", f"must be None or a non-empty string, "
                                                    f"got {self.fallback_reason!r}")
        if self.fallback_detail is not None and not isinstance(self.fallback_detail, str):
            raise InputError(p + "fallback_detail", "must be None or a string")


@dataclass(frozen=True, eq=False)
class CampusInput:
    """One campus (power contract) and all its clusters for one planning day.

    - ``clusters``: the clusters (unique names), all with H hours.
    - ``carbon_gco2_per_kwh[H]``: carbon-intensity forecast eta(h) (>= 0).
    - ``contract_limit_kw``: campus power contract: sum over clusters of each cluster's daily peak power must stay
      below it (> 0; ``inf`` = no contract).
    - ``lambda_e``: weight of carbon (per kgCO2) in the objective (>= 0).
    - ``lambda_p``: weight of the summed cluster peaks (per kW) in the objective (>= 0).
    - ``delta_min``, ``delta_max``: bounds on delta, the fractional deviation of hourly flexible usage from flat
      (-1 <= delta_min <= 0 <= delta_max).
    - ``ramp_limit``: optional bound on |delta(h) - delta(h-1)| (> 0), ``None`` for none.
    - ``solver``: ``"HIGHS"`` (default) or ``"CLARABEL"``.
    - ``hours``: optional DatetimeIndex of the H hours (passed through to the plan's ``hour`` column).
    - ``name``: campus id, passed through to the plan's ``campus`` column.
    """

    clusters: Sequence[ClusterInput]
    carbon_gco2_per_kwh: np.ndarray
    contract_limit_kw: float = float("inf")
    lambda_e: float = 1.0
    lambda_p: float = 0.0
    delta_min: float = -1.0
    delta_max: float = 1.0
    ramp_limit: float | None = None
    solver: str = "HIGHS"
    hours: pd.DatetimeIndex | None = None
    name: str = "campus"

    def __post_init__(self):
        self.validate()

    @property
    def n_hours(self) -> int:
        return int(self.carbon_gco2_per_kwh.shape[0])

    def validate(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        eta = _as_array("carbon_gco2_per_kwh", self.carbon_gco2_per_kwh, minimum=0.0)
        h = eta.shape[0]
        if h not in DAY_LENGTHS:
            raise InputError("carbon_gco2_per_kwh", f"has {h} values; a planning day has 23, 24 or 25 hours")
        set_("carbon_gco2_per_kwh", eta)
        if isinstance(self.clusters, ClusterInput) or not isinstance(self.clusters, (list, tuple)):
            raise InputError("clusters", "must be a list or tuple of ClusterInput")
        if len(self.clusters) == 0:
            raise InputError("clusters", "is empty")
        seen: set[str] = set()
        for i, c in enumerate(self.clusters):
            if not isinstance(c, ClusterInput):
                raise InputError(f"clusters[{i}]", f"must be a ClusterInput, got {type(c).__name__}")
            if c.hours != h:
                raise InputError(f"clusters[{i}].inflexible_cpu_cores",
                                 f"cluster {c.name!r} has {c.hours} hours, the campus carbon forecast has {h}")
            if c.name in seen:
                raise InputError(f"clusters[{i}].name", f"duplicate cluster name {c.name!r}")
            seen.add(c.name)
        set_("clusters", tuple(self.clusters))
        set_("contract_limit_kw", _as_float("contract_limit_kw", self.contract_limit_kw, minimum=0.0, strict=True,
                                            allow_inf=True))
        set_("lambda_e", _as_float("lambda_e", self.lambda_e, minimum=0.0))
        set_("lambda_p", _as_float("lambda_p", self.lambda_p, minimum=0.0))
        set_("delta_min", _as_float("delta_min", self.delta_min, minimum=-1.0, maximum=0.0))
        set_("delta_max", _as_float("delta_max", self.delta_max, minimum=0.0))
        if self.ramp_limit is not None:
            set_("ramp_limit", _as_float("ramp_limit", self.ramp_limit, minimum=0.0, strict=True))
        if not isinstance(self.solver, str) or self.solver.upper() not in SOLVERS:
            raise InputError("solver", f"must be one of {SOLVERS}, got {self.solver!r}")
        set_("solver", self.solver.upper())
        if self.hours is not None:
            if not isinstance(self.hours, pd.DatetimeIndex):
                raise InputError("hours", f"must be a pandas DatetimeIndex, got {type(self.hours).__name__}")
            if len(self.hours) != h:
                raise InputError("hours", f"has {len(self.hours)} timestamps, expected {h}")
        if not isinstance(self.name, str):
            raise InputError("name", "must be a string")
