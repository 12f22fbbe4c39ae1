"""The ecovisor: the site's virtual energy systems, one per registered application, and its containers.

This is the HTTP-free core. ``app.py`` maps it to REST routes. Every method that changes state validates
everything first and changes nothing when it raises (:class:`cicm.errors.InputError` -> 422,
:class:`AuthError` -> 401, :class:`ForbiddenError` -> 403, :class:`ConflictError` -> 409,
:class:`BackendError` -> 503).
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from cicm.errors import InputError

from . import energy
from .backends.base import BackendError, ContainerBackend
from .carbon import CarbonTrace, load_carbon
from .power import POWER_SOURCE, PowerModel
from .schemas import AppRegistration
from .site import SiteConfig
from .solar import SolarModel, load_solar
from .store import Telemetry

log = logging.getLogger("cicm.ecovisor")


class AuthError(Exception):
    pass


class ForbiddenError(Exception):
    pass


class ConflictError(Exception):
    pass


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _utc(t: datetime) -> datetime:
    if t.tzinfo is None:
        raise InputError("time", "must carry a time zone")
    return t.astimezone(timezone.utc)


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
    charge_rate_kw: float = 0.0
    max_discharge_kw: float | None = None
    carbon_rate_gco2_per_h: float | None = None
    carbon_budget: dict | None = None  # {"kgco2", "start", "end", "used_kgco2"}
    carbon_policy_met: bool = True
    last: energy.StepResult | None = None
    last_interval: tuple[datetime, datetime] | None = None

    def settings(self, caps: dict[str, float]) -> dict:
        b = self.carbon_budget
        return {
            "charge_rate_kw": self.charge_rate_kw,
            "max_discharge_kw": self.max_discharge_kw,
            "carbon_rate_gco2_per_h": self.carbon_rate_gco2_per_h,
            "carbon_budget": None
            if b is None
            else {"kgco2": b["kgco2"], "start": b["start"].isoformat(), "end": b["end"].isoformat() if b["end"] else None},
            "powercaps_kw": caps,
        }


class Ecovisor:
    def __init__(
        self,
        site: SiteConfig,
        clock,
        backend: ContainerBackend,
        telemetry: Telemetry,
        carbon: CarbonTrace | None = None,
        solar: SolarModel | None = None,
    ):
        self.site = site
        self.clock = clock
        self.backend = backend
        self.store = telemetry
        self.carbon = carbon or load_carbon(site.grid.carbon, site.base_dir)
        self.solar = solar or load_solar(site.location, site.solar, site.base_dir)
        self.dt_s = float(site.tick_seconds)
        self._lock = threading.RLock()
        self.containers: dict[str, ContainerState] = {}
        for c in site.containers:
            m = PowerModel.from_spec(c.cores, c.power)
            self.containers[c.name] = ContainerState(
                c.name, c.cores, m, powercap_kw=m.max_kw, effective_powercap_kw=m.max_kw
            )
        self.apps: dict[str, AppState] = {}
        last = self.store.last_tick()
        self.tick_id = 0 if last is None else int(last["tick_id"])
        self.last_tick_end: datetime = self.clock.now()
        if last is not None and getattr(self.clock, "mode", "") == "simulated":
            end = _utc(last["interval_end"])
            if end > self.last_tick_end:
                self.clock.set(end)
                self.last_tick_end = end
        self._restore_apps()
        for name in self.containers:
            self._apply_caps_for_container(name)

    # ------------------------------------------------------------------ apps
    def _battery_for(self, fraction: float) -> energy.BatterySpec:
        b = self.site.battery
        cap = b.capacity_kwh * fraction
        return energy.BatterySpec(
            capacity_kwh=cap,
            reserve_soc=b.reserve_soc,
            max_charge_kw=b.max_charge_c * cap,
            max_discharge_kw=b.max_discharge_c * cap,
            efficiency=b.round_trip_efficiency,
        )

    def _check_shares(self, reg: AppRegistration, grid_kw: float) -> None:
        others = list(self.apps.values())
        tol = 1e-9
        if sum(a.solar_fraction for a in others) + reg.solar_fraction > 1 + tol:
            raise InputError("solar_fraction", "the apps' solar fractions would add up to more than 1")
        if sum(a.battery_fraction for a in others) + reg.battery_fraction > 1 + tol:
            raise InputError("battery_fraction", "the apps' battery fractions would add up to more than 1")
        field_ = "grid_kw" if reg.grid_kw is not None else "grid_fraction"
        if sum(a.grid_share_kw for a in others) + grid_kw > self.site.grid.capacity_kw * (1 + tol):
            raise InputError(field_, f"the apps' grid shares would exceed the site's {self.site.grid.capacity_kw} kW")

    def register_app(self, reg: AppRegistration) -> tuple[AppState, str]:
        with self._lock:
            if reg.name in self.apps:
                raise ConflictError(f"app {reg.name!r} already exists")
            if (reg.grid_kw is None) == (reg.grid_fraction is None):
                raise InputError("grid_kw", "give exactly one of grid_kw and grid_fraction")
            grid_kw = reg.grid_kw if reg.grid_kw is not None else reg.grid_fraction * self.site.grid.capacity_kw
            self._check_shares(reg, grid_kw)
            for i, c in enumerate(reg.containers):
                if c not in self.containers:
                    raise InputError(f"containers.{i}", f"unknown container {c!r}")
                owner = self.containers[c].app
                if owner is not None:
                    raise InputError(f"containers.{i}", f"container {c!r} already belongs to app {owner!r}")
            token = secrets.token_urlsafe(32)
            spec = reg.model_dump(mode="json")
            battery = self._battery_for(reg.battery_fraction)
            app = AppState(
                name=reg.name,
                token_sha256=_hash(token),
                spec=spec,
                containers=list(reg.containers),
                grid_share_kw=grid_kw,
                solar_fraction=reg.solar_fraction,
                battery_fraction=reg.battery_fraction,
                callback_url=spec.get("callback_url"),
                battery=battery,
                battery_energy_kwh=battery.capacity_kwh * self._initial_soc(),
                registered_at=self.clock.now(),
            )
            self.store.save_app(app.name, app.token_sha256, spec, self._state_doc(app), app.registered_at)
            self.apps[app.name] = app
            for c in app.containers:
                self.containers[c].app = app.name
            return app, token

    def _initial_soc(self) -> float:
        b = self.site.battery
        return b.reserve_soc if b.initial_soc is None else b.initial_soc

    def _state_doc(self, app: AppState) -> dict:
        return app.settings({c: self.containers[c].powercap_kw for c in app.containers})

    def _persist(self, app: AppState) -> None:
        self.store.save_app_state(app.name, self._state_doc(app))

    def _restore_apps(self) -> None:
        for row in self.store.load_apps():
            try:
                reg = AppRegistration.model_validate(row["spec"])
            except Exception as e:  # a site change can invalidate an old app; say so, don't guess
                log.error("cannot restore app %s: %s", row["name"], e)
                continue
            missing = [c for c in reg.containers if c not in self.containers]
            if missing:
                log.error("cannot restore app %s: containers %s are no longer in the site", reg.name, missing)
                continue
            grid_kw = reg.grid_kw if reg.grid_kw is not None else reg.grid_fraction * self.site.grid.capacity_kw
            battery = self._battery_for(reg.battery_fraction)
            energy_kwh = self.store.last_battery_energy(reg.name)
            if energy_kwh is None:
                energy_kwh = battery.capacity_kwh * self._initial_soc()
            st = row["state"]
            b = st.get("carbon_budget")
            app = AppState(
                name=reg.name,
                token_sha256=row["token_sha256"],
                spec=row["spec"],
                containers=list(reg.containers),
                grid_share_kw=grid_kw,
                solar_fraction=reg.solar_fraction,
                battery_fraction=reg.battery_fraction,
                callback_url=row["spec"].get("callback_url"),
                battery=battery,
                battery_energy_kwh=min(energy_kwh, battery.capacity_kwh),
                registered_at=row["registered_at"],
                charge_rate_kw=float(st.get("charge_rate_kw") or 0.0),
                max_discharge_kw=st.get("max_discharge_kw"),
                carbon_rate_gco2_per_h=st.get("carbon_rate_gco2_per_h"),
            )
            if b:
                start = datetime.fromisoformat(b["start"])
                end = datetime.fromisoformat(b["end"]) if b.get("end") else None
                used = self.store.app_totals(app.name, start, end or self.last_tick_end)["carbon_kgco2"]
                app.carbon_budget = {"kgco2": b["kgco2"], "start": start, "end": end, "used_kgco2": used}
            self.apps[app.name] = app
            for c in app.containers:
                cs = self.containers[c]
                cs.app = app.name
                cap = st.get("powercaps_kw", {}).get(c)
                if cap is not None and cs.model.idle_kw <= cap <= cs.model.max_kw:
                    cs.powercap_kw = float(cap)

    def delete_app(self, name: str) -> None:
        with self._lock:
            app = self.apps.pop(name, None)
            if app is None:
                raise KeyError(name)
            for c in app.containers:
                cs = self.containers[c]
                cs.app = None
                cs.powercap_kw = cs.model.max_kw
                self._apply_caps_for_container(c)
            self.store.delete_app(name)

    def authenticate(self, token: str | None) -> AppState:
        if not token:
            raise AuthError("missing bearer token")
        h = _hash(token)
        with self._lock:
            for app in self.apps.values():
                if hmac.compare_digest(app.token_sha256, h):
                    return app
        raise AuthError("invalid token")

    def _container_of(self, app: AppState, name: str) -> ContainerState:
        cs = self.containers.get(name)
        if cs is None:
            raise InputError("container", f"unknown container {name!r}")
        if cs.app != app.name:
            raise ForbiddenError(f"container {name!r} does not belong to app {app.name!r}")
        return cs

    # ------------------------------------------------------------------ caps and policies
    def _policy_rate(self, app: AppState, now: datetime) -> float:
        rate = math.inf if app.carbon_rate_gco2_per_h is None else app.carbon_rate_gco2_per_h
        b = app.carbon_budget
        if b is not None and now >= b["start"] and (b["end"] is None or now < b["end"]):
            hours_left = None if b["end"] is None else (b["end"] - now).total_seconds() / 3600.0
            rate = min(rate, energy.budget_rate_gco2_per_h(b["kgco2"], b["used_kgco2"], hours_left))
        elif b is not None and b["end"] is not None and now >= b["end"]:
            pass  # the budget's window is over: it no longer binds
        return rate

    def _effective_caps(self, app: AppState, caps: dict[str, float], now: datetime) -> tuple[dict[str, float], bool, float]:
        rate = self._policy_rate(app, now)
        if not math.isfinite(rate):
            return dict(caps), True, rate
        dt_h = self.dt_s / 3600.0
        clean = app.solar_fraction * self.solar.power_kw(now)
        if app.charge_rate_kw <= 0:
            lim = math.inf if app.max_discharge_kw is None else app.max_discharge_kw
            clean += energy.available_discharge_kw(app.battery, app.battery_energy_kwh, dt_h, lim)
        ci = self.carbon.at(now).gco2_per_kwh
        idle = {c: self.containers[c].model.idle_kw for c in caps}
        eff, met = energy.carbon_limited_caps(caps, idle, clean, ci, rate)
        return eff, met, rate

    def _apply_caps_for_container(self, name: str) -> None:
        cs = self.containers[name]
        if cs.app is None:
            self._set_limit(cs, cs.powercap_kw)
        else:
            self._apply_caps(self.apps[cs.app])

    def _set_limit(self, cs: ContainerState, cap_kw: float) -> None:
        limit = cs.model.cpu_limit_for_cap(cap_kw)
        try:
            self.backend.set_cpu_limit(cs.name, limit)
            cs.last_error = None
        except BackendError as e:
            cs.last_error = str(e)
            raise
        cs.effective_powercap_kw = cap_kw
        cs.cpu_limit_cores = limit

    def _apply_caps(self, app: AppState, caps: dict[str, float] | None = None) -> None:
        caps = caps or {c: self.containers[c].powercap_kw for c in app.containers}
        eff, met, _ = self._effective_caps(app, caps, self.clock.now())
        app.carbon_policy_met = met
        for c, cap in eff.items():
            cs = self.containers[c]
            if cs.cpu_limit_cores is None or abs(cap - cs.effective_powercap_kw) > 1e-12:
                self._set_limit(cs, cap)

    # ------------------------------------------------------------------ Table 1: setters
    def set_container_powercap(self, app: AppState, name: str, kw: float) -> ContainerState:
        with self._lock:
            cs = self._container_of(app, name)
            m = cs.model
            if not (isinstance(kw, (int, float)) and math.isfinite(kw)) or kw < 0:
                raise InputError("kw", "must be a finite number >= 0")
            if kw > m.max_kw + 1e-12:
                raise InputError("kw", f"{kw} kW is above the container's max power {m.max_kw} kW")
            if kw < m.idle_kw - 1e-12:
                raise InputError("kw", f"{kw} kW is below the container's idle power {m.idle_kw} kW")
            old = cs.powercap_kw
            cs.powercap_kw = float(kw)
            try:
                self._apply_caps(app)
            except BackendError:
                cs.powercap_kw = old
                try:
                    self._apply_caps(app)
                except BackendError:
                    pass
                raise
            self._persist(app)
            return cs

    def set_battery_charge_rate(self, app: AppState, kw: float) -> AppState:
        with self._lock:
            if not math.isfinite(kw) or kw < 0:
                raise InputError("kw", "must be a finite number >= 0")
            if kw > app.battery.max_charge_kw + 1e-12:
                raise InputError(
                    "kw", f"{kw} kW is above the battery's max charge rate {app.battery.max_charge_kw} kW (C-rate)"
                )
            if kw > app.grid_share_kw + 1e-12:
                raise InputError("kw", f"{kw} kW is above the app's grid share {app.grid_share_kw} kW")
            app.charge_rate_kw = float(kw)
            self._persist(app)
            return app

    def set_battery_max_discharge(self, app: AppState, kw: float) -> AppState:
        with self._lock:
            if not math.isfinite(kw) or kw < 0:
                raise InputError("kw", "must be a finite number >= 0")
            if kw > app.battery.max_discharge_kw + 1e-12:
                raise InputError(
                    "kw",
                    f"{kw} kW is above the battery's max discharge rate {app.battery.max_discharge_kw} kW (C-rate)",
                )
            app.max_discharge_kw = float(kw)
            self._persist(app)
            return app

    # ------------------------------------------------------------------ Table 2: carbon policies
    def set_carbon_rate(self, app: AppState, gco2_per_h: float | None) -> AppState:
        with self._lock:
            if gco2_per_h is not None and (not math.isfinite(gco2_per_h) or gco2_per_h < 0):
                raise InputError("gco2_per_h", "must be a finite number >= 0")
            old = app.carbon_rate_gco2_per_h
            app.carbon_rate_gco2_per_h = gco2_per_h
            try:
                self._apply_caps(app)
            except BackendError:
                app.carbon_rate_gco2_per_h = old
                raise
            self._persist(app)
            return app

    def set_carbon_budget(self, app: AppState, kgco2: float | None, start: datetime | None, end: datetime | None) -> AppState:
        with self._lock:
            old = app.carbon_budget
            if kgco2 is None:
                app.carbon_budget = None
            else:
                if not math.isfinite(kgco2) or kgco2 < 0:
                    raise InputError("kgco2", "must be a finite number >= 0")
                s = _utc(start) if start else self.clock.now()
                e = _utc(end) if end else None
                if e is not None and e <= s:
                    raise InputError("end", "must be after start")
                used = self.store.app_totals(app.name, s, e or self.last_tick_end)["carbon_kgco2"] if s < self.last_tick_end else 0.0
                app.carbon_budget = {"kgco2": float(kgco2), "start": s, "end": e, "used_kgco2": used}
            try:
                self._apply_caps(app)
            except BackendError:
                app.carbon_budget = old
                raise
            self._persist(app)
            return app

    # ------------------------------------------------------------------ getters
    def container_view(self, cs: ContainerState) -> dict:
        return {
            "container": cs.name,
            "app": cs.app,
            "cores": cs.cores,
            "idle_kw": cs.model.idle_kw,
            "max_kw": cs.model.max_kw,
            "powercap_kw": cs.powercap_kw,
            "effective_powercap_kw": cs.effective_powercap_kw,
            "cpu_limit_cores": cs.cpu_limit_cores,
            "cpu_usage_cores": cs.usage_cores,
            "power_kw": cs.power_kw,
            "power_source": POWER_SOURCE,
            "backend": self.backend.kind,
            "backend_error": cs.last_error,
        }

    def get_container(self, app: AppState, name: str) -> dict:
        with self._lock:
            return self.container_view(self._container_of(app, name))

    def battery_view(self, app: AppState) -> dict:
        b = app.battery
        last = app.last
        return {
            "capacity_kwh": b.capacity_kwh,
            "charge_level_kwh": app.battery_energy_kwh,
            "soc": (app.battery_energy_kwh / b.capacity_kwh) if b.capacity_kwh > 0 else 0.0,
            "reserve_soc": b.reserve_soc,
            "max_charge_kw": b.max_charge_kw,
            "max_discharge_kw": b.max_discharge_kw,
            "charge_rate_kw": app.charge_rate_kw,
            "max_discharge_setting_kw": app.max_discharge_kw,
            "discharge_rate_kw": last.battery_discharge_kw if last else 0.0,
            "charging_kw": last.charging_kw if last else 0.0,
            "round_trip_efficiency": b.efficiency,
            "as_of": self._as_of(app),
        }

    def _as_of(self, app: AppState) -> str | None:
        return app.last_interval[1].isoformat() if app.last_interval else None

    def solar_view(self, app: AppState) -> dict:
        now = self.clock.now()
        last = app.last
        return {
            "power_kw": last.solar_kw if last else 0.0,
            "current_kw": app.solar_fraction * self.solar.power_kw(now),
            "curtailed_kw": last.curtailed_kw if last else 0.0,
            "solar_fraction": app.solar_fraction,
            "as_of": self._as_of(app),
            "now": now.isoformat(),
        }

    def grid_view(self, app: AppState) -> dict:
        last = app.last
        return {
            "power_kw": last.grid_kw if last else 0.0,
            "to_load_kw": last.grid_to_load_kw if last else 0.0,
            "to_battery_kw": last.grid_to_battery_kw if last else 0.0,
            "over_share_kw": last.grid_over_share_kw if last else 0.0,
            "grid_share_kw": app.grid_share_kw,
            "as_of": self._as_of(app),
        }

    def carbon_view(self) -> dict:
        now = self.clock.now()
        v = self.carbon.at(now)
        return {
            "gco2_per_kwh": v.gco2_per_kwh,
            "quality": v.quality,
            "trace": self.carbon.name,
            "trace_hour": v.trace_hour.isoformat(),
            "at": now.isoformat(),
        }

    def app_view(self, app: AppState) -> dict:
        with self._lock:
            return {
                "name": app.name,
                "containers": list(app.containers),
                "grid_share_kw": app.grid_share_kw,
                "solar_fraction": app.solar_fraction,
                "battery_fraction": app.battery_fraction,
                "callback_url": app.callback_url,
                "registered_at": app.registered_at.isoformat(),
                "battery": self.battery_view(app),
                "carbon_policy": self.policy_view(app),
            }

    def policy_view(self, app: AppState) -> dict:
        b = app.carbon_budget
        now = self.clock.now()
        rate = self._policy_rate(app, now)
        return {
            "carbon_rate_gco2_per_h": app.carbon_rate_gco2_per_h,
            "carbon_budget": None
            if b is None
            else {
                "kgco2": b["kgco2"],
                "start": b["start"].isoformat(),
                "end": b["end"].isoformat() if b["end"] else None,
                "used_kgco2": b["used_kgco2"],
            },
            "effective_rate_gco2_per_h": rate if math.isfinite(rate) else None,
            "met": app.carbon_policy_met,
        }

    # ------------------------------------------------------------------ Table 2: energy and carbon
    def _interval(self, start: datetime | None, end: datetime | None) -> tuple[datetime, datetime]:
        e = _utc(end) if end else self.last_tick_end
        s = _utc(start) if start else datetime(1970, 1, 1, tzinfo=timezone.utc)
        if e <= s:
            raise InputError("end", "must be after start")
        return s, e

    def energy_carbon(self, app: AppState, start: datetime | None, end: datetime | None, container: str | None) -> dict:
        s, e = self._interval(start, end)
        with self._lock:
            if container is not None:
                self._container_of(app, container)
                tot = self.store.container_totals(container, app.name, s, e)
                return {"app": app.name, "container": container, "start": s.isoformat(), "end": e.isoformat(), **tot,
                        "power_source": POWER_SOURCE}
            tot = self.store.app_totals(app.name, s, e)
            per = {c: self.store.container_totals(c, app.name, s, e) for c in app.containers}
        return {"app": app.name, "container": None, "start": s.isoformat(), "end": e.isoformat(),
                "energy_kwh": tot["load_energy_kwh"], **tot, "containers": per, "power_source": POWER_SOURCE}

    # ------------------------------------------------------------------ tick
    def advance(self, n: int = 1) -> list[dict]:
        """Simulated clock only: advance by ``n`` ticks, running each."""
        if getattr(self.clock, "mode", "") != "simulated":
            raise ConflictError("the clock is real-time; ticks come from the ticker")
        out = []
        for _ in range(n):
            with self._lock:
                self.clock.advance(self.dt_s)
                out.append(self.tick())
        return out

    def tick(self) -> dict:
        """Account the interval since the previous tick, store it, then set the caps for the next interval."""
        with self._lock:
            end = self.clock.now()
            start = self.last_tick_end
            dt_s = (end - start).total_seconds()
            if dt_s <= 0:
                raise ConflictError("no time has passed since the previous tick")
            dt_h = dt_s / 3600.0
            mid = start + timedelta(seconds=dt_s / 2)
            ci = self.carbon.at(mid)
            site_solar = self.solar.mean_power_kw(start, end)
            tick_id = self.tick_id + 1
            errors: list[str] = []

            for cs in self.containers.values():
                try:
                    u = self.backend.cpu_usage_cores(cs.name)
                    cs.last_error = None
                except BackendError as e:
                    u = 0.0
                    cs.last_error = str(e)
                    errors.append(f"{cs.name}: {e}")
                cs.usage_cores = min(max(u, 0.0), cs.cores)
                cs.power_kw = cs.model.power_kw(cs.usage_cores)

            app_rows, cont_rows, summaries = [], [], {}
            container_carbon: dict[str, float] = {}
            for app in self.apps.values():
                load = sum(self.containers[c].power_kw for c in app.containers)
                res = energy.step(
                    energy.StepInput(
                        dt_h=dt_h,
                        load_kw=load,
                        solar_kw=app.solar_fraction * site_solar,
                        battery=app.battery,
                        battery_energy_kwh=app.battery_energy_kwh,
                        grid_gco2_per_kwh=ci.gco2_per_kwh,
                        grid_charge_kw=app.charge_rate_kw,
                        max_discharge_kw=math.inf if app.max_discharge_kw is None else app.max_discharge_kw,
                        grid_share_kw=app.grid_share_kw,
                    )
                )
                app.battery_energy_kwh = res.battery_energy_kwh
                app.last = res
                app.last_interval = (start, end)
                b = app.carbon_budget
                if b is not None and end > b["start"] and (b["end"] is None or start < b["end"]):
                    lo = max(start, b["start"])
                    hi = end if b["end"] is None else min(end, b["end"])
                    b["used_kgco2"] += res.carbon_kgco2 * max(0.0, (hi - lo).total_seconds()) / dt_s
                load_kwh = load * dt_h
                for c in app.containers:  # the load's grid carbon, split by energy
                    share = (self.containers[c].power_kw * dt_h / load_kwh) if load_kwh > 0 else 0.0
                    container_carbon[c] = res.carbon_load_kgco2 * share
                rate = self._policy_rate(app, start)
                row = {
                    "tick_id": tick_id, "interval_start": start, "interval_end": end, "dt_s": dt_s, "app": app.name,
                    **{k: v for k, v in res.as_dict().items() if k in _APP_FIELDS},
                    "battery_soc": res.battery_energy_kwh / app.battery.capacity_kwh if app.battery.capacity_kwh > 0 else 0.0,
                    "carbon_rate_limit_gco2_per_h": rate if math.isfinite(rate) else None,
                    "carbon_policy_met": app.carbon_policy_met,
                }
                app_rows.append(row)
                summaries[app.name] = {
                    **{k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()},
                    "balance_error_kw": res.balance_error_kw(),
                    "charging_kw": res.charging_kw,
                    "ci_quality": ci.quality,
                    "containers": {},
                }
            for cs in self.containers.values():
                r = {
                    "tick_id": tick_id, "interval_start": start, "interval_end": end, "dt_s": dt_s,
                    "container": cs.name, "app": cs.app, "cpu_limit_cores": cs.cpu_limit_cores,
                    "cpu_usage_cores": cs.usage_cores, "powercap_kw": cs.powercap_kw,
                    "effective_powercap_kw": cs.effective_powercap_kw, "power_kw": cs.power_kw,
                    "energy_kwh": cs.power_kw * dt_h, "carbon_kgco2": container_carbon.get(cs.name, 0.0),
                    "power_source": POWER_SOURCE,
                }
                cont_rows.append(r)
                if cs.app in summaries:
                    summaries[cs.app]["containers"][cs.name] = {
                        k: r[k] for k in ("cpu_usage_cores", "cpu_limit_cores", "powercap_kw", "effective_powercap_kw", "power_kw", "energy_kwh", "carbon_kgco2")
                    }
            tick_row = {
                "tick_id": tick_id, "interval_start": start, "interval_end": end, "dt_s": dt_s,
                "site_solar_kw": site_solar, "grid_gco2_per_kwh": ci.gco2_per_kwh, "ci_quality": ci.quality,
                "clock_mode": getattr(self.clock, "mode", "?"), "backend": self.backend.kind,
                "recorded_at": datetime.now(timezone.utc),
            }
            self.store.write_tick(tick_row, cont_rows, app_rows)
            self.tick_id = tick_id
            self.last_tick_end = end

            for app in self.apps.values():  # caps for the next interval (carbon policies look at "now")
                try:
                    self._apply_caps(app)
                except BackendError as e:
                    errors.append(f"{app.name}: {e}")
            return {
                "tick_id": tick_id,
                "interval_start": start.isoformat(),
                "interval_end": end.isoformat(),
                "dt_s": dt_s,
                "site_solar_kw": site_solar,
                "grid_gco2_per_kwh": ci.gco2_per_kwh,
                "ci_quality": ci.quality,
                "apps": summaries,
                "errors": errors,
            }


_APP_FIELDS = {
    "load_kw", "solar_kw", "solar_to_load_kw", "solar_to_battery_kw", "curtailed_kw", "battery_discharge_kw",
    "grid_to_load_kw", "grid_to_battery_kw", "grid_kw", "grid_over_share_kw", "battery_energy_kwh",
    "battery_loss_kwh", "grid_gco2_per_kwh", "carbon_kgco2", "carbon_load_kgco2", "carbon_charging_kgco2",
}

__all__ = ["Ecovisor", "AuthError", "ForbiddenError", "ConflictError"]
