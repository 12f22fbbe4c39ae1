"""The app registry and auth: registers, restores and removes applications, checks that their shares fit the
site, issues bearer tokens (stored as SHA-256) and tells which app owns which container."""
from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from datetime import datetime, timedelta, timezone
from typing import Callable

from cicm.errors import InputError

from . import energy
from .clock import Clock
from .errors import AuthError, ConflictError, NotFoundError
from .schemas import DEFAULT_TOKEN_TTL_DAYS, AppRegistration
from .site import SiteConfig
from .state import AppState, ContainerState
from cicm.store.ecovisor import Telemetry

log = logging.getLogger("cicm.ecovisor")

_TOL = 1e-9


def wall_now() -> datetime:
    """The wall clock (UTC): tokens expire in real time, whatever the ecovisor's (maybe simulated) clock says."""
    return datetime.now(timezone.utc)


def token_sha256(token: str) -> str:
    """The stored form of a bearer token."""
    return hashlib.sha256(token.encode()).hexdigest()


class AppRegistry:
    """The registered apps (``apps``, by name) and their ownership of ``containers``. Callers hold the ecovisor
    lock."""

    def __init__(self, site: SiteConfig, store: Telemetry, containers: dict[str, ContainerState], clock: Clock,
                 wall: Callable[[], datetime] = wall_now):
        self.site = site
        self.store = store
        self.containers = containers
        self.clock = clock
        self.wall = wall  # token expiry runs on the wall clock
        self.apps: dict[str, AppState] = {}
        self._by_token: dict[str, AppState] = {}  # token SHA-256 -> app
        self._dirty: set[str] = set()  # apps whose settings changed since the last flush

    # ---------------------------------------------------------------- register and remove
    def register(self, reg: AppRegistration) -> tuple[AppState, str]:
        """Check, store and add an app; returns it and its bearer token (shown once)."""
        if reg.name in self.apps:
            raise ConflictError(f"app {reg.name!r} already exists")
        if (reg.grid_kw is None) == (reg.grid_fraction is None):
            raise InputError("grid_kw", "give exactly one of grid_kw and grid_fraction")
        grid_kw = self._grid_share_kw(reg)
        self._check_shares(reg, grid_kw)
        self._check_containers_free(reg.containers)
        token = secrets.token_urlsafe(32)
        spec = reg.model_dump(mode="json")
        spec.pop("token_ttl_days", None)  # a property of the token, not of the app
        battery = self._battery_for(reg.battery_fraction)
        app = AppState(
            name=reg.name,
            token_sha256=token_sha256(token),
            spec=spec,
            containers=list(reg.containers),
            grid_share_kw=grid_kw,
            solar_fraction=reg.solar_fraction,
            battery_fraction=reg.battery_fraction,
            callback_url=spec.get("callback_url"),
            battery=battery,
            battery_energy_kwh=battery.capacity_kwh * self._initial_soc(),
            registered_at=self.clock.now(),
            token_expires_at=self.wall() + timedelta(days=reg.token_ttl_days),
        )
        self.store.save_app(app.name, app.token_sha256, spec, self._state_doc(app), app.registered_at)
        self._add(app)
        return app, token

    def rotate(self, name: str, ttl_days: int) -> tuple[AppState, str]:
        """A new token for app ``name`` (``KeyError`` if unknown), stored at once; the old token stops working."""
        app = self.apps[name]
        token = secrets.token_urlsafe(32)
        new_sha, expires = token_sha256(token), self.wall() + timedelta(days=ttl_days)
        old_sha, old_expires = app.token_sha256, app.token_expires_at
        app.token_sha256, app.token_expires_at = new_sha, expires
        try:
            self.store.save_app(app.name, new_sha, app.spec, self._state_doc(app), app.registered_at)
        except Exception:
            app.token_sha256, app.token_expires_at = old_sha, old_expires
            raise
        self._by_token.pop(old_sha, None)
        self._by_token[new_sha] = app
        self._dirty.discard(name)  # just stored
        return app, token

    def pop(self, name: str) -> AppState:
        """Remove an app from the registry (``KeyError`` if unknown); its containers stay to be released."""
        app = self.apps.pop(name, None)
        if app is None:
            raise KeyError(name)
        self._by_token.pop(app.token_sha256, None)
        self._dirty.discard(name)
        return app

    def restore(self, last_tick_end: datetime) -> None:
        """Load the stored apps; an app the site can no longer hold is logged and skipped."""
        for row in self.store.load_apps():
            app = self._restored(row, last_tick_end)
            if app is None:
                continue
            self._add(app)
            self._restore_caps(app, row["state"].get("powercaps_kw", {}))

    # ---------------------------------------------------------------- auth
    def authenticate(self, token: str | None) -> AppState:
        """The app whose token this is, else :class:`AuthError`. One dict lookup by the token's SHA-256 (a lookup
        by hash leaks nothing about the token), then a constant-time compare; safe without the ecovisor lock."""
        if not token:
            raise AuthError("missing bearer token")
        h = token_sha256(token)
        app = self._by_token.get(h)
        if app is None or not hmac.compare_digest(app.token_sha256, h):
            raise AuthError("invalid token")
        if app.token_expires_at is not None and self.wall() >= app.token_expires_at:
            raise AuthError(f"the token of app {app.name!r} expired at {app.token_expires_at.isoformat()}; "
                            f"an admin issues a new one with `cicm ecovisor app rotate {app.name}`")
        return app

    def container_of(self, app: AppState, name: str) -> ContainerState:
        """The app's container ``name``; 404 when the app has none of that name, with the same answer whether the
        container does not exist or belongs to another app (or to none): no name leaks across apps."""
        cs = self.containers.get(name)
        if cs is None or cs.app != app.name:
            raise NotFoundError(f"app {app.name!r} has no container {name!r}", field="container")
        return cs

    # ---------------------------------------------------------------- persistence
    def persist(self, app: AppState) -> None:
        """Mark the app's settings to be stored by the next :meth:`flush` (write-behind: a setter costs no store
        write; the ecovisor flushes every second, after every tick and on shutdown)."""
        self._dirty.add(app.name)

    def dirty_docs(self) -> list[tuple[str, dict]]:
        """Take the settings documents of the apps changed since the last call (clears the marks)."""
        names, self._dirty = self._dirty, set()
        return [(n, self._state_doc(self.apps[n])) for n in sorted(names) if n in self.apps]

    def flush(self) -> int:
        """Store the changed settings now (callers hold the ecovisor lock); returns how many apps."""
        docs = self.dirty_docs()
        self.write_docs(docs)
        return len(docs)

    def write_docs(self, docs: list[tuple[str, dict]]) -> None:
        """Store settings documents taken by :meth:`dirty_docs` (needs no ecovisor lock)."""
        for name, doc in docs:
            self.store.save_app_state(name, doc)

    def carbon_used_kgco2(self, app: str, start: datetime, end: datetime) -> float:
        """The app's stored carbon over [start, end)."""
        return self.store.app_totals(app, start, end)["carbon_kgco2"]

    # ---------------------------------------------------------------- internals
    def _add(self, app: AppState) -> None:
        self.apps[app.name] = app
        self._by_token[app.token_sha256] = app
        for c in app.containers:
            self.containers[c].app = app.name

    def _grid_share_kw(self, reg: AppRegistration) -> float:
        if reg.grid_kw is not None:
            return reg.grid_kw
        assert reg.grid_fraction is not None  # exactly one of the two (checked on registration)
        return reg.grid_fraction * self.site.grid.capacity_kw

    def _check_shares(self, reg: AppRegistration, grid_kw: float) -> None:
        others = list(self.apps.values())
        if sum(a.solar_fraction for a in others) + reg.solar_fraction > 1 + _TOL:
            raise InputError("solar_fraction", "the apps' solar fractions would add up to more than 1")
        if sum(a.battery_fraction for a in others) + reg.battery_fraction > 1 + _TOL:
            raise InputError("battery_fraction", "the apps' battery fractions would add up to more than 1")
        field_ = "grid_kw" if reg.grid_kw is not None else "grid_fraction"
        if sum(a.grid_share_kw for a in others) + grid_kw > self.site.grid.capacity_kw * (1 + _TOL):
            raise InputError(field_, f"the apps' grid shares would exceed the site's {self.site.grid.capacity_kw} kW")

    def _check_containers_free(self, names: list[str]) -> None:
        for i, c in enumerate(names):
            if c not in self.containers:
                raise InputError(f"containers.{i}", f"unknown container {c!r}")
            owner = self.containers[c].app
            if owner is not None:
                raise InputError(f"containers.{i}", f"container {c!r} already belongs to app {owner!r}")

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

    def _initial_soc(self) -> float:
        b = self.site.battery
        return b.reserve_soc if b.initial_soc is None else b.initial_soc

    def _state_doc(self, app: AppState) -> dict:
        return app.settings({c: self.containers[c].powercap_kw for c in app.containers})

    def _restored(self, row: dict, last_tick_end: datetime) -> AppState | None:
        try:
            reg = AppRegistration.model_validate(row["spec"])
        except Exception as e:  # a site change can invalidate an old app; say so, don't guess
            log.error("cannot restore app %s: %s", row["name"], e)
            return None
        missing = [c for c in reg.containers if c not in self.containers]
        if missing:
            log.error("cannot restore app %s: containers %s are no longer in the site", reg.name, missing)
            return None
        battery = self._battery_for(reg.battery_fraction)
        energy_kwh = self.store.last_battery_energy(reg.name)
        if energy_kwh is None:
            energy_kwh = battery.capacity_kwh * self._initial_soc()
        st = row["state"]
        app = AppState(
            name=reg.name,
            token_sha256=row["token_sha256"],
            spec=row["spec"],
            containers=list(reg.containers),
            grid_share_kw=self._grid_share_kw(reg),
            solar_fraction=reg.solar_fraction,
            battery_fraction=reg.battery_fraction,
            callback_url=row["spec"].get("callback_url"),
            battery=battery,
            battery_energy_kwh=min(energy_kwh, battery.capacity_kwh),
            registered_at=row["registered_at"],
            charge_rate_kw=float(st.get("charge_rate_kw") or 0.0),
            max_discharge_kw=st.get("max_discharge_kw"),
            carbon_rate_gco2_per_h=st.get("carbon_rate_gco2_per_h"),
            token_expires_at=self._restored_expiry(reg.name, st.get("token_expires_at")),
        )
        b = st.get("carbon_budget")
        if b:
            app.carbon_budget = self._restored_budget(app.name, b, last_tick_end)
        return app

    def _restored_expiry(self, name: str, stored: str | None) -> datetime:
        """The stored expiry; an app stored before tokens expired gets the default lifetime from now."""
        if stored:
            return datetime.fromisoformat(stored)
        log.warning("app %s: its token had no expiry; it expires in %d days", name, DEFAULT_TOKEN_TTL_DAYS)
        self._dirty.add(name)
        return self.wall() + timedelta(days=DEFAULT_TOKEN_TTL_DAYS)

    def _restored_budget(self, app: str, doc: dict, last_tick_end: datetime) -> dict:
        start = datetime.fromisoformat(doc["start"])
        end = datetime.fromisoformat(doc["end"]) if doc.get("end") else None
        used = self.carbon_used_kgco2(app, start, end or last_tick_end)
        return {"kgco2": doc["kgco2"], "start": start, "end": end, "used_kgco2": used}

    def _restore_caps(self, app: AppState, caps_kw: dict) -> None:
        for c in app.containers:
            cs = self.containers[c]
            cap = caps_kw.get(c)
            if cap is not None and cs.model.idle_kw <= cap <= cs.model.max_kw:
                cs.powercap_kw = float(cap)


__all__ = ["AppRegistry", "token_sha256"]
