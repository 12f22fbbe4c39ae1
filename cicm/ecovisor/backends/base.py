"""The container backend protocol: CPU limits in, CPU usage out. Power is modelled from CPU usage elsewhere."""
from __future__ import annotations

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
