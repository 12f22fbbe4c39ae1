"""LXD containers through pylxd.

A CPU limit becomes the hard quota ``limits.cpu.allowance = "<N>ms/100ms"`` (N = floor(cores x 100), at least 1;
so limits have a granularity of 0.01 cores and are never rounded up). Usage comes from the instance state's
``cpu.usage`` (ns of CPU time), differenced between calls.
"""
from __future__ import annotations

import re
import threading
import time

from .base import BackendError, cores_since_last_reading

_ALLOWANCE = re.compile(r"^\s*(\d+(?:\.\d+)?)ms/(\d+(?:\.\d+)?)ms\s*$")
PERIOD_MS = 100


def allowance_for(cores: float) -> str:
    return f"{max(1, int(cores * PERIOD_MS + 1e-9))}ms/{PERIOD_MS}ms"


def cores_from_allowance(value: str | None) -> float | None:
    if not value:
        return None
    m = _ALLOWANCE.match(value)
    if not m:
        raise BackendError(f"unsupported limits.cpu.allowance {value!r} (expected 'Nms/Mms')")
    return float(m.group(1)) / float(m.group(2))


class LxdBackend:
    kind = "lxd"

    def __init__(self, endpoint: str | None = None, image: str | None = None, client=None):
        try:
            import pylxd
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise BackendError("the lxd backend needs pylxd (pip install pylxd)") from e
        self._pylxd = pylxd
        try:
            self.client = client or (pylxd.Client(endpoint=endpoint) if endpoint else pylxd.Client())
            self.client.host_info  # noqa: B018 - touch the API now so errors surface here
        except Exception as e:  # pylxd raises a zoo of exceptions
            raise BackendError(f"cannot reach LXD: {e}") from e
        self.image = image
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, int]] = {}

    def _get(self, name: str):
        try:
            return self.client.instances.get(name)
        except self._pylxd.exceptions.NotFound as e:
            raise BackendError(f"unknown container {name!r}") from e
        except Exception as e:
            raise BackendError(f"LXD error for {name!r}: {e}") from e

    def ensure(self, container: str, cores: float) -> None:
        if not self.client.instances.exists(container):
            if not self.image:
                raise BackendError(f"LXD instance {container!r} does not exist and no lxd_image is configured")
            try:
                inst = self.client.instances.create(
                    {"name": container, "source": {"type": "image", "alias": self.image}}, wait=True
                )
                inst.start(wait=True)
            except Exception as e:
                raise BackendError(f"cannot create LXD instance {container!r}: {e}") from e
        with self._lock:
            self._last[container] = (time.monotonic(), self._usage_ns(container))

    def list(self) -> list[str]:
        try:
            return sorted(i.name for i in self.client.instances.all())
        except Exception as e:
            raise BackendError(f"LXD error: {e}") from e

    def set_cpu_limit(self, container: str, cores: float | None) -> None:
        if cores is not None and not (cores == cores and cores >= 0):
            raise BackendError("limit must be >= 0")
        inst = self._get(container)
        if cores is None:
            inst.config.pop("limits.cpu.allowance", None)
        else:
            inst.config["limits.cpu.allowance"] = allowance_for(cores)
        try:
            inst.save(wait=True)
        except Exception as e:
            raise BackendError(f"cannot set CPU allowance of {container!r}: {e}") from e

    def get_cpu_limit(self, container: str) -> float | None:
        return cores_from_allowance(self._get(container).config.get("limits.cpu.allowance"))

    def _usage_ns(self, container: str) -> int:
        try:
            st = self._get(container).state()
            return int((st.cpu or {}).get("usage", 0))
        except BackendError:
            raise
        except Exception as e:
            raise BackendError(f"cannot read CPU usage of {container!r}: {e}") from e

    def cpu_usage_cores(self, container: str) -> float:
        return cores_since_last_reading(self._last, self._lock, container, self._usage_ns(container))


def lxd_usable() -> tuple[bool, str]:
    """Whether a local LXD answers and can run instances; (ok, reason)."""
    try:
        b = LxdBackend()
        info = b.client.host_info
        return True, f"LXD {info.get('environment', {}).get('server_version', '?')}"
    except BackendError as e:
        return False, str(e)
