"""CPU seconds of `cicm plan` on the demo fleet, as a user runs it (a subprocess), median of N runs each:

* a plan on a new store: `cicm demo seed` then `cicm plan` (seed and plan reported apart);
* re-planning: `cicm plan` again on that store.

Without PREFECT_API_URL the plan runs in process (cicm.planning.runner); with it set, the Prefect flow runs
against that server. CPU = user + system of the child, from its rusage; wall alongside. Usage:
`.venv/bin/python bench/plan_cpu.py [--runs 3]`.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CICM = [sys.executable, "-m", "cicm.cli"]


def timed(args: list[str]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one child run; it must exit 0 or 2 (planned, perhaps degraded)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(CICM + args, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode not in (0, 2):
        raise SystemExit(f"{' '.join(args)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    runs = parser.parse_args().runs
    figures: dict[str, list[tuple[float, float]]] = {"seed": [], "first plan": [], "re-plan": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(runs):
            db = str(Path(tmp) / f"run{i}.duckdb")
            figures["seed"].append(timed(["demo", "seed", "--db", db]))
            figures["first plan"].append(timed(["plan", "--db", db]))
            figures["re-plan"].append(timed(["plan", "--db", db]))
    mode = "Prefect flow at " + os.environ["PREFECT_API_URL"] if os.environ.get("PREFECT_API_URL") else "in process"
    print(f"cicm plan, demo fleet (10 clusters), {mode}; median of {runs}")
    for name, values in figures.items():
        cpu = statistics.median(v[0] for v in values)
        wall = statistics.median(v[1] for v in values)
        print(f"  {name:11s} {cpu:5.2f} CPU-s  {wall:5.2f} s wall")
    new = statistics.median(s[0] + p[0] for s, p in zip(figures["seed"], figures["first plan"]))
    print(f"  new store (seed + first plan) {new:5.2f} CPU-s")


if __name__ == "__main__":
    main()
