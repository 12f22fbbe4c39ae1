"""The shared requests session (urllib3 Retry) and the agent's ecovisor client, against a real loopback server."""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from urllib3.util.retry import Retry

from cicm.enforce.client import EcovisorBadResponse, EcovisorClient, EcovisorError, EcovisorUnavailable
from cicm.httpclient import BoundedRetry, is_timeout, make_session, transport_problem


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


class Server:
    """Answers every request from a script: a list of (status, body, headers, delay_s), the last one repeating."""

    def __init__(self) -> None:
        self.script: list[tuple[int, bytes, dict, float]] = [(200, b"{}", {}, 0.0)]
        self.requests: list[tuple[str, str, dict, bytes]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body_in = self.rfile.read(length) if length else b""
                server.requests.append((self.command, self.path, dict(self.headers), body_in))
                step = server.script[min(len(server.requests) - 1, len(server.script) - 1)]
                status, body, headers, delay = step
                if delay:
                    time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_PUT = do_POST = _answer  # noqa: N815

        class Quiet(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:
                pass

        self.httpd = Quiet(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def answer(self, *steps) -> None:
        self.script = [(s[0], s[1] if len(s) > 1 else b"{}", s[2] if len(s) > 2 else {}, s[3] if len(s) > 3 else 0.0)
                       for s in steps]
        self.requests = []


@pytest.fixture(scope="module")
def _server():
    srv = Server()
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


@pytest.fixture
def server(_server):
    _server.answer((200, b"{}"))
    return _server


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ok(payload) -> tuple:
    return (200, json.dumps(payload).encode())


# ------------------------------------------------------------------------------------------- make_session
def test_make_session_mounts_bounded_retry_with_default_timeout():
    with make_session(retries=2, backoff_s=0.1, timeout_s=3.0) as session:
        adapter = session.get_adapter("https://api.example.org/x")
        assert isinstance(session, requests.Session)
        assert isinstance(adapter.max_retries, Retry) and isinstance(adapter.max_retries, BoundedRetry)
        assert adapter.max_retries.total == 2 and adapter.timeout_s == 3.0
    for bad in (dict(retries=-1), dict(backoff_s=-1.0), dict(timeout_s=0.0)):
        with pytest.raises(ValueError):
            make_session(**bad)


def test_backoff_schedule_is_exponential_from_the_first_retry_and_capped(server):
    server.answer((500,), (500,), (500,), (500,), ok({"n": 1}))
    sleeps = Sleeps()
    with make_session(retries=4, backoff_s=0.01, backoff_max_s=0.03, timeout_s=2, sleep=sleeps) as session:
        assert session.get(server.url + "/x").json() == {"n": 1}
    assert sleeps == [pytest.approx(0.01), pytest.approx(0.02), pytest.approx(0.03), pytest.approx(0.03)]
    assert len(server.requests) == 5


def test_exhausted_status_returns_the_last_response(server):
    server.answer((503, b'{"detail": "busy"}'))
    sleeps = Sleeps()
    with make_session(retries=2, backoff_s=0.0, timeout_s=2, sleep=sleeps) as session:
        r = session.get(server.url + "/x")
    assert r.status_code == 503 and len(server.requests) == 3 and len(sleeps) == 2


def test_only_idempotent_methods_are_retried_by_default(server):
    server.answer((503,))
    with make_session(retries=2, backoff_s=0.0, timeout_s=2, sleep=Sleeps()) as session:
        assert session.post(server.url + "/x", json={}).status_code == 503
    assert len(server.requests) == 1
    server.answer((503,))
    with make_session(retries=2, backoff_s=0.0, timeout_s=2, sleep=Sleeps(), methods=None) as session:
        assert session.post(server.url + "/x", json={}).status_code == 503
    assert len(server.requests) == 3


def test_timeouts_and_refusals_are_told_apart(server):
    server.answer((200, b"{}", {}, 0.5))
    with make_session(retries=0, backoff_s=0.0, timeout_s=0.1) as session:
        with pytest.raises(requests.RequestException) as timeout:
            session.get(server.url + "/slow")
        with pytest.raises(requests.RequestException) as refused:
            session.get(f"http://127.0.0.1:{closed_port()}/x")
    assert is_timeout(timeout.value) and transport_problem(timeout.value, 0.1).startswith("timeout after 0.1 s")
    assert not is_timeout(refused.value)
    assert transport_problem(refused.value).startswith("connection error: NewConnectionError")


# ------------------------------------------------------------------------------------------- EcovisorClient
def test_client_sends_token_and_records_puts(server):
    server.answer(ok({"name": "c1", "kw": 2.5}))
    with EcovisorClient(server.url + "/", "tok", retries=0) as client:
        assert client.set_powercap("c1", 2.5) == {"name": "c1", "kw": 2.5}
    method, path, headers, body = server.requests[0]
    assert (method, path) == ("PUT", "/v1/containers/c1/powercap") and json.loads(body) == {"kw": 2.5}
    assert headers["Authorization"] == "Bearer tok"
    assert client.writes == [("PUT", "/v1/containers/c1/powercap", {"kw": 2.5})]


def test_unavailable_status_is_retried_with_a_fixed_delay_then_recovers(server):
    server.answer((503,), (502,), ok({"status": "ok"}))
    sleeps = Sleeps()
    with EcovisorClient(server.url, None, retries=2, retry_delay_s=0.05, sleep=sleeps) as client:
        assert client.health() == {"status": "ok"}
    assert sleeps == [0.05, 0.05] and len(server.requests) == 3
    assert "Authorization" not in server.requests[0][2]


def test_unavailable_forever_raises_unavailable_naming_the_url(server):
    server.answer((504, b'{"detail": "upstream down"}'))
    sleeps = Sleeps()
    with EcovisorClient(server.url, "t", retries=1, retry_delay_s=0.01, sleep=sleeps) as client:
        with pytest.raises(EcovisorUnavailable, match=r"GET http://127\.0\.0\.1:\d+/v1/battery: HTTP 504: upstream"):
            client.battery()
    assert len(server.requests) == 2 and sleeps == [0.01]


def test_puts_are_retried_on_unavailability(server):
    server.answer((503,), ok({"kw": 1.0}))
    with EcovisorClient(server.url, "t", retries=1, retry_delay_s=0.0, sleep=Sleeps()) as client:
        assert client.set_battery_charge_rate(1.0) == {"kw": 1.0}
    assert [r[0] for r in server.requests] == ["PUT", "PUT"]
    assert client.writes == [("PUT", "/v1/battery/charge-rate", {"kw": 1.0})]


@pytest.mark.parametrize("status", [400, 401, 404, 422, 500])
def test_other_errors_are_not_retried_and_name_the_field(server, status):
    server.answer((status, json.dumps({"detail": "bad kw", "field": "kw"}).encode()))
    with EcovisorClient(server.url, "t", retries=3, retry_delay_s=0.0, sleep=Sleeps()) as client:
        with pytest.raises(EcovisorError) as err:
            client.set_powercap("c1", -1)
    assert err.value.status_code == status and err.value.field == "kw" and "bad kw" in str(err.value)
    assert len(server.requests) == 1 and client.writes == []


def test_timeout_is_unavailable(server):
    server.answer((200, b"{}", {}, 0.4))
    sleeps = Sleeps()
    t0 = time.monotonic()
    with EcovisorClient(server.url, "t", timeout_s=0.1, retries=1, retry_delay_s=0.0, sleep=sleeps) as client:
        with pytest.raises(EcovisorUnavailable, match=r"timeout after 0\.1 s .*after 2 attempt"):
            client.clock()
    assert time.monotonic() - t0 < 2.0 and len(sleeps) == 1


def test_refused_connection_is_unavailable():
    port = closed_port()
    with EcovisorClient(f"http://127.0.0.1:{port}", "t", retries=2, retry_delay_s=0.0, sleep=Sleeps()) as client:
        with pytest.raises(EcovisorUnavailable, match=rf"GET http://127\.0\.0\.1:{port}/v1/health: connection error"):
            client.health()


def test_malformed_json_is_a_clear_error(server):
    server.answer((200, b'{"status": "o'))
    with EcovisorClient(server.url, "t", retries=0) as client:
        with pytest.raises(EcovisorBadResponse, match=r"GET http://127\.0\.0\.1:\d+/v1/health: malformed JSON") as e:
            client.health()
    assert isinstance(e.value, EcovisorError) and isinstance(e.value, ValueError)


def test_empty_success_is_none(server):
    server.answer((204, b""))
    with EcovisorClient(server.url, "t", retries=0) as client:
        assert client.set_battery_max_discharge(3) is None


def test_a_given_session_is_used(server):
    server.answer(ok([{"name": "c1"}]))
    session = make_session(retries=0, backoff_s=0.0, timeout_s=2)
    with EcovisorClient(server.url, "tok", session=session) as client:
        assert client.containers() == [{"name": "c1"}]
    assert server.requests[0][2]["Authorization"] == "Bearer tok"


@pytest.mark.parametrize("body, why", [
    (b"[" * 5000 + b"]" * 5000, "JSON nested 5,000 deep, deeper than the limit of 64"),
    (b'{"kw": ' + b"9" * 400 + b"}", "integer of 400 digits is out of range"),
    (b'{"kw": 1e400}', "number out of range"),
])
def test_hostile_json_from_the_ecovisor_is_refused_naming_the_body(server, body, why):
    server.answer((200, body))
    with EcovisorClient(server.url, "t", retries=0) as client:
        with pytest.raises(EcovisorBadResponse, match="malformed JSON in the response") as e:
            client.battery()
    assert f"response body: {why}" in str(e.value)
