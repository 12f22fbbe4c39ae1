"""Telemetry of the ecovisor in its own DuckDB file: one row per tick, per container and tick, per app and tick.

Tables: ``ecovisor_ticks``, ``ecovisor_container_ticks``, ``ecovisor_app_ticks`` and ``ecovisor_apps`` (the
registered applications: token hashes, shares and their settings, so a restart keeps them). All times are
TIMESTAMPTZ in UTC; a tick row covers [interval_start, interval_end).

(tick_id, container) and (tick_id, app) are unique by construction; there are no index constraints
because DuckDB's ART indexes make every insert several times slower.

Interval queries prorate ticks that straddle the interval's edges by their overlap.
"""
from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

import duckdb
import pyarrow as pa

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS ecovisor_ticks(
        tick_id BIGINT NOT NULL, interval_start TIMESTAMPTZ NOT NULL, interval_end TIMESTAMPTZ NOT NULL,
        dt_s DOUBLE NOT NULL, site_solar_kw DOUBLE NOT NULL, grid_gco2_per_kwh DOUBLE NOT NULL,
        ci_quality VARCHAR NOT NULL, clock_mode VARCHAR NOT NULL, backend VARCHAR NOT NULL,
        recorded_at TIMESTAMPTZ NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS ecovisor_container_ticks(
        tick_id BIGINT NOT NULL, interval_start TIMESTAMPTZ NOT NULL, interval_end TIMESTAMPTZ NOT NULL,
        dt_s DOUBLE NOT NULL, container VARCHAR NOT NULL, app VARCHAR,
        cpu_limit_cores DOUBLE, cpu_usage_cores DOUBLE NOT NULL, powercap_kw DOUBLE NOT NULL,
        effective_powercap_kw DOUBLE NOT NULL, power_kw DOUBLE NOT NULL, energy_kwh DOUBLE NOT NULL,
        carbon_kgco2 DOUBLE NOT NULL, power_source VARCHAR NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS ecovisor_app_ticks(
        tick_id BIGINT NOT NULL, interval_start TIMESTAMPTZ NOT NULL, interval_end TIMESTAMPTZ NOT NULL,
        dt_s DOUBLE NOT NULL, app VARCHAR NOT NULL,
        load_kw DOUBLE NOT NULL, solar_kw DOUBLE NOT NULL, solar_to_load_kw DOUBLE NOT NULL,
        solar_to_battery_kw DOUBLE NOT NULL, curtailed_kw DOUBLE NOT NULL, battery_discharge_kw DOUBLE NOT NULL,
        grid_to_load_kw DOUBLE NOT NULL, grid_to_battery_kw DOUBLE NOT NULL, grid_kw DOUBLE NOT NULL,
        grid_over_share_kw DOUBLE NOT NULL, battery_energy_kwh DOUBLE NOT NULL, battery_soc DOUBLE NOT NULL,
        battery_loss_kwh DOUBLE NOT NULL, grid_gco2_per_kwh DOUBLE NOT NULL, carbon_kgco2 DOUBLE NOT NULL,
        carbon_load_kgco2 DOUBLE NOT NULL, carbon_charging_kgco2 DOUBLE NOT NULL,
        carbon_rate_limit_gco2_per_h DOUBLE, carbon_policy_met BOOLEAN NOT NULL,
        )""",
    """CREATE TABLE IF NOT EXISTS ecovisor_apps(
        name VARCHAR PRIMARY KEY, token_sha256 VARCHAR NOT NULL, spec_json VARCHAR NOT NULL,
        state_json VARCHAR NOT NULL, registered_at TIMESTAMPTZ NOT NULL)""",
]

APP_TICK_COLUMNS = [
    "tick_id", "interval_start", "interval_end", "dt_s", "app", "load_kw", "solar_kw", "solar_to_load_kw",
    "solar_to_battery_kw", "curtailed_kw", "battery_discharge_kw", "grid_to_load_kw", "grid_to_battery_kw",
    "grid_kw", "grid_over_share_kw", "battery_energy_kwh", "battery_soc", "battery_loss_kwh",
    "grid_gco2_per_kwh", "carbon_kgco2", "carbon_load_kgco2", "carbon_charging_kgco2",
    "carbon_rate_limit_gco2_per_h", "carbon_policy_met",
]
CONTAINER_TICK_COLUMNS = [
    "tick_id", "interval_start", "interval_end", "dt_s", "container", "app", "cpu_limit_cores",
    "cpu_usage_cores", "powercap_kw", "effective_powercap_kw", "power_kw", "energy_kwh", "carbon_kgco2",
    "power_source",
]
CONTAINER_VARYING_COLUMNS = [c for c in CONTAINER_TICK_COLUMNS
                             if c not in ("tick_id", "interval_start", "interval_end", "dt_s", "power_source")]
"""The container-tick columns with a value per container (the others are the tick's)."""
TICK_COLUMNS = [
    "tick_id", "interval_start", "interval_end", "dt_s", "site_solar_kw", "grid_gco2_per_kwh", "ci_quality",
    "clock_mode", "backend", "recorded_at",
]

_OVERLAP = (
    "greatest(0.0, epoch(least(CAST(? AS TIMESTAMPTZ), interval_end)) - "
    "epoch(greatest(CAST(? AS TIMESTAMPTZ), interval_start))) / dt_s"
)


class Telemetry:
    def __init__(self, db_path: str | Path | None):
        path = ":memory:" if db_path is None else str(db_path)
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self.con = duckdb.connect(path)
        self.con.execute("SET TimeZone='UTC'")
        for stmt in SCHEMA:
            self.con.execute(stmt)

    def close(self) -> None:
        with self._lock:
            self.con.close()

    # ---- writes
    def write_tick(self, tick: dict, containers: list[dict], apps: list[dict]) -> None:
        with self._lock:
            self.con.execute("BEGIN")
            try:
                self._insert_many("ecovisor_ticks", TICK_COLUMNS, [tick])
                self._insert_many("ecovisor_container_ticks", CONTAINER_TICK_COLUMNS, containers)
                self._insert_many("ecovisor_app_ticks", APP_TICK_COLUMNS, apps)
                self.con.execute("COMMIT")
            except Exception:
                self.con.execute("ROLLBACK")
                raise

    def write_tick_columns(self, tick: dict, power_source: str, containers: Mapping[str, Sequence],
                           apps: list[dict]) -> None:
        """:meth:`write_tick` with the container rows as columns (``containers``: one list per column of
        :data:`CONTAINER_VARYING_COLUMNS`; the tick id, interval, dt_s and ``power_source`` are the tick's): they
        go to DuckDB as one Arrow table (``INSERT ... SELECT``), not as one ``VALUES`` list binding 14 parameters
        per container (1,000 containers: ~3 ms instead of ~45 ms per tick)."""
        n = len(containers["container"])
        table = pa.table({c: pa.array(containers[c], type=pa.string() if c in ("container", "app") else pa.float64())
                          for c in CONTAINER_VARYING_COLUMNS})
        if table.num_rows != n:
            raise ValueError("the container columns differ in length")
        consts = {"tick_id": tick["tick_id"], "interval_start": tick["interval_start"],
                  "interval_end": tick["interval_end"], "dt_s": tick["dt_s"], "power_source": power_source}
        select = ", ".join("?" if c in consts else c for c in CONTAINER_TICK_COLUMNS)
        params = [consts[c] for c in CONTAINER_TICK_COLUMNS if c in consts]
        with self._lock:
            self.con.execute("BEGIN")
            try:
                self._insert_many("ecovisor_ticks", TICK_COLUMNS, [tick])
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

    def _insert_many(self, table: str, cols: list[str], rows: list[dict]) -> None:
        """One multi-row INSERT (DuckDB's executemany is slow for many small statements)."""
        if not rows:
            return
        one = f"({', '.join('?' * len(cols))})"
        params = [r[c] for r in rows for c in cols]
        self.con.execute(f"INSERT INTO {table} ({', '.join(cols)}) VALUES {', '.join([one] * len(rows))}", params)

    def save_app(self, name: str, token_sha256: str, spec: dict, state: dict, registered_at: datetime) -> None:
        with self._lock:
            self.con.execute(
                "INSERT OR REPLACE INTO ecovisor_apps VALUES (?, ?, ?, ?, ?)",
                [name, token_sha256, json.dumps(spec), json.dumps(state), registered_at],
            )

    def save_app_state(self, name: str, state: dict) -> None:
        with self._lock:
            self.con.execute("UPDATE ecovisor_apps SET state_json = ? WHERE name = ?", [json.dumps(state), name])

    def delete_app(self, name: str) -> None:
        with self._lock:
            self.con.execute("DELETE FROM ecovisor_apps WHERE name = ?", [name])

    # ---- reads
    def load_apps(self) -> list[dict]:
        with self._lock:
            rows = self.con.execute(
                "SELECT name, token_sha256, spec_json, state_json, registered_at FROM ecovisor_apps ORDER BY registered_at"
            ).fetchall()
        return [
            {"name": r[0], "token_sha256": r[1], "spec": json.loads(r[2]), "state": json.loads(r[3]), "registered_at": r[4]}
            for r in rows
        ]

    def last_tick(self) -> dict | None:
        with self._lock:
            r = self.con.execute(
                "SELECT tick_id, interval_end FROM ecovisor_ticks ORDER BY tick_id DESC LIMIT 1"
            ).fetchone()
        return None if r is None else {"tick_id": r[0], "interval_end": r[1]}

    def last_battery_energy(self, app: str) -> float | None:
        with self._lock:
            r = self.con.execute(
                "SELECT battery_energy_kwh FROM ecovisor_app_ticks WHERE app = ? ORDER BY tick_id DESC LIMIT 1", [app]
            ).fetchone()
        return None if r is None else float(r[0])

    def app_ticks(self, app: str, start: datetime | None = None, end: datetime | None = None, limit: int = 100_000) -> list[dict]:
        return self._ticks("ecovisor_app_ticks", APP_TICK_COLUMNS, "app = ?", [app], start, end, "tick_id", limit)

    def container_ticks(self, containers: list[str], start: datetime | None = None, end: datetime | None = None, limit: int = 100_000) -> list[dict]:
        if not containers:
            return []
        where = f"container IN ({', '.join('?' * len(containers))})"
        return self._ticks("ecovisor_container_ticks", CONTAINER_TICK_COLUMNS, where, list(containers), start, end,
                           "tick_id, container", limit)

    def _ticks(self, table: str, columns, where: str, args: list, start: datetime | None, end: datetime | None,
               order: str, limit: int) -> list[dict]:
        """Tick rows overlapping [start, end) (either bound optional), as dicts, oldest first."""
        q = f"SELECT {', '.join(columns)} FROM {table} WHERE {where}"
        args = list(args)
        if start is not None:
            q += " AND interval_end > ?"
            args.append(start)
        if end is not None:
            q += " AND interval_start < ?"
            args.append(end)
        q += f" ORDER BY {order} LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self.con.execute(q, args).fetchall()
        return [dict(zip(columns, r)) for r in rows]

    def container_totals(self, container: str, app: str, start: datetime, end: datetime) -> dict:
        """Energy (kWh) and carbon (kg) of a container while it belonged to ``app``, prorated to [start, end)."""
        with self._lock:
            r = self.con.execute(
                f"SELECT coalesce(sum(energy_kwh * {_OVERLAP}), 0), coalesce(sum(carbon_kgco2 * {_OVERLAP}), 0), count(*) "
                "FROM ecovisor_container_ticks WHERE container = ? AND app = ? AND interval_end > ? AND interval_start < ?",
                [end, start, end, start, container, app, start, end],
            ).fetchone()
        assert r is not None  # an aggregate always returns one row
        return {"energy_kwh": float(r[0]), "carbon_kgco2": float(r[1]), "ticks": int(r[2])}

    def app_totals(self, app: str, start: datetime, end: datetime) -> dict:
        """Energy by source (kWh) and carbon (kg) of an app, prorated to [start, end)."""
        cols = {
            "load_energy_kwh": "load_kw", "solar_energy_kwh": "solar_kw", "solar_to_load_kwh": "solar_to_load_kw",
            "solar_to_battery_kwh": "solar_to_battery_kw", "curtailed_kwh": "curtailed_kw",
            "battery_discharge_kwh": "battery_discharge_kw", "grid_energy_kwh": "grid_kw",
            "grid_to_load_kwh": "grid_to_load_kw", "grid_to_battery_kwh": "grid_to_battery_kw",
        }
        sel = [f"coalesce(sum({c} * dt_s / 3600.0 * {_OVERLAP}), 0)" for c in cols.values()]
        sel += [f"coalesce(sum(carbon_kgco2 * {_OVERLAP}), 0)", "count(*)"]
        args: list = [end, start] * (len(cols) + 1) + [app, start, end]
        with self._lock:
            r = self.con.execute(
                f"SELECT {', '.join(sel)} FROM ecovisor_app_ticks WHERE app = ? AND interval_end > ? AND interval_start < ?",
                args,
            ).fetchone()
        assert r is not None  # an aggregate always returns one row
        out = {k: float(v) for k, v in zip(cols, r[: len(cols)])}
        out["carbon_kgco2"] = float(r[len(cols)])
        out["ticks"] = int(r[len(cols) + 1])
        return out
