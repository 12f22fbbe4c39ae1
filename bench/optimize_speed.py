"""How fast is the VCC program? Prints per-cluster solve time, fleet plan times and how they grow with size.

Inputs are synthesised around real carbon days (UTC days of the bundled EIA-930 2022 traces for CISO, MISO and
BPAT; every campus gets a random day) by cicm.optimize.synthetic: diurnal inflexible load, 15-40% flexible
share, reservations 1.2-1.8x usage, a power curve (--curve: "concave", 3 segments, the default; or "specpower",
10 segments shaped like SPECpower server curves, steeper at high load), ~30% of clusters power-capped, and a campus
contract at 1.02x the sum of the flat peaks (so the contract binds), lambda_p = 0.1 per kW.

Every figure is the median of --repeats runs (default 3) measured in this process; input synthesis is not timed.

    .venv/bin/python bench/optimize_speed.py              # full run (~5 min on 2 busy cores)
    .venv/bin/python bench/optimize_speed.py --quick      # skip the 10,000-cluster fleets
    .venv/bin/python bench/optimize_speed.py --quick --curve specpower --sections fleets,growth
    .venv/bin/python bench/optimize_speed.py --curve specpower --sections quality   # true carbon, not speed
    .venv/bin/python bench/optimize_speed.py --curve specpower --sections ratio     # both programs vs raw HiGHS

The "ratio" section (issue 19) plans one campus per size (--sizes) with each program (--programs) and case,
captures the LPs the call solved, and times highspy's passModel + run on the identical LP (cvxpy's
get_problem_data for HiGHS), interleaved with the call, in the same run: wall and process-CPU medians, and their
ratios. Both programs cache their compiled cvxpy programs per structure, so every case is timed twice: "first"
(the cache cleared before each call: a fresh cvxpy problem, as for a structure seen once) and "re-solve" (the
cache warm: the compiled program re-used, as for the nightly plan's same-shaped campuses and a backtest's days);
the "hits" column counts the timed solves that re-used a compiled program.

    .venv/bin/python bench/optimize_speed.py --curve specpower --sections ratio --programs ceiling --sizes 1,10,100

The "quality" section is not about speed: on the same synthetic campuses (lambda_p = 0, no contract) it plans
every cluster once with its power curve and once with the single-slope model the program used before curves
were modelled (nominal power = the curve at U_nom, slope = the curve's slope at the day's mean U_nom), and charges
both plans' flexible work on the true curve, P(U_IF + flexible) - P(U_IF), at the forecast carbon.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cvxpy as cp  # noqa: E402

from cicm.optimize import plan_campus  # noqa: E402
from cicm.optimize import program as ceiling_program  # noqa: E402
from cicm.optimize import queue as queue_program  # noqa: E402
from cicm.optimize.queue import plan_queue  # noqa: E402
from cicm.optimize.synthetic import synthetic_campus, synthetic_queue_campus  # noqa: E402
from cicm.paths import bundled_data_dir  # noqa: E402

ZONES = ("CISO", "MISO", "BPAT")


def carbon_days() -> list[pd.Series]:
    days = []
    for z in ZONES:
        path = bundled_data_dir() / "carbon_intensity" / f"{z}_2022_hourly_mix_and_ci.csv.gz"
        s = pd.read_csv(path, usecols=["timestamp", "avg_CI"], parse_dates=["timestamp"]).set_index("timestamp")
        s = s["avg_CI"]
        for _, v in s.groupby(s.index.floor("D")):
            if len(v) == 24 and not v.isna().any():
                days.append(v)
    return days


CURVE = "concave"  # set from --curve in main()


def make_fleet(days, n_clusters: int, per_campus: int, seed: int, *, solver: str = "HIGHS",
               contract_headroom: float = 1.02, lambda_p: float = 0.1):
    rng = np.random.default_rng(seed)
    out = []
    for j in range(n_clusters // per_campus):
        day = days[int(rng.integers(len(days)))]
        out.append(synthetic_campus(day.to_numpy(), per_campus, seed=rng, name=f"k{j:05d}",
                                    hours=pd.DatetimeIndex(day.index), solver=solver,
                                    contract_headroom=contract_headroom, lambda_p=lambda_p, curve=CURVE))
    return out


def time_fleet(campuses) -> tuple[float, float, dict, float]:
    """Wall seconds to plan every campus, summed solve seconds, the status counts, CPU seconds of this process."""
    t = time.perf_counter()
    cpu = time.process_time()
    solve = 0.0
    statuses: dict[str, int] = {}
    for c in campuses:
        p = plan_campus(c)
        solve += p.solve_seconds
        for s in p.clusters["status"]:
            statuses[s] = statuses.get(s, 0) + 1
    return time.perf_counter() - t, solve, statuses, time.process_time() - cpu


def single_slope(campus):
    """The campus with every curve cluster replaced by the single-slope model of its curve."""
    from cicm.optimize.program import _prepare

    prep = _prepare(campus)
    out = []
    for i, c in enumerate(campus.clusters):
        u_nom = c.inflexible_cpu_cores + prep.f[i]
        out.append(dataclasses.replace(c, power_curve=None, nominal_power_kw=c.power_curve(u_nom),
                                       slope_kw_per_core=float(c.power_curve.slope_at(u_nom.mean()))))
    return dataclasses.replace(campus, clusters=out)


def quality(days, repeats: int) -> None:
    print("\n## true carbon of the plans (lambda_p = 0, no contract; flexible work charged on the true curve)")
    print(f"{'model':14s} {'clusters':>8s} {'flex kgCO2':>12s} {'vs flat %':>10s} {'worse than flat':>16s} "
          f"{'kWh/core-h vs flat %':>21s} {'plan s':>7s}")
    fleet = make_fleet(days, 1_000, 10, seed=99, contract_headroom=float("inf"), lambda_p=0.0)
    for label, convert in (("single slope", single_slope), ("curve", lambda c: c)):
        flex_plan = flex_flat = energy_plan = energy_flat = 0.0
        worse = n = 0
        secs = []
        for campus in fleet:
            t = time.perf_counter()
            plan = plan_campus(convert(campus))
            secs.append(time.perf_counter() - t)
            for c, (_, hh) in zip(campus.clusters, plan.hourly.groupby("cluster", sort=False)):
                eta = hh["carbon_gco2_per_kwh"].to_numpy()
                u = c.inflexible_cpu_cores
                flex = hh["flexible_cpu_cores"].to_numpy()
                base = c.power_curve(u)
                plan_kw = c.power_curve(u + flex) - base
                flat_kw = c.power_curve(u + flex.mean()) - base
                p, q = float(plan_kw @ eta) / 1000, float(flat_kw @ eta) / 1000
                flex_plan, flex_flat = flex_plan + p, flex_flat + q
                energy_plan, energy_flat = energy_plan + plan_kw.sum(), energy_flat + flat_kw.sum()
                worse += p > q * (1 + 1e-9)
                n += 1
        print(f"{label:14s} {n:8d} {flex_plan:12.1f} {100 * (flex_plan / flex_flat - 1):10.2f} "
              f"{worse:16d} {100 * (energy_plan / energy_flat - 1):21.2f} {sum(secs):7.2f}")
        sys.stdout.flush()


def captured_problems(call):
    """Run ``call()`` once with cvxpy's Problem.solve wrapped, and return every problem it solved with its solve
    keyword arguments (not timed)."""
    seen = []
    orig = cp.Problem.solve

    def spy(self, *args, **kwargs):
        seen.append((self, dict(kwargs)))
        return orig(self, *args, **kwargs)

    cp.Problem.solve = spy
    try:
        call()
    finally:
        cp.Problem.solve = orig
    return seen


def highs_arrays(prob: cp.Problem) -> tuple:
    """The LP cvxpy hands HiGHS for ``prob`` (cvxpy's own problem data for its HiGHS interface), as the arguments
    of highspy's array ``passModel``, and (rows, columns, nonzeros)."""
    import highspy as hp
    from cvxpy.reductions.solvers.conic_solvers.conic_solver import dims_to_solver_dict

    data, _, _ = prob.get_problem_data(cp.HIGHS)
    dims = dims_to_solver_dict(data["dims"])
    a = data["A"].tocsc()
    n_row, n_col = a.shape
    b = np.asarray(data["b"], float)
    lb, ub = data.get("lower_bounds"), data.get("upper_bounds")
    args = (n_col, n_row, int(a.nnz), int(hp.MatrixFormat.kColwise), int(hp.ObjSense.kMinimize), 0.0,
            np.asarray(data["c"], float),
            np.full(n_col, -hp.kHighsInf) if lb is None else np.asarray(lb, float),
            np.full(n_col, hp.kHighsInf) if ub is None else np.asarray(ub, float),
            np.concatenate([b[:dims["f"]], np.full(dims["l"], -hp.kHighsInf)]), b,
            a.indptr[:-1].astype(np.int32), a.indices.astype(np.int32), np.asarray(a.data, float),
            np.zeros(n_col, dtype=np.int32))
    return args, (n_row, n_col, int(a.nnz))


def raw_highs_seconds(models, options: dict) -> tuple[float, float]:
    """(wall, process CPU) seconds for highspy to load the arrays and solve (one LP after another), with the
    program's options."""
    import highspy as hp

    t, cpu = time.perf_counter(), time.process_time()
    for args in models:
        h = hp.Highs()
        h.setOptionValue("output_flag", False)
        for k, v in options.items():
            h.setOptionValue(k, v)
        h.passModel(*args)
        h.run()
        assert h.getModelStatus() == hp.HighsModelStatus.kOptimal, h.modelStatusToString(h.getModelStatus())
    return time.perf_counter() - t, time.process_time() - cpu


class _Mode:
    """How the program's cache stands at each timed call: "first" clears it before every call (the call compiles
    a fresh cvxpy problem, as for a structure seen once), "re-solve" warms it first (two calls: fresh, then the
    parametrised program is compiled), so each timed call re-uses the compiled program."""

    def __init__(self, name: str, clear, stats):
        self.name, self.clear, self.stats = name, clear, stats


def _ceiling_cache():
    from cicm.optimize.cache import CACHE

    return CACHE.clear, lambda: (CACHE.stats.hits, CACHE.stats.compiled + CACHE.stats.fresh)


def _queue_cache():
    cache = queue_program.PROGRAMS
    return cache.clear, lambda: (cache.hits, cache.misses)


def ratio_rows(label: str, campus, call, options: dict, r: int, cache) -> list[dict]:
    """One campus: the program's call against raw HiGHS on the identical LP(s), same run, interleaved; once with
    every call a first solve (cache cleared) and once with every call a re-solve (cache warm)."""
    clear, stats = cache
    clear()
    probs = captured_problems(lambda: call(campus))  # a fresh (constant) cvxpy problem: cache just cleared
    built = [highs_arrays(p) for p, _ in probs]
    models = [m for m, _ in built]
    out_rows = []
    for mode in ("first", "re-solve"):
        clear()
        if mode == "re-solve":
            call(campus)
            call(campus)
        wall, cpu, cvx, raw_wall, raw_cpu = [], [], [], [], []
        hits = calls = 0
        for _ in range(r):
            if mode == "first":
                clear()
            h0, m0 = stats()
            t, c = time.perf_counter(), time.process_time()
            plan = call(campus)
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
            h1, m1 = stats()
            hits, calls = hits + (h1 - h0), calls + (h1 - h0) + (m1 - m0)
            cvx.append(plan.solve_seconds)
            w, c = raw_highs_seconds(models, options)
            raw_wall.append(w)
            raw_cpu.append(c)
        med = statistics.median
        rows, cols, nnz = (sum(x[1][i] for x in built) for i in range(3))
        out = {"label": label, "mode": mode, "clusters": len(campus.clusters), "lps": len(models), "rows": rows,
               "cols": cols, "nnz": nnz, "cache_hits": hits, "solves": calls, "call_ms": 1e3 * med(wall),
               "call_cpu_ms": 1e3 * med(cpu), "cvxpy_ms": 1e3 * med(cvx), "highs_ms": 1e3 * med(raw_wall),
               "highs_cpu_ms": 1e3 * med(raw_cpu)}
        out["ratio"] = out["cvxpy_ms"] / out["highs_ms"]
        out["ratio_cpu"] = out["call_cpu_ms"] / max(out["highs_cpu_ms"], 1e-6)
        print(f"{label:36s} {mode:8s} {out['clusters']:5d} {out['lps']:3d} {rows:7d} {cols:7d} {nnz:8d} "
              f"{f'{hits}/{calls}':>7s} {out['call_ms']:9.1f} {out['cvxpy_ms']:9.1f} {out['highs_ms']:9.1f} "
              f"{out['ratio']:7.2f} {out['call_cpu_ms']:9.1f} {out['highs_cpu_ms']:9.1f} {out['ratio_cpu']:7.2f}")
        sys.stdout.flush()
        out_rows.append(out)
    return out_rows


def ratios(days, r: int, sizes=(1, 10, 100, 300, 1_000), programs=("ceiling", "queue")) -> None:
    print("\n## against raw HiGHS on the identical LP (same run, interleaved; medians; ms)\n"
          "# cvxpy: the program's solve_seconds (build, compile, solve; for the queue program its whole call); "
          "HiGHS: highspy passModel (arrays) + run\n# on the LP(s) cvxpy hands HiGHS (get_problem_data), with the "
          "program's options; ratio = cvxpy / HiGHS (wall);\n# call cpu: process CPU of the whole plan_campus / "
          "plan_queue call, against HiGHS' process CPU (less sensitive to other load than wall)\n"
          "# mode first: the program's cache is cleared before each timed call (a structure seen for the first "
          "time: a fresh cvxpy problem);\n# re-solve: the cache is warm (the compiled program is re-used); "
          "hits: timed LP solves that re-used a compiled program / all")
    print(f"{'program, objective':36s} {'mode':8s} {'clust':>5s} {'LPs':>3s} {'rows':>7s} {'cols':>7s} "
          f"{'nnz':>8s} {'hits':>7s} {'call':>9s} {'cvxpy':>9s} {'HiGHS':>9s} {'ratio':>7s} {'call cpu':>9s} "
          f"{'HiGHS cpu':>9s} {'ratio':>7s}")
    ceiling = [("ceiling: carbon+peak, contract 1.02", 1.02, 0.1), ("ceiling: carbon only, no contract", np.inf, 0.0),
               ("ceiling: carbon only, contract cap", "cap", 0.0)]
    for label, headroom, lam_p in ceiling if "ceiling" in programs else ():
        for n in sizes:
            campus = make_fleet(days, n, n, seed=7 * n, contract_headroom=1.02 if headroom == "cap" else headroom,
                                lambda_p=lam_p)[0]
            if headroom == "cap":  # a contract at the clusters' summed power at full capacity: never binds
                limit = sum(float(c.power_curve(np.max(c.capacity_cores))) for c in campus.clusters)
                campus = dataclasses.replace(campus, contract_limit_kw=limit)
            ratio_rows(label, campus, plan_campus, ceiling_program.SOLVER_OPTIONS["HIGHS"], r, _ceiling_cache())
    rng = np.random.default_rng(11)
    queue = [("queue: nightly (contract capacity)", "capacity", 0.0), ("queue: contract binding", "binding", 0.0),
             ("queue: carbon+peak 0.1, no contract", "none", 0.1)]
    for label, contract, lam_p in queue if "queue" in programs else ():
        for n in sizes:
            i = int(rng.integers(len(days) - 1))
            eta = np.concatenate([days[i].to_numpy(), days[i + 1].to_numpy()])[:42]
            campus = synthetic_queue_campus(eta, n, seed=13 * n, contract=contract, lambda_p=lam_p, curve=CURVE)
            ratio_rows(label, campus, plan_queue, queue_program.SOLVER_OPTIONS["HIGHS"], r, _queue_cache())


def _commit() -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "cicm/optimize", "bench"],
                               cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True).stdout
        return out + ("+local changes" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="skip the 10,000-cluster fleets")
    ap.add_argument("--curve", choices=("concave", "specpower"), default="concave",
                    help="shape of the synthetic power curves (default concave)")
    ap.add_argument("--sizes", default="1,10,100,300,1000", help="campus sizes of the ratio section")
    ap.add_argument("--programs", default="ceiling,queue", help="programs of the ratio section: ceiling, queue")
    ap.add_argument("--sections", default="single,fleets,growth",
                    help="comma-separated subset of single (one-cluster campuses), fleets, growth (one campus), "
                         "quality (true carbon of curve vs single-slope plans; needs --curve specpower or concave), "
                         "ratio (both programs against raw HiGHS on the identical LP, per campus size)")
    args = ap.parse_args(argv)
    global CURVE
    CURVE = args.curve
    sections = set(args.sections.split(","))
    r = args.repeats
    days = carbon_days()
    print(f"# VCC program speed  ({platform.processor() or platform.machine()}, {os.cpu_count()} cpu, "
          f"commit {_commit()}, "
          f"python {platform.python_version()}, load avg {os.getloadavg()[0]:.2f}; {len(days)} real carbon days "
          f"from {', '.join(ZONES)}; {CURVE} power curves; median of {r} repeats)")

    # 1. Per cluster: one-cluster campuses, each on its own carbon day.
    print("\n## one-cluster campuses (per-cluster plan time = build + solve + frames)")
    for solver in (("HIGHS", "CLARABEL") if "single" in sections else ()):
        fleet = make_fleet(days, 60, 1, seed=1, solver=solver)
        times, solves = [], []
        for _ in range(r):
            for c in fleet:
                t = time.perf_counter()
                p = plan_campus(c)
                times.append(time.perf_counter() - t)
                solves.append(p.solve_seconds)
        print(f"{solver:8s}  plan median {1e3 * statistics.median(times):6.1f} ms/cluster "
              f"(p90 {1e3 * float(np.quantile(times, 0.9)):5.1f})   of which cvxpy build+solve "
              f"{1e3 * statistics.median(solves):6.1f} ms   (n={len(times)})")

    # 2. Fleets.
    print("\n## fleets (wall seconds to plan every campus; HiGHS; contract binding at 1.02x flat peaks)")
    print(f"{'clusters':>8s} {'per campus':>10s} {'campuses':>8s} {'plan s':>8s} {'solve s':>8s} {'cpu s':>8s} "
          f"{'ms/cluster':>10s}  statuses")
    results: dict[tuple[int, int], float] = {}
    cpu_results: dict[tuple[int, int], float] = {}
    groupings = [10, 100, 1_000]
    cases = [(1_000, g) for g in groupings] + ([] if args.quick else [(10_000, 10), (10_000, 100)])
    cases = cases if "fleets" in sections else []
    for n, g in cases:
        if True:
            fleet = make_fleet(days, n, g, seed=n + g)
            runs = [time_fleet(fleet) for _ in range(r)]
            wall = statistics.median(x[0] for x in runs)
            cpu = statistics.median(x[3] for x in runs)
            solve, st = statistics.median(x[1] for x in runs), runs[0][2]
            results[(n, g)], cpu_results[(n, g)] = wall, cpu
            print(f"{n:8d} {g:10d} {n // g:8d} {wall:8.2f} {solve:8.2f} {cpu:8.2f} {1e3 * wall / n:10.2f}  {st}")
            sys.stdout.flush()

    # 3. One campus: growth of a single LP with its size, per solver and objective.
    print("\n## one campus, growing (seconds to plan it: wall / process CPU)")
    sizes = (10, 100, 300, 1_000)
    configs = [("carbon+peak, contract 1.02x", 1.02, 0.1), ("carbon+peak, no contract", float("inf"), 0.1),
               ("carbon only (lambda_p=0)", float("inf"), 0.0)]
    print(f"{'solver':9s}{'objective':29s}" + "".join(f"{n:>14d}" for n in sizes) + "   cpu 1000/100")
    for solver in (("HIGHS", "CLARABEL") if "growth" in sections else ()):
        for label, headroom, lam_p in configs:
            cells, cpus = [], {}
            for n in sizes:
                c = make_fleet(days, n, n, seed=7 * n, solver=solver, contract_headroom=headroom, lambda_p=lam_p)
                runs = [time_fleet(c) for _ in range(r)]
                wall, cpu = statistics.median(x[0] for x in runs), statistics.median(x[3] for x in runs)
                cpus[n] = cpu
                cells.append(f"{wall:.3f}/{cpu:.3f}")
            print(f"{solver:9s}{label:29s}" + "".join(f"{x:>14s}" for x in cells)
                  + f"   x{cpus[1_000] / cpus[100]:.1f}")
            sys.stdout.flush()

    if "quality" in sections:
        quality(days, r)
    if "ratio" in sections:
        ratios(days, max(r, 5), tuple(int(x) for x in args.sizes.replace(" ", ",").split(",") if x),
               tuple(args.programs.split(",")))

    print("\n## fleet growth (ratios from this run; process CPU is less sensitive to other load than wall)")
    for g in groupings:
        if (10_000, g) in results:
            print(f"fleet 10,000 / 1,000 clusters, {g} per campus: wall x{results[(10_000, g)] / results[(1_000, g)]:.1f}"
                  f", cpu x{cpu_results[(10_000, g)] / cpu_results[(1_000, g)]:.1f}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS {rss:.0f} MB; load avg at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
