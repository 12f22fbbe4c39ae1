"""The columns every telemetry source produces: the Parquet drop (:func:`cicm.planning.ingest.read_telemetry_dir`)
and the readers in this package. One row per cluster (domain) and UTC hour."""

USAGE_FILE_COLUMNS = ("cluster", "hour", "inflexible_cpu_cores", "flexible_cpu_cores", "reserved_cpu_cores",
                      "flexible_arrived_core_hours")
POWER_FILE_COLUMNS = ("cluster", "domain", "hour", "cpu_cores", "power_kw")
