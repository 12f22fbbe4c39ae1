"""Issue 20, item 3: every HTTP fetch ends within its overall deadline, against a real loopback server that
trickles, stalls, or asks for an hour's wait.

Before the fix a server sending one byte every 0.5 s never timed out (each read got its byte within the 10 s
timeout), and ``Retry-After: 3600`` was obeyed at the 60 s cap on every retry (3 x 60 s).
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest
import requests

from cicm.carbon.http import RetryPolicy, get_json
from cicm.errors import ProviderError
from cicm.httpclient import DeadlineExceeded, ResponseTooLarge, make_session
from cicm.telemetry_sources import read_prometheus_telemetry

TRICKLE_S = 0.5  # one byte every half second


class Slow:
    """Paths: /trickle-body (200, Content-Length 400, one byte every 0.5 s), /trickle-headers (the status line, then
    one header byte every 0.5 s), /silent (never answers), /retry-after (429, Retry-After: 3600), /big (200 with a
    5,000-byte JSON body), /ok (200 {"ok": true}). Counts hits per path."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.bytes_sent: dict[str, int] = {}
        slow = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                kind = self.path.split("?")[0].strip("/").split("/")[0]
                slow.hits[kind] = slow.hits.get(kind, 0) + 1
                try:
                    getattr(self, "_" + kind.replace("-", "_"))()
                except (BrokenPipeError, ConnectionResetError, OSError):
                    pass

            def _ok(self) -> None:
                self._json(200, b'{"ok": true}')

            def _big(self) -> None:
                self._json(200, json.dumps({"x": "a" * 5000}).encode())

            def _json(self, status: int, body: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _retry_after(self) -> None:
                self._json(429, b'{"error": "slow down"}', {"Retry-After": "3600"})

            def _silent(self) -> None:
                time.sleep(30)

            def _trickle_body(self) -> None:
                body = (b'{"data": "' + b"x" * 386 + b'"}').ljust(400)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.flush()
                for i in range(len(body)):
                    self.wfile.write(body[i:i + 1])
                    self.wfile.flush()
                    slow.bytes_sent["trickle-body"] = i + 1
                    time.sleep(TRICKLE_S)

            def _trickle_headers(self) -> None:
                head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Padding: " + b"p" * 200 + b"\r\n"
                for i in range(len(head)):
                    self.wfile.write(head[i:i + 1])
                    self.wfile.flush()
                    time.sleep(TRICKLE_S)

        class Quiet(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:
                pass

        self.httpd = Quiet(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def slow():
    server = Slow()
    yield server
    server.close()


def timed(fn):
    t0 = time.monotonic()
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - returned for the test to check
        return exc, time.monotonic() - t0
    return None, time.monotonic() - t0


def test_a_trickled_body_is_cut_at_the_deadline(slow):
    with make_session(timeout_s=10, deadline_s=2) as session:
        exc, took = timed(lambda: session.get(f"{slow.url}/trickle-body"))
    assert isinstance(exc, DeadlineExceeded), exc
    assert "deadline of 2 s passed reading the body" in str(exc)
    assert 1.9 <= took < 3.0
    assert 2 <= slow.bytes_sent["trickle-body"] <= 7  # it was trickling: ~4 bytes in 2 s


def test_carbon_fetch_of_a_trickled_body_is_a_provider_error_within_3_s(slow):
    policy = RetryPolicy(timeout_s=10, deadline_s=2)
    with policy.session() as session:
        exc, took = timed(lambda: get_json(session, f"{slow.url}/trickle-body", provider="electricitymaps"))
    assert isinstance(exc, ProviderError), exc
    assert str(exc).startswith("electricitymaps: deadline of 2 s passed reading the body from http://127.0.0.1:")
    assert took < 3.0


def test_trickled_headers_are_cut_at_the_deadline(slow):
    policy = RetryPolicy(timeout_s=10, deadline_s=2)
    with policy.session() as session:
        exc, took = timed(lambda: get_json(session, f"{slow.url}/trickle-headers", provider="watttime"))
    assert isinstance(exc, ProviderError), exc
    assert "deadline of 2 s passed" in str(exc)
    assert took < 3.0


def test_a_silent_server_fails_at_the_deadline_not_after_the_retries(slow):
    # 4 attempts of a 10 s read timeout would be 40 s; the deadline ends it at 1.5 s
    policy = RetryPolicy(timeout_s=10, deadline_s=1.5, max_attempts=4)
    with policy.session() as session:
        exc, took = timed(lambda: get_json(session, f"{slow.url}/silent", provider="electricitymaps"))
    assert isinstance(exc, ProviderError) and "deadline of 1.5 s passed" in str(exc), exc
    assert took < 2.5
    assert slow.hits["silent"] == 1


def test_retry_after_3600_is_not_waited_for(slow):
    waits: list[float] = []
    policy = RetryPolicy(max_attempts=4, sleep=waits.append)  # defaults: cap 60 s, deadline 60 s
    with policy.session() as session:
        exc, took = timed(lambda: get_json(session, f"{slow.url}/retry-after", provider="electricitymaps"))
    assert isinstance(exc, ProviderError) and exc.status_code == 429, exc
    assert "asked to retry after 3600 s (Retry-After, capped at 60 s)" in str(exc)
    assert waits == [] and took < 1.0 and slow.hits["retry-after"] == 1


def test_retry_after_is_capped_and_never_waited_past_the_deadline(slow):
    # cap 1 s, deadline 2.5 s: waits 1 s twice, then the third wait would end past the deadline -> gives up at ~2 s
    policy = RetryPolicy(max_attempts=10, retry_after_cap_s=1.0, deadline_s=2.5)
    with policy.session() as session:
        exc, took = timed(lambda: get_json(session, f"{slow.url}/retry-after", provider="electricitymaps"))
    assert isinstance(exc, ProviderError) and exc.status_code == 429, exc
    assert "deadline of 2.5 s passed before the next attempt" in str(exc)
    assert 1.9 <= took < 2.5
    assert slow.hits["retry-after"] == 3


def test_a_session_bounds_the_body_it_reads(slow):
    with make_session(max_body_bytes=1000) as session:
        with pytest.raises(ResponseTooLarge, match=r"larger than the 1,000-byte limit"):
            session.get(f"{slow.url}/big")
        assert session.get(f"{slow.url}/ok").json() == {"ok": True}


def test_a_finished_call_leaves_its_pooled_connection_alone(slow):
    # the first call's watchdog must not shut the keep-alive connection the second call reuses
    with make_session(deadline_s=0.5) as session:
        assert session.get(f"{slow.url}/ok").json() == {"ok": True}
        time.sleep(0.8)
        assert session.get(f"{slow.url}/ok").json() == {"ok": True}
    assert slow.hits["ok"] == 2


def test_requests_errors_still_catch_a_passed_deadline(slow):
    with make_session(timeout_s=10, deadline_s=1) as session:
        with pytest.raises(requests.Timeout):
            session.get(f"{slow.url}/silent")


def test_prometheus_read_of_a_trickling_server_is_a_provider_error_within_3_s(slow):
    start = pd.Timestamp("2026-12-01", tz="UTC")
    with make_session(timeout_s=10, deadline_s=2) as session:
        exc, took = timed(lambda: read_prometheus_telemetry(
            f"{slow.url}/trickle-body", None, {"c1": ["c1-r1"]}, start, start + pd.Timedelta(hours=24),
            session=session))
    assert isinstance(exc, ProviderError), exc
    assert str(exc).startswith("prometheus: GET http://127.0.0.1:")
    assert "(inflexible_cpu_cores): deadline of 2 s passed reading the body" in str(exc)
    assert took < 3.0


def test_prometheus_default_session_has_a_deadline():
    with make_session() as session:
        assert session.deadline_s == 60.0 and session.max_body_bytes == 20 * 1024 * 1024
