"""One small GET-JSON helper shared by the provider clients, over a ``requests`` session with urllib3's ``Retry``.

The retries themselves happen inside the session (:func:`cicm.httpclient.make_session`); a :class:`RetryPolicy`
says how that session is built:

* timeouts, connection errors and HTTP 429/5xx are retried, at most ``max_attempts`` requests in all;
* the delay before retry *n* is ``backoff_base_s * 2**(n-1)``, capped at ``backoff_max_s``;
* HTTP 429 waits for the server's ``Retry-After`` (seconds or an HTTP date), capped at ``retry_after_cap_s``
  (60 s); without a usable header the exponential back-off is used;
* each fetch (its retries, waits and body) ends within ``deadline_s`` (60 s) of wall-clock time: connects and reads
  wait at most what is left, a wait (back-off or capped Retry-After) that would end past the deadline gives up at
  once, and a body still arriving at the deadline (a server trickling a byte at a time) is cut off
  (:class:`cicm.httpclient.DeadlineSession`); the ProviderError says which deadline passed, doing what;
* every other 4xx (401, 403, 404, ...) fails at once;
* failures become :class:`~cicm.errors.ProviderError` carrying the last HTTP status (None for transport errors)
  and naming the URL;
* a 2xx with an empty or non-JSON body is a ProviderError too (the caller checks the JSON's fields);
* so is a body larger than ``max_bytes`` (20 MB: :data:`cicm.jsonsafe.MAX_BYTES`; the body is streamed and the read
  stops there), nested deeper than 64, or holding a number no reading has (a 400-digit integer, ``1e400``):
  :func:`cicm.jsonsafe.loads_bounded` parses it, and its refusal names the field (``response body``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import requests

from cicm.errors import ProviderError
from cicm.jsonsafe import MAX_BYTES, JSONRejected, loads_bounded
from cicm.httpclient import (
    DEFAULT_DEADLINE_S, RETRY_STATUSES, DeadlineExceeded, ResponseTooLarge, attempts_made, make_session, read_body,
    retry_after_s, session_max_attempts, session_timeout_s, transport_problem)

__all__ = [
    "DEFAULT_POLICY", "RetryPolicy", "backoff_delay_s", "decode_json", "get_json", "retry_after_s",
]


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4
    timeout_s: float = 10.0
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    retry_after_cap_s: float = 60.0
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False, repr=False)
    deadline_s: float = DEFAULT_DEADLINE_S
    max_bytes: int = MAX_BYTES

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if not self.deadline_s > 0:
            raise ValueError("deadline_s must be > 0")

    def session(self) -> requests.Session:
        """A new ``requests.Session`` retrying per this policy (close it, or use it as a context manager)."""
        return make_session(
            retries=self.max_attempts - 1, backoff_s=self.backoff_base_s, timeout_s=self.timeout_s,
            backoff_max_s=self.backoff_max_s, retry_after_cap_s=self.retry_after_cap_s,
            retry_statuses=RETRY_STATUSES, sleep=self.sleep, deadline_s=self.deadline_s,
            max_body_bytes=self.max_bytes,
        )


DEFAULT_POLICY = RetryPolicy()


def backoff_delay_s(attempt: int, policy: RetryPolicy) -> float:
    """Delay before retry number ``attempt`` (1-based): base * 2**(attempt-1), capped."""
    return min(policy.backoff_base_s * (2 ** (attempt - 1)), policy.backoff_max_s)


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def read_bounded(response: requests.Response, provider: str, max_bytes: int = MAX_BYTES, *,
                 truncate: bool = False) -> bytes:
    """The body of ``response`` (streamed or not), or ProviderError once it passes ``max_bytes`` (with
    ``truncate``: its first ``max_bytes``, for an error page) or the fetch's deadline (``response.deadline``, set by
    the session: :func:`cicm.httpclient.read_body`)."""
    try:
        return read_body(response, max_bytes, truncate=truncate)
    except (DeadlineExceeded, ResponseTooLarge) as exc:
        raise ProviderError(provider, str(exc), response.status_code) from exc
    except requests.RequestException as exc:
        raise ProviderError(provider, f"response body: reading from {response.url} failed: {exc}",
                            response.status_code) from exc


def decode_json(response: requests.Response, provider: str, max_bytes: int = MAX_BYTES) -> Any:
    """Body of a 2xx response as JSON; empty, too large, too deep or malformed bodies raise ProviderError naming
    the field (``response body``) and the URL."""
    body = read_bounded(response, provider, max_bytes)
    if not body or not body.strip():
        raise ProviderError(provider, f"empty response body from {response.url}", response.status_code)
    try:
        return loads_bounded(body, "response body", max_bytes=max_bytes)
    except JSONRejected as exc:
        message = exc.message.replace("malformed JSON", "malformed JSON from " + str(response.url))
        if "malformed JSON" not in exc.message:
            message = f"{message} (from {response.url})"
        raise ProviderError(provider, f"{exc.field}: {message}", response.status_code) from exc


def get_json(
    session: requests.Session,
    url: str,
    *,
    provider: str,
    params: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    auth: tuple[str, str] | None = None,
) -> Any:
    """GET ``url`` through ``session`` (which retries, see :meth:`RetryPolicy.session`) and return its JSON.

    Raises ProviderError on failure: the status and body of the last response, or the transport problem.
    """
    try:
        response = session.get(url, params=params, headers=headers, auth=auth, stream=True)
    except DeadlineExceeded as exc:
        raise ProviderError(provider, f"GET {url}: {exc}", exc.status) from exc
    except requests.RequestException as exc:
        problem = transport_problem(exc, session_timeout_s(session, url))
        attempts = session_max_attempts(session, url) or 1
        raise ProviderError(provider, f"giving up after {attempts} attempt(s): GET {url}: {problem}", None) from exc
    status = response.status_code
    if 200 <= status < 300:
        return decode_json(response, provider, getattr(response, "max_body_bytes", MAX_BYTES))
    body = read_bounded(response, provider, 64 * 1024, truncate=True)  # an error page: its start says why
    problem = f"GET {response.url} failed: {_short(body.decode('utf-8', 'replace'))}"
    attempts = attempts_made(response)
    if attempts > 1:
        problem = f"giving up after {attempts} attempt(s): {problem}"
    raise ProviderError(provider, problem, status)
