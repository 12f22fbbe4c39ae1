"""Request and response bodies of the ecovisor's REST API (pydantic models; they make the OpenAPI schema)."""
from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, field_validator

_IN = ConfigDict(extra="forbid", allow_inf_nan=False)

NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"


class AppRegistration(BaseModel):
    """An application's share of the site. Give the grid share as ``grid_kw`` or as ``grid_fraction`` of the
    site's grid capacity. The shares of all apps may not add up to more than the site has."""

    model_config = _IN
    name: str = Field(pattern=NAME_PATTERN)
    grid_kw: float | None = Field(default=None, ge=0)
    grid_fraction: float | None = Field(default=None, ge=0, le=1)
    solar_fraction: float = Field(default=0.0, ge=0, le=1)
    battery_fraction: float = Field(default=0.0, ge=0, le=1)
    containers: list[Annotated[str, Field(pattern=NAME_PATTERN)]] = Field(default_factory=list)
    callback_url: AnyHttpUrl | None = None

    @field_validator("containers")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("containers must be unique")
        return v


class AppRegistered(BaseModel):
    name: str
    token: str = Field(description="bearer token of the app; shown once")
    grid_share_kw: float
    solar_fraction: float
    battery_fraction: float
    containers: list[str]


class PowerBody(BaseModel):
    model_config = _IN
    kw: float = Field(ge=0, description="power in kW")


class TickBody(BaseModel):
    model_config = _IN
    n: int = Field(default=1, ge=1, le=100_000, description="number of ticks to advance the simulated clock")


class DemandBody(BaseModel):
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
    start: datetime | None = None
    end: datetime | None = None

    @field_validator("start", "end")
    @classmethod
    def _tz(cls, v: datetime | None) -> datetime | None:
        if v is not None and v.tzinfo is None:
            raise ValueError("must carry a time zone (e.g. 2022-06-21T00:00:00Z)")
        return v
