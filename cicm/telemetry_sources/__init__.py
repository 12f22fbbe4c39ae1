"""Telemetry sources other than the Parquet/CSV drop (:func:`cicm.flows.ingest.read_telemetry_dir`).

Each source returns the drop's two frames, ``(usage, power)``, with exactly its columns
(``USAGE_FILE_COLUMNS`` and ``POWER_FILE_COLUMNS`` in :mod:`cicm.flows.ingest`), so the nightly ingestion stores
them the same way. ``docs/telemetry.md`` describes the schema and every source.
"""
from cicm.telemetry_sources.prometheus import PrometheusMapping, SeriesQuery, parse_mapping, read_prometheus_telemetry

__all__ = ["PrometheusMapping", "SeriesQuery", "parse_mapping", "read_prometheus_telemetry"]
