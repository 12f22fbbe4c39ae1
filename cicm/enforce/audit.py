"""The agent's audit trail: one row per pass in the store's ``agent_actions`` table, or in a JSONL file.

DuckDB lets one process write a file at a time, and the nightly plan writes the same file. So the agent never
holds the store open: each audit row opens the store, writes, and closes. When the store is locked by another
writer, the row is appended to a JSONL *spool* file instead, and the spool is drained into the store (upsert on
the table's key ``(cluster, acted_at)``, so draining twice is harmless) the next time a write succeeds. With a
plan file and no store, the JSONL file is the audit trail.

Rows carry the agent's run id; the agent's run is recorded in ``runs`` (kind ``agent``) on its first write.

Intraday deviations (the hourly correction's allowance where it differs from the plan of record) ride on the
audit row as its ``deviation`` key: in the JSONL file as a nested object, in the store as a row of
``intraday_deviations`` (one per cluster and hour: the deviation in force after the hour's latest applied pass),
written in the same transaction as the pass's ``agent_actions`` row. A pass that applied the plan as it is
(``deviation: null``) clears the hour's row; a failed pass, or one that kept the caps, leaves it alone.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import duckdb
import pandas as pd

from cicm.errors import InputError

log = logging.getLogger("cicm.agent")

COLUMNS = ("cluster", "acted_at", "hour", "plan_date", "mode", "reason", "vcc_cores", "flexible_allowance_cores",
           "caps", "battery_charge_kw", "battery_max_discharge_kw", "result", "detail")


def _jsonable(v):
    if isinstance(v, pd.Timestamp):
        return v.isoformat()
    if hasattr(v, "isoformat"):
        return v.isoformat()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


DEVIATION_COLUMNS = ("cluster", "hour", "plan_date", "acted_at", "plan_cores", "applied_cores", "vcc_cores",
                     "reason", "detail", "recorded_at")


def row_to_json(row: dict, run_id: str) -> str:
    doc = {"run_id": run_id, **{k: _jsonable(row.get(k)) for k in COLUMNS}}
    if "deviation" in row:  # absent: the pass does not speak for the hour's deviation (failed, kept caps)
        dev = row["deviation"]
        doc["deviation"] = None if dev is None else {k: _jsonable(v) for k, v in dev.items()}
    return json.dumps(doc, sort_keys=True)


def deviation_frame(row: dict) -> pd.DataFrame:
    """The ``intraday_deviations`` row of one JSON audit row that carries a deviation."""
    dev = row["deviation"]
    frame = pd.DataFrame([{
        "cluster": row["cluster"], "hour": row["hour"], "plan_date": row.get("plan_date"),
        "acted_at": row["acted_at"], "plan_cores": dev.get("plan_cores"), "applied_cores": dev.get("applied_cores"),
        "vcc_cores": row.get("vcc_cores"), "reason": dev.get("reason"), "detail": dev.get("detail"),
        "recorded_at": dev.get("recorded_at") or row["acted_at"]}])
    for col in ("hour", "acted_at", "recorded_at"):
        frame[col] = pd.to_datetime(frame[col], utc=True, format="ISO8601")
    frame["plan_date"] = [None if v is None else pd.Timestamp(v).date() for v in frame["plan_date"]]
    for col in ("plan_cores", "applied_cores", "vcc_cores"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce").astype(float)
    return frame[list(DEVIATION_COLUMNS)]


def rows_frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame([{k: r.get(k) for k in ("run_id", *COLUMNS)} for r in rows])
    for col in ("acted_at", "hour"):
        frame[col] = pd.to_datetime(frame[col], utc=True, format="ISO8601")
    frame["plan_date"] = [None if v is None or (isinstance(v, float) and v != v) else pd.Timestamp(v).date()
                          for v in frame["plan_date"]]
    for col in ("vcc_cores", "flexible_allowance_cores", "battery_charge_kw", "battery_max_discharge_kw"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce").astype(float)
    return frame


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            log.error("audit file %s line %d is not JSON; skipped", path, i + 1)
    return out


def is_lock_error(exc: Exception) -> bool:
    return isinstance(exc, (duckdb.IOException, duckdb.TransactionException)) or "lock" in str(exc).lower()


class JsonlAudit:
    """Append-only JSONL audit file."""

    def __init__(self, path: Path | str, run_id: str):
        self.path = Path(path)
        self.run_id = run_id

    def describe(self) -> str:
        return f"JSONL {self.path}"

    def write(self, row: dict) -> str:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(row_to_json(row, self.run_id) + "\n")
        return "jsonl"

    def last_acted_at(self, cluster: str) -> pd.Timestamp | None:
        times = [pd.Timestamp(r["acted_at"]) for r in read_jsonl(self.path) if r.get("cluster") == cluster]
        return max(times) if times else None

    def rows(self, cluster: str | None = None) -> list[dict]:
        return [r for r in read_jsonl(self.path) if cluster is None or r.get("cluster") == cluster]

    def close(self, status: str = "ok", summary: dict | None = None) -> None:
        pass


class StoreAudit:
    """Rows into ``agent_actions``; a JSONL spool while the store is locked, drained on the next good write."""

    def __init__(self, db_path: Path | str, spool_path: Path | str, run_id: str, params: dict | None = None):
        self.db_path = Path(db_path)
        self.spool = JsonlAudit(spool_path, run_id)
        self.run_id = run_id
        self.params = params or {}
        self.last_error: str | None = None
        self.last_error_kind: str | None = None  # cicm.enforce.storehealth: missing, corrupt, locked, unreadable
        self._runs_seen: set[str] = set()
        self._code_version: str | None = None

    def describe(self) -> str:
        return f"store {self.db_path} (spool {self.spool.path} while locked)"

    def _ensure_run(self, store, run_id: str) -> None:
        from cicm.store import agent, code_version

        if run_id in self._runs_seen:
            return
        if self._code_version is None:
            self._code_version = code_version()
        agent.ensure_agent_run(store, run_id, json.dumps(self.params if run_id == self.run_id else {}, default=str),
                               self._code_version)
        self._runs_seen.add(run_id)

    def write(self, row: dict) -> str:
        from cicm.store import Store, agent

        pending = self.spool.rows()
        rows = pending + [json.loads(row_to_json(row, self.run_id))]
        try:
            if not self.db_path.exists():  # the agent never creates the system of record
                raise InputError("db", f"no database at {self.db_path}")
            with Store(self.db_path) as store:
                frame = rows_frame(rows)
                with store.transaction():
                    for run_id, part in frame.groupby("run_id", sort=False):
                        self._ensure_run(store, str(run_id))
                        agent.write_actions(store, part.drop(columns="run_id"), str(run_id))
                    write_deviations(store, rows)
        except (duckdb.Error, InputError, OSError) as exc:  # never lose an audit row: spool it
            from cicm.enforce.storehealth import LOCKED, classify

            self.last_error_kind, self.last_error = classify(exc, self.db_path)
            (log.warning if self.last_error_kind == LOCKED else log.error)(
                "%s: audit row spooled to %s", self.last_error, self.spool.path)
            return self.spool.write(row)
        if pending:
            self.spool.path.write_text("")  # drained
            log.info("drained %d spooled audit rows into %s", len(pending), self.db_path)
        self.last_error = self.last_error_kind = None
        return "store"

    def last_acted_at(self, cluster: str) -> pd.Timestamp | None:
        from cicm.store import Store, agent

        best = self.spool.last_acted_at(cluster)
        try:
            with Store(self.db_path, read_only=True) as store:
                got = agent.last_acted_at(store, cluster)
        except (duckdb.Error, InputError):
            return best
        if got is not None and not pd.isna(got):
            got = pd.Timestamp(got).tz_convert("UTC")
            best = got if best is None else max(best, got)
        return best

    def close(self, status: str = "ok", summary: dict | None = None) -> None:
        from cicm.store import Store

        try:
            with Store(self.db_path) as store:
                store.finish_run(self.run_id, status, None, summary)
        except (duckdb.Error, InputError) as exc:
            log.warning("could not close the agent run in %s: %s", self.db_path, exc)


def write_deviations(store, rows: list[dict]) -> None:
    """Apply the rows' ``deviation`` keys to ``intraday_deviations``, oldest first (inside the caller's
    transaction): each row that carries the key replaces its hour's deviation (null: clears it)."""
    from cicm.store import agent

    for r in sorted((r for r in rows if "deviation" in r), key=lambda r: pd.Timestamp(r["acted_at"])):
        agent.clear_deviation(store, r["cluster"], pd.Timestamp(r["hour"]))
        if r["deviation"] is not None:
            agent.write_deviation(store, deviation_frame(r), str(r["run_id"]))


def read_deviations(db_path: Path | str | None, audit_path: Path | str | None, cluster: str | None = None
                    ) -> pd.DataFrame:
    """Intraday deviations from the store and/or a JSONL audit file (the file's latest row per hour wins),
    ordered by cluster and hour."""
    from cicm.store import Store, agent

    frames = []
    if db_path is not None and Path(db_path).exists():
        with Store(db_path, read_only=True) as store:
            frames.append(agent.deviations(store, cluster).assign(source="store"))
    if audit_path is not None:
        latest: dict[tuple, dict] = {}
        for r in read_jsonl(Path(audit_path)):
            if "deviation" in r and (cluster is None or r.get("cluster") == cluster):
                latest[(r["cluster"], r["hour"])] = r
        rows = [deviation_frame(r).assign(run_id=r["run_id"]) for r in latest.values() if r["deviation"]]
        if rows:
            frames.append(pd.concat(rows, ignore_index=True).assign(source="jsonl"))
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=["run_id", *DEVIATION_COLUMNS, "source"])
    return pd.concat(frames, ignore_index=True).sort_values(["cluster", "hour"]).reset_index(drop=True)


def read_actions(db_path: Path | str | None, spool_path: Path | str | None, cluster: str | None,
                 limit: int = 50) -> pd.DataFrame:
    """Recent audit rows from the store and/or the JSONL file, newest first (for `cicm agent actions`)."""
    from cicm.store import Store, agent

    frames = []
    if db_path is not None and Path(db_path).exists():
        with Store(db_path, read_only=True) as store:
            frames.append(agent.recent_actions(store, cluster, limit).assign(source="store"))
    if spool_path is not None:
        rows = [r for r in read_jsonl(Path(spool_path)) if cluster is None or r.get("cluster") == cluster]
        if rows:
            frames.append(rows_frame(rows).assign(source="jsonl"))
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=["run_id", *COLUMNS, "source"])
    out = pd.concat(frames, ignore_index=True)
    return out.sort_values("acted_at", ascending=False).head(limit).reset_index(drop=True)
