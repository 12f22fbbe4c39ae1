"""Nightly plan time and peak memory per stage for generated fleets of 100, 1,000 and 10,000 clusters.

    .venv/bin/python bench/fleet_plan.py [--sizes 100 1000 10000] [--program queue|ceiling] [--runner local|dask]
                                         [--repeat 1]

For each size: `prepare_scale_run` builds the fleet, a store with its history and the next night's telemetry
(cached under --workdir; --fresh rebuilds). Each measured run starts from a copy of that store, in its own
process (`cicm plan`'s code path: in process, or the Prefect flow on Dask or with PREFECT_API_URL; with the
ingestion of the night's telemetry), so peak RSS is the plan's own. Prints seconds per stage, the process's CPU-seconds
(user + system: comparable on a shared machine, where wall seconds are not), the load average, peak RSS, and the
scaling exponent b of time ≈ a·N^b.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

STAGES = ("telemetry", "carbon-forecast", "slo-feedback", "store-reads", "forecast-value", "power-models",
          "load-forecast", "vcc-program", "store-write")


def one_run(folder: Path, runner: str, workers: int, program: str) -> dict:
    from cicm.config import load_fleet
    from cicm.planning.options import PlanOptions
    from cicm.planning.runner import plan_in_process, uses_prefect

    started = time.perf_counter()
    fleet_path = folder / "fleet.toml"
    fleet = load_fleet(fleet_path)
    options = PlanOptions(runner=runner, dask_workers=workers, telemetry_dir=str(folder / "telemetry"),
                          program=program)
    if uses_prefect(options, len(fleet.clusters())):  # as `cicm plan` decides: Dask workers or a Prefect server
        from flows.nightly import run_nightly_plan

        outcome = run_nightly_plan(fleet.default_plan_date, folder / "run.duckdb", fleet_path, options)
    else:
        outcome = plan_in_process(fleet.default_plan_date, folder / "run.duckdb", fleet_path, options)
    wall = time.perf_counter() - started
    seconds = dict(outcome.seconds)
    shaped = int((outcome.clusters["status"] == "shaped").sum())
    own = resource.getrusage(resource.RUSAGE_SELF)
    return {"wall": wall, "seconds": seconds, "status": outcome.status, "shaped": shaped,
            "clusters": len(outcome.clusters), "cpu_seconds": own.ru_utime + own.ru_stime,
            "load_average": os.getloadavg()[0],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "children_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def measure(folder: Path, runner: str, workers: int, program: str) -> dict:
    shutil.copy(folder / "cicm.duckdb", folder / "run.duckdb")
    out = subprocess.run([sys.executable, __file__, "--one", str(folder), "--runner", runner,
                          "--dask-workers", str(workers), "--program", program], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"run failed for {folder}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def exponent(sizes: list[int], times: list[float]) -> float:
    xs, ys = [math.log(n) for n in sizes], [math.log(t) for t in times]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--workdir", type=Path, default=Path("var/bench/fleet"))
    parser.add_argument("--runner", default="local", choices=["local", "dask"])
    parser.add_argument("--dask-workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="runs per size; the median is shown")
    parser.add_argument("--fresh", action="store_true", help="rebuild the cached stores")
    parser.add_argument("--program", default="queue", choices=["queue", "ceiling"], help="the VCC program")
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.one, args.runner, args.dask_workers, args.program)))
        return

    from cicm.planning.scale import prepare_scale_run

    rows = []
    for n in args.sizes:
        folder = args.workdir / f"scale-{n}"
        if args.fresh or not (folder / "cicm.duckdb").exists() or not (folder / "telemetry" / "usage.parquet").exists():
            started = time.perf_counter()
            info = prepare_scale_run(folder, n)
            print(f"{n} clusters: store seeded with {info['usage_rows']:,} usage rows in "
                  f"{time.perf_counter() - started:.0f} s ({(folder / 'cicm.duckdb').stat().st_size / 2**30:.2f} GiB)")
        runs = [measure(folder, args.runner, args.dask_workers, args.program) for _ in range(args.repeat)]
        walls = [r["wall"] for r in runs]
        best = runs[walls.index(statistics.median_low(walls))]
        rows.append((n, statistics.median(walls), best))
        print(f"{n} clusters: {best['wall']:.1f} s wall, {best['shaped']}/{best['clusters']} shaped, "
              f"peak RSS {max(best['peak_rss_mb'], best['children_peak_rss_mb']):.0f} MiB", flush=True)

    print(f"\nprogram {args.program}, runner {args.runner}" + (f" ({args.dask_workers} workers)" if args.runner == "dask" else "")
          + "; seconds per stage (models and programs: summed over partitions)")
    header = f"{'stage':<22}" + "".join(f"{n:>12,}" for n, _, _ in rows)
    print(header)
    for stage in STAGES + ("models-and-programs",):
        print(f"{stage:<22}" + "".join(f"{r['seconds'].get(stage, float('nan')):>12.2f}" for _, _, r in rows))
    in_plan = [sum(r["seconds"].get(s, 0.0) for s in ("telemetry", "carbon-forecast", "slo-feedback",
                                                      "models-and-programs", "store-write")) for _, _, r in rows]
    print(f"{'plan (sum of stages)':<22}" + "".join(f"{t:>12.2f}" for t in in_plan))
    print(f"{'prefect and startup':<22}" + "".join(f"{r['wall'] - t:>12.2f}" for (_, _, r), t in zip(rows, in_plan)))
    print(f"{'wall':<22}" + "".join(f"{w:>12.2f}" for _, w, _ in rows))
    print(f"{'CPU-seconds (process)':<22}" + "".join(f"{r.get('cpu_seconds', float('nan')):>12.2f}" for _, _, r in rows))
    print(f"{'load average at end':<22}" + "".join(f"{r.get('load_average', float('nan')):>12.2f}" for _, _, r in rows))
    print(f"{'peak RSS MiB':<22}" + "".join(
        f"{max(r['peak_rss_mb'], r['children_peak_rss_mb']):>12.0f}" for _, _, r in rows))
    if len(rows) >= 2:
        sizes = [n for n, _, _ in rows]
        print(f"\nscaling exponent b (wall ≈ a·N^b), fitted over all sizes: {exponent(sizes, [w for _, w, _ in rows]):.2f};"
              f" plan stages only: {exponent(sizes, in_plan):.2f}; plan stages between the two largest sizes: "
              f"{exponent(sizes[-2:], in_plan[-2:]):.2f}")


if __name__ == "__main__":
    main()
