"""The ecovisor's telemetry store with a columnar tick write: a tick's container rows go to DuckDB as one Arrow
table (``INSERT ... SELECT``), not as one multi-row ``VALUES`` statement with 14 parameters per container, which
DuckDB binds one by one (at 1,000 containers: ~3 ms instead of ~45 ms per tick; issue 19 item 4). Reads and the
other writes are :class:`cicm.store.ecovisor.Telemetry`'s."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import pyarrow as pa

from cicm.store.ecovisor import APP_TICK_COLUMNS, CONTAINER_TICK_COLUMNS, TICK_COLUMNS, Telemetry

CONSTANT_COLUMNS = ("tick_id", "interval_start", "interval_end", "dt_s", "power_source")
"""Container-tick columns with one value per tick (bound once as parameters)."""
VARYING_COLUMNS = tuple(c for c in CONTAINER_TICK_COLUMNS if c not in CONSTANT_COLUMNS)
_STRINGS = {"container", "app"}


class ColumnarTelemetry(Telemetry):
    """:class:`Telemetry` that also stores a tick given its container rows as columns."""

    def write_tick_columns(self, tick: dict, power_source: str, containers: Mapping[str, Sequence],
                           apps: list[dict]) -> None:
        """Store the tick's site row, its container rows (``containers``: one list per column of
        :data:`VARYING_COLUMNS`, the others are the tick's) and its app rows, in one transaction."""
        n = len(containers["container"])
        table = pa.table({c: pa.array(containers[c], type=pa.string() if c in _STRINGS else pa.float64())
                          for c in VARYING_COLUMNS})
        if table.num_rows != n:
            raise ValueError("the container columns differ in length")
        select = ", ".join("?" if c in CONSTANT_COLUMNS else c for c in CONTAINER_TICK_COLUMNS)
        consts = {"tick_id": tick["tick_id"], "interval_start": tick["interval_start"],
                  "interval_end": tick["interval_end"], "dt_s": tick["dt_s"], "power_source": power_source}
        params = [consts[c] for c in CONTAINER_TICK_COLUMNS if c in CONSTANT_COLUMNS]
        with self._lock:
            self.con.execute("BEGIN")
            try:
                self.con.execute(
                    f"INSERT INTO ecovisor_ticks ({', '.join(TICK_COLUMNS)}) VALUES ({', '.join('?' * len(TICK_COLUMNS))})",
                    [tick[c] for c in TICK_COLUMNS],
                )
                if n:
                    self.con.register("_ecovisor_tick_containers", table)
                    try:
                        self.con.execute(f"INSERT INTO ecovisor_container_ticks ({', '.join(CONTAINER_TICK_COLUMNS)}) "
                                         f"SELECT {select} FROM _ecovisor_tick_containers", params)
                    finally:
                        self.con.unregister("_ecovisor_tick_containers")
                self._insert_many("ecovisor_app_ticks", APP_TICK_COLUMNS, apps)
                self.con.execute("COMMIT")
            except Exception:
                self.con.execute("ROLLBACK")
                raise


__all__ = ["ColumnarTelemetry", "VARYING_COLUMNS"]
