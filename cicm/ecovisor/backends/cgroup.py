"""Local processes in CPU cgroups, v1 or v2, as containers.

v1: ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` in the ``cpu`` hierarchy, usage from ``cpuacct.usage`` (ns) in
the ``cpuacct`` hierarchy (the two may be mounted together or apart). v2: ``cpu.max`` ("quota period" or
"max period") and ``usage_usec`` of ``cpu.stat``; the ``cpu`` controller is enabled in ``cgroup.subtree_control``
of the mount root and of our root group. v1 is preferred when its cpu controller is mounted (on hybrid hosts the
cpu controller can only be in one of the two).

Every container is the group ``<mount>/<root>/<name>``; a process joins it with :meth:`CgroupBackend.spawn`
(the child writes itself into the group before it execs) or :meth:`CgroupBackend.add_pid`.
"""
from __future__ import annotations

import builtins
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .base import BackendError, cores_since_last_reading

PERIOD_US = 100_000
MIN_QUOTA_US = 1_000


@dataclass(frozen=True)
class CgroupLayout:
    version: int
    cpu_mount: Path  # v1: cpu hierarchy; v2: unified
    acct_mount: Path  # v1: cpuacct hierarchy; v2: unified


def _mounts(mountinfo: str = "/proc/self/mountinfo") -> list[tuple[str, str, set[str]]]:
    """(mount point, fstype, super options) of every cgroup mount."""
    out: list[tuple[str, str, set[str]]] = []
    try:
        text = Path(mountinfo).read_text()
    except OSError:
        return out
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        parts, rparts = left.split(), right.split()
        if len(parts) < 5 or len(rparts) < 3:
            continue
        fstype = rparts[0]
        if fstype in ("cgroup", "cgroup2"):
            mp = parts[4].replace("\\040", " ")
            out.append((mp, fstype, set(rparts[2].split(","))))
    return out


def detect_layout(mountinfo: str = "/proc/self/mountinfo") -> CgroupLayout:
    ms = _mounts(mountinfo)
    cpu = next((Path(mp) for mp, fs, opts in ms if fs == "cgroup" and "cpu" in opts), None)
    acct = next((Path(mp) for mp, fs, opts in ms if fs == "cgroup" and "cpuacct" in opts), None)
    if cpu is not None and acct is not None:
        return CgroupLayout(1, cpu, acct)
    for mp, fs, _ in ms:
        if fs == "cgroup2":
            ctrl = Path(mp) / "cgroup.controllers"
            try:
                if "cpu" in ctrl.read_text().split():
                    return CgroupLayout(2, Path(mp), Path(mp))
            except OSError:
                continue
    raise BackendError("no cgroup v1 cpu+cpuacct hierarchy and no cgroup v2 mount with the cpu controller")


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as e:
        raise BackendError(f"cannot write {value!r} to {path}: {e}") from e


class CgroupBackend:
    kind = "cgroup"

    def __init__(self, root: str = "cicm-ecovisor", layout: CgroupLayout | None = None):
        if "/" in root or root in ("", ".", ".."):
            raise BackendError(f"bad cgroup root {root!r}")
        self.layout = layout or detect_layout()
        self.root = root
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, int]] = {}  # container -> (monotonic s, usage ns)
        self._cores: dict[str, float] = {}
        self._mk(self._cpu_dir(None))
        if self.layout.version == 1:
            self._mk(self._acct_dir(None))
        else:
            self._enable_cpu(self.layout.cpu_mount)
            self._enable_cpu(self._cpu_dir(None))

    # ---- paths
    def _cpu_dir(self, name: str | None) -> Path:
        base = self.layout.cpu_mount / self.root
        return base if name is None else base / name

    def _acct_dir(self, name: str | None) -> Path:
        base = self.layout.acct_mount / self.root
        return base if name is None else base / name

    @staticmethod
    def _mk(p: Path) -> None:
        try:
            p.mkdir(exist_ok=True)
        except OSError as e:
            raise BackendError(f"cannot create cgroup {p}: {e}") from e

    @staticmethod
    def _enable_cpu(p: Path) -> None:
        sc = p / "cgroup.subtree_control"
        try:
            if "cpu" not in sc.read_text().split():
                sc.write_text("+cpu")
        except OSError as e:
            raise BackendError(f"cannot enable the cpu controller in {sc}: {e}") from e

    def _check(self, name: str) -> None:
        if not self._cpu_dir(name).is_dir():
            raise BackendError(f"unknown container {name!r} (no cgroup {self._cpu_dir(name)})")

    # ---- protocol
    def ensure(self, container: str, cores: float) -> None:
        if not container or "/" in container or container.startswith("."):
            raise BackendError(f"bad container name {container!r}")
        self._mk(self._cpu_dir(container))
        if self.layout.version == 1:
            self._mk(self._acct_dir(container))
            _write(self._cpu_dir(container) / "cpu.cfs_period_us", str(PERIOD_US))
        with self._lock:
            self._cores[container] = float(cores)
            self._last[container] = (time.monotonic(), self._usage_ns(container))

    def list(self) -> list[str]:
        try:
            return sorted(p.name for p in self._cpu_dir(None).iterdir() if p.is_dir())
        except OSError:
            return []

    def set_cpu_limit(self, container: str, cores: float | None) -> None:
        self._check(container)
        if cores is not None and not (cores == cores and cores >= 0):
            raise BackendError("limit must be >= 0")
        if self.layout.version == 1:
            d = self._cpu_dir(container)
            if cores is None:
                _write(d / "cpu.cfs_quota_us", "-1")
            else:
                _write(d / "cpu.cfs_period_us", str(PERIOD_US))
                _write(d / "cpu.cfs_quota_us", str(max(MIN_QUOTA_US, int(cores * PERIOD_US))))
        else:
            v = "max" if cores is None else str(max(MIN_QUOTA_US, int(cores * PERIOD_US)))
            _write(self._cpu_dir(container) / "cpu.max", f"{v} {PERIOD_US}")

    def get_cpu_limit(self, container: str) -> float | None:
        self._check(container)
        if self.layout.version == 1:
            d = self._cpu_dir(container)
            q = int((d / "cpu.cfs_quota_us").read_text())
            p = int((d / "cpu.cfs_period_us").read_text())
        else:
            q_s, p_s = (self._cpu_dir(container) / "cpu.max").read_text().split()
            if q_s == "max":
                return None
            q, p = int(q_s), int(p_s)
        return None if q < 0 else q / p

    def _usage_ns(self, container: str) -> int:
        try:
            if self.layout.version == 1:
                return int((self._acct_dir(container) / "cpuacct.usage").read_text())
            for line in (self._cpu_dir(container) / "cpu.stat").read_text().splitlines():
                k, _, v = line.partition(" ")
                if k == "usage_usec":
                    return int(v) * 1000
        except (OSError, ValueError) as e:
            raise BackendError(f"cannot read CPU usage of {container!r}: {e}") from e
        raise BackendError(f"no usage_usec in cpu.stat of {container!r}")

    def cpu_usage_cores(self, container: str) -> float:
        self._check(container)
        return cores_since_last_reading(self._last, self._lock, container, self._usage_ns(container))

    # ---- processes
    def _procs_files(self, container: str) -> builtins.list[Path]:  # `list` here is the method
        files = [self._cpu_dir(container) / "cgroup.procs"]
        if self.layout.version == 1 and self.layout.acct_mount != self.layout.cpu_mount:
            files.append(self._acct_dir(container) / "cgroup.procs")
        return files

    def add_pid(self, container: str, pid: int) -> None:
        self._check(container)
        for f in self._procs_files(container):
            _write(f, str(pid))

    def spawn(self, container: str, argv: builtins.list[str], **popen_kw) -> subprocess.Popen:
        """Start a process already inside the container's cgroup (it joins before exec)."""
        self._check(container)
        files = [str(f) for f in self._procs_files(container)]

        def join():  # runs in the child between fork and exec
            for f in files:
                with open(f, "w") as fh:
                    fh.write("0")  # "0" = the writing process itself

        return subprocess.Popen(argv, preexec_fn=join, **popen_kw)

    def pids(self, container: str) -> builtins.list[int]:
        self._check(container)
        text = (self._cpu_dir(container) / "cgroup.procs").read_text()
        return [int(x) for x in text.split()]

    def remove(self, container: str, kill: bool = True) -> None:
        """Delete the container's cgroup (killing its processes first if ``kill``)."""
        if not self._cpu_dir(container).is_dir():
            return
        if kill:
            for pid in self.pids(container):
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
        dirs = [self._cpu_dir(container)]
        if self.layout.version == 1:
            dirs.append(self._acct_dir(container))
        deadline = time.monotonic() + 5
        for d in dirs:
            while d.exists():
                try:
                    d.rmdir()
                except OSError:
                    if time.monotonic() > deadline:
                        raise BackendError(f"cannot remove cgroup {d}") from None
                    time.sleep(0.05)
        with self._lock:
            self._last.pop(container, None)
            self._cores.pop(container, None)


def cgroups_usable(root: str = "cicm-ecovisor-probe") -> tuple[bool, str]:
    """Whether this process can create a CPU cgroup and set a quota on it; (ok, reason).

    Works on the raw files, independently of :class:`CgroupBackend`, so a bug in the backend makes its tests
    fail rather than skip.
    """
    try:
        lay = detect_layout()
    except BackendError as e:
        return False, str(e)
    made: list[Path] = []
    try:
        for base in dict.fromkeys([lay.cpu_mount, lay.acct_mount]):
            d = base / root
            d.mkdir(exist_ok=True)
            made.append(d)
        d = lay.cpu_mount / root
        if lay.version == 1:
            (d / "cpu.cfs_quota_us").write_text("50000")
            ok = (d / "cpu.cfs_quota_us").read_text().strip() == "50000"
            ok = ok and (lay.acct_mount / root / "cpuacct.usage").exists()
        else:
            sc = lay.cpu_mount / "cgroup.subtree_control"
            if "cpu" not in sc.read_text().split():
                sc.write_text("+cpu")
            (d / "cpu.max").write_text("50000 100000")
            ok = (d / "cpu.max").read_text().split()[0] == "50000"
        return (ok, f"cgroup v{lay.version}" if ok else "the CPU quota did not stick")
    except OSError as e:
        return False, f"cgroup v{lay.version} not writable: {e}"
    finally:
        for d in reversed(made):
            try:
                d.rmdir()
            except OSError:
                pass
