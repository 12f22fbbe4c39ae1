"""A small HTTP client for the ecovisor's REST API (the agent's only way to reach it: never by import).

Errors are split in two: :class:`EcovisorUnavailable` (connection refused, timeout, HTTP 502/503/504: retry
later) and :class:`EcovisorError` (any other 4xx/5xx: a bad token, a bad value, a missing route: retrying will
not help; also a success whose body is not JSON). Each request is retried ``retries`` times on unavailability
with a short fixed delay, by urllib3's ``Retry`` on a ``requests.Session`` (:func:`cicm.httpclient.make_session`);
longer back-off is the agent's job.

Routes used (checked against ``/openapi.json`` by :meth:`EcovisorClient.check_contract`): see ``ROUTES``; the bulk
cap route (``OPTIONAL_ROUTES``) is used when the ecovisor has it, else :meth:`EcovisorClient.set_powercaps` falls
back to one ``PUT /v1/containers/{name}/powercap`` per container.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import requests

from cicm.httpclient import make_session, session_max_attempts, transport_problem
from cicm.jsonsafe import loads_bounded

ROUTES: dict[str, tuple[str, str]] = {
    "health": ("get", "/v1/health"),
    "clock": ("get", "/v1/clock"),
    "me": ("get", "/v1/apps/me"),
    "containers": ("get", "/v1/containers"),
    "container": ("get", "/v1/containers/{name}"),
    "set_powercap": ("put", "/v1/containers/{name}/powercap"),
    "battery": ("get", "/v1/battery"),
    "set_charge_rate": ("put", "/v1/battery/charge-rate"),
    "set_max_discharge": ("put", "/v1/battery/max-discharge"),
    "grid_carbon": ("get", "/v1/grid/carbon"),
    "solar": ("get", "/v1/solar/power"),
}
OPTIONAL_ROUTES: dict[str, tuple[str, str]] = {
    # an older ecovisor lacks it: the client then sets the caps one container at a time (set_powercaps)
    "set_powercaps": ("put", "/v1/containers/powercaps"),
}
FALLBACK_STATUS = (404, 405)  # what an ecovisor without the bulk route answers for it

UNAVAILABLE_STATUS = (502, 503, 504)


class EcovisorUnavailable(RuntimeError):
    """The ecovisor could not be reached or said it is unavailable; try again later."""


class EcovisorError(RuntimeError):
    """The ecovisor answered with an error that retrying will not fix."""

    def __init__(self, status_code: int, message: str, field: str | None = None):
        self.status_code = status_code
        self.field = field
        super().__init__(f"HTTP {status_code}: {message}" + (f" (field {field})" if field else ""))


class EcovisorBadResponse(EcovisorError, ValueError):
    """A success whose body is not JSON (a ValueError too, as the JSON decoder's error was before)."""


class EcovisorClient:
    """``base_url`` is the ecovisor's root (e.g. ``http://127.0.0.1:8700``); ``token`` its bearer token.

    ``session`` replaces the built one (its own retries and timeout then apply); the token header is added to it.
    """

    def __init__(self, base_url: str, token: str | None, *, timeout_s: float = 5.0, retries: int = 2,
                 retry_delay_s: float = 0.5, session: requests.Session | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.base_url = base_url.rstrip("/")
        self.retries = max(0, int(retries))
        self.retry_delay_s = retry_delay_s
        self.timeout_s = timeout_s
        self.sleep = sleep
        if session is None:
            # every verb is retried (the client only GETs and PUTs absolute values), with a fixed delay
            session = make_session(retries=self.retries, backoff_s=retry_delay_s, backoff_max_s=retry_delay_s,
                                   timeout_s=timeout_s, retry_statuses=UNAVAILABLE_STATUS, methods=None, sleep=sleep)
        if token:
            session.headers["Authorization"] = f"Bearer {token}"
        self._http = session
        self.writes: list[tuple[str, str, dict]] = []  # every successful PUT (path, body): what the agent changed
        self.bulk_caps: bool | None = None  # the bulk cap route: None until tried, False on an older ecovisor
        self.bulk_fallback: str | None = None  # why the client sets caps one container at a time

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "EcovisorClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ transport
    def _request(self, method: str, path: str, json: dict | None = None) -> Any:
        url = f"{self.base_url}{path}"
        verb = method.upper()
        try:
            r = self._http.request(verb, url, json=json)  # retried inside the session (urllib3 Retry)
        except (requests.RequestException, OSError) as exc:  # refused, reset, timeout, DNS, bad URL
            attempts = session_max_attempts(self._http, url) or 1
            problem = transport_problem(exc, self.timeout_s)
            raise EcovisorUnavailable(f"{verb} {url}: {problem} (after {attempts} attempt(s))") from exc
        if r.status_code in UNAVAILABLE_STATUS:
            raise EcovisorUnavailable(f"{verb} {url}: HTTP {r.status_code}: {_detail(r)}")
        if r.status_code >= 400:
            field = None
            try:
                body = _json(r)
                field = body.get("field") if isinstance(body, dict) else None
            except ValueError:
                pass
            raise EcovisorError(r.status_code, f"{verb} {path}: {_detail(r)}", field)
        if verb == "PUT":
            self.writes.append((verb, path, json or {}))
        if r.status_code == 204 or not r.content:
            return None
        try:
            return _json(r)
        except ValueError as exc:
            raise EcovisorBadResponse(r.status_code, f"{verb} {url}: malformed JSON in the response ({exc}): "
                                                     f"{r.text[:200]!r}") from exc

    def _route(self, key: str, **params) -> tuple[str, str]:
        method, path = ROUTES[key]
        return method, path.format(**params)

    # ------------------------------------------------------------------------------------------ contract
    def openapi(self) -> dict:
        return self._request("get", "/openapi.json")

    def check_contract(self) -> list[str]:
        """Routes this client needs that the running ecovisor does not offer (empty when all is well)."""
        paths = self.openapi().get("paths", {})
        return [f"{m.upper()} {p}" for m, p in ROUTES.values() if m not in paths.get(p, {})]

    # ------------------------------------------------------------------------------------------ getters
    def health(self) -> dict:
        return self._request(*self._route("health"))

    def clock(self) -> dict:
        return self._request(*self._route("clock"))

    def me(self) -> dict:
        return self._request(*self._route("me"))

    def containers(self) -> list[dict]:
        return self._request(*self._route("containers"))

    def container(self, name: str) -> dict:
        return self._request(*self._route("container", name=name))

    def battery(self) -> dict:
        return self._request(*self._route("battery"))

    def grid_carbon(self) -> dict:
        return self._request(*self._route("grid_carbon"))

    def solar(self) -> dict:
        return self._request(*self._route("solar"))

    # ------------------------------------------------------------------------------------------ setters
    def set_powercap(self, name: str, kw: float) -> dict:
        return self._request(*self._route("set_powercap", name=name), json={"kw": float(kw)})

    def set_powercaps(self, caps: list[tuple[str, float]]) -> dict[str, dict]:
        """Set several containers' caps: one ``PUT /v1/containers/powercaps`` (validated as a whole by the
        ecovisor: one bad entry refuses all, :class:`EcovisorError` naming it). An ecovisor without that route
        (it answers 404 or 405 without naming a field) gets one ``PUT /v1/containers/{name}/powercap`` per
        container, now and from then on (:attr:`bulk_fallback` says why). Returns each container as answered,
        by name."""
        if not caps:
            return {}
        if self.bulk_caps is not False:
            method, path = OPTIONAL_ROUTES["set_powercaps"]
            try:
                body = self._request(method, path, json={"caps": [{"name": n, "kw": float(kw)} for n, kw in caps]})
            except EcovisorError as exc:
                if exc.status_code not in FALLBACK_STATUS or exc.field is not None:
                    raise
                self.bulk_caps = False
                self.bulk_fallback = (f"the ecovisor at {self.base_url} has no bulk cap route (HTTP "
                                      f"{exc.status_code} for {method.upper()} {path}): one PUT per container")
            else:
                self.bulk_caps = True
                got = body.get("containers") if isinstance(body, dict) else None
                if not isinstance(got, list) or len(got) != len(caps) or not all(isinstance(d, dict) for d in got):
                    raise EcovisorBadResponse(200, f"{method.upper()} {path}: expected {len(caps)} containers in "
                                                   f"the answer, got {str(body)[:200]!r}")
                return {n: d for (n, _), d in zip(caps, got)}
        return {n: self.set_powercap(n, kw) for n, kw in caps}

    def set_battery_charge_rate(self, kw: float) -> dict:
        return self._request(*self._route("set_charge_rate"), json={"kw": float(kw)})

    def set_battery_max_discharge(self, kw: float) -> dict:
        return self._request(*self._route("set_max_discharge"), json={"kw": float(kw)})


def _json(r: requests.Response) -> Any:
    """The body as JSON, bounded (:func:`cicm.jsonsafe.loads_bounded`: size, depth, numbers); a refusal is a
    ValueError (JSONRejected) naming ``response body``, as the decoder's error was."""
    return loads_bounded(r.content, "response body")


def _detail(r: requests.Response) -> str:
    try:
        body = _json(r)
    except ValueError:
        return r.text[:200]
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        return "; ".join(str(d.get("msg", d)) for d in detail[:3])
    return str(detail)[:300]
