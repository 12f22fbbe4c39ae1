"""The fleet: campuses, clusters and power domains, read from TOML and validated with pydantic.

Every campus sits in one grid zone, named as its carbon provider names it (an Electricity Maps zone such as ``DE``,
a WattTime region, a CSV feed's name, or for the bundled trace one of the 8 EIA-930 balancing authorities), and
one local time zone (any IANA name), and has a power contract. Its optional ``[campuses.carbon]`` table names its
provider (:class:`CarbonSource`). Every cluster has power domains; a domain is either a number of identical
machines of one SPECpower_ssj2008 server (a row of data/server_power/...csv), which gives its cores and a declared
power curve, or any hardware given by its ``cores``, with its own ``power_points`` or with telemetry alone. The
demo fields (a cluster's traces and shares, the fleet's history window) are needed only by ``cicm demo seed`` and
the backtests.

An optional ``[telemetry]`` table names where the nightly plan reads the night's telemetry (docs/telemetry.md):
today a Prometheus server (``source = "prometheus"``, ``url``, ``lookback_hours`` and a ``[telemetry.mapping]``
table of PromQL queries). The mapping is kept here as the file's table; ``cicm.planning.ingest.telemetry_source``
parses it with ``cicm.telemetry_sources.parse_mapping`` (config sits below telemetry_sources in the layers).

Everything is checked before anything is read or stored (issue 20), and a refusal is an InputError naming the
field (``campuses.1.clusters.0.power_domains.2.name``):

* names (fleet, campus, cluster, power domain) are 1-200 characters, without leading or trailing whitespace or
  control characters; campus names are unique in the fleet, cluster names and power-domain names are unique in the
  whole fleet (telemetry is keyed by them: a repeated domain would let one cluster's power rows overwrite
  another's, a silent wrong plan);
* every number has a range no real fleet leaves: ``machines`` 1-1,000,000 per domain (:data:`MAX_MACHINES`),
  a server of 1-4,096 hardware threads (:data:`MAX_THREADS_PER_MACHINE`), shares in (0, 0.9] and (0, 0.6],
  ``reservation_ratio`` in [1, 3], ``contract_limit_kw`` in (0, 10,000,000] (10 GW: :data:`MAX_CONTRACT_KW`),
  ``history_days`` 7-3,660, ``power_points`` from 0 to the domain's cores with CPU rising and power not
  falling, dates in 2000-2100 (:data:`MIN_DATE`, :data:`MAX_DATE`), ``lookback_hours``
  1-8,784; at most 1,000 power domains per cluster; NaN and infinity are refused everywhere.
"""
from __future__ import annotations

import hashlib
import re
import tomllib
import zoneinfo
from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from cicm.errors import InputError
from cicm.paths import bundled_data_dir

MAX_NAME_CHARS = 200
MAX_MACHINES = 1_000_000
MAX_THREADS_PER_MACHINE = 4096
MAX_CONTRACT_KW = 10_000_000.0
MAX_DOMAINS_PER_CLUSTER = 1000
MAX_HISTORY_DAYS = 3660
MIN_DATE = date(2000, 1, 1)
MAX_DATE = date(2100, 1, 1)

GRID_ZONES = ("AZPS", "BPAT", "CISO", "ERCO", "MISO", "NYIS", "PJM", "SOCO")
SPEC_WATT_COLUMNS = ("watts_active_idle",) + tuple(f"watts_{p}pct" for p in range(10, 101, 10))
SPECPOWER_FILE = "server_power/specpower_ssj2008_619_servers_via_green-coding-solutions_cloud-energy.csv"


@lru_cache(maxsize=1)
def specpower_table() -> pd.DataFrame:
    return pd.read_csv(bundled_data_dir() / SPECPOWER_FILE)


@lru_cache(maxsize=1)
def specpower_models() -> tuple[str, ...]:
    """hw_model of every SPECpower row, in row order."""
    return tuple(specpower_table()["hw_model"].astype(str))


@lru_cache(maxsize=None)
def spec_watts(spec_row: int) -> tuple[float, ...]:
    """Watts of one server of the SPECpower row at active idle, 10%, ..., 100% load."""
    row = specpower_table().iloc[spec_row]
    return tuple(float(row[c]) for c in SPEC_WATT_COLUMNS)


@lru_cache(maxsize=None)
def threads_per_machine(spec_row: int) -> int:
    """Logical CPUs (hardware threads) of a SPECpower server: the 'cores' a scheduler hands out."""
    text = str(specpower_table().iloc[spec_row]["hardware_threads"])
    return int(text.split()[0])


class FieldProblem(ValueError):
    """Raised inside a model validator to name a field below the model (pydantic puts such errors at the
    model's own path); ``load_fleet`` appends ``field`` to that path."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


def check_name(value: str, what: str = "name") -> str:
    """A name as the fleet uses it in telemetry and the store: 1-200 characters, no leading or trailing
    whitespace, no control characters."""
    if not value or not value.strip():
        raise ValueError(f"empty {what}")
    if value != value.strip():
        raise ValueError(f"{what} {value!r} has leading or trailing whitespace")
    if len(value) > MAX_NAME_CHARS:
        raise ValueError(f"{what} of {len(value)} characters is longer than {MAX_NAME_CHARS}")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ValueError(f"{what} {value!r} holds control characters")
    return value


def _first_repeat(names: list[str]) -> tuple[int, str] | None:
    """(index, name) of the first name seen before, or None."""
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            return i, name
        seen.add(name)
    return None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("name", mode="after", check_fields=False)
    @classmethod
    def _good_name(cls, value: str) -> str:
        return check_name(value)


class PowerDomain(_Strict):
    """A power domain: machines of one SPECpower server (``machines``, ``spec_row``, ``server_model``), or any
    hardware given by its ``cores``. Its power curve comes from telemetry (fitted each night); a SPECpower row or
    the domain's own ``power_points`` ([[cpu_cores, kw], ...]) is the declared curve, used when no fit is
    possible. A domain with neither must have power telemetry (checked at plan time)."""

    name: str
    machines: int | None = Field(default=None, ge=1, le=MAX_MACHINES, description="identical machines, 1-1,000,000")
    spec_row: int | None = Field(default=None, ge=0, description="0-based row of the bundled SPECpower CSV")
    server_model: str | None = Field(default=None, description="hw_model of that row, checked, so a row typo cannot "
                                                               "pass")
    cores: int | None = Field(default=None, ge=1, le=MAX_MACHINES * MAX_THREADS_PER_MACHINE,
                              description="logical CPUs of the domain (without a SPECpower row)")
    power_points: list[tuple[float, float]] | None = Field(
        default=None, min_length=2, max_length=1000,
        description="the domain's own curve: [[cpu_cores, kw], ...], CPU increasing from 0 to the domain's cores")

    @model_validator(mode="after")
    def _one_way_to_the_cores(self) -> "PowerDomain":
        spec = (self.machines, self.spec_row, self.server_model)
        if any(v is not None for v in spec) and not all(v is not None for v in spec):
            missing = [n for n, v in zip(("machines", "spec_row", "server_model"), spec) if v is None]
            raise FieldProblem(missing[0], "a SPECpower domain gives machines, spec_row and server_model together")
        if self.spec_row is None:
            if self.cores is None:
                raise FieldProblem("cores", "give the domain's cores (or machines, spec_row and server_model of a "
                                            "SPECpower server)")
        else:
            self._check_spec_row()
            if self.cores is not None and self.cores != self.capacity_cores:
                raise FieldProblem("cores", f"{self.cores} cores, but {self.machines} x {self.server_model!r} have "
                                            f"{self.capacity_cores}")
            if self.power_points is not None:
                raise FieldProblem("power_points", "a SPECpower domain has its curve already: give spec_row or "
                                                   "power_points, not both")
        if self.power_points is not None:
            self._check_points()
        return self

    def _check_spec_row(self) -> None:
        assert self.spec_row is not None
        models = specpower_models()
        if self.spec_row >= len(models):
            raise FieldProblem("spec_row", f"spec_row {self.spec_row} is past the SPECpower table ({len(models)} "
                                           "rows)")
        actual = models[self.spec_row]
        if actual != self.server_model:
            raise FieldProblem("server_model", f"spec_row {self.spec_row} is {actual!r}, not {self.server_model!r}")
        try:
            threads = threads_per_machine(self.spec_row)
        except (ValueError, IndexError) as exc:
            raise FieldProblem("spec_row", f"spec_row {self.spec_row} has no readable hardware_threads: {exc}") \
                from exc
        if not 1 <= threads <= MAX_THREADS_PER_MACHINE:
            raise FieldProblem("spec_row", f"spec_row {self.spec_row} has {threads} hardware threads per machine; "
                                           f"a server has 1-{MAX_THREADS_PER_MACHINE}")

    def _check_points(self) -> None:
        assert self.power_points is not None
        cpu = [p[0] for p in self.power_points]
        kw = [p[1] for p in self.power_points]
        if cpu[0] != 0 or cpu[-1] != self.capacity_cores:
            raise FieldProblem("power_points", f"CPU must run from 0 to the domain's {self.capacity_cores} cores, "
                                               f"got {cpu[0]:g} to {cpu[-1]:g}")
        if any(b <= a for a, b in zip(cpu, cpu[1:])):
            raise FieldProblem("power_points", "CPU cores must increase strictly from point to point")
        if any(not 0 <= k <= MAX_CONTRACT_KW for k in kw):
            raise FieldProblem("power_points", f"kW must be in [0, {MAX_CONTRACT_KW:,.0f}]")
        if any(b < a for a, b in zip(kw, kw[1:])):
            raise FieldProblem("power_points", "power must not fall as CPU rises")

    @property
    def cores_per_machine(self) -> int:
        if self.spec_row is None:
            raise InputError("spec_row", f"power domain {self.name!r} names no SPECpower server")
        return threads_per_machine(self.spec_row)

    @property
    def has_declared_curve(self) -> bool:
        return self.spec_row is not None or self.power_points is not None

    @property
    def capacity_cores(self) -> int:
        if self.spec_row is None:
            assert self.cores is not None
            return self.cores
        assert self.machines is not None
        return self.machines * threads_per_machine(self.spec_row)

    def declared_curve_kw(self) -> tuple[list[float], list[float]] | None:
        """(cpu_cores, kW) of the domain's declared curve: its ``power_points``, or its SPECpower row's published
        points scaled by its machines; None for a telemetry-only domain."""
        if self.power_points is not None:
            return [p[0] for p in self.power_points], [p[1] for p in self.power_points]
        if self.spec_row is None:
            return None
        assert self.machines is not None
        watts = spec_watts(self.spec_row)
        cores = self.capacity_cores
        return ([cores * i / 10 for i in range(11)], [w * self.machines / 1000.0 for w in watts])


class Cluster(_Strict):
    """A cluster: its power domains give its cores. The trace fields say how ``cicm demo seed`` derives its
    telemetry; a real cluster leaves them out (its telemetry comes from Prometheus or a drop)."""

    name: str
    cores: int | None = Field(default=None, ge=1, description="the cluster's cores: when given, the sum of its "
                                                              "power domains' cores must equal it")
    inflexible_trace: Literal["google2019", "azure2019", "alibaba2018"] | None = Field(
        default=None, description="demo only: the trace its inflexible usage is derived from")
    inflexible_peak_share: float | None = Field(default=None, gt=0, le=0.9,
                                                description="demo only: peak inflexible usage / capacity")
    flexible_trace: Literal["pai", "azure"] | None = Field(default=None, description="demo only: the batch trace")
    flexible_mean_share: float | None = Field(default=None, gt=0, le=0.6,
                                              description="demo only: mean flexible usage / capacity")
    reservation_ratio: float = Field(default=1.3, ge=1.0, le=3.0, description="reservations / usage")
    power_domains: list[PowerDomain] = Field(min_length=1, max_length=MAX_DOMAINS_PER_CLUSTER)

    @model_validator(mode="after")
    def _cores_add_up(self) -> "Cluster":
        if self.cores is not None and self.cores != self.capacity_cores:
            raise FieldProblem("cores", f"{self.cores} cores, but the power domains have {self.capacity_cores}")
        demo = (self.inflexible_trace, self.inflexible_peak_share, self.flexible_trace, self.flexible_mean_share)
        if any(v is not None for v in demo) and not all(v is not None for v in demo):
            names = ("inflexible_trace", "inflexible_peak_share", "flexible_trace", "flexible_mean_share")
            raise FieldProblem(next(n for n, v in zip(names, demo) if v is None),
                               "a demo cluster gives all four trace fields (or none, for a real cluster)")
        return self

    @property
    def capacity_cores(self) -> int:
        return sum(d.capacity_cores for d in self.power_domains)

    @property
    def is_demo(self) -> bool:
        return self.inflexible_trace is not None


#: Carbon providers a campus may name (cicm.carbon.providers.REGISTRY; config sits below carbon in the layers).
CARBON_PROVIDERS = ("trace", "electricitymaps", "watttime", "csv")
#: Zone names each provider uses: Electricity Maps zones (DE, US-CAL-CISO, IN-SO, DK-DK1), WattTime regions
#: (CAISO_NORTH, PJM_DC, DE); the trace provider knows the bundled EIA balancing authorities only.
ZONE_PATTERNS = {"electricitymaps": r"^[A-Z]{2}(-[A-Z0-9]{1,12}){0,3}$", "watttime": r"^[A-Z][A-Z0-9_]{1,63}$"}


def check_zone(provider: str, zone: str) -> str:
    """``zone`` if ``provider`` can know it, else ValueError saying which zones it knows."""
    if provider == "trace":
        if zone not in GRID_ZONES:
            raise ValueError(f"unknown grid zone {zone!r} for the trace provider, whose bundled zones are "
                             f"{', '.join(GRID_ZONES)}; a live zone names its provider in [campuses.carbon]")
    elif provider in ZONE_PATTERNS and not re.match(ZONE_PATTERNS[provider], zone):
        example = "DE or US-CAL-CISO" if provider == "electricitymaps" else "CAISO_NORTH"
        raise ValueError(f"{zone!r} is not a {provider} zone name (such as {example})")
    return zone


def path_relative_to_fleet(value: Path | None, info: ValidationInfo) -> Path | None:
    """A file named in the fleet file: a relative path is relative to the fleet file's folder (the validation
    context's ``fleet_dir``, when given)."""
    base = (info.context or {}).get("fleet_dir")
    if value is not None and not value.is_absolute() and base is not None:
        return Path(base) / value
    return value


class CarbonSource(_Strict):
    """A campus's ``[campuses.carbon]`` table: where its grid's forecasts and actuals come from. Without it the
    campus uses the run's provider (``cicm plan --provider``, default trace). Tokens are never here: they come
    from the provider's environment variables or Prefect Secret blocks (docs/operations.md)."""

    provider: Literal["trace", "electricitymaps", "watttime", "csv"]
    base_url: str | None = Field(default=None, description="the provider's base URL (default: its public API)")
    forecast_csv: Path | None = Field(default=None, description="csv: the forecast feed (target_hour, "
                                                                "gco2_per_kwh[, issued_at]); relative to the "
                                                                "fleet file")
    actuals_csv: Path | None = Field(default=None, description="csv: the measured intensity (target_hour, "
                                                               "gco2_per_kwh); relative to the fleet file")

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+(/\S*)?$", value):
            raise ValueError(f"must be an http(s) URL, got {value!r}")
        return value.rstrip("/") if value else value

    _relative_to_fleet = field_validator("forecast_csv", "actuals_csv", mode="after")(path_relative_to_fleet)

    @model_validator(mode="after")
    def _csv_needs_a_file(self) -> "CarbonSource":
        if self.provider == "csv" and self.forecast_csv is None:
            raise FieldProblem("forecast_csv", "the csv provider needs forecast_csv")
        if self.provider != "csv" and (self.forecast_csv or self.actuals_csv):
            raise FieldProblem("forecast_csv" if self.forecast_csv else "actuals_csv",
                               f"CSV files are for provider csv, not {self.provider}")
        return self


class BatterySpec(_Strict):
    """A campus's ``[campuses.battery]``: the battery the day-ahead plan co-plans with the flexible schedule
    (docs/storage_coplan.md). kW = kWh per hour; fractions of the capacity for the reserve and the state of charge
    the plan assumes at the start of its horizon."""

    capacity_kwh: float = Field(gt=0, le=MAX_CONTRACT_KW * 24, description="usable energy, kWh")
    max_charge_kw: float = Field(gt=0, le=MAX_CONTRACT_KW, description="kW")
    max_discharge_kw: float = Field(gt=0, le=MAX_CONTRACT_KW, description="kW")
    round_trip_efficiency: float = Field(default=0.9, ge=0.5, le=1.0, description="split evenly over both legs")
    reserve_soc: float = Field(default=0.1, ge=0, lt=1, description="never discharged below this share")
    initial_soc: float = Field(default=0.5, ge=0, le=1, description="assumed at the start of the plan's horizon")

    @model_validator(mode="after")
    def _start_above_reserve(self) -> "BatterySpec":
        if self.initial_soc < self.reserve_soc:
            raise FieldProblem("initial_soc", f"{self.initial_soc:g} is below the reserve {self.reserve_soc:g}")
        return self


class SolarSpec(_Strict):
    """A campus's ``[campuses.solar]``: a fixed-tilt array, forecast as pvlib's clear sky times a cloud factor
    from ``cloud_csv`` (timestamp, cloud_cover in percent), or clear sky alone (an upper bound) without it."""

    latitude: float = Field(ge=-90, le=90)
    longitude: float = Field(ge=-180, le=180)
    kwp: float = Field(gt=0, le=MAX_CONTRACT_KW, description="DC nameplate, kW")
    tilt_deg: float = Field(default=20.0, ge=0, le=90)
    azimuth_deg: float = Field(default=180.0, ge=0, le=360, description="180 faces south")
    cloud_csv: Path | None = Field(default=None, description="cloud-cover forecast; relative to the fleet file")

    _relative_to_fleet = field_validator("cloud_csv", mode="after")(path_relative_to_fleet)


class Campus(_Strict):
    name: str
    grid_zone: str = Field(description="the grid zone as the campus's provider names it")
    timezone: str
    contract_limit_kw: float = Field(gt=0, le=MAX_CONTRACT_KW, description="kW, in (0, 10 GW]")
    carbon: CarbonSource | None = Field(default=None, description="the campus's own carbon source")
    battery: BatterySpec | None = Field(default=None, description="on-site battery, co-planned (queue program)")
    solar: SolarSpec | None = Field(default=None, description="on-site solar, forecast and co-planned")
    clusters: list[Cluster] = Field(min_length=1)

    @field_validator("grid_zone")
    @classmethod
    def _zone_name(cls, value: str) -> str:
        return check_name(value, "grid zone")

    @model_validator(mode="after")
    def _zone_known_to_provider(self) -> "Campus":
        if self.carbon is not None:
            try:
                check_zone(self.carbon.provider, self.grid_zone)
            except ValueError as exc:
                raise FieldProblem("grid_zone", str(exc)) from None
        return self

    @field_validator("timezone")
    @classmethod
    def _known_tz(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    def provider(self, default: str) -> str:
        """The provider of this campus's carbon: its own, else the run's ``default``."""
        return self.carbon.provider if self.carbon is not None else default


class TelemetrySource(_Strict):
    """The fleet file's ``[telemetry]`` table: where the nightly plan reads the night's telemetry."""

    source: Literal["prometheus"] = Field(description="the only source a fleet file names today (the Parquet drop "
                                                      "is given per run: cicm plan --telemetry DIR)")
    url: str = Field(description="the Prometheus server's base URL, e.g. http://127.0.0.1:9090")
    lookback_hours: int = Field(default=35 * 24, ge=1, le=366 * 24,
                                description="hours read when the store holds no usage history of the fleet (and "
                                            "the most read at once); the load forecast needs 28 days")
    mapping: dict[str, Any] = Field(default_factory=dict, description="the [telemetry.mapping] table: "
                                                                      "cicm.telemetry_sources.PrometheusMapping")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+(/\S*)?$", value):
            raise ValueError(f"must be an http(s) URL such as http://127.0.0.1:9090, got {value!r}")
        return value.rstrip("/")


class Fleet(_Strict):
    name: str
    history_start: pd.Timestamp | None = Field(default=None, description="demo only: first UTC day of the derived "
                                                                        "telemetry, in 2000-2100")
    history_days: int | None = Field(default=None, ge=7, le=MAX_HISTORY_DAYS,
                                     description="demo only: days of history, 7-3,660 (ten years)")
    default_plan_date: date | None = Field(default=None, description="the day `cicm plan` plans by default")
    campuses: list[Campus] = Field(min_length=1)
    telemetry: TelemetrySource | None = Field(default=None, description="where the nightly plan reads telemetry "
                                                                        "(none: the store and --telemetry drops)")

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    @field_validator("history_start", mode="before")
    @classmethod
    def _utc_day(cls, value) -> pd.Timestamp | None:
        if value is None:
            return None
        try:
            ts = pd.Timestamp(value)
        except (ValueError, TypeError, OverflowError) as exc:
            raise ValueError(f"not a date: {value!r}") from exc
        if ts is pd.NaT:
            raise ValueError(f"not a date: {value!r}")
        ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
        if not pd.Timestamp(MIN_DATE, tz="UTC") <= ts < pd.Timestamp(MAX_DATE, tz="UTC"):
            raise ValueError(f"{ts.date()} is outside {MIN_DATE}..{MAX_DATE}")
        return ts

    @field_validator("default_plan_date", mode="after")
    @classmethod
    def _sane_date(cls, value: date | None) -> date | None:
        if value is not None and not MIN_DATE <= value < MAX_DATE:
            raise ValueError(f"{value} is outside {MIN_DATE}..{MAX_DATE}")
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> "Fleet":
        """Campus names unique in the fleet; cluster and power-domain names unique across the whole fleet (usage
        rows are keyed by cluster, power rows by domain: a repeat would mix two clusters' telemetry)."""
        repeat = _first_repeat([c.name for c in self.campuses])
        if repeat is not None:
            raise FieldProblem(f"campuses.{repeat[0]}.name",
                               f"campus name {repeat[1]!r} is repeated; campus names must be unique in the fleet")
        clusters = [(i, j, c) for i, campus in enumerate(self.campuses) for j, c in enumerate(campus.clusters)]
        cluster_at: dict[str, str] = {}
        for i, j, c in clusters:
            if c.name in cluster_at:
                raise FieldProblem(f"campuses.{i}.clusters.{j}.name",
                                   f"cluster name {c.name!r} is also at {cluster_at[c.name]}; cluster names must "
                                   "be unique across the fleet")
            cluster_at[c.name] = f"campuses.{i}.clusters.{j}"
        domain_of: dict[str, str] = {}
        for i, j, c in clusters:
            for k, d in enumerate(c.power_domains):
                if d.name in domain_of:
                    where = "the same cluster" if domain_of[d.name] == c.name else f"cluster {domain_of[d.name]!r}"
                    raise FieldProblem(f"campuses.{i}.clusters.{j}.power_domains.{k}.name",
                                       f"power domain {d.name!r} of cluster {c.name!r} is also in {where}; power "
                                       "domain names must be unique across the fleet (power telemetry is keyed by "
                                       "domain and hour, so one cluster's rows would overwrite another's)")
                domain_of[d.name] = c.name
        return self

    def clusters(self) -> list[Cluster]:
        return [c for campus in self.campuses for c in campus.clusters]

    def campus_of(self, cluster_name: str) -> Campus:
        for campus in self.campuses:
            if any(c.name == cluster_name for c in campus.clusters):
                return campus
        raise InputError("cluster", f"no cluster named {cluster_name!r} in fleet {self.name!r}")

    def cluster(self, cluster_name: str) -> Cluster:
        campus = self.campus_of(cluster_name)
        return next(c for c in campus.clusters if c.name == cluster_name)

    @property
    def is_demo(self) -> bool:
        """Every cluster names its demo traces and the fleet its history window: ``cicm demo seed`` can derive
        its telemetry."""
        return self.history_start is not None and self.history_days is not None and all(
            c.is_demo and all(d.spec_row is not None for d in c.power_domains) for c in self.clusters())

    def require_demo(self, what: str) -> None:
        """InputError naming the first field a demo fleet needs and this one lacks."""
        if self.history_start is None or self.history_days is None:
            raise InputError("history_start" if self.history_start is None else "history_days",
                             f"{what} needs a demo fleet: fleet {self.name!r} gives no demo history window")
        for i, campus in enumerate(self.campuses):
            for j, c in enumerate(campus.clusters):
                if not c.is_demo:
                    raise InputError(f"campuses.{i}.clusters.{j}.inflexible_trace",
                                     f"{what} needs a demo fleet: cluster {c.name!r} names no demo traces")
                for k, d in enumerate(c.power_domains):
                    if d.spec_row is None:
                        raise InputError(f"campuses.{i}.clusters.{j}.power_domains.{k}.spec_row",
                                         f"{what} needs a demo fleet: power domain {d.name!r} names no SPECpower "
                                         "server")

    @property
    def history_end(self) -> pd.Timestamp:
        if self.history_start is None or self.history_days is None:
            raise InputError("history_start", f"fleet {self.name!r} has no demo history window")
        return self.history_start + pd.Timedelta(days=self.history_days)

    def power_domains_by_cluster(self) -> dict[str, list[str]]:
        """cluster name -> its power domains' names, in file order."""
        return {c.name: [d.name for d in c.power_domains] for c in self.clusters()}


def check_unique_domains(fleet: Fleet) -> None:
    """Power telemetry is keyed by (domain, hour), so each power domain's name is needed once in the fleet.
    ``Fleet`` itself refuses repeats now (any fleet, with or without ``[telemetry]``); this check stays for
    fleets built without validation (``model_construct``). Raises InputError naming the second one's field."""
    seen: dict[str, str] = {}
    for i, campus in enumerate(fleet.campuses):
        for j, cluster in enumerate(campus.clusters):
            for k, domain in enumerate(cluster.power_domains):
                if domain.name in seen:
                    raise InputError(f"campuses.{i}.clusters.{j}.power_domains.{k}.name",
                                     f"power domain {domain.name!r} of cluster {cluster.name!r} is also in cluster "
                                     f"{seen[domain.name]!r}; power domain names must be unique across the fleet "
                                     "(power rows are keyed by domain and hour)")
                seen[domain.name] = cluster.name


def check_fleet_zones(fleet: Fleet, default_provider: str) -> None:
    """Every campus's zone is one its provider knows (its own ``[campuses.carbon]`` provider, else
    ``default_provider``, the run's). Raises InputError naming ``campuses.N.grid_zone``, before anything is read
    or stored."""
    for i, campus in enumerate(fleet.campuses):
        try:
            check_zone(campus.provider(default_provider), campus.grid_zone)
        except ValueError as exc:
            raise InputError(f"campuses.{i}.grid_zone", f"campus {campus.name!r}: {exc}") from None


def default_fleet_path() -> Path:
    return bundled_data_dir() / "demo_fleet.toml"


def load_fleet(path: Path | str | None = None) -> Fleet:
    """Read and validate a fleet file. Errors name the field, e.g. `campuses.0.grid_zone`.

    A Fleet is immutable, so the same file content is validated once per process (a 10,000-cluster fleet takes
    seconds); a copy is returned, so no caller can change another's fleet."""
    path = Path(path) if path else default_fleet_path()
    try:
        text = path.read_bytes()
    except FileNotFoundError as exc:
        raise InputError("fleet", f"fleet file not found: {path}") from exc
    return _load_fleet(str(path), hashlib.sha256(text).hexdigest(), text).model_copy(deep=True)


@lru_cache(maxsize=4)
def _load_fleet(path: str, _digest: str, text: bytes) -> Fleet:
    try:
        raw = tomllib.loads(text.decode())
    except UnicodeDecodeError as exc:
        raise InputError("fleet", f"{path} is not UTF-8 text: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise InputError("fleet", f"{path} is not valid TOML: {exc}") from exc
    try:
        fleet = Fleet.model_validate(raw, context={"fleet_dir": str(Path(path).resolve().parent)})
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first["loc"]]
        problem = (first.get("ctx") or {}).get("error")
        if isinstance(problem, FieldProblem):
            loc.append(problem.field)
        field = ".".join(loc) or "fleet"
        message = str(first["msg"]).removeprefix("Value error, ")
        raise InputError(field, f"{message} (in {path})") from exc
    check_unique_domains(fleet)
    return fleet
