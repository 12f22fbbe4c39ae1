"""Where the nightly plan runs: in this process (no Prefect), or as the Prefect flow (``flows/nightly.py``).

``cicm plan`` runs the plan's stages right here unless something needs Prefect: a Prefect server named in
``PREFECT_API_URL`` (the run is then recorded there too, with its task runs and artifact), or Dask workers
(``--runner dask``, a ``--dask-address``, or a very large fleet on a big machine). Either way the plan is recorded
in the store the same way (its runs, stages and summary) and the plan's metrics textfile is written. Starting
Prefect's ephemeral server for one local run cost ~10 s and two thirds of a re-plan's CPU (issue 19): the store's
``runs`` table is the run history a lone machine needs.
"""
from __future__ import annotations

import os
from datetime import date
from pathlib import Path

from cicm.errors import InputError
from cicm.planning.options import PlanOptions

# "auto" and a local Dask cluster (docs/scale.md): on 2 cores a local cluster never paid (10,000 clusters: 63.6 s
# against 62.7 s in-process; it costs ~10-15 s to start and its workers share the flow's 2 cores). It is chosen
# only for big fleets on machines with cores to spare; a given --dask-address always means Dask.
DASK_AUTO_MIN_CLUSTERS = 20_000
DASK_AUTO_MIN_CORES = 8
PARTITIONS_PER_WORKER = 4


def choose_runner(options: PlanOptions, n_clusters: int) -> str:
    """'dask' or 'local'. auto: Dask when a scheduler address is given or the fleet is large."""
    if options.runner not in ("auto", "local", "dask"):
        raise InputError("runner", f"must be auto, local or dask, got {options.runner!r}")
    if isinstance(options.dask_workers, bool) or not isinstance(options.dask_workers, int) or options.dask_workers < 1:
        raise InputError("dask_workers", f"must be a positive integer, got {options.dask_workers!r}")
    if options.runner != "auto":
        return options.runner
    if options.dask_address:
        return "dask"
    big = n_clusters >= DASK_AUTO_MIN_CLUSTERS and (os.cpu_count() or 1) >= DASK_AUTO_MIN_CORES
    return "dask" if big else "local"


def prefect_server_configured() -> bool:
    return bool(os.environ.get("PREFECT_API_URL", "").strip())


def uses_prefect(options: PlanOptions, n_clusters: int) -> bool:
    """Whether the plan runs as the Prefect flow: with a Prefect server configured, or on Dask workers."""
    return prefect_server_configured() or choose_runner(options, n_clusters) == "dask"


def plan_in_process(plan_date: date, db_path: Path | str, fleet_path: Path | str | None, options: PlanOptions):
    """The nightly plan's stages in this process, without Prefect: the same ``plan_day`` the flow runs, the same
    records in the store, and the plan's metrics textfile (``CICM_METRICS_TEXTFILE``)."""
    from cicm.config import load_fleet
    from cicm.ops.metrics import write_plan_metrics
    from cicm.planning.pipeline import plan_day
    from cicm.store import Store

    fleet = load_fleet(fleet_path)
    with Store(db_path) as store:
        outcome = plan_day(store, fleet, plan_date, options)
    write_plan_metrics(outcome)
    return outcome
