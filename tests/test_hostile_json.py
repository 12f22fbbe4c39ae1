"""Issue 20 item 5: hostile JSON is refused with an error naming the field, never a traceback.

The exact payloads of the campaign (a 400-digit integer, 200,000 nested brackets), plus an oversized body, an
overflowing float and empty lists, served from a loopback HTTP server to both provider clients, and written to a
plan file for ``cicm agent run --plan-file`` (:class:`cicm.enforce.plans.FilePlanSource`)."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cicm.carbon import electricitymaps, watttime
from cicm.carbon.http import RetryPolicy, get_json
from cicm.enforce.plans import FilePlanSource, PlanUnavailable
from cicm.errors import InputError, ProviderError
from cicm.jsonsafe import MAX_BYTES, MAX_DEPTH, JSONRejected, json_depth, loads_bounded

FAST = RetryPolicy(max_attempts=1, timeout_s=10.0, backoff_base_s=0.001, sleep=lambda s: None)
DEEP = b"[" * 200_000 + b"]" * 200_000
HUGE_INT = "9" * 400
STAMP = "2026-11-23T00:00:00Z"


def em_forecast(value: str = "302", stamp: str = f'"{STAMP}"', updated: str = f'"{STAMP}"') -> bytes:
    return (f'{{"zone": "DE", "updatedAt": {updated}, '
            f'"forecast": [{{"datetime": {stamp}, "carbonIntensity": {value}}}]}}').encode()


class Server:
    """Loopback HTTP server answering every GET with ``body`` (status 200, JSON content type)."""

    def __init__(self) -> None:
        self.body = b"{}"
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                body = (b'{"token": "t"}' if self.path.startswith("/login") else outer.body)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client stopped reading at its limit
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.stop()


# ------------------------------------------------------------------------------------------- the one helper

@pytest.mark.parametrize("text, words", [
    (DEEP, "nested 200,000 deep"),
    (HUGE_INT, "integer of 400 digits"),
    ("[-" + HUGE_INT + "]", "integer of 400 digits"),
    ("1e400", "overflows a float"),
    ("{\"a\": [1, 2", "malformed JSON"),
    (b"\xff\xfe\x00", "malformed JSON"),
    ("", "empty"),
    ("   ", "empty"),
])
def test_loads_bounded_refuses_hostile_text_naming_the_field(text, words):
    with pytest.raises(JSONRejected) as err:
        loads_bounded(text, "body")
    assert err.value.field == "body" and words in err.value.message
    assert isinstance(err.value, ValueError)


def test_loads_bounded_limits_and_ordinary_json():
    assert loads_bounded('{"a": "[[[[[[", "b": [1, 2.5, null, NaN]}', "x")["a"] == "[[[[[["
    assert json_depth(b'{"a": "]]]{{{\\"[[", "b": [[1]]}') == 3
    ok = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert loads_bounded(ok, "x") is not None
    with pytest.raises(JSONRejected, match="deeper than the limit of 64"):
        loads_bounded("[" + ok + "]", "x")
    with pytest.raises(JSONRejected, match="larger than the 10-byte limit"):
        loads_bounded("[1, 2, 3, 4, 5]", "x", max_bytes=10)
    assert loads_bounded("9" * 30, "x") == int("9" * 30)


# ------------------------------------------------------------------------------------------- provider payloads

@pytest.mark.parametrize("body, words", [
    (DEEP, "nested 200,000 deep"),
    (em_forecast(value=HUGE_INT), "integer of 400 digits"),
    (em_forecast(stamp=HUGE_INT), "integer of 400 digits"),
    (em_forecast(updated=HUGE_INT), "integer of 400 digits"),
    (em_forecast(value="1e400"), "overflows a float"),
    (b"[" * 100 + b"]" * 100, "nested 100 deep"),
    (b'{"zone": "DE", "forecast": [' + b"9" * 5000 + b"]}", "integer of 5000 digits"),
])
def test_electricitymaps_hostile_bodies_are_provider_errors(server, body, words):
    server.body = body
    with pytest.raises(ProviderError) as err:
        electricitymaps.fetch_raw_forecast("DE", base_url=server.url, token="t", policy=FAST)
    assert "response body" in str(err.value) and words in str(err.value) and server.url in str(err.value)


def test_an_oversized_body_is_refused_while_read(server):
    server.body = b'{"zone": "DE", "forecast": [' + b'"x",' * (MAX_BYTES // 4) + b"1]}"
    with pytest.raises(ProviderError, match="response body: larger than the 20,971,520-byte limit"):
        electricitymaps.fetch_raw_forecast("DE", base_url=server.url, token="t", policy=FAST)


def test_get_json_refuses_the_same_through_its_own_session(server):
    server.body = DEEP
    with FAST.session() as session, pytest.raises(ProviderError, match="nested 200,000 deep"):
        get_json(session, server.url + "/x", provider="p")


@pytest.mark.parametrize("kind, key", [("forecast", "forecast"), ("history", "history")])
def test_an_empty_electricitymaps_list_says_empty(server, kind, key):
    server.body = json.dumps({"zone": "DE", "updatedAt": STAMP, key: []}).encode()
    fetch = electricitymaps.fetch_raw_forecast if kind == "forecast" else electricitymaps.fetch_raw_history
    with pytest.raises(InputError) as err:
        fetch("DE", base_url=server.url, token="t", policy=FAST)
    assert err.value.field == key and "empty" in err.value.message and "naive" not in err.value.message


def wt_forecast(value: str = "870.2", stamp: str = f'"{STAMP}"', data: str | None = None) -> bytes:
    points = data if data is not None else f'[{{"point_time": {stamp}, "value": {value}}}]'
    return (f'{{"data": {points}, "meta": {{"region": "R", "signal_type": "co2_moer", '
            f'"units": "lbs_co2_per_mwh", "generated_at": "{STAMP}"}}}}').encode()


@pytest.mark.parametrize("body, words", [
    (DEEP, "nested 200,000 deep"),
    (wt_forecast(value=HUGE_INT), "integer of 400 digits"),
    (wt_forecast(stamp=HUGE_INT), "integer of 400 digits"),
    (wt_forecast(value="-1e400"), "overflows a float"),
])
def test_watttime_hostile_bodies_are_provider_errors(server, body, words):
    server.body = body
    with pytest.raises(ProviderError) as err:
        watttime.fetch_raw_forecast("R", base_url=server.url, username="u", password="p", policy=FAST)
    assert "response body" in str(err.value) and words in str(err.value)


def test_an_empty_watttime_list_says_empty(server):
    server.body = wt_forecast(data="[]")
    with pytest.raises(InputError) as err:
        watttime.fetch_raw_forecast("R", base_url=server.url, username="u", password="p", policy=FAST)
    assert err.value.field == "data" and "empty" in err.value.message


def test_the_parsers_name_a_huge_number_that_reached_them():
    """Belt and braces below the JSON layer: a Python int too large for a float is an InputError, not an
    OverflowError, and the message is cut short."""
    from cicm.carbon._parse import parse_float_values, parse_utc_timestamp

    with pytest.raises(InputError) as err:
        parse_float_values([1.0, 10 ** 400], "gco2_per_kwh")
    assert err.value.field == "gco2_per_kwh" and "too large" in err.value.message and len(err.value.message) < 200
    with pytest.raises(InputError) as err:
        parse_utc_timestamp(10 ** 400, "issued_at")
    assert err.value.field == "issued_at" and len(err.value.message) < 200


# ------------------------------------------------------------------------------------------- --plan-file

@pytest.mark.parametrize("content, words", [
    (DEEP, "nested 200,000 deep"),
    (b'{"cluster": "sj-a", "hours": [' + HUGE_INT.encode() + b"]}", "integer of 400 digits"),
    (b'{"cluster": "sj-a", "x": 1e400}', "overflows a float"),
    (b'{"cluster": ', "malformed JSON"),
    (b"", "empty"),
])
def test_a_hostile_plan_file_is_unavailable_naming_the_field(tmp_path, content, words):
    path = tmp_path / "plan.json"
    path.write_bytes(content)
    with pytest.raises(PlanUnavailable) as err:
        FilePlanSource(path, "sj-a").read()
    assert f"plan file {path}: plan file: " in str(err.value) and words in str(err.value)


def test_an_oversized_plan_file_is_refused(tmp_path):
    path = tmp_path / "plan.json"
    with path.open("wb") as fh:
        fh.write(b"[" + b"0," * (MAX_BYTES // 2) + b"0]")
    with pytest.raises(PlanUnavailable, match="larger than the 20,971,520-byte limit"):
        FilePlanSource(path, "sj-a").read()
