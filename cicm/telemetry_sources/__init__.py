"""Telemetry sources other than the Parquet drop (:func:`cicm.planning.ingest.read_telemetry_dir`).

Each source returns the drop's two frames, ``(usage, power)``, with exactly its columns
(``USAGE_FILE_COLUMNS`` and ``POWER_FILE_COLUMNS`` in :mod:`cicm.telemetry_sources.schema`), so the nightly
ingestion stores them the same way. ``docs/telemetry.md`` describes the schema and every source.
"""
from cicm.telemetry_sources.schema import POWER_FILE_COLUMNS, USAGE_FILE_COLUMNS
from cicm.telemetry_sources.prometheus import PrometheusMapping, SeriesQuery, parse_mapping, read_prometheus_telemetry

__all__ = ["POWER_FILE_COLUMNS", "USAGE_FILE_COLUMNS", "PrometheusMapping", "SeriesQuery", "parse_mapping",
           "read_prometheus_telemetry"]
