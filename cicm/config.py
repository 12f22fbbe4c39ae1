"""The fleet: campuses, clusters and power domains, read from TOML and validated with pydantic.

Every campus sits in one grid zone (a bundled EIA-930 balancing authority) and one local time zone, and has a
power contract. Every cluster has power domains; each domain is a number of identical machines of one
SPECpower_ssj2008 server (a row of data/server_power/...csv), which gives its cores and its power curve.

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
  ``history_days`` 7-3,660, dates in 2000-2100 (:data:`MIN_DATE`, :data:`MAX_DATE`), ``lookback_hours``
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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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
SPECPOWER_FILE = "server_power/specpower_ssj2008_619_servers_via_green-coding-solutions_cloud-energy.csv"


@lru_cache(maxsize=1)
def specpower_table() -> pd.DataFrame:
    return pd.read_csv(bundled_data_dir() / SPECPOWER_FILE)


@lru_cache(maxsize=1)
def specpower_models() -> tuple[str, ...]:
    """hw_model of every SPECpower row, in row order."""
    return tuple(specpower_table()["hw_model"].astype(str))


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
    name: str
    machines: int = Field(ge=1, le=MAX_MACHINES, description="identical machines, 1-1,000,000")
    spec_row: int = Field(ge=0, description="0-based row of the bundled SPECpower CSV")
    server_model: str = Field(description="hw_model of that row, checked, so a row typo cannot pass")

    @model_validator(mode="after")
    def _spec_row_matches_model(self) -> "PowerDomain":
        models = specpower_models()
        if self.spec_row >= len(models):
            raise ValueError(f"spec_row {self.spec_row} is past the SPECpower table ({len(models)} rows)")
        actual = models[self.spec_row]
        if actual != self.server_model:
            raise ValueError(f"spec_row {self.spec_row} is {actual!r}, not {self.server_model!r}")
        try:
            threads = threads_per_machine(self.spec_row)
        except (ValueError, IndexError) as exc:
            raise ValueError(f"spec_row {self.spec_row} has no readable hardware_threads: {exc}") from exc
        if not 1 <= threads <= MAX_THREADS_PER_MACHINE:
            raise ValueError(f"spec_row {self.spec_row} has {threads} hardware threads per machine; a server has "
                             f"1-{MAX_THREADS_PER_MACHINE}")
        return self

    @property
    def cores_per_machine(self) -> int:
        return threads_per_machine(self.spec_row)

    @property
    def capacity_cores(self) -> int:
        return self.machines * self.cores_per_machine


class Cluster(_Strict):
    name: str
    inflexible_trace: Literal["google2019", "azure2019", "alibaba2018"]
    inflexible_peak_share: float = Field(gt=0, le=0.9, description="peak inflexible usage / capacity")
    flexible_trace: Literal["pai", "azure"]
    flexible_mean_share: float = Field(gt=0, le=0.6, description="mean flexible usage / capacity")
    reservation_ratio: float = Field(default=1.3, ge=1.0, le=3.0, description="reservations / usage")
    power_domains: list[PowerDomain] = Field(min_length=2, max_length=MAX_DOMAINS_PER_CLUSTER)

    @property
    def capacity_cores(self) -> int:
        return sum(d.capacity_cores for d in self.power_domains)


class Campus(_Strict):
    name: str
    grid_zone: str
    timezone: str
    contract_limit_kw: float = Field(gt=0, le=MAX_CONTRACT_KW, description="kW, in (0, 10 GW]")
    clusters: list[Cluster] = Field(min_length=1)

    @field_validator("grid_zone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        if value not in GRID_ZONES:
            raise ValueError(f"unknown grid zone {value!r}; bundled zones are {', '.join(GRID_ZONES)}")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_tz(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value


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
    history_start: pd.Timestamp = Field(description="first UTC day of the demo telemetry, in 2000-2100")
    history_days: int = Field(ge=7, le=MAX_HISTORY_DAYS, description="days of history, 7-3,660 (ten years)")
    default_plan_date: date | None = Field(default=None, description="the day `cicm plan` plans by default")
    campuses: list[Campus] = Field(min_length=1)
    telemetry: TelemetrySource | None = Field(default=None, description="where the nightly plan reads telemetry "
                                                                        "(none: the store and --telemetry drops)")

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    @field_validator("history_start", mode="before")
    @classmethod
    def _utc_day(cls, value) -> pd.Timestamp:
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
    def history_end(self) -> pd.Timestamp:
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
        fleet = Fleet.model_validate(raw)
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
