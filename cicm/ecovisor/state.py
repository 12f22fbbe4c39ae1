"""The ecovisor's mutable state: one :class:`ContainerState` per site container, one :class:`AppState` per
registered application. Plain dataclasses; the registry, the cap controller and the tick change them."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from . import energy
from .power import PowerModel
from .site import SiteConfig


@dataclass
class ContainerState:
    name: str
    cores: float
    model: PowerModel
    app: str | None = None
    powercap_kw: float = 0.0  # as set by the app (defaults to max power = uncapped)
    effective_powercap_kw: float = 0.0  # after carbon policies
    cpu_limit_cores: float | None = None
    usage_cores: float = 0.0  # last tick
    power_kw: float = 0.0  # last tick, modelled from CPU
    last_error: str | None = None


def containers_from_site(site: SiteConfig) -> dict[str, ContainerState]:
    """The site's containers, uncapped (cap = max power) and unowned."""
    out: dict[str, ContainerState] = {}
    for c in site.containers:
        m = PowerModel.from_spec(c.cores, c.power)
        out[c.name] = ContainerState(c.name, c.cores, m, powercap_kw=m.max_kw, effective_powercap_kw=m.max_kw)
    return out


@dataclass
class AppState:
    name: str
    token_sha256: str
    spec: dict
    containers: list[str]
    grid_share_kw: float
    solar_fraction: float
    battery_fraction: float
    callback_url: str | None
    battery: energy.BatterySpec
    battery_energy_kwh: float
    registered_at: datetime
    token_expires_at: datetime | None = None  # wall clock, UTC
    charge_rate_kw: float = 0.0
    max_discharge_kw: float | None = None
    carbon_rate_gco2_per_h: float | None = None
    carbon_budget: dict | None = None  # {"kgco2", "start", "end", "used_kgco2"}
    carbon_policy_met: bool = True
    caps_constrained: bool = False  # a carbon policy was in force at the last apply of the caps
    last: energy.StepResult | None = None
    last_interval: tuple[datetime, datetime] | None = None

    def settings(self, caps: dict[str, float]) -> dict:
        """The app's settings as stored in ``ecovisor_apps.state`` (JSON)."""
        b = self.carbon_budget
        return {
            "charge_rate_kw": self.charge_rate_kw,
            "max_discharge_kw": self.max_discharge_kw,
            "carbon_rate_gco2_per_h": self.carbon_rate_gco2_per_h,
            "carbon_budget": None
            if b is None
            else {"kgco2": b["kgco2"], "start": b["start"].isoformat(), "end": b["end"].isoformat() if b["end"] else None},
            "powercaps_kw": caps,
            "token_expires_at": self.token_expires_at.isoformat() if self.token_expires_at else None,
        }


__all__ = ["ContainerState", "AppState", "containers_from_site"]
