"""The store package: the only place that holds SQL.

- ``cicm.store.core``: the DuckDB file (connection, schema and version, runs and transactions, upsert): `Store`.
- ``cicm.store.reader``: the dashboard's short-lived read-only connections, with a snapshot while a writer holds
  the file.
- ``cicm.store.retention``: sizes, compaction of cold history to Parquet, the `_all` views, restore, rebuild.
- Named reads and writes, by consumer, each returning frames with the columns its docstring lists:
  ``cicm.store.plan`` (the nightly plan, ``cicm vcc show``), ``cicm.store.slo`` (the SLO check and feedback),
  ``cicm.store.agent`` (the enforcement agent), ``cicm.store.dashboard`` (the dashboard).
- ``cicm.store.operator``: the operators' shaping pauses.
- ``cicm.store.ecovisor``: the ecovisor service's own telemetry file (its ticks, containers and apps).

The names below are loaded on first use, so importing a consumer module (``from cicm.store import slo``) does
not load DuckDB.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cicm.store.core import (SCHEMA_VERSION, TABLE_KEYS, RunRecord, Store, code_version,  # noqa: F401
                                 new_run_id)

_CORE_NAMES = ("SCHEMA_VERSION", "TABLE_KEYS", "RunRecord", "Store", "code_version", "new_run_id")
_MODULES = ("agent", "core", "dashboard", "ecovisor", "operator", "plan", "reader", "retention", "slo")

__all__ = [*_CORE_NAMES, *_MODULES]


def __getattr__(name: str) -> Any:
    if name in _CORE_NAMES:
        return getattr(importlib.import_module("cicm.store.core"), name)
    if name in _MODULES:
        return importlib.import_module(f"cicm.store.{name}")
    raise AttributeError(f"module 'cicm.store' has no attribute {name!r}")
