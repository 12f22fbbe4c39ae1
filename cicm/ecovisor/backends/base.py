"""The container backend protocol: CPU limits in, CPU usage out. Power is modelled from CPU usage elsewhere."""
from __future__ import annotations

import time
from typing import Protocol, runtime_checkable


class BackendError(RuntimeError):
    """A backend operation failed (container missing, cgroup not writable, LXD error)."""


@runtime_checkable
class ContainerBackend(Protocol):
    kind: str

    def list(self) -> list[str]:
        """Names of the containers this backend manages."""

    def set_cpu_limit(self, container: str, cores: float | None) -> None:
        """Hard CPU limit in cores (a CFS quota); None removes the limit."""

    def get_cpu_limit(self, container: str) -> float | None:
        """The CPU limit in force, in cores (None = unlimited)."""

    def cpu_usage_cores(self, container: str) -> float:
        """Average CPU cores used since the previous call for this container (or since the backend started)."""

    def ensure(self, container: str, cores: float) -> None:
        """Make sure the container exists (create it if the backend can); ``cores`` is its size."""


def cores_since_last_reading(last: dict, lock, container: str, usage_ns: int) -> float:
    """Mean cores a container used since its previous reading (0 on the first); `last` keeps the readings."""
    now = time.monotonic()
    with lock:
        t0, u0 = last.get(container, (now, usage_ns))
        last[container] = (now, usage_ns)
    dt = now - t0
    return 0.0 if dt <= 0 else max(0.0, (usage_ns - u0) / 1e9 / dt)
