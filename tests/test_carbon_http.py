"""The retrying HTTP helper (requests + urllib3 Retry), against the real local fake server."""
from __future__ import annotations

import socket
import time

import pytest
import requests
from urllib3.util.retry import Retry

from cicm.carbon.http import RetryPolicy, backoff_delay_s, get_json, retry_after_s
from cicm.errors import ProviderError

try:
    from tests.fakeproviders import EM_TOKEN, fake, fake_server  # noqa: F401
except ImportError:  # tests/ is not a package
    from fakeproviders import EM_TOKEN, fake, fake_server  # noqa: F401


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def policy(sleeps, **kw) -> RetryPolicy:
    base = dict(max_attempts=3, timeout_s=2.0, backoff_base_s=0.01, backoff_max_s=1.0, retry_after_cap_s=5.0)
    base.update(kw)
    return RetryPolicy(sleep=sleeps, **base)


def em_get(fake, pol, token=EM_TOKEN):
    with pol.session() as session:
        return get_json(session, f"{fake.url}/v3/carbon-intensity/forecast", provider="electricitymaps",
                        params={"zone": "DE"}, headers={"auth-token": token})


def test_policy_builds_a_requests_session_with_urllib3_retry():
    with policy(Sleeps(), max_attempts=4, timeout_s=1.5).session() as session:
        assert isinstance(session, requests.Session)
        for scheme in ("http://", "https://"):
            retry = session.get_adapter(f"{scheme}example.org").max_retries
            assert isinstance(retry, Retry) and retry.total == 3 and not retry.raise_on_status
            assert 429 in retry.status_forcelist and 503 in retry.status_forcelist
            assert 404 not in retry.status_forcelist and 401 not in retry.status_forcelist
            assert session.get_adapter(f"{scheme}example.org").timeout_s == 1.5
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


def test_ok_single_request(fake):
    sleeps = Sleeps()
    payload = em_get(fake, policy(sleeps))
    assert payload["zone"] == "DE" and fake.hits("electricitymaps", "forecast") == 1 and sleeps == []


def test_500_then_ok_retries_with_backoff(fake):
    fake.set("electricitymaps", "500_then_ok", failures=2)
    sleeps = Sleeps()
    assert em_get(fake, policy(sleeps))["zone"] == "DE"
    assert fake.hits("electricitymaps", "forecast") == 3
    assert sleeps == [pytest.approx(0.01), pytest.approx(0.02)]  # base * 2**(attempt-1)


def test_always_500_gives_up_with_status(fake):
    fake.set("electricitymaps", "always_500")
    sleeps = Sleeps()
    with pytest.raises(ProviderError) as e:
        em_get(fake, policy(sleeps, max_attempts=4))
    assert e.value.status_code == 500 and e.value.provider == "electricitymaps"
    assert fake.hits("electricitymaps", "forecast") == 4 and len(sleeps) == 3
    assert "giving up after 4 attempt(s)" in str(e.value) and "/v3/carbon-intensity/forecast" in str(e.value)


def test_429_honours_retry_after_seconds(fake):
    fake.set("electricitymaps", "429_then_ok", retry_after="2")
    sleeps = Sleeps()
    assert em_get(fake, policy(sleeps))["zone"] == "DE"
    assert sleeps == [2.0]


def test_429_retry_after_is_capped(fake):
    fake.set("electricitymaps", "429_then_ok", retry_after="3600")
    sleeps = Sleeps()
    em_get(fake, policy(sleeps, retry_after_cap_s=1.5))
    assert sleeps == [1.5]


def test_429_without_header_uses_backoff(fake):
    fake.set("electricitymaps", "429_then_ok", retry_after=None)
    sleeps = Sleeps()
    em_get(fake, policy(sleeps))
    assert sleeps == [pytest.approx(0.01)]


def test_429_forever_reports_429(fake):
    fake.set("electricitymaps", "429_then_ok", failures=99, retry_after="0")
    with pytest.raises(ProviderError) as e:
        em_get(fake, policy(Sleeps()))
    assert e.value.status_code == 429


def test_real_sleep_honours_retry_after(fake):
    fake.set("electricitymaps", "429_then_ok", retry_after="0.3")
    t0 = time.monotonic()
    em_get(fake, RetryPolicy(max_attempts=2, backoff_base_s=0.0, retry_after_cap_s=5))
    assert time.monotonic() - t0 >= 0.29


@pytest.mark.parametrize("behaviour, status", [("401", 401), ("403", 403), ("404", 404)])
def test_client_errors_are_not_retried(fake, behaviour, status):
    fake.set("electricitymaps", behaviour)
    sleeps = Sleeps()
    with pytest.raises(ProviderError) as e:
        em_get(fake, policy(sleeps))
    assert e.value.status_code == status and fake.hits("electricitymaps", "forecast") == 1 and sleeps == []


def test_wrong_token_is_401_not_retried(fake):
    with pytest.raises(ProviderError) as e:
        em_get(fake, policy(Sleeps()), token="nope")
    assert e.value.status_code == 401 and fake.hits("electricitymaps", "forecast") == 1


def test_timeout_then_ok(fake):
    fake.set("electricitymaps", "timeout_then_ok", delay_s=0.6)
    sleeps = Sleeps()
    assert em_get(fake, policy(sleeps, timeout_s=0.2))["zone"] == "DE"
    assert len(sleeps) == 1


def test_timeouts_exhausted_is_provider_error_without_status(fake):
    fake.set("electricitymaps", "timeout_then_ok", failures=99, delay_s=0.5)
    with pytest.raises(ProviderError) as e:
        em_get(fake, policy(Sleeps(), timeout_s=0.15, max_attempts=2))
    assert e.value.status_code is None and "timeout after 0.15 s" in str(e.value)
    assert fake.hits("electricitymaps", "forecast") == 2


def test_connection_refused_is_retried_then_fails():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave the block: nothing listens
    sleeps = Sleeps()
    with policy(sleeps).session() as session, pytest.raises(ProviderError) as e:
        get_json(session, f"http://127.0.0.1:{port}/x", provider="p")
    assert "connection error" in str(e.value) and len(sleeps) == 2
    assert f"127.0.0.1:{port}/x" in str(e.value) and e.value.status_code is None


@pytest.mark.parametrize("behaviour, words", [("empty_body", "empty"), ("malformed_json", "malformed JSON")])
def test_bad_bodies_are_provider_errors(fake, behaviour, words):
    fake.set("electricitymaps", behaviour)
    with pytest.raises(ProviderError, match=words):
        em_get(fake, policy(Sleeps()))


def test_unusable_retry_after_falls_back_to_backoff(fake):
    fake.set("electricitymaps", "429_then_ok", retry_after="soon")  # urllib3 alone would raise InvalidHeader
    sleeps = Sleeps()
    assert em_get(fake, policy(sleeps))["zone"] == "DE"
    assert sleeps == [pytest.approx(0.01)]


def test_one_session_serves_many_calls_with_fresh_retries(fake):
    fake.set("electricitymaps", "500_then_ok", failures=2)
    sleeps = Sleeps()
    with policy(sleeps).session() as session:
        for _ in range(2):
            get_json(session, f"{fake.url}/v3/carbon-intensity/forecast", provider="electricitymaps",
                     params={"zone": "DE"}, headers={"auth-token": EM_TOKEN})
    assert fake.hits("electricitymaps", "forecast") == 4 and len(sleeps) == 2


def test_retry_after_parsing():
    assert retry_after_s("7") == 7.0
    assert retry_after_s(" 1.5 ") == 1.5
    assert retry_after_s(None) is None and retry_after_s("soon") is None
    assert retry_after_s("-3") == 0.0
    assert retry_after_s("Wed, 21 Oct 2015 07:28:10 GMT", now_s=1445412480.0) == pytest.approx(10.0)


def test_backoff_is_exponential_and_capped():
    pol = RetryPolicy(backoff_base_s=0.5, backoff_max_s=3.0)
    assert [backoff_delay_s(a, pol) for a in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
