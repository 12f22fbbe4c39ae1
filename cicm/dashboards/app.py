"""The operators' dashboard: a Dash app over the DuckDB store, read-only.

Pages (the URL holds all state, so every view can be linked and reloaded):

- ``/?date=YYYY-MM-DD``                  fleet overview for a plan date (default: the newest plan)
- ``/cluster?cluster=NAME&date=...``     one cluster's day, power-model fit, forecast errors, plan history
- ``/runs?run=RUN_ID``                   plan history (runs), the run log of one run, backtest results
- ``/export/vccs.csv?date=...[&cluster=NAME]``   the day's VCCs in force as CSV
- ``/api/health``                        JSON: can the store be read, and from where (live / snapshot / busy)

Every page render opens one read-only connection (see `cicm.dashboards.reader`) and closes it before returning.
"""
from __future__ import annotations

import io
import math
from datetime import date
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import parse_qs, urlencode

import pandas as pd
from dash import Dash, Input, Output, State, dcc, html, no_update
from flask import Response, jsonify, request

from cicm.config import Fleet, load_fleet
from cicm.dashboards import data, figures
from cicm.dashboards.reader import Reading, StoreBusy, StoreIncompatible, StoreMissing, StoreReader

RETRY_MS = 3000

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 0; color: #212121;
       background: #fafafa; }
header { background: #1b5e20; color: white; padding: 10px 20px; display: flex; align-items: center; gap: 24px; }
header a { color: white; text-decoration: none; font-weight: 600; }
header .brand { font-size: 20px; }
header .store { margin-left: auto; font-size: 12px; opacity: 0.85; font-family: monospace; }
main { padding: 12px 24px 40px; max-width: 1500px; }
h1 { font-size: 22px; margin: 12px 0; } h2 { font-size: 18px; margin: 24px 0 8px; }
.controls { display: flex; gap: 16px; align-items: flex-end; flex-wrap: wrap; margin-bottom: 12px; }
.control { min-width: 220px; } .control label { display: block; font-size: 12px; color: #555; margin-bottom: 2px; }
.button { display: inline-block; padding: 7px 12px; background: #1565c0; color: white; border-radius: 4px;
          text-decoration: none; font-size: 14px; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; }
.card { background: white; border: 1px solid #ddd; border-radius: 6px; padding: 12px 16px; min-width: 260px;
        flex: 1; }
.card .label { font-size: 12px; color: #666; text-transform: uppercase; letter-spacing: .04em; }
.card .value { font-size: 24px; font-weight: 700; margin: 4px 0; } .card .note { font-size: 13px; color: #444; }
.table-wrap { overflow-x: auto; max-width: 100%; }  /* a wide table scrolls; the page does not stretch */
table.grid { border-collapse: collapse; background: white; font-size: 13px; width: 100%; }
table.grid th, table.grid td { border: 1px solid #e0e0e0; padding: 4px 8px; text-align: left; vertical-align: top; }
table.grid th { background: #f1f1f1; } table.grid td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.grid tr.group td { background: #e8f5e9; font-weight: 600; }
.status-shaped { color: #1b5e20; font-weight: 600; } .status-fallback { color: #b71c1c; font-weight: 600; }
.status-failed { color: #b71c1c; font-weight: 600; } .status-degraded { color: #e65100; font-weight: 600; }
.status-ok, .status-ran { color: #1b5e20; font-weight: 600; } .muted { color: #777; }
.notice { margin: 0; padding: 10px 24px; background: #fff3e0; border-bottom: 2px solid #ef6c00; }
.notice.error { background: #ffebee; border-color: #c62828; }
.detail { font-size: 12px; color: #444; max-width: 520px; }
pre { background: #f5f5f5; padding: 8px; font-size: 12px; white-space: pre-wrap; }
"""

INDEX = """<!DOCTYPE html>
<html lang="en">
    <head>
        {%metas%}
        <title>{%title%}</title>
        {%favicon%}
        {%css%}
        <style>""" + CSS + """</style>
    </head>
    <body>
        {%app_entry%}
        <footer>{%config%}{%scripts%}{%renderer%}</footer>
    </body>
</html>"""


# ---------------------------------------------------------------------------------------------- helpers


def _params(search: str | None) -> dict[str, str]:
    parsed = parse_qs((search or "").lstrip("?"))
    return {k: v[-1] for k, v in parsed.items() if v}


def _search(params: Mapping[str, str | None]) -> str:
    kept = {k: v for k, v in params.items() if v}
    return "?" + urlencode(kept) if kept else ""


def _with_param(search: str | None, key: str, value) -> str:
    params: dict[str, str | None] = dict(_params(search))
    params[key] = str(value) if value is not None else None
    return _search(params)


def _is_missing(value) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def fmt(value, digits: int = 1, suffix: str = "") -> str:
    if _is_missing(value):
        return "—"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and math.isinf(value):
            return "—"
        return f"{value:,.{digits}f}{suffix}"
    return str(value)


def fmt_time(value) -> str:
    if _is_missing(value):
        return "—"
    return pd.Timestamp(value).tz_convert("UTC").strftime("%Y-%m-%d %H:%M:%S UTC") \
        if pd.Timestamp(value).tzinfo else str(value)


def fmt_date(value) -> str:
    return "—" if _is_missing(value) else pd.Timestamp(value).strftime("%Y-%m-%d")


def _parse_date(text: str | None) -> date | None:
    if not text:
        return None
    try:
        return pd.Timestamp(text).date()
    except (ValueError, TypeError):
        return None


def _status_span(status) -> html.Span:
    text = "—" if _is_missing(status) else str(status)
    return html.Span(text, className=f"status-{text}")


def grid(frame: pd.DataFrame, columns: list[tuple[Any, ...]], table_id: str,
         row_key: str | None = None) -> html.Div:
    """A plain HTML table. columns: (column, header, formatter or None, css class or None)."""
    head = html.Thead(html.Tr([html.Th(h) for _, h, *_ in columns]))
    rows = []
    for _, row in frame.iterrows():
        cells = []
        for col, _, formatter, *rest in columns:
            value = row.get(col)
            content = formatter(value, row) if formatter else fmt(value)
            cells.append(html.Td(content, className=(rest[0] if rest else None)))
        attrs: dict[str, Any] = {"data-key": str(row[row_key])} if row_key else {}
        rows.append(html.Tr(cells, **attrs))
    return html.Div(html.Table([head, html.Tbody(rows)], id=table_id, className="grid"), className="table-wrap")


def _num(digits: int = 1, suffix: str = ""):
    return lambda v, _row: fmt(v, digits, suffix)


def _picker(picker_id: str, label: str, options: list, value) -> html.Div:
    return html.Div([
        html.Label(label, htmlFor=picker_id),
        dcc.Dropdown(id=picker_id, options=options, value=value, clearable=False, searchable=True),
    ], className="control", id=f"{picker_id}-control")


def _card(card_id: str, label: str, value, note) -> html.Div:
    return html.Div([html.Div(label, className="label"), html.Div(value, className="value"),
                     html.Div(note, className="note")], className="card", id=card_id)


# ---------------------------------------------------------------------------------------------- pages


class Pages:
    def __init__(self, reader: StoreReader, fleet: Fleet | None):
        self.reader = reader
        self.fleet = fleet

    # -- dispatch -----------------------------------------------------------------------------------------
    def render(self, pathname: str | None, search: str | None):
        """(page children, notice children, retry timer disabled?) for a URL. Never raises for store trouble."""
        params = _params(search)
        try:
            with self.reader.read() as r:
                if pathname in ("/cluster", "/cluster/"):
                    page = self.cluster(r, params)
                elif pathname in ("/runs", "/runs/"):
                    page = self.runs(r, params)
                elif pathname in (None, "", "/"):
                    page = self.overview(r, params)
                else:
                    page = html.Div([html.H1("Not found"), html.P(f"No page at {pathname}."),
                                     dcc.Link("Fleet overview", href="/")], id="not-found")
                notice = self._snapshot_notice(r)
                return page, notice, r.source == "live"
        except StoreBusy as exc:
            notice = html.Div([html.Strong("Store busy, retrying… "), html.Span(str(exc)),
                               html.Span(f" This page reloads every {RETRY_MS // 1000} s until the store is free.")],
                              className="notice", id="store-busy")
            page = html.Div([html.H1("Store busy, retrying…"),
                             html.P("The nightly flow or the agent is writing the store; the dashboard reads it "
                                    "again in a moment.")], id="busy-page")
            return page, notice, False
        except StoreMissing as exc:
            return (html.Div([html.H1("No store yet"), html.P(str(exc))], id="no-store"),
                    html.Div(str(exc), className="notice error", id="store-missing"), True)
        except StoreIncompatible as exc:
            return (html.Div([html.H1("Cannot read the store"), html.P(str(exc))], id="bad-store"),
                    html.Div(str(exc), className="notice error", id="store-error"), True)

    @staticmethod
    def _snapshot_notice(r: Reading):
        if r.source != "snapshot":
            return None
        return html.Div([
            html.Strong("Store busy, retrying… "),
            html.Span(f"A writer holds the store ({r.busy_detail}). Showing a read-only snapshot of its last "
                      f"checkpoint, copied at {fmt_time(r.snapshot_taken_at)}; the newest writes may be missing. "
                      f"Retrying every {RETRY_MS // 1000} s."),
        ], className="notice", id="store-busy")

    def _dates(self, r: Reading, params: dict) -> tuple[list[date], date | None]:
        dates = data.plan_dates(r)
        wanted = _parse_date(params.get("date"))
        chosen = wanted if wanted in dates else (dates[0] if dates else None)
        return dates, chosen

    @staticmethod
    def _not_found(what: str, links: list[tuple[str, str]]) -> html.Div:
        """A clear "not found" for a cluster or date the store has no plan for, with links to what it has."""
        return html.Div([html.H1("Not found"), html.P(what, id="not-found-what"),
                         html.Ul([html.Li(dcc.Link(label, href=href)) for label, href in links[:31]])],
                        id="not-found")

    def _unknown_date(self, params: dict, dates: list[date], href) -> html.Div | None:
        """The not-found page when the request names a date without a plan (None when it names none, or one)."""
        asked = params.get("date")
        if not asked or _parse_date(asked) in dates:
            return None
        return self._not_found(f"No plan for {asked}. Plans in the store:", [(str(d), href(d)) for d in dates])

    @staticmethod
    def _no_plan() -> html.Div:
        return html.Div([html.H1("No plans in the store"),
                         html.P("Run `cicm plan` (or wait for the nightly flow) to create one.")], id="no-plan")

    # -- overview -----------------------------------------------------------------------------------------
    def overview(self, r: Reading, params: dict) -> html.Div:
        dates, plan_date = self._dates(r, params)
        if plan_date is None:
            return self._no_plan()
        missing = self._unknown_date(params, dates, lambda d: f"/?date={d}")
        if missing is not None:
            return missing
        frame = data.overview(r, self.fleet, plan_date)
        carbon = data.carbon_summary(frame)
        slo = data.slo_summary(r, plan_date)
        runs = data.run_in_force(r, plan_date)
        newest = " (newest plan in the store)" if plan_date == dates[0] else ""

        not_shaped = frame[(frame["status"] != "shaped")]
        why = [html.Li([dcc.Link(c, href=f"/cluster?cluster={c}&date={plan_date}"), ": ",
                        html.Strong(code or status), (f" — {detail}" if detail else "")])
               for c, status, code, detail in zip(not_shaped["cluster"], not_shaped["status"],
                                                  not_shaped["reason_code"], not_shaped["reason_detail"])]
        shaped_names = list(frame.loc[frame["status"] == "shaped", "cluster"])
        shaped_list = html.P(["shaped: "] + [x for i, c in enumerate(shaped_names) for x in
                                             ([", "] if i else []) + [dcc.Link(c, href=f"/cluster?cluster={c}"
                                                                                      f"&date={plan_date}")]]
                             if shaped_names else "no cluster is shaped", id="shaped-list")
        shaped_card = _card(
            "card-shaped", f"Shaped on {plan_date}", f"{carbon.shaped} of {carbon.clusters} clusters",
            html.Div([shaped_list, html.Ul(why, id="not-shaped-list") if why else "every planned cluster is shaped"]))
        if carbon.flat_kgco2 > 0:
            carbon_value = f"{fmt(carbon.saved_kgco2)} kgCO2"
            carbon_note = (f"{fmt(carbon.saved_pct)}% of {fmt(carbon.flat_kgco2)} kgCO2 unshaped (flat); "
                           f"plan {fmt(carbon.expected_kgco2)} kgCO2")
            if carbon.without_estimate:
                carbon_note += f"; no estimate for {', '.join(carbon.without_estimate)}"
        else:
            carbon_value, carbon_note = "no estimate", "no cluster of this plan has expected and flat carbon"
        carbon_card = _card("card-carbon", "Expected carbon saved vs flat", carbon_value, carbon_note)
        first, last = slo.window
        if slo.latest_day is None:
            slo_value = "no data"
            slo_note = (f"no SLO day recorded in {first} … {last} (slo_events is empty for this window): "
                        f"0 violations recorded, which is not the same as none happened")
        else:
            slo_value = (f"{slo.latest_met}/{slo.latest_clusters} met" if not slo.latest_violated
                         else f"{len(slo.latest_violated)} violated")
            slo_note = f"latest day evaluated {slo.latest_day}"
            if slo.latest_violated:
                slo_note += f": violated by {', '.join(slo.latest_violated)}"
            slo_note += (f". Last {data.SLO_WINDOW_DAYS} days ({first} … {last}): {slo.violations} violation(s), "
                         f"{slo.close_calls} close call(s) over {slo.days_recorded} day(s) recorded")
        slo_card = _card("card-slo", "SLO (latest day evaluated)", slo_value, slo_note)
        if runs.empty:
            run_card = _card("card-run", "Plan run", "—", "no run recorded")
        else:
            run = runs.iloc[0]
            run_card = _card("card-run", "Plan run in force", _status_span(run["status"]),
                             [dcc.Link(run["run_id"], href=f"/runs?run={run['run_id']}"),
                              f" finished {fmt_time(run['finished_at'])}"
                              + (f" — {run['message']}" if not _is_missing(run["message"]) else "")])

        def cluster_link(v, row):
            return dcc.Link(v, href=f"/cluster?cluster={v}&date={plan_date}") if row["status"] != "not planned" \
                else v

        def shaping_off(v, row):
            if _is_missing(v):
                return "—"
            return f"{v} (until {fmt_date(row['shaping_off_until'])})"

        def slo_cell(v, row):
            if row["slo_days"] == 0:
                return html.Span("no data", className="muted")
            return f"{row['slo_violations']} violated / {row['slo_days']} d"

        def last_slo(v, row):
            if _is_missing(row.get("slo_last_day")):
                return html.Span("no data", className="muted")
            verdict = "violated" if row["slo_last_violated"] else "met, close" if row["slo_last_close"] else "met"
            return f"{fmt_date(row['slo_last_day'])}: {verdict}"

        columns: list[tuple[Any, ...]] = [
            ("cluster", "cluster", cluster_link),
            ("status", "status", lambda v, _r: _status_span(v)),
            ("reason_code", "reason", None),
            ("reason_detail", "detail", lambda v, _r: html.Div(fmt(v), className="detail")),
            ("shaping_off_reason", "SLO loop: shaping off", shaping_off),
            ("expected_kgco2", "plan kgCO2", _num(), "num"),
            ("flat_kgco2", "flat kgCO2", _num(), "num"),
            ("saved_kgco2", "saved kgCO2", _num(), "num"),
            ("saving_pct", "saved %", _num(1, "%"), "num"),
            ("slo_violations", f"SLO {data.SLO_WINDOW_DAYS} d", slo_cell),
            ("slo_last_day", "last SLO day", last_slo),
        ]
        body = []
        for (campus, zone), group in frame.groupby(["campus", "grid_zone"], sort=True, dropna=False):
            tz = group["timezone"].dropna().iloc[0] if group["timezone"].notna().any() else "?"
            group_attrs: dict[str, Any] = {"data-campus": str(campus)}
            body.append(html.Tr(html.Td(f"{campus} — grid zone {zone} — {tz}", colSpan=len(columns)),
                                className="group", **group_attrs))
            table = grid(group, columns, "unused", row_key="cluster").children
            body.extend(table.children[1].children)
        fleet_table = html.Div(html.Table([html.Thead(html.Tr([html.Th(h) for _, h, *_ in columns])),
                                           html.Tbody(body)], id="fleet-table", className="grid"),
                               className="table-wrap")

        return html.Div([
            html.H1(f"Fleet overview — plan for {plan_date}{newest}", id="overview-title"),
            html.Div([
                _picker("date-picker", "Plan date", [{"label": str(d), "value": str(d)} for d in dates],
                        str(plan_date)),
                html.A("Export the day's VCCs (CSV)", href=f"/export/vccs.csv?date={plan_date}",
                       id="export-day", className="button", download=f"vccs-{plan_date}.csv"),
            ], className="controls"),
            html.Div([shaped_card, carbon_card, slo_card, run_card], className="cards"),
            html.H2("Clusters by campus and grid zone"),
            fleet_table,
            dcc.Graph(id="savings-chart", figure=figures.savings_chart(
                frame, f"Expected carbon saved by the plan for {plan_date}, per cluster"),
                config={"displaylogo": False}),
        ], id="overview-page")

    # -- cluster ------------------------------------------------------------------------------------------
    def cluster(self, r: Reading, params: dict) -> html.Div:
        dates, plan_date = self._dates(r, params)
        if plan_date is None:
            return self._no_plan()
        clusters = data.planned_clusters(r, plan_date)
        known = [c.name for c in self.fleet.clusters()] if self.fleet else []
        options = clusters + [c for c in known if c not in clusters]
        cluster = params.get("cluster")
        missing = self._unknown_date(params, dates, lambda d: f"/cluster?cluster={cluster or ''}&date={d}")
        if missing is not None:
            return missing
        if cluster and cluster not in options:
            return self._not_found(f"No cluster {cluster!r} in the plan for {plan_date} or the fleet file. Clusters:",
                                   [(c, f"/cluster?cluster={c}&date={plan_date}") for c in options])
        if not cluster:
            cluster = options[0] if options else None
        if cluster is None:
            return self._no_plan()
        campus, zone, tz = data.cluster_place(self.fleet, cluster)
        status = data.cluster_status(r, cluster, plan_date)
        day = data.cluster_day(r, cluster, plan_date, zone)
        capacity = status.get("capacity_cores") if status else None
        fits = data.power_fits(r, cluster, plan_date)
        errors = data.forecast_errors(r, cluster, zone)
        history = data.cluster_plan_history(r, cluster)
        backtest = data.backtest_results(r, cluster)
        deviations = data.intraday_deviations(r, cluster, plan_date)
        storage = data.storage_day(r, cluster, plan_date)

        summary: html.P | html.Div
        if status is None:
            summary = html.P(f"No plan in force for {cluster} on {plan_date}.", id="cluster-status")
        else:
            code, detail = data.split_reason(status.get("reason"))
            saved = (status["flat_kgco2"] - status["expected_kgco2"]) if not _is_missing(status["flat_kgco2"]) \
                else None
            summary = html.Div([
                _card("cluster-status-card", f"{cluster} on {plan_date}", _status_span(status["status"]),
                      (f"{code}" + (f": {detail}" if detail else "")) if code else "shaped by the plan"),
                _card("cluster-carbon-card", "Expected carbon", f"{fmt(status['expected_kgco2'])} kgCO2",
                      f"flat {fmt(status['flat_kgco2'])} kgCO2, saved {fmt(saved)} kgCO2 "
                      f"({fmt(status['saving_pct'], 1, '%')})"),
                _card("cluster-run-card", "Plan run in force", html.Span(status["run_id"], style={"fontSize": 14}),
                      f"capacity {fmt(status['capacity_cores'], 0)} cores; Θ {fmt(status['theta_core_hours'], 0)} "
                      f"reservation core-hours; peak {fmt(status['peak_kw'])} kW"),
            ], className="cards", id="cluster-status")

        history_table = grid(history, [
            ("plan_date", "plan date", lambda v, _r: fmt_date(v)),
            ("run_id", "run", lambda v, _r: dcc.Link(v, href=f"/runs?run={v}")),
            ("started_at", "run started", lambda v, _r: fmt_time(v)),
            ("status", "status", lambda v, _r: _status_span(v)),
            ("reason", "reason", lambda v, _r: html.Div(fmt(v), className="detail")),
            ("expected_kgco2", "plan kgCO2", _num(), "num"),
            ("flat_kgco2", "flat kgCO2", _num(), "num"),
            ("saving_pct", "saved %", _num(1, "%"), "num"),
            ("in_force", "in force", lambda v, _r: "yes" if v else "superseded"),
        ], "cluster-history", row_key="run_id")

        where = f"{campus} — grid zone {zone} — {tz}" if campus else "not in the fleet file"
        parts = [
            html.H1(f"Cluster {cluster} ({where})", id="cluster-title"),
            html.Div([
                _picker("cluster-picker", "Cluster", [{"label": c, "value": c} for c in options], cluster),
                _picker("date-picker", "Plan date", [{"label": str(d), "value": str(d)} for d in dates],
                        str(plan_date)),
                html.A(f"Export {cluster}'s VCC (CSV)", href=f"/export/vccs.csv?date={plan_date}&cluster={cluster}",
                       id="export-cluster", className="button", download=f"vccs-{plan_date}-{cluster}.csv"),
                html.A("Export all clusters (CSV)", href=f"/export/vccs.csv?date={plan_date}", id="export-day",
                       className="button", download=f"vccs-{plan_date}.csv"),
            ], className="controls"),
            summary,
            dcc.Graph(id="day-chart", figure=figures.day_chart(
                day, tz, capacity, f"{cluster} on {plan_date}: VCC against forecast and actual usage", deviations),
                config={"displaylogo": False}),
            html.H2("Intraday deviations from the plan of record (the agent's hourly correction)"),
            self._deviations(deviations, tz, cluster, plan_date),
            *([html.H2(f"Battery and solar of {campus}: the storage plan against what the agent applied"),
               dcc.Graph(id="storage-chart", figure=figures.storage_chart(
                   storage, tz, f"{campus} on {plan_date}: planned charge and discharge, solar forecast, applied "
                                "settings"), config={"displaylogo": False})] if len(storage) else []),
            dcc.Graph(id="power-fit", figure=figures.power_fit_chart(
                fits, f"Power models of the plan in force: telemetry and fitted piecewise-linear curves"),
                config={"displaylogo": False}),
            dcc.Graph(id="forecast-errors", figure=figures.forecast_error_chart(
                errors, f"Day-ahead forecast errors of {cluster}, per plan date stored"),
                config={"displaylogo": False}),
            html.H2("Plan history of this cluster"),
            history_table,
        ]
        if backtest is not None:
            parts += [html.H2("Backtest results"), _frame_table(backtest, "cluster-backtest")]
        return html.Div(parts, id="cluster-page")

    @staticmethod
    def _deviations(deviations: pd.DataFrame, tz: str | None, cluster: str, plan_date) -> html.Div:
        if deviations.empty:
            return html.Div(html.P(f"No intraday deviations recorded for {cluster} on {plan_date}: the agent "
                                   "applied the plan of record (or no agent corrected this cluster-day).",
                                   className="muted", id="deviations-none"), id="deviations")
        summary = data.deviation_summary(deviations)
        reasons = ", ".join(f"{k} {v}" for k, v in summary["reasons"].items())
        local = data.to_local(deviations["hour"], tz)
        frame = deviations.assign(hour_local=[t.strftime("%Y-%m-%d %H:%M") for t in local])
        table = grid(frame, [
            ("hour_local", f"hour ({tz or 'UTC'})", None),
            ("reason", "reason", lambda v, _r: html.Span(v, className=f"reason-{v}")),
            ("plan_cores", "plan (flexible cores)", _num(0), "num"),
            ("applied_cores", "applied", _num(0), "num"),
            ("difference_cores", "difference", _num(0), "num"),
            ("detail", "detail", lambda v, _r: html.Div(fmt(v), className="detail")),
            ("acted_at", "applied at", lambda v, _r: fmt_time(v)),
        ], "deviations-table", row_key="hour_local")
        return html.Div([
            html.P(f"{summary['hours']} hour(s) differ from the plan of record ({reasons}): "
                   f"{summary['hours_above_plan']} above it by {summary['core_hours_above_plan']:,.0f} core-hours, "
                   f"{summary['hours_below_plan']} below it by {summary['core_hours_below_plan']:,.0f} core-hours. "
                   "The day-ahead VCC stays the plan of record.", id="deviations-summary"),
            table,
        ], id="deviations")

    # -- runs ---------------------------------------------------------------------------------------------
    def runs(self, r: Reading, params: dict) -> html.Div:
        runs = data.runs(r)
        backtest = data.backtest_results(r)
        if runs.empty:
            return html.Div([html.H1("Plan history"), html.P("No runs recorded yet.")], id="runs-page")
        wanted = params.get("run")
        plans = runs[runs["kind"] == "plan"]  # by default the newest plan's log (a plan run encloses its SLO run)
        newest = plans.iloc[0]["run_id"] if len(plans) else runs.iloc[0]["run_id"]
        run_id = wanted if wanted is not None and wanted in set(runs["run_id"]) else newest
        table = grid(runs, [
            ("run_id", "run", lambda v, _r: dcc.Link(v, href=f"/runs?run={v}")),
            ("kind", "kind", None),
            ("plan_date", "plan date", lambda v, _r: fmt_date(v)),
            ("status", "status", lambda v, _r: _status_span(v)),
            ("started_at", "started", lambda v, _r: fmt_time(v)),
            ("seconds", "seconds", _num(1), "num"),
            ("code_version", "code", None),
            ("message", "message", lambda v, _r: html.Div(fmt(v), className="detail")),
        ], "runs-table", row_key="run_id")
        record = data.run_record(r, run_id)
        assert record is not None  # run_id is one of the listed runs
        summary = data.parse_json(record.get("summary")) or {}
        params_doc = data.parse_json(record.get("params")) or {}
        assert isinstance(params_doc, dict)  # a run's params are a JSON object
        stages = pd.DataFrame(summary.get("stages", []) if isinstance(summary, dict) else [])
        clusters = pd.DataFrame(summary.get("clusters", []) if isinstance(summary, dict) else [])
        log = [
            html.H2(f"Run log: {run_id}"),
            html.Div([
                _picker("run-picker", "Run", [{"label": f"{rid} ({k}, {s})", "value": rid} for rid, k, s in
                                              zip(runs["run_id"], runs["kind"], runs["status"])], run_id),
            ], className="controls"),
            html.P([html.Strong("status: "), _status_span(record["status"]), f" — {record['kind']}",
                    f" for {fmt_date(record['plan_date'])}" if not _is_missing(record["plan_date"]) else "",
                    f"; started {fmt_time(record['started_at'])}, finished {fmt_time(record['finished_at'])}"],
                   id="run-status"),
        ]
        if not _is_missing(record.get("message")):
            log.append(html.Pre(str(record["message"]), id="run-message"))
        if not stages.empty:
            log += [html.H2("Stages"), grid(stages, [
                ("name", "stage", None), ("status", "status", lambda v, _r: _status_span(v)),
                ("detail", "detail", lambda v, _r: html.Div(fmt(v), className="detail")),
            ], "run-stages")]
        if not clusters.empty:
            log += [html.H2("Clusters of this run"), _frame_table(clusters, "run-clusters")]
        log += [html.H2("Parameters"), html.Pre("\n".join(f"{k} = {v}" for k, v in params_doc.items()) or "—",
                                                 id="run-params")]
        parts = [html.H1("Plan history and run log"), table, html.Div(log, id="run-log")]
        if backtest is not None:
            parts += [html.H2("Backtest results"), _frame_table(backtest, "backtest-results")]
        return html.Div(parts, id="runs-page")


def _frame_table(frame: pd.DataFrame, table_id: str) -> html.Div | html.P:
    if frame.empty:
        return html.P("no rows", className="muted", id=table_id)
    columns: list[tuple[Any, ...]] = []
    for col in frame.columns:
        kind = frame[col].dtype.kind
        if kind == "f":
            columns.append((col, col, _num(2), "num"))
        elif kind == "M":
            columns.append((col, col, lambda v, _r: fmt_time(v) if getattr(v, "tzinfo", None) else fmt(v)))
        else:
            columns.append((col, col, None))
    return grid(frame, columns, table_id)


# ---------------------------------------------------------------------------------------------- the app


def create_app(db_path: Path | str, fleet_path: Path | str | None = None,
               reader: StoreReader | None = None) -> Dash:
    """The Dash app (its Flask server is `app.server`, a WSGI app any WSGI server can run)."""
    reader = reader or StoreReader(db_path)
    try:
        fleet = load_fleet(fleet_path)
    except Exception:  # noqa: BLE001 - the pages still work without the fleet file (no zones, UTC axes)
        if fleet_path:
            raise
        fleet = None
    pages = Pages(reader, fleet)
    # update_title=None turns the "Updating..." title off (documented), though dash's annotation says str.
    app = Dash(__name__, title="cicm — operators' dashboard", update_title=None,  # type: ignore[arg-type]
               suppress_callback_exceptions=True, serve_locally=True)
    app.index_string = INDEX
    app.layout = html.Div([
        dcc.Location(id="url", refresh=False),
        dcc.Interval(id="busy-retry", interval=RETRY_MS, disabled=True),
        html.Header([
            dcc.Link("cicm", href="/", className="brand", id="nav-home"),
            html.Nav(id="nav", style={"display": "flex", "gap": "18px"}),
            html.Span(f"store: {reader.path} (read-only)", className="store", id="store-path"),
        ]),
        html.Div(id="store-notice"),
        dcc.Loading(html.Main(id="page"), type="dot", delay_show=400),
    ])

    @app.callback(Output("page", "children"), Output("store-notice", "children"), Output("busy-retry", "disabled"),
                  Output("nav", "children"),
                  Input("url", "pathname"), Input("url", "search"), Input("busy-retry", "n_intervals"))
    def _render(pathname, search, _ticks):
        page, notice, live = pages.render(pathname, search)
        params = _params(search)
        keep = _search({"date": params.get("date")})
        cluster_q = _search({"date": params.get("date"), "cluster": params.get("cluster")})
        nav = [dcc.Link("Fleet overview", href="/" + keep, id="nav-overview"),
               dcc.Link("Cluster", href="/cluster" + cluster_q, id="nav-cluster"),
               dcc.Link("Plan history & runs", href="/runs", id="nav-runs")]
        return page, notice, live, nav

    for picker, key in (("date-picker", "date"), ("cluster-picker", "cluster"), ("run-picker", "run")):
        _register_picker(app, picker, key)

    server = app.server

    @server.route("/export/vccs.csv")
    def _export():
        plan_date = _parse_date(request.args.get("date"))
        cluster = request.args.get("cluster") or None
        if plan_date is None:
            return Response("date=YYYY-MM-DD is required\n", status=400, mimetype="text/plain")
        try:
            with reader.read() as r:
                frame = data.vcc_export(r, fleet, plan_date, cluster)
        except StoreBusy as exc:
            return Response(f"store busy, retry shortly: {exc}\n", status=503, mimetype="text/plain",
                            headers={"Retry-After": "3"})
        except (StoreMissing, StoreIncompatible) as exc:
            return Response(f"{exc}\n", status=503, mimetype="text/plain")
        if frame.empty:
            what = f"cluster {cluster} on {plan_date}" if cluster else str(plan_date)
            return Response(f"no plan in force for {what}\n", status=404, mimetype="text/plain")
        buffer = io.StringIO()
        frame.to_csv(buffer, index=False)
        name = f"vccs-{plan_date}" + (f"-{cluster}" if cluster else "") + ".csv"
        return Response(buffer.getvalue(), mimetype="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    @server.route("/api/health")
    def _health():
        try:
            with reader.read() as r:
                dates = [str(d) for d in data.plan_dates(r)]
                return jsonify({"store": str(reader.path), "state": r.source, "plan_dates": dates})
        except StoreBusy as exc:
            return jsonify({"store": str(reader.path), "state": "busy", "detail": str(exc)}), 503
        except (StoreMissing, StoreIncompatible) as exc:
            return jsonify({"store": str(reader.path), "state": "unavailable", "detail": str(exc)}), 503

    return app


def _register_picker(app: Dash, picker: str, key: str) -> None:
    @app.callback(Output("url", "search", allow_duplicate=True), Input(picker, "value"), State("url", "search"),
                  prevent_initial_call=True)
    def _pick(value, search):
        if value is None or _params(search).get(key) == str(value):
            return no_update
        return _with_param(search, key, value)
