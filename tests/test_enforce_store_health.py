"""Issue 20 item 4: the agent re-reads its store at every pass, and a store that was deleted or overwritten with
garbage lifts the caps (as a missing plan does) instead of capping from the plan it remembers; the audit row
goes to the JSONL spool, the pass is counted in the agent's metrics (``cicm_agent_store_unreadable_passes``),
and a corrupt file is reported as corrupt, not as "locked by another process". Real DuckDB files, a real
ecovisor on loopback."""
from __future__ import annotations

import os
import subprocess
import sys

import duckdb
import pandas as pd
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cicm.data.store import Store
from cicm.enforce.audit import read_jsonl
from cicm.enforce.clock import SimulatedClock
from cicm.enforce.policy import tolerance_cores
from cicm.enforce.storehealth import CORRUPT, LOCKED, MISSING, classify
from cicm.ops.agent_metrics import AgentMetrics

try:
    from tests.test_enforce_agent import ALLOWANCE_CC, CLUSTER, START, containers, eco, make_agent, write_plan
except ImportError:
    from test_enforce_agent import ALLOWANCE_CC, CLUSTER, START, containers, eco, make_agent, write_plan

assert eco  # the fixture: a real ecovisor (uvicorn in a thread) on a simulated clock
HOUR = pd.Timedelta(hours=1)


def unreadable_count(agent, kind: str) -> float:
    text = generate_latest(agent.metrics.registry).decode()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "cicm_agent_store_unreadable_passes_total" and s.labels == {"cluster": CLUSTER, "kind": kind}:
                return s.value
    raise AssertionError(f"no cicm_agent_store_unreadable_passes_total{{kind={kind}}} in\n{text}")


def capped_agent(eco, db_path, tmp_path):
    """An agent that has read the plan and capped hour 5 (allowance 2 container cores: 1 per flexible container)."""
    write_plan(db_path)
    token = eco.register()
    t = START + 5 * HOUR
    eco.tick_to(t)
    clock = SimulatedClock(t)
    agent = make_agent(eco.url, token, clock, db=db_path)
    agent.metrics = AgentMetrics(CLUSTER, textfile=tmp_path / "agent.prom")
    first = agent.step()
    assert first.mode == "shaped" and first.audit_to == "store"
    state = containers(eco, token)
    assert state["batch-1"]["cpu_limit_cores"] == pytest.approx(ALLOWANCE_CC[5] / 2, abs=tolerance_cores(4))
    assert state["batch-1"]["powercap_kw"] < 0.30 - 1e-6  # capped below the container's max power
    return agent, token, clock


def assert_lifted(eco, token) -> None:
    state = containers(eco, token)
    for name, max_kw in (("batch-1", 0.30), ("batch-2", 0.30)):
        assert state[name]["powercap_kw"] == pytest.approx(max_kw), name
        assert state[name]["cpu_limit_cores"] == pytest.approx(4.0), name


def test_a_deleted_store_lifts_the_caps_alerts_and_recovers(eco, db_path, tmp_path):
    agent, token, clock = capped_agent(eco, db_path, tmp_path)
    db_path.unlink()
    for side in db_path.parent.glob(db_path.name + ".wal"):
        side.unlink()

    out = agent.step()  # the same hour: the agent still remembers the plan, and must not use it
    assert out.mode == "lift" and out.ok and out.store_problem == MISSING
    assert out.reason.startswith(f"plan-unreadable: store {db_path} is missing")
    assert out.plan is None and out.allowance_cores is None
    assert_lifted(eco, token)
    assert out.audit_to == "jsonl"  # audited where possible: the spool, drained when a store is back
    spooled = read_jsonl(agent.audit.spool.path)
    assert [r["mode"] for r in spooled] == ["lift"] and "is missing" in spooled[0]["reason"]
    assert unreadable_count(agent, MISSING) == 1.0 and unreadable_count(agent, CORRUPT) == 0.0
    assert "cicm_agent_store_unreadable_passes_total" in (tmp_path / "agent.prom").read_text()
    assert not db_path.exists()  # the agent never creates the system of record

    clock.set(clock.now() + HOUR)
    eco.tick_to(clock.now())
    again = agent.step()
    assert again.mode == "lift" and unreadable_count(agent, MISSING) == 2.0

    write_plan(db_path)  # the nightly plan re-creates the store: shaped again, the spool drains into it
    clock.set(clock.now() + HOUR)
    eco.tick_to(clock.now())
    back = agent.step()
    assert back.mode == "shaped" and back.store_problem is None and back.audit_to == "store"
    assert unreadable_count(agent, MISSING) == 2.0
    with Store(db_path, read_only=True) as store:
        modes = store.query("SELECT mode FROM agent_actions ORDER BY acted_at")["mode"].tolist()
    assert modes == ["lift", "lift", "shaped"]
    assert read_jsonl(agent.audit.spool.path) == []


def test_a_store_overwritten_with_garbage_is_corrupt_not_locked(eco, db_path, tmp_path):
    agent, token, clock = capped_agent(eco, db_path, tmp_path)
    size = db_path.stat().st_size
    db_path.write_bytes(os.urandom(size))

    out = agent.step()
    assert out.mode == "lift" and out.ok and out.store_problem == CORRUPT
    assert out.reason.startswith(f"plan-unreadable: store {db_path} is corrupt, not locked")
    assert "not a valid DuckDB database file" in out.reason
    assert "locked by another process" not in out.reason
    assert_lifted(eco, token)
    assert out.audit_to == "jsonl" and agent.audit.last_error_kind == CORRUPT
    assert "corrupt" in agent.audit.last_error
    assert unreadable_count(agent, CORRUPT) == 1.0 and unreadable_count(agent, LOCKED) == 0.0

    keep = make_agent(eco.url, token, SimulatedClock(clock.now()), db=db_path, on_missing_plan="keep",
                      audit_file=tmp_path / "keep.jsonl")
    kept = keep.step()  # --on-missing-plan keep is honoured, as for a missing plan, with the same reason
    assert kept.mode == "keep" and kept.store_problem == CORRUPT and "corrupt, not locked" in kept.reason


def test_a_checksum_failure_is_corrupt_and_a_held_lock_is_locked(tmp_path):
    good = tmp_path / "good.duckdb"
    con = duckdb.connect(str(good))
    con.execute("CREATE TABLE t AS SELECT range AS i FROM range(200000)")
    con.close()
    data = bytearray(good.read_bytes())
    for i in range(16384, len(data), 7):  # every block after the headers
        data[i] ^= 0x55
    bad = tmp_path / "bad.duckdb"
    bad.write_bytes(bytes(data))
    with pytest.raises(duckdb.Error) as err:
        with Store(bad, read_only=True) as store:
            store.query("SELECT sum(i) FROM t")
    kind, message = classify(err.value, bad)
    assert kind == CORRUPT and "checksum" in message

    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys; c = duckdb.connect(sys.argv[1]); print('locked', flush=True); "
                               "sys.stdin.read()", str(good)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(duckdb.Error) as locked:
            duckdb.connect(str(good), read_only=True)
        kind, message = classify(locked.value, good)
        assert kind == LOCKED and "Conflicting lock" in message, message
    finally:
        holder.stdin.close()
        holder.wait(20)
    assert classify(FileNotFoundError(str(tmp_path / "gone")), tmp_path / "gone")[0] == MISSING
