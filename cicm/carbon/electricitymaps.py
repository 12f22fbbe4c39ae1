"""Electricity Maps API v3 client: carbon-intensity forecast and recent history for one zone.

Wire format (v3)::

    GET {base}/v3/carbon-intensity/forecast?zone=DE         header auth-token: <ELECTRICITYMAPS_TOKEN>
    {"zone": "DE", "forecast": [{"carbonIntensity": 302, "datetime": "2026-11-23T00:00:00.000Z"}, ...],
     "updatedAt": "2026-11-22T18:00:00.000Z"}

    GET {base}/v3/carbon-intensity/history?zone=DE
    {"zone": "DE", "history": [{"zone": "DE", "carbonIntensity": 302, "datetime": "...", "updatedAt": "...",
      "createdAt": "...", "emissionFactorType": "lifecycle", "isEstimated": false, "estimationMethod": null}, ...]}

Values are lifecycle gCO2eq/kWh (average, not marginal). The functions here return *raw* canonical frames;
:func:`cicm.carbon.providers.fetch_forecast` validates them. Missing wire fields raise InputError naming the wire
field (e.g. ``forecast[3].carbonIntensity``); HTTP trouble raises ProviderError (see :mod:`cicm.carbon.http`).
Requests go through a ``requests.Session`` with urllib3's ``Retry`` (given, or built from ``policy``).
"""
from __future__ import annotations

import os

import pandas as pd
import requests

from cicm.carbon._parse import parse_float_values, parse_utc_timestamp, parse_utc_timestamps, require_key, require_list
from cicm.carbon.http import DEFAULT_POLICY, RetryPolicy, get_json
from cicm.carbon.schema import make_forecast_frame
from cicm.errors import InputError

PROVIDER = "electricitymaps"
DEFAULT_BASE_URL = "https://api.electricitymap.org"
TOKEN_ENV = "ELECTRICITYMAPS_TOKEN"


def token_from_env() -> str:
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise InputError(TOKEN_ENV, "environment variable not set: an Electricity Maps API token is required")
    return token


def _check_zone(payload: dict, zone: str) -> None:
    got = require_key(payload, "zone", "")
    if got != zone:
        raise InputError("zone", f"asked Electricity Maps for zone {zone!r}, response is for {got!r}")


def _points(entries: list, list_name: str, keys: tuple[str, ...]) -> dict[str, list]:
    columns: dict[str, list] = {k: [] for k in keys}
    for i, entry in enumerate(entries):
        for key in keys:
            columns[key].append(require_key(entry, key, f"{list_name}[{i}]"))
    return columns


def parse_forecast_payload(payload: object, *, zone: str) -> pd.DataFrame:
    """Pure: a /v3/carbon-intensity/forecast JSON body -> raw canonical frame (issued_at = updatedAt)."""
    if not isinstance(payload, dict):
        raise InputError("forecast", f"expected a JSON object, got {type(payload).__name__}")
    _check_zone(payload, zone)
    entries = require_list(payload, "forecast", nonempty=True)
    issued_at = parse_utc_timestamp(require_key(payload, "updatedAt", ""), "issued_at")
    cols = _points(entries, "forecast", ("datetime", "carbonIntensity"))
    return make_forecast_frame(
        zone=zone,
        target_times=parse_utc_timestamps(cols["datetime"], "target_hour"),
        issued_at=issued_at,
        gco2_per_kwh=parse_float_values(cols["carbonIntensity"], "gco2_per_kwh"),
        provider=PROVIDER,
    )


def parse_history_payload(payload: object, *, zone: str) -> pd.DataFrame:
    """Pure: a /v3/carbon-intensity/history JSON body -> raw canonical frame (issued_at = each point's updatedAt)."""
    if not isinstance(payload, dict):
        raise InputError("history", f"expected a JSON object, got {type(payload).__name__}")
    _check_zone(payload, zone)
    entries = require_list(payload, "history", nonempty=True)
    cols = _points(entries, "history", ("datetime", "carbonIntensity", "updatedAt"))
    return make_forecast_frame(
        zone=zone,
        target_times=parse_utc_timestamps(cols["datetime"], "target_hour"),
        issued_at=parse_utc_timestamps(cols["updatedAt"], "issued_at"),
        gco2_per_kwh=parse_float_values(cols["carbonIntensity"], "gco2_per_kwh"),
        provider=PROVIDER,
    )


def _get(kind: str, zone: str, *, base_url: str | None, token: str | None, policy: RetryPolicy,
         session: requests.Session | None, extra_params: dict | None = None) -> object:
    base = (base_url or DEFAULT_BASE_URL).rstrip("/")
    headers = {"auth-token": token if token is not None else token_from_env()}
    params = {"zone": zone, **(extra_params or {})}
    url = f"{base}/v3/carbon-intensity/{kind}"
    if session is not None:
        return get_json(session, url, provider=PROVIDER, params=params, headers=headers)
    with policy.session() as own:
        return get_json(own, url, provider=PROVIDER, params=params, headers=headers)


def fetch_raw_forecast(
    zone: str,
    *,
    base_url: str | None = None,
    token: str | None = None,
    horizon_hours: int | None = None,
    policy: RetryPolicy = DEFAULT_POLICY,
    session: requests.Session | None = None,
) -> pd.DataFrame:
    """GET the forecast for ``zone`` (token from $ELECTRICITYMAPS_TOKEN unless given). Unvalidated.

    ``session`` (retries and timeout included) is used when given, else one is built from ``policy``.

    ``horizon_hours`` is sent as ``horizonHours`` only when given (the API default is 24 h).
    """
    extra = {"horizonHours": int(horizon_hours)} if horizon_hours is not None else None
    payload = _get("forecast", zone, base_url=base_url, token=token, policy=policy, session=session, extra_params=extra)
    return parse_forecast_payload(payload, zone=zone)


def fetch_raw_history(
    zone: str,
    *,
    base_url: str | None = None,
    token: str | None = None,
    policy: RetryPolicy = DEFAULT_POLICY,
    session: requests.Session | None = None,
) -> pd.DataFrame:
    """GET the last 24 h of measured/estimated intensity for ``zone``. Unvalidated."""
    payload = _get("history", zone, base_url=base_url, token=token, policy=policy, session=session)
    return parse_history_payload(payload, zone=zone)
