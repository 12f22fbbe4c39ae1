"""`cicm ecovisor app create`: mint an app's token with the admin token, against a real ecovisor on loopback,
as a user runs it (the console script in a subprocess)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parent.parent
CICM = Path(sys.executable).with_name("cicm")
ADMIN = "admin-secret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ecovisor(tmp_path):
    port = _free_port()
    env = {**os.environ, "CICM_ECOVISOR_ADMIN_TOKEN": ADMIN}
    proc = subprocess.Popen([str(CICM), "ecovisor", "serve", "--site", str(REPO / "cicm/ecovisor/examples/site.toml"),
                             "--port", str(port), "--clock", "simulated", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            requests.get(url + "/v1/health", timeout=1)
            break
        except requests.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(proc.stdout.read().decode()) from None
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def create(args: list[str], admin: str | None = ADMIN) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CICM_ECOVISOR_ADMIN_TOKEN"}
    if admin:
        env["CICM_ECOVISOR_ADMIN_TOKEN"] = admin
    return subprocess.run([str(CICM), "ecovisor", "app", "create", *args], capture_output=True, text=True,
                          timeout=60, env=env)


def test_app_create_prints_a_token_the_ecovisor_accepts(ecovisor):
    out = create(["sj-a", "--ecovisor", ecovisor, "--grid-kw", "5", "--container", "batch-1"])
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert line.startswith("export CICM_ECOVISOR_TOKEN=")
    token = line.split("=", 1)[1]
    me = requests.get(ecovisor + "/v1/apps/me", headers={"Authorization": f"Bearer {token}"}, timeout=5)
    assert me.status_code == 200 and me.json()["name"] == "sj-a"
    assert "grid 5 kW" in out.stderr

    again = create(["sj-a", "--ecovisor", ecovisor, "--grid-kw", "1"])
    assert again.returncode == 1 and again.stderr.startswith("error: app: the ecovisor refused the app (409)")
    bad = create(["sj-b", "--ecovisor", ecovisor, "--grid-fraction", "3"])
    assert bad.returncode == 1 and bad.stderr.startswith("error: grid_fraction:"), bad.stderr
    wrong = create(["sj-c", "--ecovisor", ecovisor, "--grid-kw", "1"], admin="not-the-admin")
    assert wrong.returncode == 1 and ("(401)" in wrong.stderr or "(403)" in wrong.stderr), wrong.stderr


def test_app_create_without_admin_token_or_ecovisor(tmp_path):
    missing = create(["sj-a"], admin=None)
    assert missing.returncode == 1 and missing.stderr.startswith("error: CICM_ECOVISOR_ADMIN_TOKEN:")
    down = create(["sj-a", "--ecovisor", f"http://127.0.0.1:{_free_port()}"])
    assert down.returncode == 2 and "connection error" in down.stderr, down.stderr


def rotate(args: list[str], admin: str | None = ADMIN) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CICM_ECOVISOR_ADMIN_TOKEN"}
    if admin:
        env["CICM_ECOVISOR_ADMIN_TOKEN"] = admin
    return subprocess.run([str(CICM), "ecovisor", "app", "rotate", *args], capture_output=True, text=True,
                          timeout=60, env=env)


def test_app_rotate_prints_a_new_token_and_the_old_one_stops_working(ecovisor):
    made = create(["sj-a", "--ecovisor", ecovisor, "--grid-kw", "5", "--token-ttl-days", "30"])
    assert made.returncode == 0, made.stderr
    assert "expires at" in made.stderr
    old = made.stdout.strip().split("=", 1)[1]
    out = rotate(["sj-a", "--ecovisor", ecovisor, "--token-ttl-days", "7"])
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert line.startswith("export CICM_ECOVISOR_TOKEN=")
    new = line.split("=", 1)[1]
    assert new != old and "old token no longer works" in out.stderr

    def me(token: str) -> requests.Response:
        return requests.get(ecovisor + "/v1/apps/me", headers={"Authorization": f"Bearer {token}"}, timeout=5)

    assert me(new).status_code == 200 and me(new).json()["name"] == "sj-a"
    assert me(old).status_code == 401
    missing = rotate(["nope", "--ecovisor", ecovisor])
    assert missing.returncode == 1 and missing.stderr.startswith("error: name: the ecovisor refused the rotation (404)")
    wrong = rotate(["sj-a", "--ecovisor", ecovisor], admin=new)  # an app's token is not the admin's
    assert wrong.returncode == 1 and "(403)" in wrong.stderr, wrong.stderr


@pytest.mark.parametrize("body, words", [
    (b"[" * 200_000, "deeper than"),
    (b"1" + b"0" * 400, "digits"),
    (b"[1, 2]", "expected a JSON object"),
])
def test_app_create_refuses_a_hostile_answer_with_a_clear_error(body, words):
    """An answer that is not an app (too deep, a huge number, not an object) exits 2 with one error line."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(201)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        done = create(["sj-a", "--grid-kw", "1", "--container", "c", "--ecovisor",
                       f"http://127.0.0.1:{server.server_address[1]}"])
    finally:
        server.shutdown()
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and words in done.stderr
