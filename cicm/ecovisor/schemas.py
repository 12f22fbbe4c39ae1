"""Request and response bodies of the ecovisor's REST API (pydantic models; they make the OpenAPI schema).

Bodies are **strict**: a number is a JSON number (``true`` and ``"0.2"`` are refused, an integer where a float is
wanted is fine), an integer a JSON integer, and a timestamp an ISO-8601 string with a time zone
(:data:`Timestamp`, also for query parameters: ``?start=0.5`` is refused, never read as Unix time). Every range
rule that does not depend on the site is in the schema (``minimum``/``maximum``); the ones that do (a cap within
the container's idle and max power, a rate within the battery's C-rate) are in the field's description.
"""
from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Annotated, Any

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema, field_validator

_IN = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"

# ISO 8601 / RFC 3339 date-time with seconds and a zone (Z or +hh:mm), years 1900-2999
TIMESTAMP_PATTERN = (r"^(19|2[0-9])[0-9]{2}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
                     r"([Zz]|[+-][0-9]{2}:[0-9]{2})$")
_TIMESTAMP_RE = re.compile(TIMESTAMP_PATTERN)
TIMESTAMP_HINT = "an ISO-8601 date-time string with a time zone, e.g. 2022-06-21T00:00:00Z"


def parse_timestamp(v: Any) -> datetime:
    """An ISO-8601 string with a zone -> an aware datetime in UTC; anything else (numbers, naive or date-only
    strings, years outside 1900-2999) is refused with :data:`TIMESTAMP_HINT`."""
    if isinstance(v, datetime) and v.tzinfo is not None:  # from Python callers (and the stored specs)
        return v.astimezone(timezone.utc)
    if not isinstance(v, str) or not _TIMESTAMP_RE.match(v):
        raise ValueError(f"must be {TIMESTAMP_HINT}")
    try:
        return datetime.fromisoformat(v.upper().replace("Z", "+00:00")).astimezone(timezone.utc)
    except (ValueError, OverflowError) as e:
        raise ValueError(f"must be {TIMESTAMP_HINT} ({e})") from None


Timestamp = Annotated[
    datetime,
    PlainValidator(parse_timestamp),
    WithJsonSchema({"type": "string", "format": "date-time", "pattern": TIMESTAMP_PATTERN,
                    "description": TIMESTAMP_HINT}),
]

MAX_TICKS_PER_REQUEST = 48
TICK_CAP_WHY = (
    f"at most {MAX_TICKS_PER_REQUEST} ticks per request (4 h of 5-minute ticks): each tick accounts and stores "
    "every container (~25 ms), so one request stays near a second and cannot tie up the service; "
    "call again to advance further"
)
DEFAULT_TOKEN_TTL_DAYS = 90
MAX_TOKEN_TTL_DAYS = 3650


class AppRegistration(BaseModel):
    """An application's share of the site. Give the grid share as ``grid_kw`` or as ``grid_fraction`` of the
    site's grid capacity. The shares of all apps may not add up to more than the site has."""

    model_config = _IN
    name: str = Field(pattern=NAME_PATTERN)
    grid_kw: float | None = Field(default=None, ge=0)
    grid_fraction: float | None = Field(default=None, ge=0, le=1)
    solar_fraction: float = Field(default=0.0, ge=0, le=1)
    battery_fraction: float = Field(default=0.0, ge=0, le=1)
    containers: list[Annotated[str, Field(pattern=NAME_PATTERN)]] = Field(default_factory=list, max_length=100_000)
    callback_url: AnyHttpUrl | None = None
    callback_events: str | None = Field(
        default=None, pattern=r"^[a-z_]+(,[a-z_]+)*$", max_length=200,
        description="notifications also POSTed to callback_url, as the event stream's types (e.g. "
                    "`solar,carbon,battery`); the tick callback is always sent. Default: only the tick callback")
    token_ttl_days: int = Field(default=DEFAULT_TOKEN_TTL_DAYS, ge=1, le=MAX_TOKEN_TTL_DAYS,
                                description="the token expires this many days after it is issued (wall clock); "
                                            "`cicm ecovisor app rotate` issues a new one")

    @field_validator("callback_events")
    @classmethod
    def _known_events(cls, v: str | None) -> str | None:
        if v is not None:
            from cicm.errors import InputError

            from .events import parse_types

            try:
                parse_types(v)
            except InputError as e:
                raise ValueError(e.message) from None
        return v

    @field_validator("containers")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("containers must be unique")
        return v


class AppRegistered(BaseModel):
    name: str
    token: str = Field(description="bearer token of the app; shown once")
    token_expires_at: str = Field(description="when the token stops working (ISO 8601, UTC, wall clock)")
    grid_share_kw: float
    solar_fraction: float
    battery_fraction: float
    containers: list[str]


class TokenRotation(BaseModel):
    """A new token for an app; the old one stops working at once."""

    model_config = _IN
    token_ttl_days: int = Field(default=DEFAULT_TOKEN_TTL_DAYS, ge=1, le=MAX_TOKEN_TTL_DAYS,
                                description="days until the new token expires")


class TokenIssued(BaseModel):
    name: str
    token: str = Field(description="the app's new bearer token; shown once")
    token_expires_at: str = Field(description="when the token stops working (ISO 8601, UTC, wall clock)")


class PowerBody(BaseModel):
    """A power in kW: a JSON number >= 0. A container cap must lie in [idle_kw, max_kw] of the container; a
    charge rate within the battery's C-rate and the app's grid share; a max discharge within the C-rate."""

    model_config = _IN
    kw: float = Field(ge=0, description="power in kW (a number, never a string or a boolean)")


MAX_CAPS_PER_REQUEST = 100_000


class PowerCapEntry(BaseModel):
    """One container's cap in a bulk request: the container's name and the cap in kW, as
    ``PUT /v1/containers/{name}/powercap`` takes it (within the container's [idle_kw, max_kw])."""

    model_config = _IN
    name: str = Field(pattern=NAME_PATTERN, description="one of the app's containers")
    kw: float = Field(ge=0, description="power cap in kW (a number, never a string or a boolean)")


class PowerCapsBody(BaseModel):
    """Several of the app's container caps, set in one request and validated as a whole: one bad entry (a
    container the app does not have, a container named twice, a cap outside the container's [idle_kw, max_kw])
    refuses the request, naming the entry (``caps.<i>.name`` or ``caps.<i>.kw``), and nothing changes."""

    model_config = _IN
    caps: list[PowerCapEntry] = Field(max_length=MAX_CAPS_PER_REQUEST,
                                      description=f"at most {MAX_CAPS_PER_REQUEST:,} entries, each container once")


class ContainerView(BaseModel):
    """A container as ``GET /v1/containers/{name}`` shows it."""

    container: str
    app: str | None
    cores: float
    idle_kw: float
    max_kw: float
    powercap_kw: float
    effective_powercap_kw: float = Field(description="the cap in force after the app's carbon policies")
    cpu_limit_cores: float | None
    cpu_usage_cores: float
    power_kw: float
    power_source: str
    backend: str
    backend_error: str | None


class PowerCapsSet(BaseModel):
    """The answer to a bulk cap request: every container of the request, in its order, as it is now."""

    app: str
    n: int = Field(description="how many caps were set")
    containers: list[ContainerView]


class TickBody(BaseModel):
    model_config = _IN
    n: int = Field(default=1, ge=1, le=MAX_TICKS_PER_REQUEST,
                   description=f"number of ticks to advance the simulated clock; {TICK_CAP_WHY}")


class DemandBody(BaseModel):
    """Simulated backend: a container's CPU demand, in [0, the container's cores]."""

    model_config = _IN
    cores: float = Field(ge=0)


class CarbonRateBody(BaseModel):
    """Carbon rate limit in gCO2/h (null clears it). The ecovisor lowers the app's container caps so that
    grid power x grid intensity stays within it (Ecovisor's set_carbon_rate)."""

    model_config = _IN
    gco2_per_h: float | None = Field(ge=0)


class CarbonBudgetBody(BaseModel):
    """Carbon budget in kgCO2 over [start, end) (null kgco2 clears it). With an end, the remaining budget is
    paced evenly over the time left; without one, it binds once spent. start defaults to now."""

    model_config = _IN
    kgco2: float | None = Field(ge=0)
    start: Timestamp | None = None
    end: Timestamp | None = None


class ContainerPower(BaseModel):
    power_kw: float = Field(description="modelled from CPU usage, mean over the last tick")
    cpu_usage_cores: float
    powercap_kw: float
    effective_powercap_kw: float


class PowerSupply(BaseModel):
    """What served the load; the three add up to ``load_kw``."""

    solar_kw: float
    battery_kw: float
    grid_kw: float


class SolarFlows(BaseModel):
    power_kw: float
    to_load_kw: float
    to_battery_kw: float
    curtailed_kw: float


class GridFlows(BaseModel):
    power_kw: float
    to_load_kw: float
    to_battery_kw: float
    over_share_kw: float
    grid_share_kw: float


class BatteryPower(BaseModel):
    discharge_kw: float
    charging_kw: float
    charge_level_kwh: float
    soc: float
    capacity_kwh: float


class AppPower(BaseModel):
    """``get_app_power``: the app's power over its last tick (all 0 and ``as_of`` null before its first)."""

    app: str
    as_of: str | None
    interval_start: str | None
    load_kw: float = Field(description="the sum of the containers' power")
    containers: dict[str, ContainerPower]
    supply: PowerSupply
    solar: SolarFlows
    grid: GridFlows
    battery: BatteryPower
    grid_gco2_per_kwh: float | None
    carbon_gco2_per_h: float | None = Field(description="the tick's grid draw (load and charging) x its intensity")
    power_source: str


class ErrorBody(BaseModel):
    """Every error but 422: a message (401 also sends ``WWW-Authenticate: Bearer``)."""

    detail: str
    field: str | None = Field(default=None, description="the field at fault, when one is")


class ValidationIssue(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorBody(BaseModel):
    """422: the request was refused and nothing changed; ``field`` names the first offending field."""

    detail: list[ValidationIssue]
    field: str
