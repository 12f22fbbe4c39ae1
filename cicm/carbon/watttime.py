"""WattTime API v3 client: marginal operating emissions rate (co2_moer) forecast for one region.

Wire format (v3)::

    GET {base}/login  (HTTP basic auth: $WATTTIME_USERNAME / $WATTTIME_PASSWORD)  ->  {"token": "..."}
    GET {base}/v3/forecast?region=CAISO_NORTH&signal_type=co2_moer   Authorization: Bearer <token>
    {"data": [{"point_time": "2026-11-23T00:00:00+00:00", "value": 870.2}, ...5-minute points...],
     "meta": {"data_point_period_seconds": 300, "region": "CAISO_NORTH", "signal_type": "co2_moer",
              "units": "lbs_co2_per_mwh", "generated_at": "2026-11-22T18:00:00+00:00", ...}}

Tokens expire (30 minutes); a 401 on the data call triggers one fresh login and one retry. Values are converted
from lbs CO2/MWh to g CO2/kWh (x 0.45359237). Note that MOER is a *marginal* signal, unlike Electricity Maps'
average lifecycle intensity; do not mix the two in one backtest. The 5-minute points are averaged to hours by
validation (:func:`cicm.carbon.validate.to_hourly`). Requests go through a ``requests.Session`` with urllib3's
``Retry`` (given, or built from ``policy``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd
import requests

from cicm.carbon._parse import parse_float_values, parse_utc_timestamp, parse_utc_timestamps, require_key, require_list
from cicm.carbon.http import DEFAULT_POLICY, RetryPolicy, get_json
from cicm.carbon.schema import make_forecast_frame
from cicm.errors import InputError, ProviderError

PROVIDER = "watttime"
DEFAULT_BASE_URL = "https://api.watttime.org"
USERNAME_ENV = "WATTTIME_USERNAME"
PASSWORD_ENV = "WATTTIME_PASSWORD"
SIGNAL_TYPE = "co2_moer"
EXPECTED_UNITS = "lbs_co2_per_mwh"
#: 1 lb = 453.59237 g and 1 MWh = 1000 kWh, so 1 lb/MWh = 0.45359237 g/kWh.
GCO2_PER_KWH_PER_LBS_PER_MWH = 0.45359237


def lbs_per_mwh_to_gco2_per_kwh(lbs_per_mwh):
    """lbs CO2 per MWh -> g CO2 per kWh (works on scalars and arrays)."""
    return np.asarray(lbs_per_mwh, dtype="float64") * GCO2_PER_KWH_PER_LBS_PER_MWH


def credentials_from_env() -> tuple[str, str]:
    user = os.environ.get(USERNAME_ENV, "").strip()
    password = os.environ.get(PASSWORD_ENV, "")
    if not user:
        raise InputError(USERNAME_ENV, "environment variable not set: WattTime credentials are required")
    if not password:
        raise InputError(PASSWORD_ENV, "environment variable not set: WattTime credentials are required")
    return user, password


def payload_meta(payload: object, *, region: str) -> dict:
    """Pure: the ``meta`` of a /v3/forecast or /v3/historical body, checked: a JSON object for ``region``, the
    co2_moer signal in lbs/MWh."""
    if not isinstance(payload, dict):
        raise InputError("data", f"expected a JSON object, got {type(payload).__name__}")
    meta = require_key(payload, "meta", "")
    units = require_key(meta, "units", "meta")
    if units != EXPECTED_UNITS:
        raise InputError("meta.units", f"expected {EXPECTED_UNITS!r}, got {units!r}")
    signal = meta.get("signal_type", SIGNAL_TYPE)
    if signal != SIGNAL_TYPE:
        raise InputError("meta.signal_type", f"expected {SIGNAL_TYPE!r}, got {signal!r}")
    got_region = meta.get("region", region)
    if got_region != region:
        raise InputError("zone", f"asked WattTime for region {region!r}, response is for {got_region!r}")
    return meta


def parse_forecast_payload(payload: object, *, region: str) -> pd.DataFrame:
    """Pure: a /v3/forecast JSON body -> raw canonical frame in g/kWh (issued_at = meta.generated_at)."""
    meta = payload_meta(payload, region=region)
    issued_at = parse_utc_timestamp(require_key(meta, "generated_at", "meta"), "issued_at")
    points = require_list(payload, "data", nonempty=True)
    times = [require_key(p, "point_time", f"data[{i}]") for i, p in enumerate(points)]
    values = [require_key(p, "value", f"data[{i}]") for i, p in enumerate(points)]
    return make_forecast_frame(
        zone=region,
        target_times=parse_utc_timestamps(times, "target_hour"),
        issued_at=issued_at,
        gco2_per_kwh=lbs_per_mwh_to_gco2_per_kwh(parse_float_values(values, "gco2_per_kwh")),
        provider=PROVIDER,
    )


@dataclass
class WattTimeSession:
    """Holds a login token across calls; logs in lazily and again once when the token has expired (401).

    ``session`` (a ``requests.Session`` with its retries) is used when given; otherwise each call builds one
    from ``policy``.
    """

    base_url: str = DEFAULT_BASE_URL
    username: str | None = None
    password: str | None = None
    policy: RetryPolicy = DEFAULT_POLICY
    session: requests.Session | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    def _base(self) -> str:
        return (self.base_url or DEFAULT_BASE_URL).rstrip("/")

    def _with_session(self, fn: Callable[[requests.Session], Any]) -> Any:
        if self.session is not None:
            return fn(self.session)
        with self.policy.session() as own:
            return fn(own)

    def login(self) -> str:
        if self.username is None or self.password is None:
            self.username, self.password = credentials_from_env()
        auth = (self.username, self.password)
        payload = self._with_session(lambda s: get_json(s, f"{self._base()}/login", provider=PROVIDER, auth=auth))
        token = require_key(payload, "token", "login")
        if not isinstance(token, str) or not token:
            raise InputError("login.token", "empty or non-string token in login response")
        self.token = token
        return token

    def _get_forecast_payload(self, params: dict) -> object:
        headers = {"Authorization": f"Bearer {self.token}"}
        return self._with_session(
            lambda s: get_json(s, f"{self._base()}/v3/forecast", provider=PROVIDER, params=params, headers=headers)
        )

    def forecast_payload(self, region: str, *, horizon_hours: int | None = None) -> object:
        params: dict = {"region": region, "signal_type": SIGNAL_TYPE}
        if horizon_hours is not None:
            params["horizon_hours"] = int(horizon_hours)
        if self.token is None:
            self.login()
        try:
            return self._get_forecast_payload(params)
        except ProviderError as exc:
            if exc.status_code != 401:
                raise
        self.login()  # token expired: one fresh login, one retry; a second 401 propagates
        return self._get_forecast_payload(params)

    def fetch_raw_forecast(self, region: str, *, horizon_hours: int | None = None) -> pd.DataFrame:
        return parse_forecast_payload(self.forecast_payload(region, horizon_hours=horizon_hours), region=region)


def parse_historical_payload(payload: object, *, region: str) -> pd.DataFrame:
    """Pure: a /v3/historical JSON body (the measured co2_moer, same shape as the forecast's, without
    ``generated_at``) -> raw canonical frame in g/kWh, ``issued_at`` = each point's time."""
    payload_meta(payload, region=region)
    points = require_list(payload, "data")
    times = parse_utc_timestamps([require_key(p, "point_time", f"data[{i}]") for i, p in enumerate(points)],
                                 "target_hour")
    values = [require_key(p, "value", f"data[{i}]") for i, p in enumerate(points)]
    return make_forecast_frame(zone=region, target_times=times, issued_at=list(times),
                               gco2_per_kwh=lbs_per_mwh_to_gco2_per_kwh(parse_float_values(values, "gco2_per_kwh")),
                               provider=PROVIDER)


def fetch_raw_historical(region: str, start: pd.Timestamp, end: pd.Timestamp, *, base_url: str | None = None,
                         policy: RetryPolicy = DEFAULT_POLICY, session: requests.Session | None = None,
                         ) -> pd.DataFrame:
    """Log in and GET the measured co2_moer of ``region`` over [start, end) (at most 32 days a request, as the
    API allows). Unvalidated; credentials from the environment."""
    if end - start > pd.Timedelta(days=32):
        raise InputError("start", "WattTime's historical data is asked for 32 days at most at a time")
    if session is None:
        with policy.session() as own:
            return fetch_raw_historical(region, start, end, base_url=base_url, policy=policy, session=own)
    wt = WattTimeSession(base_url=base_url or DEFAULT_BASE_URL, policy=policy, session=session)
    wt.login()
    params = {"region": region, "signal_type": SIGNAL_TYPE, "start": start.isoformat(), "end": end.isoformat()}
    headers = {"Authorization": f"Bearer {wt.token}"}
    payload = get_json(session, f"{wt._base()}/v3/historical", provider=PROVIDER, params=params, headers=headers)
    return parse_historical_payload(payload, region=region)


def fetch_raw_forecast(
    region: str,
    *,
    base_url: str | None = None,
    username: str | None = None,
    password: str | None = None,
    horizon_hours: int | None = None,
    policy: RetryPolicy = DEFAULT_POLICY,
    session: requests.Session | None = None,
) -> pd.DataFrame:
    """Log in and GET the co2_moer forecast for ``region`` (credentials from env unless given). Unvalidated.

    Login and forecast share one ``requests.Session`` (``session``, or one built from ``policy``).
    """
    if session is None:
        with policy.session() as own:
            return fetch_raw_forecast(region, base_url=base_url, username=username, password=password,
                                      horizon_hours=horizon_hours, policy=policy, session=own)
    wt = WattTimeSession(
        base_url=base_url or DEFAULT_BASE_URL, username=username, password=password, policy=policy, session=session
    )
    return wt.fetch_raw_forecast(region, horizon_hours=horizon_hours)
