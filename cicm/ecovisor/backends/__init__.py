"""Container backends: simulated, local CPU cgroups (v1 and v2), and LXD through pylxd."""
from __future__ import annotations

from .base import BackendError, ContainerBackend
from .simulated import SimulatedBackend


def make_backend(site) -> ContainerBackend:
    """The backend named in the site file, with every site container ensured to exist."""
    kind = site.backend.kind
    b: ContainerBackend
    if kind == "simulated":
        b = SimulatedBackend({c.name: c.sim_demand_cores for c in site.containers})
    elif kind == "cgroup":
        from .cgroup import CgroupBackend

        b = CgroupBackend(root=site.backend.cgroup_root)
    elif kind == "lxd":
        from .lxd import LxdBackend

        b = LxdBackend(endpoint=site.backend.lxd_endpoint, image=site.backend.lxd_image)
    else:  # pragma: no cover - the site model forbids it
        raise BackendError(f"unknown backend {kind!r}")
    for c in site.containers:
        b.ensure(c.name, c.cores)
    return b


__all__ = ["BackendError", "ContainerBackend", "SimulatedBackend", "make_backend"]
