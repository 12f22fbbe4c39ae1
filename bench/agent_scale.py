"""Enforcement at scale (issue 19, item 4): the agent applying an hour to N containers end to end, and a tick.

    .venv/bin/python bench/agent_scale.py [--containers 1000] [--repeat 5] [--ticks 30] [--profile]

Each run starts a real ecovisor (``uvicorn`` in a child process on a free loopback port, simulated clock and
backend, its telemetry in a DuckDB file) whose site has N flexible containers (``batch-*``; half with a linear
power model, half piecewise, so the agent's cap search needs more than one round for those) and 8 inflexible
ones (``serve-*``), registers one app owning all of them, writes a day's plan for the cluster into a real
DuckDB store (``cicm.data.store.Store``), and then measures:

1. **agent, hour 1**: ``build_agent`` (the store opened, the client built) and one pass (``Agent.step``: the plan
   read from the store, the contract checked, the containers read, every flexible container capped from
   uncapped, the battery set and read back, the pass audited in the store), wall and CPU seconds (this
   process's) and the server's CPU seconds (from /proc);
2. **agent, hour 2**: the next hour's pass with a different allowance (every cap moves; the contract is known);
   then, caps moved back to uncapped, **``cicm agent run --once``** in a new process (interpreter start and
   imports included) caps them all again: the cold end-to-end figure;
3. the same two passes against an ecovisor **without the bulk route** (the agent falls back to one PUT per
   container per search step, as before the bulk route existed), for comparison in the same run;
4. **tick**: ``POST /v1/tick`` (one tick each) ``--ticks`` times on the N + 8 container ecovisor: the server's
   CPU milliseconds per tick (/proc), and the request's wall time. ``--profile`` also cProfiles the tick in this
   process (the same core, in-memory) and prints where its time goes.

The caps the bulk passes leave are checked equal to the per-container passes' (same targets, same search).
Figures are medians of ``--repeat`` runs; the load average is printed (the machine's 2 cores are shared with the
server child, and with other work).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ecovisor_load import Server as EcovisorServer  # noqa: E402

ADMIN = "bench-admin"
CLUSTER = "scale-a"
START = pd.Timestamp("2022-06-14T07:00:00Z")
N_INFLEXIBLE = 8
BULK_ROUTE = "/v1/containers/powercaps"


# ----------------------------------------------------------------------------- the ecovisor (child process)
def site_dict(n: int) -> dict:
    from cicm.ecovisor.testing import TEST_SITE

    d = json.loads(json.dumps(TEST_SITE))
    d["sim_start"] = START.isoformat()
    d["tick_seconds"] = 300
    d["grid"]["capacity_kw"] = 10_000.0
    conts = []
    for i in range(n):
        power = ({"kind": "linear", "idle_kw": 0.1, "max_kw": 0.3} if i % 2 == 0 else
                 {"kind": "piecewise", "points": [[0, 0.10], [1, 0.17], [2, 0.22], [4, 0.30]]})
        conts.append({"name": f"batch-{i:05d}", "cores": 4, "sim_demand_cores": 4.0, "power": power})
    for i in range(N_INFLEXIBLE):
        conts.append({"name": f"serve-{i:03d}", "cores": 2, "sim_demand_cores": 1.5,
                      "power": {"kind": "linear", "idle_kw": 0.05, "max_kw": 0.15}})
    d["containers"] = conts
    return d


def serve(port: int, n: int, db: str, bulk: bool) -> None:
    import uvicorn

    from cicm.ecovisor.site import parse_site
    from cicm.ecovisor.testing import simulated_app

    api = simulated_app(parse_site(site_dict(n)), db_path=db, admin_token=ADMIN)
    if not bulk:  # an ecovisor from before the bulk route
        api.router.routes = [r for r in api.router.routes if getattr(r, "path", None) != BULK_ROUTE]
    uvicorn.run(api, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def Server(n: int, db: Path, bulk: bool = True) -> EcovisorServer:
    """This bench's ecovisor (its ``serve``: a store at ``db``, with or without the bulk route) in a child."""
    return EcovisorServer(n, str(db), "1" if bulk else "0", script=__file__)


# ----------------------------------------------------------------------------- the plan store
def write_plan(db: Path, n: int) -> None:
    """A shaped day for the cluster: the site is the cluster in miniature (capacity = 10 x the containers'
    cores); the allowance moves every hour, so every flexible cap moves with it."""
    from cicm.data.store import Store

    cores = 4 * n + 2 * N_INFLEXIBLE
    capacity = 10.0 * cores
    hours = pd.date_range(START, periods=24, freq="h", name="hour")
    share = np.array([0.30, 0.55, 0.20, 0.70, 0.45, 0.60] * 4)  # of the flexible cores
    flex = share * 4 * n * 10.0
    infl = np.full(24, 2 * N_INFLEXIBLE * 10.0)
    plan_date = date(2022, 6, 14)
    vccs = pd.DataFrame({
        "plan_date": plan_date, "cluster": CLUSTER, "hour": hours, "hour_index": np.arange(24),
        "vcc_cores": (infl * 1.1 + flex) * 1.35, "flexible_cpu_cores": flex, "inflexible_cpu_cores": infl,
        "power_kw": 150.0, "carbon_kgco2": 40.0, "gco2_per_kwh": [300.0 + 10 * (h % 7) for h in range(24)],
    })
    st = pd.DataFrame([{
        "plan_date": plan_date, "cluster": CLUSTER, "campus": "ca-sj", "status": "shaped", "reason": None,
        "capacity_cores": capacity, "theta_core_hours": 2.5e6, "tau_core_hours": float(flex.sum()),
        "expected_kgco2": 900.0, "flat_kgco2": 950.0, "saving_pct": 5.0, "peak_kw": 190.0,
    }])
    with Store(db) as store, store.run("plan", {"bench": True}, plan_date=plan_date) as run:
        store.replace_plan(plan_date, vccs, st, run.run_id)


# ----------------------------------------------------------------------------- one run
def _http(url: str, method: str, path: str, token: str = ADMIN, body: dict | None = None):
    import requests

    r = requests.request(method, url + path, headers={"Authorization": f"Bearer {token}"}, json=body, timeout=60)
    r.raise_for_status()
    return r.json() if r.content else None


def _pass(agent, srv: Server) -> dict:
    cpu0, scpu0, t0 = time.process_time(), srv.cpu_s(), time.perf_counter()
    out = agent.step()
    wall, cpu, scpu = time.perf_counter() - t0, time.process_time() - cpu0, srv.cpu_s() - scpu0
    if not out.ok or out.mode != "shaped":
        raise RuntimeError(f"the pass did not apply: {out.line()}")
    return {"wall_s": wall, "cpu_s": cpu, "server_cpu_s": scpu, "changes": len(out.changes), "out": out}


def agent_run(n: int, bulk: bool, tmp: Path) -> dict:
    from cicm.enforce.clock import SimulatedClock
    from cicm.enforce.cli import build_agent

    plan_db = tmp / f"plans-{int(bulk)}.duckdb"
    eco_db = tmp / f"ecovisor-{int(bulk)}.duckdb"
    for p in (plan_db, eco_db):
        p.unlink(missing_ok=True)
    write_plan(plan_db, n)
    with Server(n, eco_db, bulk) as srv:
        token = _http(srv.url, "post", "/v1/apps", body={
            "name": CLUSTER, "grid_kw": 100.0, "battery_fraction": 1.0, "solar_fraction": 1.0,
            "containers": [f"batch-{i:05d}" for i in range(n)] + [f"serve-{i:03d}" for i in range(N_INFLEXIBLE)],
        })["token"]
        clock = SimulatedClock(START + pd.Timedelta(minutes=1))
        t0, cpu0, scpu0 = time.perf_counter(), time.process_time(), srv.cpu_s()
        agent = build_agent(cluster=CLUSTER, ecovisor=srv.url, token=token, db=plan_db, plan_file=None,
                            audit_file=None, fleet=None, flexible=[], flexible_pattern="batch-*",
                            cluster_cores_per_core=None, on_missing_plan="lift", max_plan_age_hours=None,
                            battery=True, battery_hours=4, retry_base_s=5.0, retry_max_s=300.0,
                            reconcile_every_s=3600.0, request_retries=0, clock=clock, correction=False)
        build = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - cpu0,
                 "server_cpu_s": srv.cpu_s() - scpu0}
        h1 = _pass(agent, srv)
        h1_total = {k: build[k] + h1[k] for k in build}
        _http(srv.url, "post", "/v1/tick", body={"n": 12})
        clock.set(START + pd.Timedelta(hours=1, minutes=1))
        h2 = _pass(agent, srv)
        caps = {c["container"]: (c["powercap_kw"], c["cpu_limit_cores"])
                for c in _http(srv.url, "get", "/v1/containers", token=token)}
        out = {"h1": h1, "h1_total": h1_total, "h2": h2, "caps": caps,
               "how": [d for d in h2["out"].detail.split(" | ") if d.startswith("caps:")]}
        if bulk:
            out["cli"] = cli_pass(srv, token, plan_db)
        return out


def cli_pass(srv: Server, token: str, plan_db: Path) -> dict:
    """Hour 2's caps re-applied by ``cicm agent run --once`` in a new process (interpreter start, imports, the
    store and the client built, one pass, the audit), after the caps were moved back to uncapped: wall and CPU
    seconds of the child, and the server's CPU."""
    import resource

    _http(srv.url, "put", BULK_ROUTE, token=token, body={"caps": [
        {"name": c["container"], "kw": c["max_kw"]} for c in _http(srv.url, "get", "/v1/containers", token=token)]})
    cmd = [sys.executable, "-m", "cicm.cli", "agent", "run", "--cluster", CLUSTER, "--ecovisor", srv.url, "--once",
           "--db", str(plan_db), "--clock", "ecovisor", "--no-events", "--no-correction", "--max-plan-age-hours", "0",
           "--log-level", "warning"]
    before, scpu0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), srv.cpu_s(), time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "CICM_ECOVISOR_TOKEN": token})
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"cicm agent run --once exited {done.returncode}: {done.stderr[-2000:]}")
    return {"wall_s": wall, "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "server_cpu_s": srv.cpu_s() - scpu0}


def tick_run(n: int, ticks: int, tmp: Path) -> dict:
    eco_db = tmp / "ecovisor-tick.duckdb"
    eco_db.unlink(missing_ok=True)
    with Server(n, eco_db) as srv:
        _http(srv.url, "post", "/v1/apps", body={
            "name": CLUSTER, "grid_kw": 100.0, "battery_fraction": 1.0, "solar_fraction": 1.0,
            "containers": [f"batch-{i:05d}" for i in range(n)] + [f"serve-{i:03d}" for i in range(N_INFLEXIBLE)]})
        for _ in range(3):  # warm-up
            _http(srv.url, "post", "/v1/tick", body={"n": 1})
        import requests

        s = requests.Session()
        s.headers["Authorization"] = f"Bearer {ADMIN}"
        walls, cpus = [], []
        for _ in range(ticks):
            c0, t0 = srv.cpu_s(), time.perf_counter()
            r = s.post(srv.url + "/v1/tick", json={"n": 1}, timeout=60)
            walls.append(time.perf_counter() - t0)
            r.raise_for_status()
            cpus.append(srv.cpu_s() - c0)
        s.close()
    # /proc counts in clock ticks (10 ms): the per-tick figure is the total over the requests / their number
    return {"server_cpu_ms": sum(cpus) / ticks * 1e3, "wall_ms_median": statistics.median(walls) * 1e3,
            "wall_ms_p90": sorted(walls)[int(0.9 * (len(walls) - 1))] * 1e3}


def tick_in_process(n: int, ticks: int, profile: bool) -> float:
    """CPU ms of ``Ecovisor.advance(1)`` (the accountant's tick and its store write, no HTTP), median; with
    ``profile``, the cProfile of those ticks."""
    from cicm.ecovisor.schemas import AppRegistration
    from cicm.ecovisor.site import parse_site
    from cicm.ecovisor.testing import simulated_app

    with tempfile.TemporaryDirectory() as d:
        api = simulated_app(parse_site(site_dict(n)), db_path=Path(d) / "eco.duckdb", admin_token=ADMIN)
        core = api.state.ecovisor
        core.register_app(AppRegistration(
            name=CLUSTER, grid_kw=100.0, containers=[f"batch-{i:05d}" for i in range(n)]))
        core.advance(3)
        ts = []
        for _ in range(ticks):
            c0 = time.process_time()
            core.advance(1)
            ts.append(time.process_time() - c0)
        if profile:
            import cProfile
            import pstats

            pr = cProfile.Profile()
            pr.enable()
            for _ in range(ticks):
                core.advance(1)
            pr.disable()
            print(f"\ncProfile of {ticks} ticks with {n + N_INFLEXIBLE} containers (in process, file store):")
            pstats.Stats(pr).sort_stats("tottime").print_stats(15)
        core.store.close()
    return statistics.median(ts) * 1e3


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--serve":
        serve(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1")
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--containers", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--ticks", type=int, default=30)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--no-fallback", action="store_true", help="skip the passes without the bulk route")
    args = ap.parse_args()
    if not (1 <= args.containers <= 100_000 and 1 <= args.repeat <= 50 and 1 <= args.ticks <= 1000):
        ap.error("--containers in [1, 1e5], --repeat in [1, 50], --ticks in [1, 1000]")
    n = args.containers
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; {n} flexible + {N_INFLEXIBLE} inflexible containers")
    runs: dict[bool, list[dict]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for _ in range(args.repeat):
            runs[True].append(agent_run(n, True, tmp))
            if not args.no_fallback:
                runs[False].append(agent_run(n, False, tmp))
        ticks = [tick_run(n, args.ticks, tmp) for _ in range(args.repeat)]
    for bulk in (True, False):
        rs = runs[bulk]
        if not rs:
            continue
        label = "bulk route" if bulk else "no bulk route (per-container PUTs)"
        print(f"\nagent, {label}, median of {len(rs)}:")
        keys = [("h1_total", "hour 1 incl. build_agent"), ("h1", "hour 1 pass"), ("h2", "hour 2 pass")]
        if "cli" in rs[0]:
            keys.append(("cli", "cicm agent run --once"))
        for key, name in keys:
            med = {k: statistics.median(r[key][k] for r in rs) for k in ("wall_s", "cpu_s", "server_cpu_s")}
            walls = ", ".join(f"{r[key]['wall_s']:.2f}" for r in rs)
            print(f"  {name:<26} wall {med['wall_s']:.2f} s  agent CPU {med['cpu_s']:.2f} s  server CPU "
                  f"{med['server_cpu_s']:.2f} s   (walls: {walls})")
        print(f"  hour 2: {rs[0]['h2']['changes']} change(s); {'; '.join(rs[0]['how'])}")
    if runs[False]:
        same = all(a["caps"] == b["caps"] for a, b in zip(runs[True], runs[False]))
        print(f"\ncaps after hour 2, bulk vs per-container: {'identical' if same else 'DIFFERENT'}")
    med = {k: statistics.median(t[k] for t in ticks) for k in ticks[0]}
    each = ", ".join(f"{t['server_cpu_ms']:.1f}" for t in ticks)
    print(f"\ntick (POST /v1/tick, n=1) with {n + N_INFLEXIBLE} containers, {args.ticks} ticks x {args.repeat} runs: "
          f"server CPU {med['server_cpu_ms']:.1f} ms/tick (median of runs: "
          f"{each}), wall median {med['wall_ms_median']:.1f} ms, "
          f"p90 {med['wall_ms_p90']:.1f} ms")
    cpu_ms = tick_in_process(n, args.ticks, args.profile)
    print(f"tick in process (Ecovisor.advance(1), no HTTP): {cpu_ms:.1f} ms CPU (median of {args.ticks})")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
