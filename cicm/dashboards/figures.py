"""Plotly figures of the dashboard, built from the frames of `cicm.dashboards.data`."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from cicm.dashboards.data import DomainFit, to_local

TEMPLATE = "plotly_white"
COLOURS = {
    "vcc": "#1b5e20", "capacity": "#9e9e9e", "reserved": "#6a1b9a", "forecast_if": "#1565c0",
    "upper": "#64b5f6", "planned_total": "#ef6c00", "actual_if": "#0d47a1", "actual_total": "#d84315",
    "carbon_forecast": "#546e7a", "carbon_actual": "#000000", "carbon_plan": "#8d6e63",
}
DOMAIN_COLOURS = ["#1565c0", "#c62828", "#2e7d32", "#6a1b9a", "#ef6c00", "#00838f"]


def _empty(title: str, message: str) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(template=TEMPLATE, title=title, height=320,
                      annotations=[dict(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                                        font=dict(size=14, color="#666"))],
                      xaxis=dict(visible=False), yaxis=dict(visible=False))
    return fig


def _values(series: pd.Series) -> list:
    """Plain floats (None for missing), so the figure JSON stays readable and small."""
    return [None if v is None or (isinstance(v, float) and np.isnan(v)) else float(v) for v in series]


DEVIATION_MARKERS = {"deadline-release": ("triangle-up", "#c62828"), "catch-up": ("triangle-up", "#ef6c00"),
                     "below-plan": ("triangle-down", "#1565c0"), "deferred": ("triangle-down", "#00838f")}


def day_chart(day: pd.DataFrame, tz: str | None, capacity_cores: float | None, title: str,
              deviations: pd.DataFrame | None = None) -> go.Figure:
    """Top: the VCC (reservation cores) against forecast and actual usage, and a marker for every hour the agent's
    hourly correction applied another flexible allowance than the plan (at forecast inflexible + the applied
    allowance, comparable with the planned-usage line). Bottom: carbon intensity."""
    if day.empty:
        return _empty(title, "no plan in force for this cluster and day")
    # Each value holds for its hour: steps, with one extra point closing the last hour.
    local = to_local(day["hour"], tz)
    x = list(local) + [local.iloc[-1] + pd.Timedelta(hours=1)]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, row_heights=[0.64, 0.36],
                        subplot_titles=("Cores: VCC, capacity and reservations in reservation cores; usage in CPU cores",
                                        "Carbon intensity (gCO2/kWh)"))

    def line(name, y, colour, row, dash=None, width=2, shape="hv", visible=True, fill=None):
        values = _values(y)
        values.append(values[-1] if values else None)
        fig.add_trace(go.Scatter(x=x, y=values, name=name, mode="lines", line=dict(color=colour, dash=dash,
                                 width=width, shape=shape), visible=True if visible else "legendonly",
                                 fill=fill, legendgroup=f"row{row}", connectgaps=False), row=row, col=1)

    line("VCC (reservation cores)", day["vcc_cores"], COLOURS["vcc"], 1, width=3)
    if capacity_cores:
        # the plan's capacity is in the VCC's unit: the machines' cores times the day's highest reservation ratio
        line("capacity (reservation cores)", pd.Series([capacity_cores] * len(day)), COLOURS["capacity"], 1, dash="dot",
             width=1)
    line("actual reservations", day["actual_reserved_cpu_cores"], COLOURS["reserved"], 1, dash="dot")
    line("forecast inflexible usage", day["forecast_inflexible_cpu_cores"], COLOURS["forecast_if"], 1)
    line("forecast inflexible, upper bound", day["forecast_inflexible_upper_cpu_cores"], COLOURS["upper"], 1,
         dash="dash", width=1)
    planned_total = day["forecast_inflexible_cpu_cores"] + day["planned_flexible_cpu_cores"]
    line("planned usage (forecast inflexible + planned flexible)", planned_total, COLOURS["planned_total"], 1)
    line("actual inflexible usage", day["actual_inflexible_cpu_cores"], COLOURS["actual_if"], 1, dash="dash")
    actual_total = day["actual_inflexible_cpu_cores"] + day["actual_flexible_cpu_cores"]
    line("actual total usage (inflexible + flexible)", actual_total, COLOURS["actual_total"], 1, dash="dash")
    if deviations is not None and len(deviations):
        base = day.set_index(pd.to_datetime(day["hour"], utc=True))["forecast_inflexible_cpu_cores"]
        hours = pd.to_datetime(deviations["hour"], utc=True)
        at = base.reindex(hours).to_numpy(float) + deviations["applied_cores"].to_numpy(float)
        for reason, group in deviations.assign(_y=at, _hour=hours).groupby("reason", sort=False):
            symbol, colour = DEVIATION_MARKERS.get(reason, ("diamond", "#6a1b9a"))
            xs = list(to_local(group["_hour"], tz) + pd.Timedelta(minutes=30))  # the middle of the hour
            fig.add_trace(go.Scatter(
                x=xs, y=_values(group["_y"]), mode="markers", name=f"hourly correction: {reason}",
                marker=dict(symbol=symbol, size=13, color=colour, line=dict(width=1, color="white")),
                customdata=list(zip(_values(group["plan_cores"]), _values(group["applied_cores"]),
                                    [str(d)[:160] for d in group["detail"]])),
                hovertemplate=(f"{reason}: plan %{{customdata[0]:,.0f}} → applied %{{customdata[1]:,.0f}} flexible "
                               "cores<br>%{customdata[2]}<extra></extra>"),
                legendgroup="row1"), row=1, col=1)
    line("carbon forecast (newest vintage)", day["forecast_gco2_per_kwh"], COLOURS["carbon_forecast"], 2)
    line("carbon actual", day["actual_gco2_per_kwh"], COLOURS["carbon_actual"], 2)
    if not np.allclose(day["plan_gco2_per_kwh"].fillna(-1), day["forecast_gco2_per_kwh"].fillna(-1)):
        line("carbon the plan used", day["plan_gco2_per_kwh"], COLOURS["carbon_plan"], 2, dash="dot")
    fig.update_layout(template=TEMPLATE, title=title, height=640, hovermode="x unified",
                      legend=dict(orientation="v", yanchor="top", y=1.0, x=1.01, font=dict(size=11)),
                      margin=dict(l=60, r=20, t=70, b=50))
    fig.update_xaxes(title_text=f"local time ({tz or 'UTC'})", row=2, col=1)
    fig.update_yaxes(rangemode="tozero", row=1, col=1)
    fig.update_yaxes(rangemode="tozero", row=2, col=1)
    return fig


def storage_chart(day: pd.DataFrame, tz: str | None, title: str) -> go.Figure:
    """The campus battery's plan against what the agent applied: planned charge (up) and discharge (down) as bars,
    the solar forecast, the agent's charge rate and max discharge as markers, and (right axis) the planned energy
    at each hour's end."""
    if day.empty:
        return _empty(title, "no storage plan in force")
    local = to_local(day["hour"], tz) + pd.Timedelta(minutes=30)  # the middle of each hour
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Bar(x=list(local), y=_values(day["charge_kw"]), name="planned charge (kW)",
                         marker_color="#2e7d32"))
    fig.add_trace(go.Bar(x=list(local), y=_values(-day["discharge_kw"]), name="planned discharge (kW)",
                         marker_color="#c62828"))
    fig.add_trace(go.Scatter(x=list(local), y=_values(day["solar_kw"]), name="solar forecast (kW)", mode="lines",
                             line=dict(color="#f9a825", width=2)))
    fig.add_trace(go.Scatter(x=list(local), y=_values(day["battery_charge_kw"]), name="applied charge rate (kW)",
                             mode="markers", marker=dict(symbol="triangle-up", size=10, color="#1b5e20")))
    fig.add_trace(go.Scatter(x=list(local), y=_values(-day["battery_max_discharge_kw"]),
                             name="applied max discharge (kW)", mode="markers",
                             marker=dict(symbol="triangle-down", size=10, color="#b71c1c")))
    fig.add_trace(go.Scatter(x=list(local), y=_values(day["energy_kwh"]), name="planned energy (kWh, right)",
                             mode="lines", line=dict(color="#37474f", dash="dot")), secondary_y=True)
    fig.update_layout(template=TEMPLATE, title=title, height=380, barmode="relative", hovermode="x unified",
                      margin=dict(l=60, r=60, t=60, b=40))
    fig.update_xaxes(title_text=f"local time ({tz or 'UTC'})")
    fig.update_yaxes(title_text="kW (charge up, discharge down)", secondary_y=False)
    fig.update_yaxes(title_text="kWh", rangemode="tozero", secondary_y=True)
    return fig


def power_fit_chart(fits: list[DomainFit], title: str) -> go.Figure:
    """Per power domain: the telemetry the model was fitted on (scatter) and the fitted piecewise line."""
    if not fits:
        return _empty(title, "no power models stored for the plan in force")
    fig = go.Figure()
    for i, fit in enumerate(fits):
        colour = DOMAIN_COLOURS[i % len(DOMAIN_COLOURS)]
        fig.add_trace(go.Scatter(
            x=_values(fit.telemetry["cpu_cores"]), y=_values(fit.telemetry["power_kw"]), mode="markers",
            name=f"{fit.domain} telemetry ({len(fit.telemetry)} h)", legendgroup=fit.domain,
            marker=dict(color=colour, size=5, opacity=0.45)))
        if len(fit.line_cpu):
            label = f"{fit.domain} fit"
            if fit.r2 is not None:
                label += f" (R² {fit.r2:.3f}, MAPE {fit.mape_pct:.2f}%)"
            fig.add_trace(go.Scatter(x=_values(pd.Series(fit.line_cpu)), y=_values(pd.Series(fit.line_kw)),
                                     mode="lines+markers", name=label, legendgroup=fit.domain,
                                     line=dict(color=colour, width=3), marker=dict(size=8, symbol="diamond")))
        else:
            fig.add_annotation(text=f"{fit.domain}: no model ({fit.reason or fit.status})", showarrow=False,
                               xref="paper", yref="paper", x=0.02, y=0.98 - 0.06 * i, xanchor="left")
    fig.update_layout(template=TEMPLATE, title=title, height=420, xaxis_title="CPU cores in use",
                      yaxis_title="power (kW)", legend=dict(orientation="h", yanchor="top", y=-0.15, x=0),
                      margin=dict(l=60, r=20, t=60, b=40))
    return fig


def forecast_error_chart(errors: pd.DataFrame, title: str) -> go.Figure:
    """Per plan date: the day-ahead forecast errors against what happened."""
    if errors.empty:
        return _empty(title, "no load forecasts stored for this cluster")
    x = [pd.Timestamp(d).strftime("%Y-%m-%d") for d in errors["plan_date"]]
    fig = go.Figure()
    series = [
        ("inflexible usage MAPE %", "inflexible_mape_pct", "#1565c0", None),
        ("inflexible usage bias % (forecast − actual)", "inflexible_bias_pct", "#64b5f6", "dash"),
        ("hours above the upper bound %", "hours_above_upper_pct", "#c62828", "dot"),
        ("carbon forecast MAPE %", "carbon_mape_pct", "#546e7a", None),
    ]
    for name, col, colour, dash in series:
        if col in errors:
            fig.add_trace(go.Scatter(x=x, y=_values(errors[col]), name=name, mode="lines+markers",
                                     line=dict(color=colour, dash=dash), marker=dict(size=8)))
    fig.update_layout(template=TEMPLATE, title=title, height=380, xaxis_title="plan date", yaxis_title="%",
                      xaxis=dict(type="category"), legend=dict(orientation="h", yanchor="top", y=-0.2, x=0),
                      margin=dict(l=60, r=20, t=60, b=40))
    return fig


def savings_chart(frame: pd.DataFrame, title: str) -> go.Figure:
    """Expected kgCO2 saved against flat, per cluster (fallback clusters show 0 or nothing)."""
    planned = frame[frame["status"] != "not planned"]
    if planned.empty:
        return _empty(title, "no plan for this day")
    colours = ["#2e7d32" if s == "shaped" else "#9e9e9e" for s in planned["status"]]
    fig = go.Figure(go.Bar(
        x=list(planned["cluster"]), y=_values(planned["saved_kgco2"]), marker_color=colours,
        text=[f"{v:.1f}%" if isinstance(v, float) and not np.isnan(v) else "—" for v in planned["saving_pct"]],
        textposition="outside", name="kgCO2 saved",
        customdata=list(zip(planned["campus"], planned["status"])),
        hovertemplate="%{x} (%{customdata[0]}, %{customdata[1]}): %{y:.1f} kgCO2 saved<extra></extra>"))
    fig.update_layout(template=TEMPLATE, title=title, height=340, yaxis_title="kgCO2 saved vs flat",
                      margin=dict(l=60, r=20, t=60, b=40))
    return fig
