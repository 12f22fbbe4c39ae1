"""One entry point for every carbon-intensity source; its output is always validated and canonical.

Each source is a small class following the :class:`CarbonProvider` protocol, found by name in :data:`REGISTRY`
(``name -> class``). A provider is built from :class:`ProviderOptions` and returns the *raw* frame for a window;
:func:`fetch_forecast` checks the arguments, asks the provider and validates what comes back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol, TypeAlias, runtime_checkable

import pandas as pd
import requests

from cicm.carbon import csvsource, electricitymaps, trace, watttime
from cicm.carbon.http import DEFAULT_POLICY, RetryPolicy
from cicm.carbon.validate import DEFAULT_MAX_AGE, check_window, require_utc_timestamp, validate_forecast
from cicm.errors import InputError

#: A provider's registry name (one of :data:`PROVIDERS`).
ProviderName: TypeAlias = str
#: Horizons we ask live APIs for (both accept up to 72 h); the smallest one reaching ``end`` is used.
LIVE_HORIZONS_HOURS = (24, 48, 72)


def horizon_hours_needed(now: pd.Timestamp, end: pd.Timestamp) -> int | None:
    """Smallest standard horizon covering ``[now, end)``; None when the provider default (24 h) suffices."""
    need = math.ceil((end - now) / pd.Timedelta(hours=1))
    if need <= LIVE_HORIZONS_HOURS[0]:
        return None
    for horizon in LIVE_HORIZONS_HOURS:
        if need <= horizon:
            return horizon
    return LIVE_HORIZONS_HOURS[-1]  # validation will then report the hours beyond reach as missing


@dataclass(frozen=True)
class ProviderOptions:
    """Everything a provider may need besides the window; each provider reads only its own fields.

    ``base_url``, ``policy`` and ``session`` are for the HTTP providers (``session``: a ``requests.Session``
    with its own retries, else one is built from ``policy``); ``path`` for csv; ``seed`` for trace;
    ``issued_at`` for trace (default: ``now``) and for csv files without an ``issued_at`` column.
    """

    base_url: str | None = None
    path: str | Path | None = None
    seed: int = 0
    issued_at: pd.Timestamp | None = None
    policy: RetryPolicy = DEFAULT_POLICY
    session: requests.Session | None = None


@runtime_checkable
class CarbonProvider(Protocol):
    """A source of raw carbon-intensity forecasts (unvalidated; may be sub-hourly or reach beyond the window)."""

    name: ClassVar[str]

    def __init__(self, options: ProviderOptions) -> None:
        ...

    def fetch_raw(self, zone: str, start: pd.Timestamp, end: pd.Timestamp, *, now: pd.Timestamp) -> pd.DataFrame:
        ...


class TraceProvider:
    """Simulated day-ahead forecasts from the bundled traces (``seed`` drives the errors)."""

    name: ClassVar[str] = "trace"

    def __init__(self, options: ProviderOptions) -> None:
        self.options = options

    def fetch_raw(self, zone: str, start: pd.Timestamp, end: pd.Timestamp, *, now: pd.Timestamp) -> pd.DataFrame:
        issued_at = self.options.issued_at if self.options.issued_at is not None else now
        return trace.trace_forecast(zone, start, end, issued_at, self.options.seed)


class ElectricityMapsProvider:
    """Electricity Maps v3 forecasts (average lifecycle intensity); token from $ELECTRICITYMAPS_TOKEN."""

    name: ClassVar[str] = electricitymaps.PROVIDER

    def __init__(self, options: ProviderOptions) -> None:
        self.options = options

    def fetch_raw(self, zone: str, start: pd.Timestamp, end: pd.Timestamp, *, now: pd.Timestamp) -> pd.DataFrame:
        o = self.options
        return electricitymaps.fetch_raw_forecast(
            zone, base_url=o.base_url, horizon_hours=horizon_hours_needed(now, end), policy=o.policy,
            session=o.session,
        )


class WattTimeProvider:
    """WattTime v3 co2_moer forecasts (marginal intensity); credentials from $WATTTIME_USERNAME/_PASSWORD."""

    name: ClassVar[str] = watttime.PROVIDER

    def __init__(self, options: ProviderOptions) -> None:
        self.options = options

    def fetch_raw(self, zone: str, start: pd.Timestamp, end: pd.Timestamp, *, now: pd.Timestamp) -> pd.DataFrame:
        o = self.options
        return watttime.fetch_raw_forecast(
            zone, base_url=o.base_url, horizon_hours=horizon_hours_needed(now, end), policy=o.policy,
            session=o.session,
        )


class CsvProvider:
    """Forecasts from a local CSV file (``path`` is required)."""

    name: ClassVar[str] = csvsource.PROVIDER

    def __init__(self, options: ProviderOptions) -> None:
        if options.path is None:
            raise InputError("path", "the csv provider needs a CSV path")
        self.options = options

    def fetch_raw(self, zone: str, start: pd.Timestamp, end: pd.Timestamp, *, now: pd.Timestamp) -> pd.DataFrame:
        assert self.options.path is not None
        return csvsource.read_raw_csv(self.options.path, zone=zone, issued_at=self.options.issued_at)


#: Every provider by name, in the order the CLI lists them.
REGISTRY: dict[str, type[CarbonProvider]] = {
    cls.name: cls for cls in (TraceProvider, ElectricityMapsProvider, WattTimeProvider, CsvProvider)
}
PROVIDERS: tuple[str, ...] = tuple(REGISTRY)


def provider_class(name: str) -> type[CarbonProvider]:
    """The registered class for ``name``; an unknown name raises InputError listing the valid ones."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise InputError("provider", f"unknown provider {name!r}; choose one of {', '.join(REGISTRY)}") from None


def make_provider(name: str, options: ProviderOptions | None = None) -> CarbonProvider:
    """An instance of the provider called ``name``, built from ``options``."""
    cls = provider_class(name)
    return cls(options if options is not None else ProviderOptions())


def fetch_raw(
    provider: ProviderName,
    zone: str,
    start: pd.Timestamp,
    end: pd.Timestamp,
    *,
    now: pd.Timestamp,
    base_url: str | None = None,
    path: str | Path | None = None,
    seed: int = 0,
    issued_at: pd.Timestamp | None = None,
    policy: RetryPolicy = DEFAULT_POLICY,
    session: requests.Session | None = None,
) -> pd.DataFrame:
    """The provider's unvalidated frame (may be sub-hourly, may extend beyond the window)."""
    options = ProviderOptions(base_url=base_url, path=path, seed=seed, issued_at=issued_at, policy=policy,
                              session=session)
    return make_provider(provider, options).fetch_raw(zone, start, end, now=now)


def fetch_forecast(
    provider: ProviderName,
    zone: str,
    start: pd.Timestamp,
    end: pd.Timestamp,
    *,
    now: pd.Timestamp,
    base_url: str | None = None,
    path: str | Path | None = None,
    seed: int = 0,
    issued_at: pd.Timestamp | None = None,
    max_age: pd.Timedelta = DEFAULT_MAX_AGE,
    policy: RetryPolicy = DEFAULT_POLICY,
    session: requests.Session | None = None,
) -> pd.DataFrame:
    """Hourly carbon-intensity forecast for ``zone`` over ``[start, end)``, validated, in canonical form.

    ``now`` is the planning time (staleness is measured against it). ``issued_at`` is used by ``trace`` (default:
    ``now``) and by ``csv`` files without an ``issued_at`` column (default: the file's mtime). ``seed`` drives the
    trace's simulated errors. Raises InputError (bad input/data, naming the field) or ProviderError (HTTP).
    """
    cls = provider_class(provider)
    if not isinstance(zone, str) or not zone.strip():
        raise InputError("zone", "a zone/region name is required")
    start = require_utc_timestamp(start, "start")
    end = require_utc_timestamp(end, "end")
    now = require_utc_timestamp(now, "now")
    check_window(start, end)
    options = ProviderOptions(base_url=base_url, path=path, seed=seed, issued_at=issued_at, policy=policy,
                              session=session)
    raw = cls(options).fetch_raw(zone, start, end, now=now)
    return validate_forecast(raw, start=start, end=end, now=now, max_age=max_age)
