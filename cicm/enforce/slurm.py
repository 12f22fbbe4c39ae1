"""Enforcement where work is admitted: the flexible work's admission limit in a Slurm partition.

The agent's other path (:mod:`cicm.enforce.agent` with ``--enforce ecovisor``) caps the power of flexible
containers. This one (``--enforce slurm``) turns the hour's flexible allowance into the limit of a Slurm
partition that holds the cluster's flexible work, so the scheduler admits no more flexible work than the plan
allows, and reads the scheduler's queue as telemetry.

- **Mechanism**: ``scontrol update PartitionName=<flex> MaxCPUsPerNode=<n>``. Slurm then allocates at most n
  CPUs per node to the partition's jobs: pending jobs beyond it wait (reason ``Resources``), and raising it
  starts them at the next scheduling pass (measured: well under a second here). Running jobs are never stopped:
  lowering the limit only stops admissions. ``MaxCPUsPerNode=0`` holds every job (reason ``PartitionConfig``);
  ``UNLIMITED`` is the full lift. It needs no accounting database (a QOS ``GrpTRES`` limit would need slurmdbd),
  and acts on the whole partition in one write instead of holding and releasing each job.
- **Inflexible partitions** (``inflexible_partitions``) are never limited: a limit found on one is lifted and
  audited. They must have a higher ``PriorityTier`` than the flexible partition on shared nodes, or a held
  flexible job (pending for ``Resources``) keeps the node for itself (measured: an inflexible job then waits,
  reason "Nodes required for job are DOWN, DRAINED or reserved for jobs in higher priority partitions"); the
  pass's detail says so when they do not.
- **Units**: the plan speaks in cluster cores; ``cluster_cores_per_cpu`` Slurm CPUs stand for them (default:
  the cluster's capacity over the partition's CPUs, i.e. the partition is the cluster in miniature). The limit
  per node is the allowance in CPUs over the partition's nodes, rounded down: never above the plan.
- **Deadlines**: a pending flexible job whose own deadline (``sbatch --deadline``) is at risk, i.e. whose latest
  start (deadline − time limit) falls before the agent's next pass plus ``deadline_slack_s``, is released
  whatever the plan says: the limit is raised to the running flexible CPUs plus the at-risk jobs' CPUs (per
  node) and those jobs get the partition's top priority so that they, not others, take the room. Audited per job.
- **Queue as telemetry**: :class:`SlurmBacklogSource` lists pending and running flexible jobs as
  :class:`cicm.enforce.correction.WorkItem` for the hourly correction.

Every call is a subprocess of Slurm's own client commands (``scontrol``, ``squeue``), with ``SLURM_CONF`` set
when a configuration file is given; a controller that cannot be reached raises :class:`SlurmUnavailable` (the
agent audits the pass as failed and retries with back-off).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cicm.enforce.correction import WorkItem

UNLIMITED = None  # MaxCPUsPerNode=UNLIMITED


class SlurmError(RuntimeError):
    """Slurm answered, but not as expected (an unknown partition, a refused update, a read-back mismatch)."""


class SlurmUnavailable(SlurmError):
    """slurmctld cannot be reached (connection refused, timeout) or the client commands are missing."""


_UNREACHABLE = ("unable to contact slurm controller", "connection refused", "socket timed out",
                "zero bytes were transmitted", "communication connection failure", "slurm_load_partitions: "
                "unable to contact", "slurmctld not responding", "connect failure")


@dataclass(frozen=True)
class PartitionInfo:
    name: str
    max_cpus_per_node: int | None  # None: UNLIMITED
    total_cpus: int
    total_nodes: int
    priority_tier: int
    state: str
    nodes: str

    @property
    def cpus_per_node(self) -> float:
        return self.total_cpus / max(self.total_nodes, 1)


@dataclass(frozen=True)
class SlurmJob:
    job_id: int
    partition: str
    state: str  # PENDING, RUNNING, ...
    cpus: int
    submit: pd.Timestamp
    start: pd.Timestamp | None
    end: pd.Timestamp | None
    time_limit_s: float | None  # None: no limit
    deadline: pd.Timestamp | None
    priority: int
    reason: str
    qos: str = ""

    @property
    def pending(self) -> bool:
        return self.state == "PENDING"

    @property
    def running(self) -> bool:
        return self.state in ("RUNNING", "CONFIGURING", "COMPLETING")

    @property
    def latest_start(self) -> pd.Timestamp | None:
        """The last time the job can start and still end by its deadline (None without a deadline)."""
        if self.deadline is None:
            return None
        return self.deadline - pd.Timedelta(seconds=self.time_limit_s or 0.0)


def _num(v: Any) -> float | None:
    """A Slurm JSON number: plain, or {"set": bool, "infinite": bool, "number": n} in later versions; None when
    unset, infinite or not a number."""
    if isinstance(v, dict):
        if not v.get("set", True) or v.get("infinite"):
            return None
        v = v.get("number")
    if v is None or isinstance(v, bool):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _ts(v: Any) -> pd.Timestamp | None:
    """Slurm JSON times: Unix seconds as a Slurm number (0: unset)."""
    n = _num(v)
    return pd.Timestamp(int(n), unit="s", tz="UTC") if n is not None and 0 < n < 2**62 else None


def _slurm_duration_s(text: str) -> float | None:
    """[days-]hours:minutes:seconds, minutes:seconds, or UNLIMITED/INVALID/NOT_SET -> None."""
    text = text.strip()
    if not text or not text[0].isdigit():
        return None
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    parts = [int(p) for p in text.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    h, m, s = parts[-3:]
    return float(days * 86400 + h * 3600 + m * 60 + s)


def _text_time(text: str) -> pd.Timestamp | None:
    """squeue's local ISO times (2026-12-05T12:32:13), N/A, Unknown, None -> UTC or None."""
    text = text.strip()
    if not text or not text[0].isdigit():
        return None
    return pd.Timestamp(text).tz_localize(_local_zone()).tz_convert("UTC")


def _local_zone():
    from datetime import datetime

    return datetime.now().astimezone().tzinfo


def parse_partition_line(line: str) -> PartitionInfo:
    """One line of ``scontrol show partition -o`` (Key=Value pairs)."""
    fields = dict(re.findall(r"(\w+)=(\S*)", line))
    if "PartitionName" not in fields:
        raise SlurmError(f"not a partition record: {line[:200]!r}")
    mcpn = fields.get("MaxCPUsPerNode", "UNLIMITED")
    try:
        return PartitionInfo(
            name=fields["PartitionName"], max_cpus_per_node=None if mcpn == "UNLIMITED" else int(mcpn),
            total_cpus=int(fields.get("TotalCPUs", "0")), total_nodes=int(fields.get("TotalNodes", "0")),
            priority_tier=int(fields.get("PriorityTier", "1")), state=fields.get("State", ""),
            nodes=fields.get("Nodes", ""))
    except ValueError as exc:
        raise SlurmError(f"partition {fields['PartitionName']}: unreadable field ({exc})") from None


def parse_squeue_json(doc: dict) -> list[SlurmJob]:
    """The jobs of ``squeue --json`` (OpenAPI v0.0.38 and later shapes)."""
    jobs = []
    for j in doc.get("jobs") or []:
        state = j.get("job_state")
        if isinstance(state, list):  # later versions: a list of flags
            state = state[0] if state else ""
        limit_min = _num(j.get("time_limit"))
        jobs.append(SlurmJob(
            job_id=int(j["job_id"]), partition=str(j.get("partition") or ""), state=str(state or ""),
            cpus=int(_num(j.get("cpus")) or 0), submit=_ts(j.get("submit_time")) or pd.Timestamp(0, tz="UTC"),
            start=_ts(j.get("start_time")), end=_ts(j.get("end_time")),
            time_limit_s=None if limit_min is None or limit_min <= 0 else limit_min * 60.0,
            deadline=_ts(j.get("deadline")), priority=int(_num(j.get("priority")) or 0),
            reason=str(j.get("state_reason") or ""), qos=str(j.get("qos") or "")))
    return jobs


SQUEUE_FORMAT = "%i|%P|%T|%C|%V|%S|%e|%l|%Q|%r|%q"  # %V submit, %S start, %e end, %l time limit, %Q priority


def parse_squeue_text(text: str, deadlines: dict[int, pd.Timestamp | None] | None = None) -> list[SlurmJob]:
    """``squeue -h -o SQUEUE_FORMAT`` (the fallback where ``--json`` is unavailable; -o has no deadline field,
    so ``deadlines`` comes from ``scontrol show job -o``)."""
    jobs = []
    for line in text.splitlines():
        if not line.strip():
            continue
        p = line.split("|")
        if len(p) < 11:
            raise SlurmError(f"squeue line with {len(p)} fields: {line[:200]!r}")
        jid = int(p[0].split("_")[0])
        running = p[2] in ("RUNNING", "COMPLETING", "CONFIGURING")
        jobs.append(SlurmJob(
            job_id=jid, partition=p[1], state=p[2], cpus=int(p[3]), submit=_text_time(p[4]) or pd.Timestamp(0, tz="UTC"),
            start=_text_time(p[5]) if running else None, end=_text_time(p[6]) if running else None,
            time_limit_s=_slurm_duration_s(p[7]), deadline=(deadlines or {}).get(jid), priority=int(p[8]),
            reason=p[9], qos=p[10]))
    return jobs


class SlurmClient:
    """Slurm's client commands as calls. ``conf``: the slurm.conf to use (``SLURM_CONF``); None: the default.
    ``writes`` lists every update this client made (for tests and the audit)."""

    def __init__(self, conf: Path | str | None = None, timeout_s: float = 20.0, use_json: bool = True):
        self.conf = Path(conf) if conf else None
        self.timeout_s = timeout_s
        self.use_json = use_json
        self.writes: list[str] = []

    def describe(self) -> str:
        return f"Slurm ({self.conf or os.environ.get('SLURM_CONF') or 'default slurm.conf'})"

    def _run(self, args: list[str]) -> str:
        exe = shutil.which(args[0])
        if exe is None:
            raise SlurmUnavailable(f"{args[0]}: not installed (Slurm's client commands are needed)")
        env = dict(os.environ)
        if self.conf is not None:
            env["SLURM_CONF"] = str(self.conf)
        try:
            r = subprocess.run([exe, *args[1:]], capture_output=True, text=True, timeout=self.timeout_s, env=env)
        except subprocess.TimeoutExpired as exc:
            raise SlurmUnavailable(f"{' '.join(args[:3])}: no answer in {self.timeout_s:g} s") from exc
        if r.returncode != 0:
            text = (r.stderr.strip() or r.stdout.strip() or f"exit {r.returncode}").splitlines()
            msg = "; ".join(text[:3])[:300]
            if any(t in msg.lower() for t in _UNREACHABLE):
                raise SlurmUnavailable(f"slurmctld unreachable ({' '.join(args[:3])}): {msg}")
            raise SlurmError(f"{' '.join(args[:3])}: {msg}")
        return r.stdout

    # ----------------------------------------------------------------------------------------------- partitions
    def partitions(self) -> dict[str, PartitionInfo]:
        out = self._run(["scontrol", "show", "partition", "-o"])
        parts = [parse_partition_line(line) for line in out.splitlines() if line.strip()]
        return {p.name: p for p in parts}

    def partition(self, name: str) -> PartitionInfo:
        found = self.partitions().get(name)
        if found is None:
            raise SlurmError(f"no partition {name!r} in {self.describe()}")
        return found

    def set_max_cpus_per_node(self, name: str, value: int | None) -> None:
        arg = "UNLIMITED" if value is None else str(int(value))
        self._run(["scontrol", "update", f"PartitionName={name}", f"MaxCPUsPerNode={arg}"])
        self.writes.append(f"{name}.MaxCPUsPerNode={arg}")

    # ----------------------------------------------------------------------------------------------- jobs
    def jobs(self, partition: str | None = None) -> list[SlurmJob]:
        """Pending and running jobs (of one partition, or all)."""
        args = ["squeue", "-t", "PENDING,RUNNING,CONFIGURING,COMPLETING"]
        if partition:
            args += ["-p", partition]
        if self.use_json:  # Slurm 22.05's squeue --json ignores -p and -t: filter here
            out = self._run([*args, "--json"])
            try:
                jobs = parse_squeue_json(json.loads(out))
            except (ValueError, KeyError, TypeError) as exc:
                raise SlurmError(f"squeue --json: unreadable answer ({exc})") from None
            return [j for j in jobs if (j.pending or j.running)
                    and (not partition or partition in j.partition.split(","))]
        jobs = parse_squeue_text(self._run([*args, "-h", "-o", SQUEUE_FORMAT]))
        deadlines = self._deadlines([j.job_id for j in jobs if j.pending])
        return [j if j.job_id not in deadlines else _with_deadline(j, deadlines[j.job_id]) for j in jobs]

    def _deadlines(self, ids: list[int]) -> dict[int, pd.Timestamp | None]:
        found: dict[int, pd.Timestamp | None] = {}
        for jid in ids:
            line = self._run(["scontrol", "show", "job", "-o", str(jid)])
            m = re.search(r"\bDeadline=(\S+)", line)
            found[jid] = _text_time(m.group(1)) if m else None
        return found

    def set_priority(self, job_id: int, priority: int) -> None:
        self._run(["scontrol", "update", f"JobId={job_id}", f"Priority={int(priority)}"])
        self.writes.append(f"job {job_id}.Priority={int(priority)}")


def _with_deadline(job: SlurmJob, deadline: pd.Timestamp | None) -> SlurmJob:
    from dataclasses import replace

    return replace(job, deadline=deadline)


# --------------------------------------------------------------------------------------------------- the adapter


@dataclass
class SlurmConfig:
    partition: str = "flex"  # the flexible work's partition: its MaxCPUsPerNode is the admission limit
    inflexible_partitions: tuple[str, ...] = ()  # never limited (a limit found on one is lifted)
    cluster_cores_per_cpu: float | None = None  # cluster cores one Slurm CPU stands for (default: capacity / CPUs)
    deadline_slack_s: float = 600.0  # a job is at risk when its latest start is before the next pass + this
    release_deadlines: bool = True
    lift_on_exit: bool = True  # a stopping agent (loop mode) lifts the limit: no limit outlives its agent

    def __post_init__(self):
        if not self.partition:
            raise ValueError("slurm partition: must be named")
        if self.partition in self.inflexible_partitions:
            raise ValueError(f"partition {self.partition!r} cannot be both flexible and inflexible")
        if self.cluster_cores_per_cpu is not None and not self.cluster_cores_per_cpu > 0:
            raise ValueError("cluster_cores_per_cpu must be > 0")
        if not (self.deadline_slack_s >= 0):
            raise ValueError("deadline_slack_s must be >= 0")


@dataclass
class Release:
    job_id: int
    cpus: int
    deadline: pd.Timestamp
    latest_start: pd.Timestamp
    priority_before: int
    priority: int

    def text(self) -> str:
        return (f"job {self.job_id} ({self.cpus} CPUs, deadline {self.deadline:%Y-%m-%d %H:%M:%S}Z, latest start "
                f"{self.latest_start:%H:%M:%S}Z)")


@dataclass
class SlurmPass:
    """What one pass did to the scheduler (the audit's ``caps`` entries, changes and detail)."""

    caps: dict = field(default_factory=dict)
    changes: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    limit_per_node: int | None = None  # applied (None: UNLIMITED or kept unknown)
    plan_limit_per_node: int | None = None
    releases: list[Release] = field(default_factory=list)
    scale: float | None = None
    partition: PartitionInfo | None = None

    @property
    def released_above_plan_cpus(self) -> float:
        if not self.releases or self.partition is None:
            return 0.0
        plan = self.plan_limit_per_node
        applied = self.limit_per_node
        n = self.partition.total_nodes
        plan_total = self.partition.total_cpus if plan is None else plan * n
        applied_total = self.partition.total_cpus if applied is None else applied * n
        return max(0.0, float(applied_total - plan_total))


class SlurmAdmission:
    """Sets, reads back and audits the flexible partition's MaxCPUsPerNode (see the module doc)."""

    def __init__(self, client: SlurmClient, config: SlurmConfig):
        self.client = client
        self.config = config
        self.last_limit: int | None | str = "unknown"  # the limit read at the last pass that reached slurmctld
        self.last_read_at: pd.Timestamp | None = None
        self.last_partition: PartitionInfo | None = None

    def describe(self) -> str:
        inflex = ", ".join(self.config.inflexible_partitions) or "none named"
        return (f"{self.client.describe()} partition {self.config.partition} (MaxCPUsPerNode; inflexible: "
                f"{inflex})")

    def scale(self, part: PartitionInfo, capacity_cores: float | None) -> float:
        if self.config.cluster_cores_per_cpu:
            return float(self.config.cluster_cores_per_cpu)
        if capacity_cores is None or not math.isfinite(capacity_cores) or capacity_cores <= 0:
            raise SlurmConfigError("the cluster's capacity is unknown (the plan does not carry it): pass "
                                   "--cluster-cores-per-core or a fleet file naming the cluster")
        if part.total_cpus <= 0:
            raise SlurmConfigError(f"partition {part.name} has no CPUs")
        return float(capacity_cores) / part.total_cpus

    def at_risk(self, jobs: list[SlurmJob], now: pd.Timestamp, horizon_s: float) -> list[SlurmJob]:
        """Pending jobs that must start before the next pass (+ slack) to end by their deadline, most urgent
        first."""
        cut = now + pd.Timedelta(seconds=horizon_s + self.config.deadline_slack_s)
        risky = [j for j in jobs if j.pending and j.latest_start is not None and j.latest_start <= cut]
        return sorted(risky, key=lambda j: (j.latest_start, j.job_id))

    def apply(self, *, mode: str, allowance_cores: float | None, capacity_cores: float | None,
              now: pd.Timestamp, horizon_s: float, reason: str | None, round_up: bool = False) -> SlurmPass:
        """One pass: mode ``shaped`` (limit from ``allowance_cores``, cluster cores), ``lift`` (UNLIMITED) or
        ``keep`` (leave it). Deadline-at-risk jobs are released in every mode. ``now``: the scheduler's (wall)
        time; ``horizon_s``: wall seconds until the agent's next pass. The limit is the allowance in CPUs per node
        rounded down (never above the plan), or up with ``round_up`` (the hourly correction released work above
        the plan for a deadline: a job of 16 CPUs needs 16, not 15.999)."""
        cfg = self.config
        out = SlurmPass()
        parts = self.client.partitions()
        part = parts.get(cfg.partition)
        if part is None:
            raise SlurmConfigError(f"no partition {cfg.partition!r} in {self.client.describe()} (partitions: "
                                   f"{', '.join(sorted(parts)) or 'none'})")
        out.partition = part
        found = part.max_cpus_per_node
        self.last_limit, self.last_read_at, self.last_partition = found, now, part
        per_node_cap = int(round(part.cpus_per_node))
        # inflexible partitions: never limited
        for name in cfg.inflexible_partitions:
            other = parts.get(name)
            if other is None:
                out.details.append(f"inflexible partition {name!r} not found")
                continue
            entry: dict[str, Any] = {"flexible": False, "max_cpus_per_node": other.max_cpus_per_node,
                                     "priority_tier": other.priority_tier,
                                     "cpu_limit_cores": float(other.total_cpus)}
            if other.max_cpus_per_node is not None:
                self.client.set_max_cpus_per_node(name, UNLIMITED)
                back = self.client.partition(name).max_cpus_per_node
                out.changes.append(f"{name}: MaxCPUsPerNode {other.max_cpus_per_node} -> UNLIMITED (inflexible "
                                   "work is never limited)")
                entry |= {"found": other.max_cpus_per_node, "max_cpus_per_node": back}
            if other.priority_tier <= part.priority_tier and set(_node_names(other.nodes)) & set(_node_names(part.nodes)):
                out.details.append(f"WARNING: inflexible partition {name} has PriorityTier {other.priority_tier} <= "
                                   f"{part.name}'s {part.priority_tier} on shared nodes: a held flexible job can "
                                   "block its jobs; give it a higher PriorityTier")
            out.caps[f"slurm:{name}"] = entry

        # the plan's limit
        if mode == "shaped":
            assert allowance_cores is not None
            out.scale = self.scale(part, capacity_cores)
            target_cpus = max(0.0, allowance_cores / out.scale)
            per = target_cpus / max(part.total_nodes, 1)
            per_node = int(math.ceil(per - 1e-9) if round_up else math.floor(per + 1e-9))
            plan_limit: int | None = None if per_node >= per_node_cap else per_node
            out.details.append(f"allowance {allowance_cores:,.0f} cluster cores = {target_cpus:,.2f} of "
                               f"{part.total_cpus} CPUs in {part.name} ({out.scale:,.6g} cluster cores per CPU)")
        elif mode == "lift":
            plan_limit, target_cpus = UNLIMITED, float(part.total_cpus)
        else:  # keep
            plan_limit, target_cpus = found, float(part.total_cpus if found is None else found * part.total_nodes)
        out.plan_limit_per_node = plan_limit

        # the queue, and deadlines at risk
        jobs = self.client.jobs(cfg.partition)
        running = [j for j in jobs if j.running]
        pending = [j for j in jobs if j.pending]
        running_cpus = sum(j.cpus for j in running)
        limit = plan_limit
        if cfg.release_deadlines and limit is not None:
            risky = self.at_risk(pending, now, horizon_s)
            if risky:
                need = int(math.ceil(running_cpus / max(part.total_nodes, 1))) + sum(j.cpus for j in risky)
                need = min(need, per_node_cap)
                ids = {j.job_id for j in risky}
                top = max([j.priority for j in pending if j.job_id not in ids] + [0])
                for i, j in enumerate(risky):  # above every other pending job; the most urgent first
                    prio = min(top + len(risky) - i, 4294967293)
                    if j.priority < prio:
                        self.client.set_priority(j.job_id, prio)
                    else:
                        prio = j.priority
                    assert j.deadline is not None and j.latest_start is not None
                    out.releases.append(Release(j.job_id, j.cpus, j.deadline, j.latest_start, j.priority, prio))
                if need > limit:
                    limit = None if need >= per_node_cap else need
                out.details.append(
                    "deadline-release: " + "; ".join(r.text() for r in out.releases)
                    + f" at risk before the next pass (+{cfg.deadline_slack_s:g} s): limit "
                    + f"{_fmt_limit(plan_limit)} -> {_fmt_limit(limit)} per node, whatever the plan says")
        out.limit_per_node = limit

        # set and read back
        entry = {"flexible": True, "target_cpus": round(target_cpus, 6), "found": found,
                 "max_cpus_per_node": limit, "plan_max_cpus_per_node": plan_limit, "total_cpus": part.total_cpus,
                 "nodes": part.total_nodes, "running_jobs": len(running), "running_cpus": running_cpus,
                 "pending_jobs": len(pending), "pending_cpus": sum(j.cpus for j in pending),
                 "released_jobs": [r.job_id for r in out.releases],
                 "cpu_limit_cores": float(part.total_cpus if limit is None else limit * part.total_nodes)}
        if mode == "keep":
            entry["kept"] = True
        elif limit != found:
            self.client.set_max_cpus_per_node(part.name, limit)
            back = self.client.partition(part.name).max_cpus_per_node
            entry["read_back"] = back
            if back != limit:
                raise SlurmError(f"{part.name}: set MaxCPUsPerNode={_fmt_limit(limit)}, read back {_fmt_limit(back)}")
            self.last_limit = back
            why = reason or ("deadline-release" if out.releases and limit != plan_limit else "plan")
            out.changes.append(f"{part.name}: MaxCPUsPerNode {_fmt_limit(found)} -> {_fmt_limit(limit)} ({why})")
        else:
            entry["read_back"] = found
        out.caps[f"slurm:{part.name}"] = entry
        oldest = min((j.submit for j in pending), default=None)
        out.details.append(f"{part.name} queue: {len(running)} running ({running_cpus} CPUs), {len(pending)} pending "
                           f"({sum(j.cpus for j in pending)} CPUs" + (f", oldest submitted {oldest:%H:%M:%S}Z"
                                                                     if oldest is not None else "") + ")")
        return out

    def stuck_note(self, mode: str, allowance_cores: float | None, capacity_cores: float | None,
                   retry_base_s: float, retry_max_s: float) -> str:
        """What a pass that could not reach slurmctld leaves in place, for the audit: the limit read last, and
        whether the plan allows more now (a lower limit then stays only until slurmctld answers again, at most
        ``retry_max_s`` after; while slurmctld is down no job starts anyway)."""
        found = self.last_limit
        if found == "unknown" or self.last_partition is None:
            return (f"limit in force unknown (slurmctld not reached since the agent started); retrying with "
                    f"back-off {retry_base_s:g} s doubling to {retry_max_s:g} s")
        part = self.last_partition
        cap = int(round(part.cpus_per_node))
        want: int | None
        if mode == "shaped" and allowance_cores is not None:
            try:
                scale = self.scale(part, capacity_cores)
            except SlurmError:
                want = None
            else:
                per = int(math.floor(allowance_cores / scale / max(part.total_nodes, 1) + 1e-9))
                want = None if per >= cap else per
        elif mode == "lift":
            want = None
        else:
            return f"limit {_fmt_limit(found)} per node kept (read {self.last_read_at:%H:%M:%S}Z)"
        have = cap if found is None else int(found)  # type: ignore[arg-type]
        need = cap if want is None else want
        head = (f"limit in force at the last read ({self.last_read_at:%H:%M:%S}Z): {_fmt_limit(found)} per node; "
                f"the plan now allows {_fmt_limit(want)}")
        if have < need:
            return (head + f": the LOWER LIMIT STAYS IN PLACE until slurmctld answers (no job starts while it is "
                           f"down either); retrying with back-off {retry_base_s:g} s doubling to at most "
                           f"{retry_max_s:g} s, and at the hour")
        return head + f"; retrying with back-off {retry_base_s:g} s doubling to {retry_max_s:g} s"

    def lift(self) -> str | None:
        """Lift the limit (a stopping agent); returns the change, None when it was already UNLIMITED."""
        part = self.client.partition(self.config.partition)
        if part.max_cpus_per_node is None:
            return None
        self.client.set_max_cpus_per_node(part.name, UNLIMITED)
        return f"{part.name}: MaxCPUsPerNode {part.max_cpus_per_node} -> UNLIMITED (agent stopping)"


def _fmt_limit(v) -> str:
    return "UNLIMITED" if v is None else str(v)


def _node_names(spec: str) -> list[str]:
    """Expand a simple Slurm hostlist (``n[1-3,5],m1``)."""
    names: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", spec or ""):
        base, ranges = m.group(1), m.group(2)
        if not ranges:
            names.append(base)
            continue
        for r in ranges.split(","):
            if "-" in r:
                a, b = r.split("-", 1)
                names.extend(f"{base}{i:0{len(a)}d}" for i in range(int(a), int(b) + 1))
            else:
                names.append(f"{base}{r}")
    return names


class SlurmConfigError(SlurmError):
    """A problem retrying cannot fix: no such partition, unknown capacity."""


# --------------------------------------------------------------------------------------------------- telemetry


class SlurmBacklogSource:
    """The flexible partition's pending and running jobs as the hourly correction's backlog (``BacklogSource``):
    remaining core-hours = CPUs × the time left of the job's limit (running: to its end time; pending: its whole
    limit; no limit: ``default_limit_s``), width = its CPUs, deadline = its own or submit + 24 h; all in
    cluster cores (× ``cluster_cores_per_cpu``). ``as_of`` = the query time on the agent's clock. Arrivals and
    served usage come from ``history`` (a ``StoreBacklogSource``) when given, else none."""

    def __init__(self, client: SlurmClient, partition: str, cluster_cores_per_cpu: float | None = None,
                 capacity_cores: float | None = None, history=None, wall_to_agent=None,
                 agent_seconds_per_wall_second: float = 1.0, default_limit_s: float = 3600.0,
                 deadline_hours: float = 24.0):
        self.client = client
        self.partition = partition
        self.cluster_cores_per_cpu = cluster_cores_per_cpu  # None: capacity_cores / the partition's CPUs
        self.capacity_cores = capacity_cores
        self.history = history
        self.wall_to_agent = wall_to_agent  # wall Timestamp -> the agent's clock (compressed test clocks)
        self.rate = agent_seconds_per_wall_second
        self.default_limit_s = default_limit_s
        self.deadline_hours = deadline_hours

    def describe(self) -> str:
        return f"Slurm queue of partition {self.partition}"

    def _agent(self, t: pd.Timestamp) -> pd.Timestamp:
        return self.wall_to_agent(t) if self.wall_to_agent is not None else t

    def items(self, now_wall: pd.Timestamp) -> tuple[WorkItem, ...]:
        from cicm.enforce.backlog import BacklogUnavailable

        try:
            jobs = self.client.jobs(self.partition)
            scale = self.cluster_cores_per_cpu
            if scale is None:
                total = self.client.partition(self.partition).total_cpus
                if not self.capacity_cores or total <= 0:
                    raise BacklogUnavailable("cluster cores per Slurm CPU unknown: no capacity for the cluster")
                scale = float(self.capacity_cores) / total
        except SlurmError as exc:
            raise BacklogUnavailable(str(exc)) from exc
        out = []
        for j in jobs:
            limit = j.time_limit_s if j.time_limit_s is not None else self.default_limit_s
            if j.running and j.end is not None and j.start is not None:
                left_s = max(0.0, (j.end - now_wall).total_seconds())
            elif j.running and j.start is not None:
                left_s = max(0.0, limit - (now_wall - j.start).total_seconds())
            else:
                left_s = limit
            if left_s <= 0:
                continue
            width = j.cpus * scale
            hours = left_s * self.rate / 3600.0
            due = j.deadline if j.deadline is not None else j.submit + pd.Timedelta(hours=self.deadline_hours) / self.rate
            out.append(WorkItem(width * hours, width, self._agent(due)))
        return tuple(out)

    def snapshot(self, hour: pd.Timestamp, hours: pd.DatetimeIndex):
        from cicm.enforce.backlog import BacklogSnapshot

        now_wall = pd.Timestamp.now(tz="UTC")
        items = self.items(now_wall)
        arrivals = np.zeros(len(hours))
        served = pd.Series(dtype=float)
        note = "no arrival forecast or usage history: planned with the queue alone"
        if self.history is not None:
            try:
                hist = self.history.snapshot(hour, hours)
                arrivals, served, note = hist.arrivals_core_hours, hist.served_cpu_cores, hist.note
            except Exception as exc:  # noqa: BLE001 - the live queue stands on its own; say why there is no history
                note = f"no arrival forecast ({str(exc)[:160]}): planned with the queue alone"
        return BacklogSnapshot(self._agent(now_wall), items, np.asarray(arrivals, float), served, self.describe(),
                               note)


__all__ = ["PartitionInfo", "Release", "SlurmAdmission", "SlurmBacklogSource", "SlurmClient", "SlurmConfig",
           "SlurmConfigError", "SlurmError", "SlurmJob", "SlurmPass", "SlurmUnavailable", "parse_partition_line",
           "parse_squeue_json", "parse_squeue_text"]
