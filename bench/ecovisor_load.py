"""A bounded load test of the ecovisor's REST API on loopback (issue 20, item 8).

    .venv/bin/python bench/ecovisor_load.py [--requests 20000] [--connections 50] [--route put|get|mix]
                                            [--containers 250] [--caps-sizes 250 1000 2000] [--repeat 3]
                                            [--rate R]

It starts a real ecovisor (``uvicorn`` in a child process, simulated clock and backend, in-memory store) on a free
loopback port, registers one app that owns every container, and then:

1. **throughput**: fires ``--requests`` requests over ``--connections`` keep-alive HTTP/1.1 connections (one
   asyncio task per connection on raw sockets, so the client costs little CPU next to the server) and prints
   req/s, p50 and p99 latency, and the server's CPU time per request (from /proc of the server process);
   ``put`` is ``PUT /v1/containers/{c}/powercap`` on a random container (what the enforcement agent sends),
   ``get`` is ``GET /v1/containers/{c}``, ``mix`` alternates them;
2. **set all caps**: for each ``--caps-sizes`` N, a fresh ecovisor with N containers in one app, and the time to
   set every container's cap once, over the same ``--connections`` connections (with the server's CPU per PUT:
   flat in N when one cap change is O(1)), then in one bulk ``PUT /v1/containers/powercaps`` (issue 19, item 4).

Each figure is the median of ``--repeat`` runs (these machines have 2 shared cores: the client and the server
share them, so the figures are a floor, not the server's ceiling). Nothing here runs in the test suite.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ADMIN = "bench-admin"


# ----------------------------------------------------------------------------- the server (child process)
def site_dict(n_containers: int) -> dict:
    from cicm.ecovisor.testing import TEST_SITE

    d = json.loads(json.dumps(TEST_SITE))
    d["containers"] = [
        {"name": f"c-{i:05d}", "cores": 4, "sim_demand_cores": 2.0,
         "power": {"kind": "linear", "idle_kw": 0.1, "max_kw": 0.5}}
        for i in range(n_containers)
    ]
    return d


def serve(port: int, n_containers: int) -> None:
    """The child: uvicorn with ``$ECOVISOR_BENCH_HTTP`` (auto: httptools and uvloop when installed, as
    ``cicm ecovisor serve`` runs; h11: the pure-Python parser and asyncio's loop, for comparison)."""
    import uvicorn

    from cicm.ecovisor.site import parse_site
    from cicm.ecovisor.testing import simulated_app

    api = simulated_app(parse_site(site_dict(n_containers)), admin_token=ADMIN)
    http = os.environ.get("ECOVISOR_BENCH_HTTP", "auto")
    opts: dict = {"http": "h11", "loop": "asyncio"} if http == "h11" else {}
    prof_out = os.environ.get("ECOVISOR_BENCH_PROFILE")  # cProfile the server into this file (--profile)
    if not prof_out:
        uvicorn.run(api, host="127.0.0.1", port=port, log_level="warning", access_log=False, **opts)
        return
    import cProfile
    import pstats
    import signal
    import threading

    signal.signal(signal.SIGTERM, lambda *_: None)  # uvicorn re-raises the signal after its shutdown: let us dump
    profiles = [cProfile.Profile()]

    def _boot(*_):  # each new thread (the sync routes' worker threads) gets its own profiler
        sys.setprofile(None)
        p = cProfile.Profile()
        profiles.append(p)
        p.enable()

    threading.setprofile(_boot)
    profiles[0].enable()
    try:
        uvicorn.run(api, host="127.0.0.1", port=port, log_level="warning", access_log=False, **opts)
    finally:
        profiles[0].disable()
        stats = pstats.Stats(profiles[0])
        for p in profiles[1:]:
            stats.add(p)
        stats.dump_stats(prof_out)


class Server:
    """The ecovisor in a child process (its own interpreter and GIL), with ``n_containers`` containers:
    ``script --serve PORT N *extra`` (this bench's, or another bench's ``serve``)."""

    def __init__(self, n_containers: int, *extra: str, script: str = __file__):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, script, "--serve", str(self.port), str(n_containers), *extra]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("the ecovisor exited on start")
                time.sleep(0.1)
        raise RuntimeError("the ecovisor did not start")

    def __exit__(self, *exc) -> None:
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def cpu_s(self) -> float:
        """The server process's user + system CPU time so far."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- a small HTTP/1.1 client
class Conn:
    def __init__(self, port: int):
        self.port = port
        self.r: asyncio.StreamReader
        self.w: asyncio.StreamWriter

    async def open(self) -> "Conn":
        self.r, self.w = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def call(self, method: str, path: str, token: str, body: dict | None = None) -> tuple[int, bytes]:
        data = b"" if body is None else json.dumps(body).encode()
        head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode()
        self.w.write(head + data)
        status_line = await self.r.readline()
        length = 0
        while True:
            line = await self.r.readline()
            if line in (b"\r\n", b""):
                break
            k, _, v = line.decode().partition(":")
            if k.lower() == "content-length":
                length = int(v)
        payload = await self.r.readexactly(length) if length else b""
        return int(status_line.split()[1]), payload

    def close(self) -> None:
        self.w.close()


async def _register(port: int, n_containers: int) -> str:
    c = await Conn(port).open()
    status, body = await c.call("POST", "/v1/apps", ADMIN, {
        "name": "bench", "grid_kw": 10.0, "containers": [f"c-{i:05d}" for i in range(n_containers)]})
    c.close()
    if status != 201:
        raise RuntimeError(f"registration failed: {status} {body[:200]!r}")
    return json.loads(body)["token"]


async def _fire(port: int, token: str, jobs: list[tuple[str, str, dict | None]], connections: int,
                rate: float | None = None) -> list[float]:
    """Run ``jobs`` over ``connections`` connections; returns each request's latency (s). Without ``rate``, each
    connection sends its next request as soon as the previous answer is in (closed loop: the latency is then
    connections / throughput by construction); with ``rate``, request i is due at i / rate s, and its latency
    counts from when it was due (open loop, no coordinated omission)."""
    conns = [await Conn(port).open() for _ in range(connections)]
    it = iter(enumerate(jobs))
    lat: list[float] = []
    bad: list[tuple[int, bytes]] = []
    start = time.perf_counter()

    async def worker(c: Conn) -> None:
        for i, (method, path, body) in it:
            t0 = time.perf_counter()
            if rate is not None:
                due = start + i / rate
                if due > t0:
                    await asyncio.sleep(due - t0)
                t0 = due
            status, payload = await c.call(method, path, token, body)
            lat.append(time.perf_counter() - t0)
            if status >= 300:
                bad.append((status, payload[:200]))

    await asyncio.gather(*(worker(c) for c in conns))
    for c in conns:
        c.close()
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed, e.g. {bad[0]}")
    return lat


def _jobs(route: str, n: int, n_containers: int, rng: random.Random) -> list[tuple[str, str, dict | None]]:
    out: list[tuple[str, str, dict | None]] = []
    for i in range(n):
        c = f"c-{rng.randrange(n_containers):05d}"
        if route == "put" or (route == "mix" and i % 2 == 0):
            out.append(("PUT", f"/v1/containers/{c}/powercap", {"kw": round(rng.uniform(0.1, 0.5), 4)}))
        else:
            out.append(("GET", f"/v1/containers/{c}", None))
    return out


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def throughput(args) -> dict:
    rng = random.Random(0)
    with Server(args.containers) as srv:
        token = asyncio.run(_register(srv.port, args.containers))
        asyncio.run(_fire(srv.port, token, _jobs(args.route, min(2000, args.requests), args.containers, rng),
                          args.connections))  # warm-up
        cpu0, t0 = srv.cpu_s(), time.perf_counter()
        lat = asyncio.run(_fire(srv.port, token, _jobs(args.route, args.requests, args.containers, rng),
                                args.connections, args.rate))
        wall, cpu = time.perf_counter() - t0, srv.cpu_s() - cpu0
    return {"req_s": len(lat) / wall, "p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3,
            "server_cpu_ms_per_req": cpu / len(lat) * 1e3, "wall_s": wall}


def set_all_caps(n_containers: int, connections: int) -> dict:
    """Every container's cap set once: one PUT per container over ``connections`` connections, then (new caps) in
    one bulk ``PUT /v1/containers/powercaps``; wall seconds and the server's CPU seconds of each, and the server's
    CPU per single-cap PUT (flat in the number of containers when a cap change is O(1))."""
    rng = random.Random(1)
    with Server(n_containers) as srv:
        token = asyncio.run(_register(srv.port, n_containers))
        jobs: list[tuple[str, str, dict | None]] = [
            ("PUT", f"/v1/containers/c-{i:05d}/powercap", {"kw": round(rng.uniform(0.1, 0.5), 4)})
            for i in range(n_containers)]
        cpu0, t0 = srv.cpu_s(), time.perf_counter()
        asyncio.run(_fire(srv.port, token, jobs, connections))
        single_s, single_cpu = time.perf_counter() - t0, srv.cpu_s() - cpu0
        body = {"caps": [{"name": f"c-{i:05d}", "kw": round(rng.uniform(0.1, 0.5), 4)} for i in range(n_containers)]}
        cpu0, t0 = srv.cpu_s(), time.perf_counter()
        asyncio.run(_fire(srv.port, token, [("PUT", "/v1/containers/powercaps", body)], 1))
        bulk_s, bulk_cpu = time.perf_counter() - t0, srv.cpu_s() - cpu0
    return {"single_s": single_s, "single_cpu_s": single_cpu, "bulk_s": bulk_s, "bulk_cpu_s": bulk_cpu,
            "cpu_ms_per_put": single_cpu / n_containers * 1e3}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        serve(int(sys.argv[2]), int(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--route", choices=("put", "get", "mix"), default="put")
    ap.add_argument("--containers", type=int, default=250)
    ap.add_argument("--caps-sizes", type=int, nargs="*", default=[250, 1000, 2000])
    ap.add_argument("--rate", type=float, default=None,
                    help="open loop: send this many requests per second in all (default: closed loop, flat out)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--http", choices=("auto", "h11"), default="auto",
                    help="the server's HTTP stack: auto (httptools + uvloop when installed) or h11 + asyncio")
    args = ap.parse_args()
    if not (1 <= args.requests <= 1_000_000 and 1 <= args.connections <= 1000):
        ap.error("--requests in [1, 1e6], --connections in [1, 1000]")
    if args.rate is not None and not 1 <= args.rate <= 100_000:
        ap.error("--rate in [1, 1e5]")

    os.environ["ECOVISOR_BENCH_HTTP"] = args.http  # read by the server child
    runs = [throughput(args) for _ in range(args.repeat)]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    mode = f"open loop at {args.rate:g} req/s" if args.rate else "closed loop"
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"throughput: {args.requests} x {args.route} over {args.connections} connections ({mode}), "
          f"{args.containers} containers, HTTP stack {args.http}, median of {args.repeat}:")
    print(f"  {med['req_s']:,.0f} req/s   p50 {med['p50_ms']:.1f} ms   p99 {med['p99_ms']:.1f} ms   "
          f"server CPU {med['server_cpu_ms_per_req']:.2f} ms/request")
    for r in runs:
        print(f"    run: {r['req_s']:,.0f} req/s, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
              f"{r['server_cpu_ms_per_req']:.2f} ms CPU/req")
    for n in args.caps_sizes:
        rs = [set_all_caps(n, args.connections) for _ in range(args.repeat)]
        m = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        singles = ", ".join(f"{r['single_s']:.2f}" for r in rs)
        bulks = ", ".join(f"{r['bulk_s']:.3f}" for r in rs)
        print(f"set all caps, {n:>5} containers in one app: one PUT each {m['single_s']:.2f} s "
              f"(server CPU {m['single_cpu_s']:.2f} s, {m['cpu_ms_per_put']:.2f} ms per PUT; walls "
              f"{singles}); one bulk PUT {m['bulk_s']:.3f} s "
              f"(server CPU {m['bulk_cpu_s']:.2f} s; walls {bulks}); "
              f"median of {args.repeat}")


if __name__ == "__main__":
    main()
