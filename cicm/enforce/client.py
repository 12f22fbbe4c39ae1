"""A small HTTP client for the ecovisor's REST API (the agent's only way to reach it: never by import).

Errors are split in two: :class:`EcovisorUnavailable` (connection refused, timeout, HTTP 502/503/504: retry
later) and :class:`EcovisorError` (any other 4xx/5xx: a bad token, a bad value, a missing route: retrying will
not help). Each request is retried ``retries`` times on unavailability with a short fixed delay; longer
back-off is the agent's job.

Routes used (checked against ``/openapi.json`` by :meth:`EcovisorClient.check_contract`): see ``ROUTES``.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import httpx

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

UNAVAILABLE_STATUS = (502, 503, 504)


class EcovisorUnavailable(RuntimeError):
    """The ecovisor could not be reached or said it is unavailable; try again later."""


class EcovisorError(RuntimeError):
    """The ecovisor answered with an error that retrying will not fix."""

    def __init__(self, status_code: int, message: str, field: str | None = None):
        self.status_code = status_code
        self.field = field
        super().__init__(f"HTTP {status_code}: {message}" + (f" (field {field})" if field else ""))


class EcovisorClient:
    def __init__(self, base_url: str, token: str | None, *, timeout_s: float = 5.0, retries: int = 2,
                 retry_delay_s: float = 0.5, transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.base_url = base_url.rstrip("/")
        self.retries = max(0, int(retries))
        self.retry_delay_s = retry_delay_s
        self.sleep = sleep
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=httpx.Timeout(timeout_s),
                                  transport=transport)
        self.writes: list[tuple[str, str, dict]] = []  # every successful PUT (path, body): what the agent changed

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "EcovisorClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ transport
    def _request(self, method: str, path: str, json: dict | None = None) -> Any:
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                self.sleep(self.retry_delay_s)
            try:
                r = self._http.request(method, path, json=json)
            except (httpx.TransportError, OSError) as exc:  # refused, reset, timeout, DNS
                last = EcovisorUnavailable(f"{method.upper()} {self.base_url}{path}: {type(exc).__name__}: {exc}")
                continue
            if r.status_code in UNAVAILABLE_STATUS:
                last = EcovisorUnavailable(f"{method.upper()} {path}: HTTP {r.status_code}: {_detail(r)}")
                continue
            if r.status_code >= 400:
                field = None
                try:
                    field = r.json().get("field")
                except ValueError:
                    pass
                raise EcovisorError(r.status_code, f"{method.upper()} {path}: {_detail(r)}", field)
            if method.lower() == "put":
                self.writes.append((method.upper(), path, json or {}))
            if r.status_code == 204 or not r.content:
                return None
            return r.json()
        assert last is not None
        raise last

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

    def set_battery_charge_rate(self, kw: float) -> dict:
        return self._request(*self._route("set_charge_rate"), json={"kw": float(kw)})

    def set_battery_max_discharge(self, kw: float) -> dict:
        return self._request(*self._route("set_max_discharge"), json={"kw": float(kw)})


def _detail(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text[:200]
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        return "; ".join(str(d.get("msg", d)) for d in detail[:3])
    return str(detail)[:300]
