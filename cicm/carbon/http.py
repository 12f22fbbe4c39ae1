"""One small retrying GET-JSON helper around httpx, shared by the provider clients.

Policy (see :class:`RetryPolicy`):

* timeouts, connection errors and HTTP 5xx are retried with exponential backoff
  ``backoff_base_s * 2**(attempt-1)`` (capped at ``backoff_max_s``);
* HTTP 429 is retried after the server's ``Retry-After`` (seconds or an HTTP date), capped at
  ``retry_after_cap_s``; without a usable header the exponential backoff is used;
* every other 4xx (401, 403, 404, ...) fails at once;
* failures become :class:`~cicm.errors.ProviderError` carrying the last HTTP status (None for transport errors);
* a 2xx with an empty or non-JSON body is a ProviderError too (the caller checks the JSON's fields).
"""
from __future__ import annotations

import email.utils
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import httpx

from cicm.errors import ProviderError


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4
    timeout_s: float = 10.0
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    retry_after_cap_s: float = 60.0
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False, repr=False)


DEFAULT_POLICY = RetryPolicy()


def backoff_delay_s(attempt: int, policy: RetryPolicy) -> float:
    """Delay before retry number ``attempt`` (1-based): base * 2**(attempt-1), capped."""
    return min(policy.backoff_base_s * (2 ** (attempt - 1)), policy.backoff_max_s)


def retry_after_s(header: str | None, *, now_s: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date); None if absent/unusable."""
    if header is None or not header.strip():
        return None
    text = header.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (time.time() if now_s is None else now_s)
    if seconds != seconds:  # NaN
        return None
    return max(seconds, 0.0)


def _is_retryable_status(status: int) -> bool:
    return status == 429 or status >= 500


def _delay_for_response(response: httpx.Response, attempt: int, policy: RetryPolicy) -> float:
    if response.status_code == 429:
        server = retry_after_s(response.headers.get("Retry-After"))
        if server is not None:
            return min(server, policy.retry_after_cap_s)
    return backoff_delay_s(attempt, policy)


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def decode_json(response: httpx.Response, provider: str) -> Any:
    """Body of a 2xx response as JSON; empty or malformed bodies raise ProviderError."""
    body = response.content
    if not body or not body.strip():
        raise ProviderError(provider, f"empty response body from {response.request.url}", response.status_code)
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProviderError(
            provider, f"malformed JSON from {response.request.url}: {exc}", response.status_code
        ) from exc


def get_json(
    client: httpx.Client,
    url: str,
    *,
    provider: str,
    params: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    auth: httpx.Auth | tuple[str, str] | None = None,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> Any:
    """GET ``url`` and return its JSON, retrying per ``policy``. Raises ProviderError on failure."""
    if policy.max_attempts < 1:
        raise ValueError("max_attempts must be >= 1")
    last_problem, last_status = "no attempt made", None
    for attempt in range(1, policy.max_attempts + 1):
        try:
            response = client.get(url, params=params, headers=headers, auth=auth, timeout=policy.timeout_s)
        except httpx.TimeoutException as exc:
            last_problem, last_status = f"timeout after {policy.timeout_s:g} s ({type(exc).__name__})", None
            delay = backoff_delay_s(attempt, policy)
        except httpx.TransportError as exc:
            last_problem, last_status = f"connection error: {type(exc).__name__}: {exc}", None
            delay = backoff_delay_s(attempt, policy)
        else:
            status = response.status_code
            if 200 <= status < 300:
                return decode_json(response, provider)
            last_problem, last_status = f"GET {url} failed: {_short(response.text)}", status
            if not _is_retryable_status(status):
                raise ProviderError(provider, last_problem, status)
            delay = _delay_for_response(response, attempt, policy)
        if attempt < policy.max_attempts:
            policy.sleep(delay)
    raise ProviderError(provider, f"giving up after {policy.max_attempts} attempt(s): {last_problem}", last_status)
