"""WattTime v3 client against the local fake server, through the validating dispatcher."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cicm.carbon import watttime
from cicm.carbon.http import RetryPolicy
from cicm.carbon.providers import fetch_forecast
from cicm.carbon.schema import FORECAST_COLUMNS
from cicm.errors import InputError, ProviderError

try:
    from tests.fakeproviders import (  # noqa: F401
        BAD_HOUR, DAY_END, DAY_START, ISSUED_AT, NOW, WT_PASSWORD, WT_USER, fake, fake_server,
        wt_hour_mean_lbs_per_mwh, wt_point_lbs_per_mwh)
except ImportError:
    from fakeproviders import (  # noqa: F401
        BAD_HOUR, DAY_END, DAY_START, ISSUED_AT, NOW, WT_PASSWORD, WT_USER, fake, fake_server,
        wt_hour_mean_lbs_per_mwh, wt_point_lbs_per_mwh)

FAST = RetryPolicy(max_attempts=3, timeout_s=2.0, backoff_base_s=0.001, retry_after_cap_s=0.01, sleep=lambda s: None)
REGION = "CAISO_NORTH"
BAD = BAD_HOUR.strftime("%Y-%m-%dT%H:%MZ")


@pytest.fixture(autouse=True)
def credentials(monkeypatch):
    monkeypatch.setenv("WATTTIME_USERNAME", WT_USER)
    monkeypatch.setenv("WATTTIME_PASSWORD", WT_PASSWORD)


def fetch(fake, **kw):
    return fetch_forecast("watttime", REGION, DAY_START, DAY_END, now=NOW, base_url=fake.url, policy=FAST, **kw)


def test_lbs_per_mwh_to_g_per_kwh_numerically():
    assert watttime.lbs_per_mwh_to_gco2_per_kwh(1000.0) == pytest.approx(453.59237)
    assert watttime.lbs_per_mwh_to_gco2_per_kwh(870.2) == pytest.approx(870.2 * 453.59237 / 1000)
    np.testing.assert_allclose(watttime.lbs_per_mwh_to_gco2_per_kwh([0.0, 2204.62262]), [0.0, 1000.0], rtol=1e-8)


def test_ok_five_minute_points_become_hourly_grams(fake):
    out = fetch(fake)
    assert list(out.columns) == FORECAST_COLUMNS and len(out) == 24
    hours = pd.date_range(DAY_START, periods=24, freq="h")
    # independent expectation: mean of the 12 served 5-min points, then x 0.45359237
    expected = [np.mean([wt_point_lbs_per_mwh(h + pd.Timedelta(minutes=5 * k)) for k in range(12)]) * 0.45359237
                for h in hours]
    np.testing.assert_allclose(out["gco2_per_kwh"], expected, rtol=1e-12)
    np.testing.assert_allclose(out["gco2_per_kwh"], [wt_hour_mean_lbs_per_mwh(h) * 0.45359237 for h in hours])
    assert (out["issued_at"] == ISSUED_AT).all() and (out["provider"] == "watttime").all()
    assert (out["zone"] == REGION).all()
    assert fake.hits("watttime", "login") == 1 and fake.hits("watttime", "forecast") == 1
    query = fake.last_query("watttime", "forecast")
    assert query == {"region": REGION, "signal_type": "co2_moer", "horizon_hours": "48"}


def test_expired_token_relogs_once(fake):
    fake.set("watttime", "expired_token")
    out = fetch(fake)
    assert len(out) == 24
    assert fake.hits("watttime", "login") == 2 and fake.hits("watttime", "forecast") == 2


def test_session_reuses_token_and_relogs_on_expiry(fake):
    session = watttime.WattTimeSession(base_url=fake.url, username=WT_USER, password=WT_PASSWORD, policy=FAST)
    session.fetch_raw_forecast(REGION)
    session.fetch_raw_forecast(REGION)
    assert fake.hits("watttime", "login") == 1
    fake.tokens_issued.clear()  # server forgets tokens: the held one is now expired
    session.fetch_raw_forecast(REGION)
    assert fake.hits("watttime", "login") == 2 and session.token == "wt-token-1"


def test_bad_credentials_are_401_without_retry(monkeypatch, fake):
    monkeypatch.setenv("WATTTIME_PASSWORD", "wrong")
    with pytest.raises(ProviderError) as e:
        fetch(fake)
    assert e.value.status_code == 401 and fake.hits("watttime", "login") == 1
    assert fake.hits("watttime", "forecast") == 0


def test_login_401_behaviour(fake):
    fake.set("watttime", "401")
    with pytest.raises(ProviderError) as e:
        fetch(fake)
    assert e.value.status_code == 401


@pytest.mark.parametrize("env", ["WATTTIME_USERNAME", "WATTTIME_PASSWORD"])
def test_missing_credentials(monkeypatch, fake, env):
    monkeypatch.delenv(env)
    with pytest.raises(InputError) as e:
        fetch(fake)
    assert e.value.field == env


@pytest.mark.parametrize("behaviour, status", [("403", 403), ("always_500", 500)])
def test_http_failures(fake, behaviour, status):
    fake.set("watttime", behaviour)
    with pytest.raises(ProviderError) as e:
        fetch(fake)
    assert e.value.status_code == status


@pytest.mark.parametrize("behaviour", ["429_then_ok", "500_then_ok"])
def test_transient_failures_recover(fake, behaviour):
    fake.set("watttime", behaviour)
    assert len(fetch(fake)) == 24
    assert fake.hits("watttime", "forecast") == 2 and fake.hits("watttime", "login") == 1


@pytest.mark.parametrize("behaviour", ["empty_body", "malformed_json"])
def test_bad_bodies(fake, behaviour):
    fake.set("watttime", behaviour)
    with pytest.raises(ProviderError):
        fetch(fake)


@pytest.mark.parametrize(
    "behaviour, field, fragment",
    [
        ("missing_fields", "meta.generated_at", "missing field"),
        ("missing_value_key", "data[3].value", "missing field"),
        ("wrong_units", "meta.units", "kg_co2_per_mwh"),
        ("wrong_zone", "zone", "ELSEWHERE"),
        ("stale", "issued_at", "stale"),
        ("nan_value", "gco2_per_kwh", "05:10Z"),
        ("negative_value", "gco2_per_kwh", "05:10Z"),
        ("huge_value", "gco2_per_kwh", "impossible"),
        ("duplicate_datetime", "target_hour", BAD),
        ("missing_hour", "target_hour", BAD),
        ("naive_datetime", "target_hour", "naive"),
    ],
)
def test_content_problems_name_the_field(fake, behaviour, field, fragment):
    fake.set("watttime", behaviour)
    with pytest.raises(InputError) as e:
        fetch(fake)
    assert e.value.field == field
    assert fragment in str(e.value)


def test_parse_payload_pure_and_converts():
    payload = {"data": [{"point_time": "2026-11-23T00:00:00+00:00", "value": 870.2}],
               "meta": {"region": REGION, "signal_type": "co2_moer", "units": "lbs_co2_per_mwh",
                        "generated_at": "2026-11-22T18:00:00+00:00", "data_point_period_seconds": 300}}
    raw = watttime.parse_forecast_payload(payload, region=REGION)
    assert raw["gco2_per_kwh"].iloc[0] == pytest.approx(394.716080, rel=1e-6)
    assert raw["issued_at"].iloc[0] == pd.Timestamp("2026-11-22T18:00Z")


def test_parse_rejects_other_signal():
    payload = {"data": [], "meta": {"region": REGION, "signal_type": "health_damage", "units": "lbs_co2_per_mwh",
                                    "generated_at": "2026-11-22T18:00:00+00:00"}}
    with pytest.raises(InputError) as e:
        watttime.parse_forecast_payload(payload, region=REGION)
    assert e.value.field == "meta.signal_type"


def test_a_given_requests_session_serves_login_and_forecast(fake):
    fake.set("watttime", "500_then_ok")
    sleeps = []
    pol = RetryPolicy(max_attempts=2, timeout_s=2.0, backoff_base_s=0.001, sleep=sleeps.append)
    with pol.session() as session:
        out = fetch_forecast("watttime", REGION, DAY_START, DAY_END, now=NOW, base_url=fake.url, session=session)
    assert len(out) == 24 and fake.hits("watttime", "login") == 1 and fake.hits("watttime", "forecast") == 2
    assert sleeps == [pytest.approx(0.001)]


def test_timeout_names_the_url(fake):
    fake.set("watttime", "timeout_then_ok", failures=99, delay_s=0.4)
    pol = RetryPolicy(max_attempts=2, timeout_s=0.1, backoff_base_s=0.0, sleep=lambda s: None)
    with pytest.raises(ProviderError) as e:
        fetch_forecast("watttime", REGION, DAY_START, DAY_END, now=NOW, base_url=fake.url, policy=pol)
    assert e.value.status_code is None and "timeout after 0.1 s" in e.value.message
    assert f"{fake.url}/v3/forecast" in e.value.message and fake.hits("watttime", "forecast") == 2
