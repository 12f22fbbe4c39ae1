"""The cgroup backend: a real capped busy loop measured through cpuacct (v1) or cpu.stat (v2), the service
turning a power cap into a CFS quota, and the v1/v2 file handling on a fake tree."""
from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

import pytest

from cicm.ecovisor.backends.cgroup import CgroupBackend, CgroupLayout, cgroups_usable, detect_layout
from cicm.ecovisor.testing import bearer, test_site

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

BUSY = [sys.executable, "-c", "while True: pass"]
ADMIN = bearer("admin-token")


@pytest.fixture(scope="module")
def cgroups():
    ok, why = cgroups_usable(root=f"cicm-probe-{os.getpid()}")
    if not ok:
        pytest.skip(f"CPU cgroups are not writable here: {why}")
    return why


@pytest.fixture
def backend(cgroups):
    b = CgroupBackend(root=f"cicm-test-{os.getpid()}")
    yield b
    for name in b.list():
        b.remove(name)
    for d in {b._cpu_dir(None), b._acct_dir(None)}:
        try:
            d.rmdir()
        except OSError:
            pass


def _measure(b: CgroupBackend, name: str, seconds: float = 2.0) -> float:
    time.sleep(0.3)  # let the process start and the quota bite
    b.cpu_usage_cores(name)
    time.sleep(seconds)
    return b.cpu_usage_cores(name)


def _throttled(b: CgroupBackend, name: str) -> int:
    for line in (b._cpu_dir(name) / "cpu.stat").read_text().splitlines():
        k, _, v = line.partition(" ")
        if k == "nr_throttled":
            return int(v)
    raise AssertionError("no nr_throttled in cpu.stat")


def test_capped_busy_loop_uses_no_more_than_its_cap(backend):
    backend.ensure("capped", 1.0)
    backend.set_cpu_limit("capped", 0.25)
    assert backend.get_cpu_limit("capped") == pytest.approx(0.25)
    p = backend.spawn("capped", BUSY)
    try:
        assert p.pid in backend.pids("capped")
        throttled0 = _throttled(backend, "capped")
        used = _measure(backend, "capped")
        assert used <= 0.30, f"capped at 0.25 cores but used {used:.3f}"
        # the loop ran and was measured (the bound is loose: other work may share this machine's cores)
        assert used >= 0.05, f"the busy loop should use about 0.25 cores, measured {used:.3f}"
        # and the kernel throttled it: the quota, not something else, held it back
        assert _throttled(backend, "capped") > throttled0
        backend.set_cpu_limit("capped", None)
        assert backend.get_cpu_limit("capped") is None
    finally:
        p.kill()
        p.wait()


def test_service_turns_a_power_cap_into_a_quota(backend):
    from cicm.ecovisor.app import create_app
    from cicm.ecovisor.clock import SimulatedClock

    site = test_site(
        backend={"kind": "cgroup", "cgroup_root": backend.root},
        containers=[{"name": "cg-work", "cores": 1, "power": {"kind": "linear", "idle_kw": 0.1, "max_kw": 0.5}}],
    )
    backend.ensure("cg-work", 1.0)
    api = create_app(site, SimulatedClock(site.sim_start), backend, None, admin_token="admin-token")
    with TestClient(api) as c:
        r = c.post("/v1/apps", headers=ADMIN, json={"name": "cg", "grid_kw": 1, "containers": ["cg-work"]})
        tok = bearer(r.json()["token"])
        r = c.put("/v1/containers/cg-work/powercap", headers=tok, json={"kw": 0.2})
        assert r.status_code == 200 and r.json()["cpu_limit_cores"] == pytest.approx(0.25)
        if backend.layout.version == 1:
            quota = int((backend._cpu_dir("cg-work") / "cpu.cfs_quota_us").read_text())
            period = int((backend._cpu_dir("cg-work") / "cpu.cfs_period_us").read_text())
        else:
            q, per = (backend._cpu_dir("cg-work") / "cpu.max").read_text().split()
            quota, period = int(q), int(per)
        assert quota / period == pytest.approx(0.25)
        p = backend.spawn("cg-work", BUSY)
        try:
            time.sleep(0.3)
            c.post("/v1/tick", headers=ADMIN, json={"n": 1})  # starts a fresh measuring window
            time.sleep(2.0)
            t = c.post("/v1/tick", headers=ADMIN, json={"n": 1}).json()["ticks"][0]
        finally:
            p.kill()
            p.wait()
        cont = t["apps"]["cg"]["containers"]["cg-work"]
        assert 0.05 <= cont["cpu_usage_cores"] <= 0.30
        assert cont["power_kw"] <= 0.1 + 0.4 * 0.30 + 1e-12  # modelled power stays near the 0.2 kW cap
        assert c.get("/v1/containers/cg-work/power", headers=tok).json()["power_source"] == "modelled-from-cpu"


def _fake_tree(tmp_path: Path, version: int) -> CgroupLayout:
    if version == 1:
        cpu, acct = tmp_path / "cpu", tmp_path / "cpuacct"
        cpu.mkdir()
        acct.mkdir()
        return CgroupLayout(1, cpu, acct)
    root = tmp_path / "unified"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu memory\n")
    (root / "cgroup.subtree_control").write_text("")
    return CgroupLayout(2, root, root)


def test_v2_files(tmp_path, monkeypatch):
    lay = _fake_tree(tmp_path, 2)
    (lay.cpu_mount / "eco").mkdir()
    (lay.cpu_mount / "eco" / "cgroup.subtree_control").write_text("")  # the kernel makes it on mkdir
    b = CgroupBackend(root="eco", layout=lay)
    assert (lay.cpu_mount / "cgroup.subtree_control").read_text() == "+cpu"
    assert (lay.cpu_mount / "eco" / "cgroup.subtree_control").read_text() == "+cpu"
    d = lay.cpu_mount / "eco" / "w"
    d.mkdir(parents=True)
    (d / "cpu.stat").write_text("usage_usec 1000000\nuser_usec 900000\n")
    b.ensure("w", 2)
    b.set_cpu_limit("w", 0.5)
    assert (d / "cpu.max").read_text() == "50000 100000"
    assert b.get_cpu_limit("w") == 0.5
    b.set_cpu_limit("w", None)
    assert (d / "cpu.max").read_text() == "max 100000" and b.get_cpu_limit("w") is None
    t = [100.0]
    monkeypatch.setattr("cicm.ecovisor.backends.cgroup.time.monotonic", lambda: t[0])
    b.cpu_usage_cores("w")
    (d / "cpu.stat").write_text("usage_usec 3000000\n")
    t[0] += 4.0
    assert b.cpu_usage_cores("w") == pytest.approx(0.5)  # 2 s of CPU in 4 s
    b.set_cpu_limit("w", 0.001)
    assert (d / "cpu.max").read_text() == "1000 100000"  # the kernel's minimum quota


def test_v1_files(tmp_path, monkeypatch):
    lay = _fake_tree(tmp_path, 1)
    b = CgroupBackend(root="eco", layout=lay)
    (lay.acct_mount / "eco" / "w").mkdir(parents=True)
    (lay.acct_mount / "eco" / "w" / "cpuacct.usage").write_text("0\n")
    b.ensure("w", 2)
    b.set_cpu_limit("w", 1.5)
    assert (lay.cpu_mount / "eco" / "w" / "cpu.cfs_quota_us").read_text() == "150000"
    assert b.get_cpu_limit("w") == 1.5
    b.set_cpu_limit("w", None)
    assert b.get_cpu_limit("w") is None
    t = [0.0]
    monkeypatch.setattr("cicm.ecovisor.backends.cgroup.time.monotonic", lambda: t[0])
    b.cpu_usage_cores("w")
    (lay.acct_mount / "eco" / "w" / "cpuacct.usage").write_text(str(3 * 10**9))
    t[0] += 2.0
    assert b.cpu_usage_cores("w") == pytest.approx(1.5)
    assert b.list() == ["w"]


def test_layout_detection(tmp_path):
    v1 = tmp_path / "mi1"
    v1.write_text(
        "30 25 0:26 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
        "31 25 0:27 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct\n"
        "32 25 0:28 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
    )
    lay = detect_layout(str(v1))
    assert lay.version == 1 and lay.cpu_mount == Path("/sys/fs/cgroup/cpu")
    assert lay.acct_mount == Path("/sys/fs/cgroup/cpuacct")
    root = tmp_path / "cg2"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    v2 = tmp_path / "mi2"
    v2.write_text(f"40 1 0:30 / {root} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n")
    lay = detect_layout(str(v2))
    assert lay.version == 2 and lay.cpu_mount == root
    (root / "cgroup.controllers").write_text("memory\n")
    from cicm.ecovisor.backends import BackendError

    with pytest.raises(BackendError):
        detect_layout(str(v2))
