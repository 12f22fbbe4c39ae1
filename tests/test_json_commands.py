"""Every `--json` command prints exactly one JSON document on stdout, nothing else (logs and solver output go to
stderr), run as a user runs it: the console script in a subprocess. `cicm plan --json` and `cicm backtest --json`
have their own tests (test_nightly_flow, test_backtest_run)."""
from __future__ import annotations

import json
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest

from cicm.config import load_fleet
from cicm.planning.ingest import import_demo_telemetry
from cicm.planning.pipeline import PlanOptions, plan_day
from cicm.store import Store

CICM = Path(sys.executable).with_name("cicm")
DAY = date(2022, 6, 15)


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("json") / "cicm.duckdb"
    with Store(path) as store:
        import_demo_telemetry(store, load_fleet())
        for day in (date(2022, 6, 10), date(2022, 6, 11), date(2022, 6, 12), DAY):
            plan_day(store, load_fleet(), day, PlanOptions())
    return path


@pytest.mark.parametrize("args, check", [
    (["vcc", "show", "--cluster", "sj-a", "--date", str(DAY)], lambda d: len(d["hours"]) == 24),
    (["slo", "status"], lambda d: isinstance(d, (list, dict))),
    (["slo", "check", "--date", str(DAY)], lambda d: isinstance(d, dict)),
    (["agent", "actions"], lambda d: isinstance(d, (list, dict))),
    (["agent", "deviations"], lambda d: isinstance(d, (list, dict))),
])
def test_json_output_is_one_document(db, args, check, tmp_path):
    copy = tmp_path / "cicm.duckdb"
    copy.write_bytes(db.read_bytes())
    out = subprocess.run([str(CICM), *args, "--db", str(copy), "--json"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode in (0, 2), out.stderr[-2000:]
    doc = json.loads(out.stdout)  # the whole of stdout parses: one document, no banner or log line before it
    assert check(doc), doc
