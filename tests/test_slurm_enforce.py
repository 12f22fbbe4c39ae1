"""Issue 15: the agent enforces VCCs where work is admitted, through a REAL Slurm (Debian's slurmctld, slurmd and
munge, one node declaring 64 CPUs; .ci/setup-slurm starts it in a temporary folder for the session and stops it
after). Real jobs (``sbatch -p flex --wrap 'sleep N'``), real partition limits (``MaxCPUsPerNode``), the agent's
store and audit as in production. An hour of the agent's clock is a few wall seconds where the loop runs.

Skips only when Slurm's binaries are absent and CICM_REQUIRE_SLURM is unset (``.ci/setup-slurm`` installs them;
scripts/test runs it)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cicm.data.store import Store
from cicm.enforce.cli import build_agent
from cicm.enforce.clock import CompressedClock, SimulatedClock
from cicm.enforce.slurm import (SlurmBacklogSource, SlurmClient, SlurmError, SlurmUnavailable, parse_partition_line,
                                parse_squeue_text)

REPO = Path(__file__).resolve().parent.parent
SETUP = REPO / ".ci" / "setup-slurm"
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel")
CPUS = 64
CLUSTER = "sj-a"
CAPACITY = 102400.0
PER_CPU = CAPACITY / CPUS  # 1,600 cluster cores per Slurm CPU: the partition is the cluster in miniature
START = pd.Timestamp("2022-06-14T07:00:00Z")
PLAN_DATE = date(2022, 6, 14)
H = pd.Timedelta(hours=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Slurm:
    def __init__(self, folder: Path, start_s: float):
        self.folder = folder
        self.conf = folder / "slurm.conf"
        self.start_s = start_s
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.client = SlurmClient(self.conf)

    def run(self, *args: str) -> str:
        r = subprocess.run(list(args), capture_output=True, text=True, env=self.env, timeout=30)
        assert r.returncode == 0, f"{' '.join(args)}: {r.stderr}"
        return r.stdout

    def sbatch(self, partition: str, cpus: int, seconds: int = 60, limit_min: int | None = None,
               deadline: str | None = None) -> int:
        args = ["sbatch", "--parsable", "-p", partition, "-c", str(cpus), "-o", "/dev/null"]
        if limit_min is not None:
            args += ["-t", str(limit_min)]
        if deadline is not None:
            args += ["--deadline", deadline]
        return int(self.run(*args, "--wrap", f"sleep {seconds}").strip().split(";")[0])

    def states(self) -> dict[int, tuple[str, str]]:
        out = self.run("squeue", "-h", "-o", "%i|%T|%r")
        return {int(a): (b, c) for a, b, c in (line.split("|") for line in out.splitlines() if line)}

    def running_cpus(self, partition: str) -> int:
        out = self.run("squeue", "-h", "-p", partition, "-t", "R", "-o", "%C")
        return sum(int(x) for x in out.split())

    def limit(self, partition: str) -> int | None:
        return parse_partition_line(self.run("scontrol", "show", "partition", partition, "-o")).max_cpus_per_node

    def reset(self) -> None:
        ids = self.run("squeue", "-h", "-o", "%i").split()
        if ids:
            self.run("scancel", *ids)
        wait_for(lambda: not self.run("squeue", "-h", "-o", "%i").split(), 15, "jobs cancelled")
        for p in ("flex", "prod"):
            self.run("scontrol", "update", f"PartitionName={p}", "MaxCPUsPerNode=UNLIMITED")


def wait_for(pred, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout:g} s: {what}")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    missing = [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if missing:
        why = f"Slurm is not installed here (no {', '.join(missing)}); run .ci/setup-slurm"
        if os.environ.get("CICM_REQUIRE_SLURM"):
            pytest.fail(why + " (CICM_REQUIRE_SLURM is set)")
        pytest.skip(why)
    folder = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "CICM_SLURM_CTLD_PORT": str(_free_port()), "CICM_SLURM_SLURMD_PORT": str(_free_port())}
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(SETUP), "start", str(folder), str(CPUS)], capture_output=True, text=True,
                       env=env, timeout=120)
    started = time.monotonic() - t0
    try:
        assert r.returncode == 0, f".ci/setup-slurm start failed: {r.stderr}"
        assert f"SLURM_CONF={folder}/slurm.conf" in r.stdout
        yield Slurm(folder, started)
    finally:
        subprocess.run(["bash", str(SETUP), "stop", str(folder)], capture_output=True, text=True, timeout=60)


@pytest.fixture
def cluster(slurm):
    slurm.reset()
    yield slurm
    slurm.reset()


def write_plan(db: Path, flex_cpus: list[float], status: str = "shaped", reason: str | None = None,
               program: str = "ceiling", start: pd.Timestamp = START) -> None:
    """A day's plan for sj-a whose flexible allowance is ``flex_cpus`` Slurm CPUs per hour (× 1,600 cluster cores)."""
    plan_date = start.date() if start != START else PLAN_DATE
    hours = pd.date_range(start, periods=24, freq="h", name="hour")
    flex = np.array((flex_cpus + [flex_cpus[-1]] * 24)[:24], float) * PER_CPU
    infl = np.full(24, 40000.0)
    vccs = pd.DataFrame({
        "plan_date": plan_date, "cluster": CLUSTER, "hour": hours, "hour_index": np.arange(24),
        "vcc_cores": (infl * 1.1 + flex) * 1.35, "flexible_cpu_cores": flex, "inflexible_cpu_cores": infl,
        "power_kw": 150.0, "carbon_kgco2": 40.0, "gco2_per_kwh": 300.0})
    st = pd.DataFrame([{
        "plan_date": plan_date, "cluster": CLUSTER, "campus": "ca-sj", "status": status, "reason": reason,
        "capacity_cores": CAPACITY, "theta_core_hours": 2.5e6, "tau_core_hours": float(flex.sum()),
        "expected_kgco2": 900.0, "flat_kgco2": 950.0, "saving_pct": 5.0, "peak_kw": 190.0}])
    with Store(db) as store, store.run("plan", {"program": program}, plan_date=plan_date) as run:
        store.replace_plan(plan_date, vccs, st, run.run_id)


def make_agent(slurm: Slurm, db: Path, clock, **overrides):
    options = dict(cluster=CLUSTER, ecovisor=None, token=None, db=db, plan_file=None, audit_file=None, fleet=None,
                   flexible=[], flexible_pattern="batch-*", cluster_cores_per_core=None, on_missing_plan="lift",
                   max_plan_age_hours=None, battery=False, battery_hours=4, retry_base_s=5.0, retry_max_s=300.0,
                   reconcile_every_s=3600.0, clock=clock, correction=False, enforce="slurm", slurm_partition="flex",
                   slurm_inflexible=["prod"], slurm_conf=slurm.conf, slurm_deadline_slack_s=60.0)
    options.update(overrides)
    return build_agent(**options)


def actions(db: Path) -> pd.DataFrame:
    with Store(db, read_only=True) as store:
        return store.query("SELECT * FROM agent_actions ORDER BY acted_at")


# ------------------------------------------------------------------------------------------------ tests


def test_setup_started_a_one_node_cluster_fast(slurm):
    info = slurm.client.partitions()
    assert info["flex"].total_cpus == CPUS and info["flex"].total_nodes == 1
    assert info["prod"].priority_tier > info["flex"].priority_tier  # a held flex job never blocks prod
    assert slurm.start_s < 15.0, f".ci/setup-slurm start took {slurm.start_s:.1f} s"
    print(f"\nslurm: munged + slurmctld + slurmd up, node idle, in {slurm.start_s:.2f} s")


def test_a_low_limit_holds_flexible_jobs_and_raising_it_starts_them(cluster, db_path):
    write_plan(db_path, [4, 16])  # 4 CPUs (6,400 cluster cores) in hour 0, 16 in hour 1
    clock = SimulatedClock(START)
    agent = make_agent(cluster, db_path, clock)
    out = agent.step()
    assert out.ok and out.mode == "shaped" and out.result == "applied"
    assert out.allowance_cores == 4 * PER_CPU
    assert cluster.limit("flex") == 4 and cluster.limit("prod") is None
    flex = out.caps["slurm:flex"]
    assert (flex["found"], flex["max_cpus_per_node"], flex["read_back"]) == (None, 4, 4)

    jobs = [cluster.sbatch("flex", 2, 60) for _ in range(4)]
    wait_for(lambda: cluster.running_cpus("flex") == 4, 10, "two flex jobs running")
    time.sleep(1.5)  # a few scheduling passes: the limit keeps the other two pending
    states = cluster.states()
    assert [states[j][0] for j in jobs] == ["RUNNING", "RUNNING", "PENDING", "PENDING"]
    assert cluster.running_cpus("flex") == 4

    clock.set(START + H)
    t0 = time.monotonic()
    out = agent.step()
    assert out.result == "applied" and cluster.limit("flex") == 16
    started = wait_for(lambda: cluster.running_cpus("flex") == 8, 10, "all four flex jobs running") + \
        (time.monotonic() - t0)
    assert started < 5.0
    print(f"\nslurm: raising MaxCPUsPerNode 4 -> 16 started the 2 pending jobs in {started:.2f} s (incl. the pass)")

    rows = actions(db_path)
    assert list(rows["result"]) == ["applied", "applied"]
    caps = [json.loads(c)["slurm:flex"] for c in rows["caps"]]
    assert [(c["found"], c["max_cpus_per_node"], c["read_back"]) for c in caps] == [(None, 4, 4), (4, 16, 16)]
    assert [c["pending_jobs"] for c in caps] == [0, 2]
    assert list(rows["flexible_allowance_cores"]) == [4 * PER_CPU, 16 * PER_CPU]
    assert "flex: MaxCPUsPerNode 4 -> 16 (plan)" in rows["detail"].iloc[1]


def test_inflexible_jobs_are_never_held(cluster, db_path):
    write_plan(db_path, [0])  # hold every flexible job
    cluster.run("scontrol", "update", "PartitionName=prod", "MaxCPUsPerNode=2")  # someone limited prod
    agent = make_agent(cluster, db_path, SimulatedClock(START))
    out = agent.step()
    assert cluster.limit("flex") == 0 and cluster.limit("prod") is None
    assert "prod: MaxCPUsPerNode 2 -> UNLIMITED (inflexible work is never limited)" in out.detail
    held = [cluster.sbatch("flex", 4, 60) for _ in range(3)]
    prod = cluster.sbatch("prod", 48, 60)
    t = wait_for(lambda: cluster.states()[prod][0] == "RUNNING", 10, "the prod job running")
    assert t < 5.0
    time.sleep(1.0)
    states = cluster.states()
    assert all(states[j] == ("PENDING", "PartitionConfig") for j in held), states
    assert agent.step().result == "unchanged"  # nothing to do: prod unlimited, flex at the plan
    print(f"\nslurm: a 48-CPU prod job started in {t:.2f} s with three flex jobs held at MaxCPUsPerNode=0")


def test_a_deadline_at_risk_job_is_released_whatever_the_plan_says(cluster, db_path):
    write_plan(db_path, [4])
    clock = CompressedClock(START, seconds_per_hour=4.0)  # the next pass is at most 4 wall seconds away
    agent = make_agent(cluster, db_path, clock)
    assert agent.step().ok and cluster.limit("flex") == 4
    running = [cluster.sbatch("flex", 2, 120) for _ in range(2)]
    wait_for(lambda: cluster.running_cpus("flex") == 4, 10, "the limit filled")
    plain = cluster.sbatch("flex", 2, 60)  # submitted first: ahead of the others in Slurm's FIFO
    later = cluster.sbatch("flex", 2, 60, limit_min=1, deadline="now+2hours")  # latest start in 1 h 59 min
    urgent = cluster.sbatch("flex", 2, 60, limit_min=1, deadline="now+100seconds")  # latest start in 40 s
    time.sleep(1.0)
    assert {j: cluster.states()[j][0] for j in (plain, later, urgent)} == dict.fromkeys((plain, later, urgent),
                                                                                         "PENDING")
    t0 = time.monotonic()
    out = agent.step()
    assert out.ok and out.result == "applied"
    assert [r.job_id for r in out.slurm.releases] == [urgent]
    assert cluster.limit("flex") == 6  # running 4 + the urgent job's 2, whatever the plan's 4 says
    wait_for(lambda: cluster.states()[urgent][0] == "RUNNING", 10, "the urgent job running")
    print(f"\nslurm: the deadline-at-risk job started {time.monotonic() - t0:.2f} s after the pass")
    time.sleep(1.0)
    states = cluster.states()
    assert states[plain][0] == "PENDING" and states[later][0] == "PENDING"
    assert out.deviation.reason == "deadline-release"
    assert (out.deviation.plan_cores, out.deviation.applied_cores) == (4 * PER_CPU, 6 * PER_CPU)
    assert f"deadline-release: job {urgent} (2 CPUs" in out.detail
    with Store(db_path, read_only=True) as store:
        dev = store.query("SELECT * FROM intraday_deviations")
    assert list(dev["reason"]) == ["deadline-release"]
    assert (dev["plan_cores"].iloc[0], dev["applied_cores"].iloc[0]) == (4 * PER_CPU, 6 * PER_CPU)

    back = agent.step()  # nothing at risk any more: the plan's limit again; the released job runs on
    assert back.slurm.releases == [] and cluster.limit("flex") == 4
    assert cluster.states()[urgent][0] == "RUNNING" and cluster.states()[later][0] == "PENDING"


def test_a_compressed_day_holds_and_releases_by_the_hour_and_the_limit_dies_with_the_agent(cluster, db_path):
    write_plan(db_path, [0, 0, 8, 16])  # hold, hold, 8 CPUs, 16
    clock = CompressedClock(START, seconds_per_hour=2.5)
    stop = threading.Event()
    clock.stop = stop
    agent = make_agent(cluster, db_path, clock)
    seen: dict[int, int] = {}
    worker = threading.Thread(target=agent.run, kwargs={"stop": stop})
    worker.start()
    try:
        wait_for(lambda: len(agent.passes) >= 1, 10, "hour 0's pass")  # then the work arrives
        jobs = [cluster.sbatch("flex", 4, 60) for _ in range(4)]
        while clock.now() < START + 3.9 * H:
            h = int((clock.now() - START) / H)
            seen[h] = max(seen.get(h, 0), cluster.running_cpus("flex"))
            time.sleep(0.1)
    finally:
        stop.set()
        worker.join(20)
    shut = agent.shutdown()
    assert seen[0] == 0 and seen[1] == 0, seen  # held in the dirty hours (MaxCPUsPerNode=0)
    assert seen[2] == 8, seen  # two of the four 4-CPU jobs in hour 2
    assert seen[3] == 16, seen  # all four in hour 3
    assert [p.hour for p in agent.passes[:4]] == [START + i * H for i in range(4)]
    assert shut is not None and shut.reason.startswith("agent-stopping") and cluster.limit("flex") is None
    rows = actions(db_path)
    assert [json.loads(c)["slurm:flex"]["max_cpus_per_node"] for c in rows["caps"].iloc[:4]] == [0, 0, 8, 16]
    assert rows["reason"].iloc[-1].startswith("agent-stopping")
    assert all(cluster.states()[j][0] == "RUNNING" for j in jobs)


def test_missing_stale_and_fallback_plans_lift_the_limit(cluster, db_path):
    write_plan(db_path, [4])
    clock = SimulatedClock(START)
    agent = make_agent(cluster, db_path, clock)
    agent.step()
    assert cluster.limit("flex") == 4
    clock.set(START + 25 * H)  # no plan covers the next day: stale
    out = agent.step()
    assert out.mode == "lift" and out.reason.startswith("stale-plan") and cluster.limit("flex") is None
    clock.set(START)
    agent.step()
    assert cluster.limit("flex") == 4
    write_plan(db_path, [4], status="fallback", reason="solver-failed: test")
    out = agent.step()
    assert out.mode == "lift" and out.reason == "fallback-plan: solver-failed: test"
    assert cluster.limit("flex") is None
    keep = make_agent(cluster, tmp_missing := db_path.with_name("none.duckdb"), SimulatedClock(START),
                      on_missing_plan="keep", audit_file=db_path.with_name("keep.jsonl"))
    cluster.run("scontrol", "update", "PartitionName=flex", "MaxCPUsPerNode=2")
    kept = keep.step()
    assert not tmp_missing.exists() and kept.mode == "keep" and cluster.limit("flex") == 2
    lifted = make_agent(cluster, tmp_missing, SimulatedClock(START), audit_file=db_path.with_name("lift.jsonl")).step()
    assert lifted.mode == "lift" and "is missing" in lifted.reason and cluster.limit("flex") is None


def test_an_unreachable_slurmctld_is_retried_with_backoff_and_the_audit_says_what_stays(cluster, db_path, tmp_path):
    write_plan(db_path, [4, 16])
    dead = tmp_path / "dead.conf"  # the same cluster, a port nobody listens on
    text = cluster.conf.read_text()
    dead.write_text("\n".join(f"SlurmctldPort={_free_port()}" if line.startswith("SlurmctldPort=") else line
                              for line in text.splitlines()) + "\nMessageTimeout=2\n")
    slept: list[pd.Timestamp] = []
    stop = threading.Event()

    def on_sleep(t):
        slept.append(t)
        if len(slept) == 1:  # after hour 0's pass, slurmctld becomes unreachable
            agent.slurm.client.conf = dead
        if len(slept) == 5:  # and comes back
            agent.slurm.client.conf = cluster.conf
        if len(slept) >= 6:
            stop.set()

    clock = SimulatedClock(START + H - pd.Timedelta(seconds=30), on_sleep=on_sleep)
    clock.set(START + H - pd.Timedelta(seconds=30))  # hour 0, 30 s before hour 1
    agent = make_agent(cluster, db_path, clock, retry_base_s=5.0, retry_max_s=40.0)
    agent.run(stop=stop)
    passes = agent.passes
    assert passes[0].ok and passes[0].hour == START
    failed = [p for p in passes if not p.ok]
    assert len(failed) == 4 and all(p.result == "failed" for p in failed)
    assert all("slurmctld unreachable" in p.detail for p in failed)
    gaps = [(b.acted_at - a.acted_at).total_seconds() for a, b in zip(passes, passes[1:])]
    assert gaps[:5] == [30.0, 5.0, 10.0, 20.0, 40.0]  # the hour boundary, then back-off 5, 10, 20, 40 (the cap)
    in_hour_1 = [p for p in failed if p.hour == START + H]
    assert in_hour_1 and all("LOWER LIMIT STAYS IN PLACE" in p.detail and "4 per node" in p.detail
                             and "the plan now allows 16" in p.detail for p in in_hour_1)
    assert passes[-1].ok and cluster.limit("flex") == 16  # back: the plan's limit at the first answer
    rows = actions(db_path)
    assert list(rows["result"]) == ["applied", "failed", "failed", "failed", "failed", "applied"]


def test_a_restarted_agent_reconciles_with_the_limit_it_finds(cluster, db_path):
    write_plan(db_path, [4, 16])
    first = make_agent(cluster, db_path, SimulatedClock(START + pd.Timedelta(minutes=10)))
    assert first.step().result == "applied"
    again = make_agent(cluster, db_path, SimulatedClock(START + pd.Timedelta(minutes=40)))
    out = again.step()
    assert out.result == "unchanged" and again.slurm.client.writes == []
    assert out.caps["slurm:flex"]["found"] == 4 and cluster.limit("flex") == 4
    cluster.run("scontrol", "update", "PartitionName=flex", "MaxCPUsPerNode=30")  # someone changed it
    fixed = again.step()
    assert fixed.result == "applied" and "flex: MaxCPUsPerNode 30 -> 4 (plan)" in fixed.detail
    assert again.slurm.client.writes == ["flex.MaxCPUsPerNode=4"]
    assert len(set(actions(db_path)["run_id"])) == 2


def test_the_queue_as_telemetry_json_and_text_agree(cluster):
    cluster.run("scontrol", "update", "PartitionName=flex", "MaxCPUsPerNode=2")
    run = cluster.sbatch("flex", 2, 300, limit_min=10)
    wait_for(lambda: cluster.states()[run][0] == "RUNNING", 10, "the first job running")
    pend = cluster.sbatch("flex", 4, 60, limit_min=30)
    due = cluster.sbatch("flex", 8, 60, limit_min=60, deadline="now+3hours")
    cluster.sbatch("prod", 1, 60)  # another partition: not flexible work
    by_json = {j.job_id: j for j in SlurmClient(cluster.conf).jobs("flex")}
    by_text = {j.job_id: j for j in SlurmClient(cluster.conf, use_json=False).jobs("flex")}
    assert set(by_json) == set(by_text) == {run, pend, due}
    for jid in by_json:
        a, b = by_json[jid], by_text[jid]
        assert (a.state, a.cpus, a.time_limit_s, a.deadline) == (b.state, b.cpus, b.time_limit_s, b.deadline)
        assert abs((a.submit - b.submit).total_seconds()) < 1.5
    assert by_json[due].deadline is not None
    assert abs((by_json[due].deadline - pd.Timestamp.now(tz="UTC")).total_seconds() - 3 * 3600) < 60

    items = SlurmBacklogSource(SlurmClient(cluster.conf), "flex", capacity_cores=CAPACITY).items(
        pd.Timestamp.now(tz="UTC"))
    got = sorted((i.width_cores, round(i.remaining_core_hours)) for i in items)
    assert got[0][0] == 2 * PER_CPU and got[0][1] == pytest.approx(2 * PER_CPU * 10 / 60, rel=0.02)  # running
    assert got[1] == (4 * PER_CPU, round(4 * PER_CPU * 0.5))  # pending: its whole 30 min
    assert got[2] == (8 * PER_CPU, 8 * PER_CPU)  # 1 h
    deadline = {i.width_cores: i.deadline for i in items}
    assert deadline[8 * PER_CPU] == by_json[due].deadline
    assert deadline[4 * PER_CPU] == by_json[pend].submit + pd.Timedelta(hours=24)


def test_the_hourly_correction_reads_slurms_queue(cluster, db_path):
    """A queue plan that holds flexible work for 4 h, and a 16-CPU job in Slurm's queue due in 90 minutes: the
    correction (fed by the queue, not the usage history) releases it above the plan, and Slurm starts it."""
    try:
        from tests.test_enforce_agent import write_queue_plan, write_usage
    except ImportError:
        from test_enforce_agent import write_queue_plan, write_usage
    write_queue_plan(db_path)  # 0 cluster cores in hours 0-3, capacity 102,400
    write_usage(db_path, START - pd.Timedelta(days=35), START, 1000.0, 1000.0)  # steady: no backlog of its own
    clock = CompressedClock(START, seconds_per_hour=3600.0)  # agent time = wall time, from the plan's day
    agent = make_agent(cluster, db_path, clock, correction=True)
    agent.slurm.config.release_deadlines = False  # the correction alone decides here
    cluster.run("scontrol", "update", "PartitionName=flex", "MaxCPUsPerNode=0")  # held, as the plan's 0 says
    job = cluster.sbatch("flex", 16, 60, limit_min=60, deadline="now+90minutes")
    time.sleep(0.5)
    assert cluster.states()[job] == ("PENDING", "PartitionConfig")
    out = agent.step()
    assert out.ok and out.plan.program == "queue" and out.plan_allowance_cores == 0.0
    assert out.correction is not None and out.deviation.reason == "deadline-release"
    assert out.allowance_cores == pytest.approx(16 * PER_CPU, rel=1e-3)  # the job's 25,600 core-hours, this hour
    assert "hourly correction deadline-release: 0 -> 25,6" in out.detail
    assert cluster.limit("flex") == 16  # rounded up, not down to 15: the release is for a 16-CPU job
    assert "flex: MaxCPUsPerNode 0 -> 16 (hourly correction deadline-release)" in out.detail
    wait_for(lambda: cluster.states()[job][0] == "RUNNING", 10, "the job the correction released")


def test_the_command_line_agent_enforces_through_slurm_and_lifts_when_stopped(cluster, db_path):
    """``cicm agent run --enforce slurm`` (the console script, wall clock, no ecovisor and no token): one pass
    applies the hour's limit; the looping agent, stopped by SIGTERM, lifts it and audits why."""
    import signal
    import sys

    now = pd.Timestamp.now(tz="UTC").floor("h")
    write_plan(db_path, [4], start=now)
    cicm = str(Path(sys.executable).with_name("cicm"))
    env = {k: v for k, v in os.environ.items() if k != "CICM_ECOVISOR_TOKEN"}
    args = [cicm, "agent", "run", "--cluster", CLUSTER, "--enforce", "slurm", "--slurm-conf", str(cluster.conf),
            "--slurm-inflexible", "prod", "--db", str(db_path), "--no-correction"]
    once = subprocess.run([*args, "--once"], capture_output=True, text=True, env=env, timeout=120)
    assert once.returncode == 0, once.stderr
    assert "shaped allowance 6,400 cores: applied" in once.stdout
    assert cluster.limit("flex") == 4
    loop = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for(lambda: len(actions(db_path)) >= 2, 60, "the looping agent's first pass")
    finally:
        loop.send_signal(signal.SIGTERM)
        out, err = loop.communicate(timeout=60)
    assert loop.returncode == 0, err
    assert cluster.limit("flex") is None
    rows = actions(db_path)
    assert list(rows["result"]) == ["applied", "unchanged", "applied"]
    assert rows["reason"].iloc[-1] == "agent-stopping: no limit outlives its agent"
    assert "flex: MaxCPUsPerNode 4 -> UNLIMITED (agent stopping)" in rows["detail"].iloc[-1]


def test_squeue_text_and_partition_parsing_units(monkeypatch):
    p = parse_partition_line("PartitionName=flex AllowGroups=ALL MaxCPUsPerNode=12 Nodes=n[1-4] PriorityTier=1 "
                             "State=UP TotalCPUs=256 TotalNodes=4")
    assert (p.max_cpus_per_node, p.total_cpus, p.total_nodes, p.cpus_per_node) == (12, 256, 4, 64.0)
    jobs = parse_squeue_text("7|flex|PENDING|8|2026-12-05T12:00:00|N/A|N/A|1-02:03:04|100|Resources|normal\n")
    assert jobs[0].time_limit_s == 93784.0 and jobs[0].cpus == 8 and jobs[0].pending
    with pytest.raises(SlurmError):
        parse_squeue_text("7|flex|PENDING\n")
    monkeypatch.setenv("PATH", "/nonexistent")  # no client commands: unavailable (retried), not a crash
    with pytest.raises(SlurmUnavailable, match="scontrol: not installed"):
        SlurmClient().partitions()
    assert issubclass(SlurmUnavailable, SlurmError)


class FakeSlurm(SlurmClient):
    """Slurm's answers without Slurm: a 4-node flexible partition (256 CPUs) and a given queue."""

    def __init__(self, jobs, limit=None):
        super().__init__(None)
        self._jobs = jobs
        self._limit = limit
        self.down = False

    def partitions(self):
        if self.down:
            raise SlurmUnavailable("slurmctld unreachable (test)")
        line = (f"PartitionName=flex MaxCPUsPerNode={self._limit if self._limit is not None else 'UNLIMITED'} "
                "Nodes=n[1-4] PriorityTier=1 State=UP TotalCPUs=256 TotalNodes=4")
        return {"flex": parse_partition_line(line)}

    def set_max_cpus_per_node(self, name, value):
        self._limit = value
        self.writes.append(f"{name}.MaxCPUsPerNode={value}")

    def jobs(self, partition=None):
        return list(self._jobs)

    def set_priority(self, job_id, priority):
        self.writes.append(f"job {job_id}.Priority={priority}")


def _job(jid, state, cpus, *, limit_s=3600.0, deadline=None, priority=100):
    from cicm.enforce.slurm import SlurmJob

    now = pd.Timestamp("2026-12-05T12:00:00Z")
    return SlurmJob(jid, "flex", state, cpus, now - pd.Timedelta(minutes=5), None, None, limit_s, deadline,
                    priority, "Resources")


def test_multi_node_limits_round_down_and_deadline_releases_count_per_node():
    from cicm.enforce.slurm import SlurmAdmission, SlurmConfig

    now = pd.Timestamp("2026-12-05T12:00:00Z")
    urgent = _job(9, "PENDING", 8, limit_s=1800.0, deadline=now + pd.Timedelta(minutes=35), priority=50)
    queue = [_job(1, "RUNNING", 20), _job(2, "RUNNING", 20), _job(3, "PENDING", 4, priority=120), urgent]
    client = FakeSlurm(queue)
    adm = SlurmAdmission(client, SlurmConfig(deadline_slack_s=60.0))
    # 20,000 cluster cores at 400 per CPU (102,400 / 256) = 50 CPUs over 4 nodes: 12 per node (48 <= 50)
    out = adm.apply(mode="shaped", allowance_cores=20000.0, capacity_cores=CAPACITY, now=now, horizon_s=0.0,
                    reason=None)
    assert out.scale == 400.0 and out.plan_limit_per_node == 12
    assert out.limit_per_node == 12 and out.releases == []  # latest start 12:05, after the next pass + 60 s
    # the urgent job must start by 12:05; with the next pass 10 minutes away it is at risk
    out = adm.apply(mode="shaped", allowance_cores=20000.0, capacity_cores=CAPACITY, now=now, horizon_s=600.0,
                    reason=None)
    assert [r.job_id for r in out.releases] == [9]
    assert out.limit_per_node == 10 + 8 > 12  # ceil(40 running / 4 nodes) + the job's 8 CPUs
    assert client.writes[-2:] == ["job 9.Priority=121", "flex.MaxCPUsPerNode=18"]  # above job 3's 120
    assert out.released_above_plan_cpus == (18 - 12) * 4
    # slurmctld gone: the audit says the lower limit stays, and what the plan allows now
    client.down = True
    note = adm.stuck_note("lift", None, CAPACITY, 5.0, 300.0)
    assert "18 per node" in note and "allows UNLIMITED" in note and "LOWER LIMIT STAYS IN PLACE" in note
    assert "LOWER LIMIT" not in adm.stuck_note("shaped", 4000.0, CAPACITY, 5.0, 300.0)  # the plan wants less


def _job_record(cluster: Slurm, job: int) -> dict[str, str]:
    """``scontrol show job`` as key=value pairs (kept by slurmctld for MinJobAge after the job ends; no
    accounting database needed)."""
    out = cluster.run("scontrol", "show", "job", str(job), "-o")
    return dict(part.split("=", 1) for part in out.split() if "=" in part)


def test_done_when_a_compressed_day_keeps_the_dirty_block_under_the_plan_and_every_deadline(cluster, db_path):
    """Issue 15's "done when": a stream of flexible jobs arrives over a compressed day whose VCC has a dirty
    midday block (hours 2-4: 4 of 64 CPUs); the CPU-hours started in the block stay within the plan's limit for
    it, every job finishes before its deadline, and the audit holds every change of the limit."""
    limits = [16, 16, 4, 4, 4, 16]  # Slurm CPUs per hour; the plan keeps the last value for the rest of the day
    write_plan(db_path, limits)
    seconds_per_hour, job_seconds, cpus = 5.0, 5, 4  # a job runs one compressed hour
    clock = CompressedClock(START, seconds_per_hour=seconds_per_hour)
    stop = threading.Event()
    clock.stop = stop
    agent = make_agent(cluster, db_path, clock)
    worker = threading.Thread(target=agent.run, kwargs={"stop": stop})
    worker.start()
    jobs: list[int] = []
    first_running: dict[int, float] = {}  # job -> the agent hour (fractional) it was first seen running
    try:
        wait_for(lambda: len(agent.passes) >= 1, 10, "hour 0's pass")
        submitted_hours: set[int] = set()
        while True:
            now_h = (clock.now() - START) / H
            h = int(now_h)
            if h <= 5 and h not in submitted_hours:  # the stream: two jobs at the start of hours 0-5
                submitted_hours.add(h)
                jobs += [cluster.sbatch("flex", cpus, job_seconds, limit_min=1, deadline="now+180seconds")
                         for _ in range(2)]
            states = cluster.states()
            for j in jobs:
                if j not in first_running and states.get(j, ("",))[0] == "RUNNING":
                    first_running[j] = now_h
            if h >= 6 and all(j not in states for j in jobs):
                break
            assert now_h < 11, f"the jobs did not all finish in the compressed day: {states}"
            time.sleep(0.05)
    finally:
        stop.set()
        worker.join(30)
    agent.shutdown()

    assert len(jobs) == 12 and set(first_running) == set(jobs), first_running
    # the dirty block: CPU-hours of the jobs started in it within the plan's 4 CPUs x 3 hours
    block = [j for j, at in first_running.items() if 2.0 <= at < 5.0]
    started_cpu_hours = len(block) * cpus * job_seconds / seconds_per_hour
    assert started_cpu_hours <= sum(limits[2:5]), (started_cpu_hours, first_running)
    assert any(at >= 5.0 for at in first_running.values())  # the work the block held back ran after it
    # every job finished, before its deadline
    for j in jobs:
        record = _job_record(cluster, j)
        assert record["JobState"] == "COMPLETED", record
        assert pd.Timestamp(record["EndTime"]) <= pd.Timestamp(record["Deadline"]), record
    # the audit trail: every hour's pass applied the plan's limit, and each change is a row
    rows = actions(db_path)
    shaped = rows[rows["mode"] == "shaped"]  # applied, or found already right (result "unchanged")
    per_hour = shaped.groupby("hour")["caps"].last()
    limit = [json.loads(c)["slurm:flex"]["max_cpus_per_node"] for c in per_hour.iloc[:7]]
    found = [json.loads(c)["slurm:flex"]["found"] for c in per_hour.iloc[:7]]
    assert limit == [16, 16, 4, 4, 4, 16, 16], limit
    assert found[1:] == limit[:-1]  # each pass read back the limit the one before set: every change is audited
    assert rows["reason"].iloc[-1].startswith("agent-stopping") and cluster.limit("flex") is None
