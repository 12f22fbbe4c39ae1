"""Site file (TOML) of an ecovisor, validated with pydantic.

A site is one physical energy system: a grid connection with a carbon-intensity source, a battery, a solar
array, a container backend and the containers with their power models. See ``examples/site.toml``.

Every bad value is rejected with :class:`cicm.errors.InputError` naming the field (dotted path, e.g.
``battery.reserve_soc``).
"""
from __future__ import annotations

import tomllib
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from cicm.errors import InputError

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

NonNeg = Annotated[float, Field(ge=0)]
Pos = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class Location(BaseModel):
    model_config = _STRICT
    latitude: float = Field(ge=-90, le=90)
    longitude: float = Field(ge=-180, le=180)
    timezone: str = "UTC"
    altitude_m: float = Field(default=0.0, ge=-500, le=9000)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError) as e:
            raise ValueError(f"unknown time zone {v!r}") from e
        return v


class CarbonSource(BaseModel):
    """Grid carbon intensity.

    ``source = "eia"``: the bundled EIA-930 2022 trace of ``zone`` (``data/carbon_intensity/{ZONE}_2022_...``).
    ``source = "csv"``: a CSV at ``path`` with a UTC ``timestamp_column`` and a ``column`` in gCO2/kWh.
    Gaps of at most ``max_gap_hours`` are interpolated linearly in time; longer gaps are filled with the same
    hour of the previous day (quality ``filled-previous-day``). Times outside the trace are replayed on the
    trace's year (``replay = "year"``, same month/day/hour) or held at the nearest value (``"hold"``); the
    quality of each value is reported by the API and stored with every tick.
    """

    model_config = _STRICT
    source: Literal["eia", "csv"] = "eia"
    zone: str | None = None
    path: str | None = None
    column: str = "avg_CI"
    timestamp_column: str = "timestamp"
    max_gap_hours: int = Field(default=3, ge=0, le=48)
    replay: Literal["year", "hold"] = "year"

    @model_validator(mode="after")
    def _need(self) -> "CarbonSource":
        if self.source == "eia" and not self.zone:
            raise ValueError("zone is required when source = 'eia'")
        if self.source == "csv" and not self.path:
            raise ValueError("path is required when source = 'csv'")
        return self


class Grid(BaseModel):
    model_config = _STRICT
    capacity_kw: Pos = Field(description="site grid connection; app grid shares given as fractions refer to it")
    carbon: CarbonSource


class Battery(BaseModel):
    model_config = _STRICT
    capacity_kwh: NonNeg
    reserve_soc: Fraction = 0.3
    initial_soc: Fraction | None = Field(default=None, description="defaults to reserve_soc")
    max_charge_c: NonNeg = Field(default=0.5, description="max charge power = C-rate x capacity_kwh (kW)")
    max_discharge_c: NonNeg = Field(default=1.0, description="max discharge power = C-rate x capacity_kwh (kW)")
    round_trip_efficiency: float = Field(default=0.9, gt=0, le=1)

    @model_validator(mode="after")
    def _soc(self) -> "Battery":
        if self.initial_soc is not None and self.initial_soc < self.reserve_soc:
            raise ValueError("initial_soc must be >= reserve_soc")
        return self


class Solar(BaseModel):
    """``source = "pvlib"``: clear-sky (Ineichen, Linke turbidity shipped with pvlib) on a fixed-tilt array,
    PVWatts DC with Faiman cell temperature, then flat system losses. ``source = "csv"``: a trace of site
    solar power in kW (``timestamp_column``, ``column``), linearly interpolated, zero outside the trace."""

    model_config = _STRICT
    source: Literal["pvlib", "csv"] = "pvlib"
    array_kwp: NonNeg = 0.0
    tilt_deg: float = Field(default=25.0, ge=0, le=90)
    azimuth_deg: float = Field(default=180.0, ge=0, lt=360)
    system_losses: Fraction = 0.14
    gamma_pdc: float = Field(default=-0.004, ge=-0.02, le=0)
    temp_air_c: float = Field(default=20.0, ge=-60, le=60)
    wind_speed_m_s: NonNeg = 1.0
    path: str | None = None
    column: str = "power_kw"
    timestamp_column: str = "timestamp"

    @model_validator(mode="after")
    def _need(self) -> "Solar":
        if self.source == "csv" and not self.path:
            raise ValueError("path is required when source = 'csv'")
        return self


class PowerModelSpec(BaseModel):
    """CPU -> power of a container. ``linear``: idle_kw at 0 cores to max_kw at ``cores``. ``piecewise``:
    ``points`` = [[cores, kw], ...], cores strictly increasing from 0 to the container's cores, kW
    non-decreasing."""

    model_config = _STRICT
    kind: Literal["linear", "piecewise"] = "linear"
    idle_kw: NonNeg | None = None
    max_kw: NonNeg | None = None
    points: list[tuple[NonNeg, NonNeg]] | None = None

    @model_validator(mode="after")
    def _need(self) -> "PowerModelSpec":
        if self.kind == "linear":
            if self.idle_kw is None or self.max_kw is None:
                raise ValueError("linear power model needs idle_kw and max_kw")
            if self.max_kw < self.idle_kw:
                raise ValueError("max_kw must be >= idle_kw")
        else:
            if not self.points or len(self.points) < 2:
                raise ValueError("piecewise power model needs at least two points")
            xs = [p[0] for p in self.points]
            ys = [p[1] for p in self.points]
            if xs[0] != 0:
                raise ValueError("piecewise points must start at 0 cores")
            if any(b <= a for a, b in zip(xs, xs[1:])):
                raise ValueError("piecewise cores must be strictly increasing")
            if any(b < a for a, b in zip(ys, ys[1:])):
                raise ValueError("piecewise kW must be non-decreasing")
        return self


class Container(BaseModel):
    model_config = _STRICT
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    cores: Pos
    power: PowerModelSpec
    sim_demand_cores: NonNeg = Field(default=0.0, description="simulated backend only: CPU demand in cores")

    @model_validator(mode="after")
    def _fit(self) -> "Container":
        points = self.power.points  # PowerModelSpec._need: set when kind is piecewise
        if self.power.kind == "piecewise" and points is not None and abs(points[-1][0] - self.cores) > 1e-12:
            raise ValueError("piecewise points must end at the container's cores")
        return self


class Backend(BaseModel):
    model_config = _STRICT
    kind: Literal["lxd", "cgroup", "simulated"] = "simulated"
    cgroup_root: str = Field(default="cicm-ecovisor", pattern=r"^[A-Za-z0-9_.-]+$")
    lxd_endpoint: str | None = Field(default=None, description="None = local unix socket")
    lxd_image: str | None = Field(default=None, description="image alias to create missing containers from")


class Events(BaseModel):
    """When the notifications of the event streams (``GET /v1/apps/{app}/events``) fire, and the streams' bounds.

    ``solar_change``: the app's solar share (the tick's mean) moved from the last notified value by more than
    ``max(solar_threshold_kw, solar_threshold_fraction x array_kwp x the app's solar_fraction)``.
    ``carbon_change``: the grid intensity at the tick's end
    differs from the last notified one by more than ``carbon_threshold_gco2_per_kwh`` (0: any change, i.e. every
    new hourly value that differs). ``battery_full`` / ``battery_empty``: the app's battery entered
    ``soc >= 1 - battery_epsilon_soc`` / ``soc <= reserve_soc + battery_epsilon_soc``; once per crossing."""

    model_config = _STRICT
    solar_threshold_fraction: Fraction = 0.05
    solar_threshold_kw: NonNeg = 0.0
    carbon_threshold_gco2_per_kwh: NonNeg = 0.0
    battery_epsilon_soc: float = Field(default=1e-6, ge=0, le=0.1)
    max_subscribers_per_app: int = Field(default=4, ge=1, le=64)
    keepalive_s: float = Field(default=15.0, gt=0, le=300)
    replay_events: int = Field(default=1000, ge=0, le=100_000,
                               description="recent events kept per app for reconnects with Last-Event-ID")
    queue_events: int = Field(default=256, ge=1, le=100_000,
                              description="events waiting per stream; a stream that falls further behind is "
                                          "sent `resync` and closed")


class SiteConfig(BaseModel):
    model_config = _STRICT
    name: str = "site"
    tick_seconds: int = Field(default=300, ge=1, le=3600)
    sim_start: datetime | None = Field(default=None, description="start of the simulated clock (UTC)")
    location: Location
    grid: Grid
    battery: Battery
    solar: Solar
    backend: Backend = Backend()
    events: Events = Events()
    containers: list[Container] = Field(default_factory=list)
    _base_dir: str = PrivateAttr(default=".")

    @field_validator("sim_start")
    @classmethod
    def _utc(cls, v: datetime | None) -> datetime | None:
        if v is None:
            return v
        if v.tzinfo is None:
            raise ValueError("sim_start must carry a time zone (e.g. 2022-06-21T00:00:00Z)")
        return v.astimezone(timezone.utc)

    @model_validator(mode="after")
    def _unique(self) -> "SiteConfig":
        names = [c.name for c in self.containers]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate container names: {sorted(dup)}")
        return self

    def container(self, name: str) -> Container:
        for c in self.containers:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def base_dir(self) -> Path:
        return Path(self._base_dir)


def _field_of(err: ValidationError) -> tuple[str, str]:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"]) or "site"
    return loc, e["msg"]


def parse_site(data: dict, base_dir: Path | str = ".") -> SiteConfig:
    """Validate a site mapping; relative paths in it are resolved against ``base_dir``."""
    try:
        site = SiteConfig.model_validate(data)
    except ValidationError as err:
        field, msg = _field_of(err)
        raise InputError(field, msg) from err
    site._base_dir = str(Path(base_dir).resolve())
    return site


def load_site(path: str | Path) -> SiteConfig:
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError as e:
        raise InputError("site", f"site file not found: {p}") from e
    except tomllib.TOMLDecodeError as e:
        raise InputError("site", f"invalid TOML in {p}: {e}") from e
    return parse_site(data, base_dir=p.parent)
