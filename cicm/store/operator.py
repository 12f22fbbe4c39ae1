"""Named reads and writes of the operators' controls (``cicm shaping pause|resume|list``): a pause is a
``shaping_state`` row whose reason starts ``operator-pause:``, beside the SLO loop's switch-offs, so the nightly
plan honours it as it honours those (the cluster falls back with that reason) and the dashboard shows it. Each
pause and resume is its own run (the audit: who asked, when, why, in ``runs.params``)."""
from __future__ import annotations

from datetime import date

import pandas as pd

from cicm.reasons import FallbackCode

PAUSE_PREFIX = str(FallbackCode.OPERATOR_PAUSE)


def write_pauses(store, clusters: list[str], start: date, until: date, reason: str, run_id: str) -> int:
    """Pause shaping of ``clusters`` over the local days [start, until]. Call inside the run's transaction."""
    rows = pd.DataFrame({"cluster": clusters, "disabled_from": start, "disabled_until": until,
                         "reason": f"{PAUSE_PREFIX}: {reason}"})
    return store.upsert("shaping_state", rows, run_id)


def end_pauses(store, clusters: list[str], day: date, note: str) -> int:
    """End the operator pauses of ``clusters`` in force on ``day`` or later: they end the day before ``day``
    (a pause that has not started yet ends before it starts). The rows stay, with ``note`` added to the reason.
    Returns how many pauses ended."""
    found = store.con.execute(
        "SELECT count(*) FROM shaping_state WHERE list_contains(?, cluster) AND starts_with(reason, ?)"
        " AND disabled_until >= ?", [list(clusters), PAUSE_PREFIX, day]).fetchone()[0]
    store.con.execute(
        "UPDATE shaping_state SET disabled_until = least(disabled_until, ?::DATE - 1),"
        " reason = reason || ' (' || ? || ')' WHERE list_contains(?, cluster) AND starts_with(reason, ?)"
        " AND disabled_until >= ?", [day, note, list(clusters), PAUSE_PREFIX, day])
    return int(found)


def pauses(store, on_or_after: date | None = None) -> pd.DataFrame:
    """Operator pauses (ending on or after ``on_or_after`` if given), newest first.

    Columns: cluster, disabled_from, disabled_until, reason, run_id."""
    return store.query(
        "SELECT cluster, disabled_from, disabled_until, reason, run_id FROM shaping_state"
        " WHERE starts_with(reason, ?) AND (?::DATE IS NULL OR disabled_until >= ?::DATE)"
        " ORDER BY disabled_from DESC, cluster", [PAUSE_PREFIX, on_or_after, on_or_after])


def pause_in_force(store, cluster: str, day: date) -> str | None:
    """The reason of the operator pause of ``cluster`` in force on ``day`` (the newest), or None."""
    row = store.con.execute(
        "SELECT reason FROM shaping_state WHERE cluster = ? AND starts_with(reason, ?) AND disabled_from <= ?"
        " AND disabled_until >= ? ORDER BY disabled_from DESC LIMIT 1", [cluster, PAUSE_PREFIX, day, day]).fetchone()
    return None if row is None else str(row[0])
