"""The LXD backend through pylxd: a capped busy loop in a real container uses no more CPU than its
``limits.cpu.allowance``. Needs a running LXD with the ``cicm-busybox`` image (``.ci/setup-lxd``); skips,
saying why, only when LXD cannot be reached or cannot run containers here."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
import warnings
from pathlib import Path

import pytest

from cicm.ecovisor.backends.lxd import allowance_for, cores_from_allowance
from cicm.ecovisor.testing import bearer, test_site

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

IMAGE = os.environ.get("CICM_LXD_IMAGE", "cicm-busybox")
SETUP = Path(__file__).resolve().parent.parent / ".ci" / "setup-lxd"
ADMIN = bearer("admin-token")


def test_allowance_strings():
    assert allowance_for(0.25) == "25ms/100ms"
    assert allowance_for(0.259) == "25ms/100ms"  # never rounded up past the cap
    assert allowance_for(2) == "200ms/100ms"
    assert allowance_for(0.0) == "1ms/100ms"
    assert cores_from_allowance("25ms/100ms") == 0.25
    assert cores_from_allowance(None) is None


@pytest.fixture(scope="module")
def lxd():
    try:
        import pylxd
    except ImportError:
        pytest.skip("pylxd is not installed")
    def connect():  # checked with pylxd itself, so a bug in our backend fails rather than skips
        c = pylxd.Client()
        c.host_info  # noqa: B018
        if not c.images.exists(IMAGE, alias=True):
            raise RuntimeError(f"LXD runs but has no image {IMAGE!r}")
        return c

    try:
        client = connect()
    except Exception as first:
        # installed but not started (or not initialised): start it the way CI does, then try again
        if shutil.which("lxd") is None or os.geteuid() != 0 or not SETUP.exists() or "LXD_DIR" in os.environ:
            pytest.skip(f"LXD is not available here ({first}); run .ci/setup-lxd")
        r = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=300)
        try:
            client = connect()
        except Exception as e:
            why = (r.stdout.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"LXD cannot run here: {why} ({e})")
    if shutil.which("lxc") is None:
        pytest.skip("the lxc client is not installed")
    from cicm.ecovisor.backends.lxd import LxdBackend

    return LxdBackend(image=IMAGE)


@pytest.fixture(scope="module")
def container(lxd):
    name = f"cicm-test-{os.getpid()}"
    lxd.ensure(name, 1.0)  # creates and starts it from the image
    yield name
    try:
        inst = lxd.client.instances.get(name)
        inst.stop(force=True, wait=True)
        inst.delete(wait=True)
    except Exception:  # leave nothing behind if we can, but never mask the test's result
        subprocess.run(["lxc", "delete", "--force", name], capture_output=True)


def _busy(name: str, seconds: int) -> subprocess.Popen:
    return subprocess.Popen(["lxc", "exec", name, "--", "timeout", str(seconds), "sh", "-c", "while :; do :; done"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _host_quota(name: str) -> int | None:
    """The CFS quota LXD wrote on the host (cgroup v1 path), if this host exposes it."""
    for p in (f"/sys/fs/cgroup/cpu/lxc.payload.{name}/cpu.cfs_quota_us", f"/sys/fs/cgroup/lxc.payload.{name}/cpu.max"):
        try:
            return int(open(p).read().split()[0].replace("max", "-1"))
        except OSError:
            continue
    return None


def _measure(lxd, name: str, seconds: float) -> float:
    """CPU cores used over ``seconds``, once the busy loop is seen running (``lxc exec`` takes a moment)."""
    lxd.cpu_usage_cores(name)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.2)
        if lxd.cpu_usage_cores(name) > 0.1:
            break
    time.sleep(seconds)
    return lxd.cpu_usage_cores(name)


def test_lxd_capped_busy_loop_uses_no_more_than_its_cap(lxd, container):
    assert container in lxd.list()
    lxd.set_cpu_limit(container, 0.25)
    assert lxd.client.instances.get(container).config["limits.cpu.allowance"] == "25ms/100ms"
    assert lxd.get_cpu_limit(container) == pytest.approx(0.25)
    assert _host_quota(container) in (None, 25000)  # the kernel got the quota (where we can see it)
    p = _busy(container, 6)
    try:
        used = _measure(lxd, container, 2.0)
    finally:
        p.kill()
        p.wait(timeout=30)
    assert used <= 0.30, f"capped at 0.25 cores but used {used:.3f}"
    # the loop ran and was measured (the bound is loose: other work may share this machine's cores)
    assert used >= 0.05, f"the busy loop should use about 0.25 cores, measured {used:.3f}"
    lxd.set_cpu_limit(container, None)
    assert lxd.get_cpu_limit(container) is None
    assert "limits.cpu.allowance" not in lxd.client.instances.get(container).config
    assert _host_quota(container) in (None, -1)


def test_service_caps_an_lxd_container(lxd, container):
    from cicm.ecovisor.app import create_app
    from cicm.ecovisor.clock import SimulatedClock

    site = test_site(
        backend={"kind": "lxd", "lxd_image": IMAGE},
        containers=[{"name": container, "cores": 1, "power": {"kind": "linear", "idle_kw": 0.1, "max_kw": 0.5}}],
    )
    api = create_app(site, SimulatedClock(site.sim_start), lxd, None, admin_token="admin-token")
    with TestClient(api) as c:
        r = c.post("/v1/apps", headers=ADMIN, json={"name": "lx", "grid_kw": 1, "containers": [container]})
        tok = bearer(r.json()["token"])
        r = c.put(f"/v1/containers/{container}/powercap", headers=tok, json={"kw": 0.2})
        assert r.status_code == 200 and r.json()["cpu_limit_cores"] == pytest.approx(0.25)
        assert lxd.client.instances.get(container).config["limits.cpu.allowance"] == "25ms/100ms"
        p = _busy(container, 6)
        try:
            _measure(lxd, container, 0.0)  # wait until it runs
            c.post("/v1/tick", headers=ADMIN, json={"n": 1})
            time.sleep(2.0)
            t = c.post("/v1/tick", headers=ADMIN, json={"n": 1}).json()["ticks"][0]
        finally:
            p.kill()
            p.wait(timeout=30)
        cont = t["apps"]["lx"]["containers"][container]
        assert 0.05 <= cont["cpu_usage_cores"] <= 0.30
        assert cont["power_kw"] <= 0.1 + 0.4 * 0.30 + 1e-12
        assert t["apps"]["lx"]["load_kw"] == pytest.approx(cont["power_kw"])
