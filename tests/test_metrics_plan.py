"""The nightly plan's textfile metrics (cicm.ops.metrics): from a real ``plan_day`` on the demo store, and from
constructed outcomes for the cases the demo does not produce (fallback reasons, degraded stages)."""
from __future__ import annotations

import math
from datetime import date, datetime, timezone

import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cicm.ops.metrics import TEXTFILE_ENV, plan_registry, reason_code, write_plan_metrics
from cicm.planning.pipeline import PlanOutcome
from cicm.planning.stages import StageReport

NOW = 1_800_000_000.0


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a text exposition."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: dict, name: str, **labels) -> float:
    return found[(name, tuple(sorted(labels.items())))]


@pytest.fixture(scope="module")
def demo_outcome(tmp_path_factory) -> PlanOutcome:
    """The demo fleet's plan for its default day, by the real stages (what `cicm demo seed; cicm plan` does)."""
    from cicm.config import load_fleet
    from cicm.planning.ingest import import_demo_telemetry
    from cicm.planning.pipeline import PlanOptions, plan_day
    from cicm.store import Store

    db = tmp_path_factory.mktemp("plan-metrics") / "cicm.duckdb"
    fleet = load_fleet()
    with Store(db) as store:
        import_demo_telemetry(store, fleet)
        return plan_day(store, fleet, fleet.default_plan_date, PlanOptions())


def test_a_real_plan_in_textfile_format(demo_outcome, tmp_path):
    o = demo_outcome
    path = write_plan_metrics(o, tmp_path / "textfile" / "cicm_plan.prom", now=NOW)
    assert path == tmp_path / "textfile" / "cicm_plan.prom"
    found = samples(path.read_text())

    assert value(found, "cicm_plan_last_success_timestamp_seconds") == NOW
    assert value(found, "cicm_plan_last_written_timestamp_seconds") == NOW
    day = o.plan_date
    assert value(found, "cicm_plan_date_timestamp_seconds") == datetime(day.year, day.month, day.day,
                                                                        tzinfo=timezone.utc).timestamp()
    assert value(found, "cicm_plan_status", status=o.status) == 1.0
    assert sum(v for (n, _), v in found.items() if n == "cicm_plan_status") == 1.0
    assert value(found, "cicm_plan_info", plan_date=str(day), run_id=o.run_id) == 1.0

    # every timed step of the run, in seconds, and the total of plan_day's own steps
    assert o.seconds and all(value(found, "cicm_plan_stage_duration_seconds", stage=k) == pytest.approx(v)
                             for k, v in o.seconds.items())
    top = ("telemetry", "carbon-actuals", "carbon-forecast", "slo-feedback", "models-and-programs", "store-write")
    assert value(found, "cicm_plan_duration_seconds") == pytest.approx(sum(o.seconds[k] for k in top))
    for report in o.stages:
        assert value(found, "cicm_plan_stage_status", stage=report.name, status=report.status) == 1.0

    # clusters: shaped + fallback = the fleet; fallbacks by code; the saving is the printed summary's
    c = o.clusters
    shaped = int((c["status"] == "shaped").sum())
    assert value(found, "cicm_plan_clusters", status="shaped") == shaped
    assert value(found, "cicm_plan_clusters", status="fallback") == len(c) - shaped
    codes = c.loc[c["status"] != "shaped", "reason"].map(reason_code).value_counts()
    for code, n in codes.items():
        assert value(found, "cicm_plan_fallback_clusters", reason=code) == n
    assert value(found, "cicm_plan_fallback_clusters", reason="slo-feedback") == codes.get("slo-feedback", 0)
    plan_kg, flat_kg = c["plan_kgco2"].sum(), c["flat_kgco2"].sum()
    assert flat_kg > plan_kg > 0
    assert value(found, "cicm_plan_expected_saving_kgco2") == pytest.approx(flat_kg - plan_kg)
    assert value(found, "cicm_plan_expected_saving_percent") == pytest.approx(100 * (1 - plan_kg / flat_kg))
    assert value(found, "cicm_plan_expected_emissions_kgco2") == pytest.approx(plan_kg)
    assert value(found, "cicm_plan_unshaped_emissions_kgco2") == pytest.approx(flat_kg)


def outcome(status="degraded", stages=(), clusters=None, seconds=None) -> PlanOutcome:
    rows = clusters if clusters is not None else [
        ("sj-a", "shaped", None, 90.0, 100.0),
        ("sj-b", "fallback", "slo-feedback: 2 violated days, shaping off until 2022-06-21", 50.0, 50.0),
        ("sj-c", "fallback", "slo-feedback", 10.0, 10.0),
        ("dl-a", "fallback", "no-carbon-forecast: electricitymaps: HTTP 503", 40.0, 40.0),
        ("dl-b", "fallback", None, 5.0, 5.0),
    ]
    frame = pd.DataFrame(rows, columns=["cluster", "status", "reason", "plan_kgco2", "flat_kgco2"])
    return PlanOutcome(date(2022, 6, 15), "plan-x", status, list(stages), frame, seconds=seconds or {})


def test_fallback_reasons_and_degraded_stages():
    o = outcome(stages=[StageReport("telemetry", "ran"), StageReport("carbon-forecast", "degraded", "1/2 zones"),
                        StageReport("slo-feedback", "ran"), StageReport("vcc-program", "ran"),
                        StageReport("vcc-program", "failed", "campus x")],
                seconds={"telemetry": 1.5, "carbon-forecast": 0.25})
    from prometheus_client import generate_latest

    found = samples(generate_latest(plan_registry(o, NOW)).decode())
    assert value(found, "cicm_plan_fallback_clusters", reason="slo-feedback") == 2
    assert value(found, "cicm_plan_fallback_clusters", reason="no-carbon-forecast") == 1
    assert value(found, "cicm_plan_fallback_clusters", reason="unknown") == 1
    assert value(found, "cicm_plan_clusters", status="fallback") == 4
    assert value(found, "cicm_plan_clusters", status="shaped") == 1
    assert value(found, "cicm_plan_stage_status", stage="carbon-forecast", status="degraded") == 1
    assert value(found, "cicm_plan_stage_status", stage="carbon-forecast", status="ran") == 0
    assert value(found, "cicm_plan_stage_status", stage="vcc-program", status="failed") == 1  # the worst report
    assert value(found, "cicm_plan_status", status="degraded") == 1
    assert value(found, "cicm_plan_last_success_timestamp_seconds") == NOW  # a degraded plan is still a plan
    assert value(found, "cicm_plan_expected_saving_kgco2") == pytest.approx(10.0)
    assert value(found, "cicm_plan_expected_saving_percent") == pytest.approx(100 * 10 / 205)
    assert value(found, "cicm_plan_duration_seconds") == pytest.approx(1.75)


def test_no_clusters_no_saving_and_a_failed_status():
    from prometheus_client import generate_latest

    found = samples(generate_latest(plan_registry(outcome(status="failed", clusters=[]), NOW)).decode())
    assert value(found, "cicm_plan_status", status="failed") == 1
    assert value(found, "cicm_plan_last_success_timestamp_seconds") == 0.0  # no plan stored: the alert fires
    assert value(found, "cicm_plan_expected_saving_percent") == 0.0
    assert value(found, "cicm_plan_fallback_clusters", reason="slo-feedback") == 0  # always there for the alert
    assert not any(math.isnan(v) for v in found.values())


def test_the_path_comes_from_the_environment_and_a_bad_path_never_fails_the_plan(tmp_path, monkeypatch):
    monkeypatch.delenv(TEXTFILE_ENV, raising=False)
    assert write_plan_metrics(outcome()) is None  # no path: nothing written
    target = tmp_path / "node-exporter" / "cicm_plan.prom"
    monkeypatch.setenv(TEXTFILE_ENV, str(target))
    assert write_plan_metrics(outcome(), now=NOW) == target
    assert "cicm_plan_last_success_timestamp_seconds 1.8e+09" in target.read_text()
    assert not list(target.parent.glob("*.tmp*"))  # written atomically (temp file renamed)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert write_plan_metrics(outcome(), blocker / "x.prom") is None  # logged, not raised


@pytest.mark.parametrize("reason, code", [("slo-feedback: off until x", "slo-feedback"), ("low-benefit", "low-benefit"),
                                          (None, "unknown"), (float("nan"), "unknown"), ("", "unknown")])
def test_reason_code_is_the_part_before_the_colon(reason, code):
    assert reason_code(reason) == code
