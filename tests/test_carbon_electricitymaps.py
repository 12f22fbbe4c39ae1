"""Electricity Maps v3 client against the local fake server, through the validating dispatcher."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cicm.carbon import electricitymaps
from cicm.carbon.http import RetryPolicy
from cicm.carbon.providers import fetch_forecast
from cicm.carbon.schema import FORECAST_COLUMNS
from cicm.errors import InputError, ProviderError

try:
    from tests.fakeproviders import (  # noqa: F401
        BAD_HOUR, DAY_END, DAY_START, EM_TOKEN, FORECAST_START, ISSUED_AT, NOW, em_value_gco2_per_kwh, fake,
        fake_server)
except ImportError:
    from fakeproviders import (  # noqa: F401
        BAD_HOUR, DAY_END, DAY_START, EM_TOKEN, FORECAST_START, ISSUED_AT, NOW, em_value_gco2_per_kwh, fake,
        fake_server)

FAST = RetryPolicy(max_attempts=3, timeout_s=2.0, backoff_base_s=0.001, retry_after_cap_s=0.01, sleep=lambda s: None)
BAD = BAD_HOUR.strftime("%Y-%m-%dT%H:%MZ")


@pytest.fixture(autouse=True)
def token(monkeypatch):
    monkeypatch.setenv("ELECTRICITYMAPS_TOKEN", EM_TOKEN)


def fetch(fake, **kw):
    return fetch_forecast("electricitymaps", "DE", DAY_START, DAY_END, now=NOW, base_url=fake.url, policy=FAST, **kw)


def test_ok_forecast_is_canonical_and_exact(fake):
    out = fetch(fake)
    assert list(out.columns) == FORECAST_COLUMNS and len(out) == 24
    expected = [em_value_gco2_per_kwh(h) for h in pd.date_range(DAY_START, periods=24, freq="h")]
    np.testing.assert_allclose(out["gco2_per_kwh"], expected)
    assert (out["issued_at"] == ISSUED_AT).all() and (out["zone"] == "DE").all()
    assert (out["provider"] == "electricitymaps").all()
    assert str(out["target_hour"].dtype) == "datetime64[ns, UTC]"


def test_sends_zone_and_horizon_only_when_needed(fake):
    # now = 18:30 on the eve and end = the next day's end: 29.5 h ahead -> horizonHours=48
    fetch(fake)
    assert fake.last_query("electricitymaps", "forecast") == {"zone": "DE", "horizonHours": "48"}
    soon = NOW.floor("h") + pd.Timedelta(hours=1)
    fetch_forecast("electricitymaps", "DE", soon, soon + pd.Timedelta(hours=12), now=NOW, base_url=fake.url, policy=FAST)
    assert fake.last_query("electricitymaps", "forecast") == {"zone": "DE"}
    from cicm.carbon.providers import horizon_hours_needed
    assert horizon_hours_needed(NOW, DAY_END) == 48
    assert horizon_hours_needed(DAY_START, DAY_END) is None
    assert horizon_hours_needed(NOW - pd.Timedelta(days=5), DAY_END) == 72


def test_token_from_env_missing(monkeypatch, fake):
    monkeypatch.delenv("ELECTRICITYMAPS_TOKEN")
    with pytest.raises(InputError) as e:
        fetch(fake)
    assert e.value.field == "ELECTRICITYMAPS_TOKEN"
    assert fake.hits("electricitymaps", "forecast") == 0


def test_wrong_token_is_401(monkeypatch, fake):
    monkeypatch.setenv("ELECTRICITYMAPS_TOKEN", "wrong")
    with pytest.raises(ProviderError) as e:
        fetch(fake)
    assert e.value.status_code == 401 and fake.hits("electricitymaps", "forecast") == 1


@pytest.mark.parametrize("behaviour, status", [("401", 401), ("403", 403), ("always_500", 500)])
def test_http_failures(fake, behaviour, status):
    fake.set("electricitymaps", behaviour)
    with pytest.raises(ProviderError) as e:
        fetch(fake)
    assert e.value.status_code == status


@pytest.mark.parametrize("behaviour", ["429_then_ok", "500_then_ok"])
def test_transient_failures_recover(fake, behaviour):
    fake.set("electricitymaps", behaviour)
    assert len(fetch(fake)) == 24
    assert fake.hits("electricitymaps", "forecast") == 2


@pytest.mark.parametrize("behaviour", ["empty_body", "malformed_json"])
def test_bad_bodies(fake, behaviour):
    fake.set("electricitymaps", behaviour)
    with pytest.raises(ProviderError) as e:
        fetch(fake)
    assert e.value.status_code == 200


@pytest.mark.parametrize(
    "behaviour, field, fragment",
    [
        ("missing_fields", "updatedAt", "missing field"),
        ("missing_value_key", "forecast[11].carbonIntensity", "missing field"),
        ("stale", "issued_at", "stale"),
        ("nan_value", "gco2_per_kwh", BAD),
        ("negative_value", "gco2_per_kwh", BAD),
        ("huge_value", "gco2_per_kwh", "5000"),
        ("duplicate_datetime", "target_hour", BAD),
        ("missing_hour", "target_hour", BAD),
        ("naive_datetime", "target_hour", "naive"),
        ("wrong_zone", "zone", "XX"),
    ],
)
def test_content_problems_name_the_field(fake, behaviour, field, fragment):
    fake.set("electricitymaps", behaviour)
    with pytest.raises(InputError) as e:
        fetch(fake)
    assert e.value.field == field
    assert fragment in str(e.value)


def test_configurable_base_url_trailing_slash(fake):
    out = fetch_forecast("electricitymaps", "DE", DAY_START, DAY_END, now=NOW, base_url=fake.url + "/", policy=FAST)
    assert len(out) == 24


def test_history_endpoint(fake):
    raw = electricitymaps.fetch_raw_history("DE", base_url=fake.url, token=EM_TOKEN, policy=FAST)
    assert len(raw) == 24 and list(raw.columns) == FORECAST_COLUMNS
    assert raw["target_hour"].iloc[0] == FORECAST_START - pd.Timedelta(hours=24)
    assert fake.hits("electricitymaps", "history") == 1


def test_history_missing_updated_at(fake):
    fake.set("electricitymaps", "missing_fields")
    with pytest.raises(InputError) as e:
        electricitymaps.fetch_raw_history("DE", base_url=fake.url, token=EM_TOKEN, policy=FAST)
    assert e.value.field == "history[2].updatedAt"


def test_parse_forecast_payload_pure():
    payload = {"zone": "DE", "updatedAt": "2026-11-22T18:00:00.000Z",
               "forecast": [{"carbonIntensity": 302, "datetime": "2026-11-23T00:00:00.000Z"},
                            {"carbonIntensity": 298.5, "datetime": "2026-11-23T01:00:00+00:00"}]}
    raw = electricitymaps.parse_forecast_payload(payload, zone="DE")
    assert raw["gco2_per_kwh"].tolist() == [302.0, 298.5]
    assert raw["target_hour"].iloc[1] == pd.Timestamp("2026-11-23T01:00Z")


@pytest.mark.parametrize("bad, field", [("302", "gco2_per_kwh"), (True, "gco2_per_kwh")])
def test_parse_rejects_non_numeric(bad, field):
    payload = {"zone": "DE", "updatedAt": "2026-11-22T18:00:00.000Z",
               "forecast": [{"carbonIntensity": bad, "datetime": "2026-11-23T00:00:00.000Z"}]}
    with pytest.raises(InputError) as e:
        electricitymaps.parse_forecast_payload(payload, zone="DE")
    assert e.value.field == field


def test_parse_rejects_non_object():
    with pytest.raises(InputError) as e:
        electricitymaps.parse_forecast_payload([1, 2], zone="DE")
    assert e.value.field == "forecast"


def test_a_given_requests_session_is_used(fake):
    fake.set("electricitymaps", "429_then_ok", retry_after="0.5")
    sleeps = []
    pol = RetryPolicy(max_attempts=2, timeout_s=2.0, retry_after_cap_s=0.05, sleep=sleeps.append)
    with pol.session() as session:
        out = fetch_forecast("electricitymaps", "DE", DAY_START, DAY_END, now=NOW, base_url=fake.url,
                             session=session)
    assert len(out) == 24 and sleeps == [0.05] and fake.hits("electricitymaps", "forecast") == 2


def test_500_names_the_url_and_attempts(fake):
    fake.set("electricitymaps", "always_500")
    with pytest.raises(ProviderError) as e:
        fetch(fake)
    assert "giving up after 3 attempt(s)" in e.value.message
    assert f"{fake.url}/v3/carbon-intensity/forecast?zone=DE" in e.value.message
