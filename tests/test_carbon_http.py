"""The retrying HTTP helper, against the real local fake server."""
from __future__ import annotations

import socket
import time

import httpx
import pytest

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
    with httpx.Client() as client:
        return get_json(client, f"{fake.url}/v3/carbon-intensity/forecast", provider="electricitymaps",
                        params={"zone": "DE"}, headers={"auth-token": token}, policy=pol)


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
    assert e.value.status_code is None and "timeout" in str(e.value)


def test_connection_refused_is_retried_then_fails():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave the block: nothing listens
    sleeps = Sleeps()
    with httpx.Client() as client, pytest.raises(ProviderError) as e:
        get_json(client, f"http://127.0.0.1:{port}/x", provider="p", policy=policy(sleeps))
    assert "connection error" in str(e.value) and len(sleeps) == 2


@pytest.mark.parametrize("behaviour, words", [("empty_body", "empty"), ("malformed_json", "malformed JSON")])
def test_bad_bodies_are_provider_errors(fake, behaviour, words):
    fake.set("electricitymaps", behaviour)
    with pytest.raises(ProviderError, match=words):
        em_get(fake, policy(Sleeps()))


def test_retry_after_parsing():
    assert retry_after_s("7") == 7.0
    assert retry_after_s(" 1.5 ") == 1.5
    assert retry_after_s(None) is None and retry_after_s("soon") is None
    assert retry_after_s("-3") == 0.0
    assert retry_after_s("Wed, 21 Oct 2015 07:28:10 GMT", now_s=1445412480.0) == pytest.approx(10.0)


def test_backoff_is_exponential_and_capped():
    pol = RetryPolicy(backoff_base_s=0.5, backoff_max_s=3.0)
    assert [backoff_delay_s(a, pol) for a in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
