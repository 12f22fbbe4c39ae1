"""A real Prometheus for the tests: Debian's ``prometheus`` package, backfilled with ``promtool``.

:func:`prometheus_server` writes OpenMetrics text to a folder, backfills it with ``promtool tsdb
create-blocks-from openmetrics``, starts ``prometheus`` on a free loopback port with a 10-year retention (so old
blocks are kept) and no scrape targets, yields its URL once it is ready, and stops it afterwards. Needs
``prometheus`` and ``promtool`` (``.ci/setup-prometheus``, run here when one is missing); skips the test with
the setup's reason when they cannot be installed. Used by tests/test_prometheus_telemetry.py and
tests/test_prometheus_nightly.py.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pandas as pd
import pytest
import requests

REPO = Path(__file__).resolve().parent.parent
SETUP = REPO / ".ci" / "setup-prometheus"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_prometheus() -> None:
    """Install Debian's prometheus when missing (``.ci/setup-prometheus``), or skip the test saying why."""
    if shutil.which("promtool") is None or shutil.which("prometheus") is None:
        r = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=600)
        if shutil.which("promtool") is None or shutil.which("prometheus") is None:
            why = (r.stderr.strip().splitlines() or r.stdout.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"prometheus is not available here ({why}); run .ci/setup-prometheus")


@contextmanager
def prometheus_server(root: Path, openmetrics: str) -> Iterator[str]:
    """A Prometheus serving ``openmetrics`` (OpenMetrics text ending in ``# EOF``), backfilled into ``root``;
    yields its base URL (``http://127.0.0.1:<port>``)."""
    require_prometheus()
    data, om = root / "data", root / "telemetry.om"
    om.write_text(openmetrics)
    backfill = subprocess.run(["promtool", "tsdb", "create-blocks-from", "openmetrics", str(om), str(data)],
                              capture_output=True, text=True, timeout=300)
    assert backfill.returncode == 0, backfill.stderr or backfill.stdout
    config = root / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 1m\nscrape_configs: []\n")
    port = free_port()
    log = (root / "prometheus.log").open("w")
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={data}",
         f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=10y"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (root / "prometheus.log").read_text()[-2000:]
                raise AssertionError(f"prometheus did not become ready: {tail}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


#: The columns of the telemetry drops as the gauges a monitoring stack would export (the fleet files' mapping
#: tables in the tests name these).
USAGE_METRICS = {"inflexible_cpu_cores": "cicm_inflexible_cpu_cores", "flexible_cpu_cores": "cicm_flexible_cpu_cores",
                 "reserved_cpu_cores": "cicm_reserved_cpu_cores",
                 "flexible_arrived_core_hours": "cicm_flexible_arrived_core_hours"}
POWER_METRICS = {"cpu_cores": "cicm_domain_cpu_cores", "power_kw": "cicm_domain_power_kw"}


def openmetrics(usage: pd.DataFrame, power: pd.DataFrame) -> str:
    """Hourly gauges stamped at the hour's start; repr() round-trips every float exactly."""
    lines: list[str] = []
    for frame, metrics, labels in ((usage, USAGE_METRICS, ("cluster",)), (power, POWER_METRICS, ("cluster", "domain"))):
        seconds = ((frame["hour"] - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy()
        for column, metric in metrics.items():
            lines.append(f"# TYPE {metric} gauge")
            for key, rows in frame.assign(_t=seconds).groupby(list(labels), sort=True):
                key = key if isinstance(key, tuple) else (key,)
                label = ",".join(f'{name}="{value}"' for name, value in zip(labels, key))
                lines.extend(f"{metric}{{{label}}} {v!r} {t}" for t, v in zip(rows["_t"], rows[column].tolist()))
    lines.append("# EOF")
    return "\n".join(lines) + "\n"
