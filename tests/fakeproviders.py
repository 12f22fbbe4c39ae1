"""A real HTTP server on 127.0.0.1 that speaks the Electricity Maps v3 and WattTime v3 wire formats.

Behaviours are switchable per provider (``fake.set("electricitymaps", "stale")``); see ``BEHAVIOURS``. The values
it serves are deterministic functions of the hour (:func:`em_value_gco2_per_kwh`, :func:`wt_point_lbs_per_mwh`)
so tests can compute the expected numbers independently.
"""
from __future__ import annotations

import base64
import json
import math
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pandas as pd
import pytest

EM_TOKEN = "em-test-token"
WT_USER, WT_PASSWORD = "alice", "s3cret"

FORECAST_START = pd.Timestamp("2026-11-22T18:00:00Z")  # first hour served
FORECAST_HOURS = 36  # through 2026-11-24T05:00Z
ISSUED_AT = pd.Timestamp("2026-11-22T18:00:00Z")
NOW = pd.Timestamp("2026-11-22T18:30:00Z")
DAY_START = pd.Timestamp("2026-11-23T00:00:00Z")  # the planning day the tests ask for
DAY_END = pd.Timestamp("2026-11-24T00:00:00Z")
BAD_HOUR = pd.Timestamp("2026-11-23T05:00:00Z")  # where nan/negative/duplicate/missing behaviours strike

BEHAVIOURS = (
    "ok", "401", "403", "404", "429_then_ok", "500_then_ok", "always_500", "timeout_then_ok", "empty_body",
    "malformed_json", "missing_fields", "missing_value_key", "stale", "nan_value", "negative_value", "huge_value",
    "duplicate_datetime", "missing_hour", "naive_datetime", "wrong_zone", "expired_token", "wrong_units",
)


def em_value_gco2_per_kwh(hour: pd.Timestamp) -> float:
    """Hourly value served by the fake Electricity Maps (a smooth daily cycle, 200..400)."""
    return round(300.0 + 100.0 * math.sin(2 * math.pi * hour.hour / 24), 3)


def wt_hour_mean_lbs_per_mwh(hour: pd.Timestamp) -> float:
    """Mean of the 12 five-minute WattTime points of ``hour`` (lbs/MWh)."""
    return round(900.0 + 200.0 * math.cos(2 * math.pi * hour.hour / 24), 3)


def wt_point_lbs_per_mwh(point: pd.Timestamp) -> float:
    """Five-minute value: hourly mean + a ramp (k - 5.5) * 4, k = 0..11, whose mean over the hour is zero."""
    k = point.minute // 5
    return wt_hour_mean_lbs_per_mwh(point.floor("h")) + (k - 5.5) * 4.0


def _iso_em(ts: pd.Timestamp) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _iso_wt(ts: pd.Timestamp) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S+00:00")


@dataclass
class ProviderState:
    behaviour: str = "ok"
    failures: int = 1  # how many failing responses before "_then_ok" behaviours recover
    retry_after: str | None = "1"
    delay_s: float = 0.5
    failed_so_far: int = 0
    hits: dict = field(default_factory=dict)
    last_query: dict = field(default_factory=dict)  # endpoint -> query parameters of the latest request


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        import sys

        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return  # the client gave up (timeout tests): expected
        super().handle_error(request, client_address)


class FakeProviders:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.state: dict[str, ProviderState] = {}
        self.tokens_issued: list[str] = []
        self.reset()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:  # noqa: N802
                fake._dispatch(self)

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # -- lifecycle -------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeProviders":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "FakeProviders":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def reset(self) -> None:
        with self.lock:
            self.state = {"electricitymaps": ProviderState(), "watttime": ProviderState()}
            self.tokens_issued = []

    def set(self, provider: str, behaviour: str, **options) -> None:
        assert behaviour in BEHAVIOURS, behaviour
        with self.lock:
            self.state[provider] = ProviderState(behaviour=behaviour, **options)

    def hits(self, provider: str, endpoint: str) -> int:
        with self.lock:
            return self.state[provider].hits.get(endpoint, 0)

    # -- responses -------------------------------------------------------------------------------------
    @staticmethod
    def _send(handler, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.end_headers()
        if body:
            handler.wfile.write(body)

    def _send_json(self, handler, status: int, payload) -> None:
        self._send(handler, status, json.dumps(payload).encode())

    def _dispatch(self, handler) -> None:
        parts = urlsplit(handler.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        path = parts.path
        if path.startswith("/v3/carbon-intensity/"):
            self._electricitymaps(handler, path.rsplit("/", 1)[-1], query)
        elif path == "/login":
            self._wt_login(handler)
        elif path == "/v3/forecast":
            self._wt_forecast(handler, query)
        else:
            self._send_json(handler, 404, {"error": f"no route {path}"})

    def last_query(self, provider: str, endpoint: str) -> dict:
        with self.lock:
            return dict(self.state[provider].last_query.get(endpoint, {}))

    def _count(self, provider: str, endpoint: str, query: dict | None = None) -> ProviderState:
        with self.lock:
            st = self.state[provider]
            st.hits[endpoint] = st.hits.get(endpoint, 0) + 1
            st.last_query[endpoint] = dict(query or {})
            return st

    def _transport_behaviour(self, handler, st: ProviderState) -> bool:
        """Status/transport behaviours common to both providers. True when a response was sent."""
        b = st.behaviour
        if b in ("401", "403", "404"):
            self._send_json(handler, int(b), {"error": f"fake {b}"})
            return True
        if b == "always_500":
            self._send_json(handler, 500, {"error": "fake outage"})
            return True
        if b in ("429_then_ok", "500_then_ok", "timeout_then_ok"):
            with self.lock:
                failing = st.failed_so_far < st.failures
                st.failed_so_far += failing
            if failing and b == "429_then_ok":
                headers = {"Retry-After": st.retry_after} if st.retry_after is not None else {}
                self._send(handler, 429, b'{"error": "rate limited"}', headers)
                return True
            if failing and b == "500_then_ok":
                self._send_json(handler, 503, {"error": "fake transient outage"})
                return True
            if failing and b == "timeout_then_ok":
                time.sleep(st.delay_s)
        if b == "empty_body":
            self._send(handler, 200, b"")
            return True
        if b == "malformed_json":
            self._send(handler, 200, b'{"zone": "DE", "forecast": [{"carbonIntensity": 3')
            return True
        return False

    # -- Electricity Maps ------------------------------------------------------------------------------
    def _electricitymaps(self, handler, kind: str, query: dict) -> None:
        st = self._count("electricitymaps", kind, query)
        if handler.headers.get("auth-token") != EM_TOKEN:
            self._send_json(handler, 401, {"error": "invalid auth-token"})
            return
        if self._transport_behaviour(handler, st):
            return
        zone = query.get("zone", "")
        if kind == "forecast":
            payload = self.em_forecast_payload(zone, st.behaviour)
        elif kind == "history":
            payload = self.em_history_payload(zone, st.behaviour)
        else:
            self._send_json(handler, 404, {"error": kind})
            return
        self._send_json(handler, 200, payload)

    @staticmethod
    def _em_hours(behaviour: str) -> list[pd.Timestamp]:
        hours = list(pd.date_range(FORECAST_START, periods=FORECAST_HOURS, freq="h"))
        if behaviour == "missing_hour":
            hours.remove(BAD_HOUR)
        if behaviour == "duplicate_datetime":
            hours.insert(hours.index(BAD_HOUR), BAD_HOUR)
        return hours

    @staticmethod
    def _em_value(hour: pd.Timestamp, behaviour: str):
        if hour == BAD_HOUR:
            if behaviour == "nan_value":
                return None
            if behaviour == "negative_value":
                return -50
            if behaviour == "huge_value":
                return 5000
        return em_value_gco2_per_kwh(hour)

    def em_forecast_payload(self, zone: str, behaviour: str = "ok") -> dict:
        issued = ISSUED_AT - pd.Timedelta(days=3) if behaviour == "stale" else ISSUED_AT
        entries = []
        for hour in self._em_hours(behaviour):
            stamp = _iso_em(hour)
            if behaviour == "naive_datetime" and hour == BAD_HOUR:
                stamp = stamp.rstrip("Z")
            entry = {"carbonIntensity": self._em_value(hour, behaviour), "datetime": stamp}
            if behaviour == "missing_value_key" and hour == BAD_HOUR:
                del entry["carbonIntensity"]
            entries.append(entry)
        payload = {"zone": "XX" if behaviour == "wrong_zone" else zone, "forecast": entries,
                   "updatedAt": _iso_em(issued)}
        if behaviour == "missing_fields":
            del payload["updatedAt"]
        return payload

    def em_history_payload(self, zone: str, behaviour: str = "ok") -> dict:
        """24 past hours ending at FORECAST_START (i.e. 2026-11-21T18Z .. 2026-11-22T17Z)."""
        hours = list(pd.date_range(FORECAST_START - pd.Timedelta(hours=24), periods=24, freq="h"))
        updated = ISSUED_AT - pd.Timedelta(days=3) if behaviour == "stale" else ISSUED_AT
        entries = [
            {"zone": zone, "carbonIntensity": em_value_gco2_per_kwh(h), "datetime": _iso_em(h),
             "updatedAt": _iso_em(updated), "createdAt": _iso_em(h), "emissionFactorType": "lifecycle",
             "isEstimated": False, "estimationMethod": None}
            for h in hours
        ]
        if behaviour == "missing_fields":
            del entries[2]["updatedAt"]
        return {"zone": zone, "history": entries}

    # -- WattTime --------------------------------------------------------------------------------------
    def _wt_login(self, handler) -> None:
        st = self._count("watttime", "login")
        expected = "Basic " + base64.b64encode(f"{WT_USER}:{WT_PASSWORD}".encode()).decode()
        if handler.headers.get("Authorization") != expected or st.behaviour == "401":
            self._send_json(handler, 401, {"error": "bad credentials"})
            return
        with self.lock:
            token = f"wt-token-{len(self.tokens_issued) + 1}"
            self.tokens_issued.append(token)
        self._send_json(handler, 200, {"token": token})

    def _wt_token_valid(self, handler, st: ProviderState) -> bool:
        auth = handler.headers.get("Authorization", "")
        with self.lock:
            tokens = list(self.tokens_issued)
        if not auth.startswith("Bearer ") or auth[len("Bearer "):] not in tokens:
            return False
        token = auth[len("Bearer "):]
        if st.behaviour == "expired_token" and token == tokens[0]:
            return False  # the first token has expired; later ones are fine
        return True

    def _wt_forecast(self, handler, query: dict) -> None:
        st = self._count("watttime", "forecast", query)
        if not self._wt_token_valid(handler, st):
            self._send_json(handler, 401, {"error": "token expired or invalid"})
            return
        if st.behaviour != "401" and self._transport_behaviour(handler, st):
            return
        if query.get("signal_type") != "co2_moer":
            self._send_json(handler, 400, {"error": "signal_type"})
            return
        self._send_json(handler, 200, self.wt_forecast_payload(query.get("region", ""), st.behaviour))

    @staticmethod
    def wt_forecast_payload(region: str, behaviour: str = "ok") -> dict:
        points = list(pd.date_range(FORECAST_START, periods=FORECAST_HOURS * 12, freq="5min"))
        if behaviour == "missing_hour":
            points = [p for p in points if p.floor("h") != BAD_HOUR]
        if behaviour == "duplicate_datetime":
            points.insert(points.index(BAD_HOUR), BAD_HOUR)
        data = []
        for p in points:
            value = wt_point_lbs_per_mwh(p)
            if p == BAD_HOUR + pd.Timedelta(minutes=10):
                value = {"nan_value": None, "negative_value": -20.0, "huge_value": 9000.0}.get(behaviour, value)
            stamp = _iso_wt(p)
            if behaviour == "naive_datetime" and p == BAD_HOUR:
                stamp = p.strftime("%Y-%m-%dT%H:%M:%S")
            data.append({"point_time": stamp, "value": value})
        generated = ISSUED_AT - pd.Timedelta(days=3) if behaviour == "stale" else ISSUED_AT
        meta = {
            "data_point_period_seconds": 300,
            "region": "ELSEWHERE" if behaviour == "wrong_zone" else region,
            "warnings": [],
            "signal_type": "co2_moer",
            "model": {"date": "2026-01-01"},
            "units": "kg_co2_per_mwh" if behaviour == "wrong_units" else "lbs_co2_per_mwh",
            "generated_at_period_seconds": 300,
            "generated_at": _iso_wt(generated),
        }
        if behaviour == "missing_fields":
            del meta["generated_at"]
        if behaviour == "missing_value_key":
            del data[3]["value"]
        return {"data": data, "meta": meta}


@pytest.fixture(scope="module")
def fake_server():
    with FakeProviders() as server:
        yield server


@pytest.fixture
def fake(fake_server):
    fake_server.reset()
    yield fake_server
    fake_server.reset()
