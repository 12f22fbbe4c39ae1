"""Day-ahead load forecasts of one cluster, with their uncertainty (CICM, Radovanović et al. 2023).

`forecast_load` forecasts one cluster; `forecast_load_batch` many clusters of one campus at once, with the same
numbers per cluster (one engine, vectorised over a cluster axis; `forecast_load` is its one-cluster case).

Modules: `history` (reading and validating usage history and the arguments; InputErrors name the field),
`series` (the model of one series over a cluster axis), `engine` (the batched forecast: rows to day matrices to
forecasts), `result` (`LoadForecast`), `baselines` (seasonal naive, Holt-Winters). The local-day calendar is
`cicm.timeutil`'s.

For the target day D (a local day of the campus: 23, 24 or 25 UTC hours) and an issue time `now`:

- inflexible CPU per hour U_IF(h), and its upper (1-γ) bound;
- flexible CPU-hours of the day T_UF, reservations of the day T_R, and Θ = T_R·(1 + q0.97);
- the reservations-to-usage ratio R(h).

Method (docs/models.md has the details and the measured accuracy). Only hours that ended by `now` are used.
History is arranged as complete local days × local hour of day ("day matrix"); a DST day's missing hour is
interpolated from its neighbours and its doubled hour averaged, inside the model only.

1. Week-ahead: for the 7-day block ending on day e, m = block mean and f(dow, hod) = value / m. The level L is
   an EWMA (weight α) of the block means of the blocks ending on e, e-7, e-14, ...; the hour-of-week factors
   S an EWMA (weight β) of f over the same blocks. WA(D | e) = L_e · S_e(dow(D), hod). Computed for every
   origin in one pass (seven interleaved EWMA chains). α, β come from a small grid, by the rolling-origin
   MAPE of WA(D | D - lag) over the history, lag = target day − last complete day before `now` (1 or 2).
2. Day-ahead: DA(D) = a + b·WA(D) + c·(X(D-lag) − WA(D-lag)), i.e. the last complete day's actual minus its
   own week-ahead forecast, same local hour; a, b, c by least squares over the past days' rolling forecasts
   (last 90 days), refit at every origin of the backtest.
3. Uncertainty: empirical quantiles of the relative errors (actual − DA)/DA of the rolling day-ahead backtest
   over the last 90 days: the (1-γ) quantile of the hourly inflexible errors, the 0.97 quantile of the daily
   reservation errors. Both clipped at 0 so that bounds are never below the forecast.
4. Daily series: one period per day, the daily mean CPU cores (turned into core-hours by the number of hours
   of the target day, so 23- and 25-hour days are handled). Reservations use steps 1-3 as they are. The
   flexible series' model is selected: three base models, each with its weight from a small grid by the
   rolling-origin MAPE of its own forecasts of X(D) from the state after day D - lag (as for α, β above):
     - seasonal: the week-ahead WA of step 1;
     - level EWMA: L_e = α·X(e) + (1-α)·L_{e-1}, forecast L_{D-lag}; α from `alpha_grid`;
     - moving average: the mean of the w days ending on D - lag, w in LEVEL_WINDOWS (fewer at the start);
   then each, with and without the day-ahead adjustment of step 2 (refit at every origin), is backtested
   day-ahead over every history day on which all six candidates have a forecast, and the one with the lowest
   MAPE is used (a tie keeps the seasonal model with adjustment). The hourly inflexible series always uses
   the seasonal model with adjustment (it needs the hour-of-day shape). Step 3's errors come from the chosen
   candidate's backtest. `parameters[series]` records `model`, `adjusted` and, for the flexible series, every
   candidate's `selection_mape_pct`.
"""
from __future__ import annotations

from cicm.models.load.baselines import (
    holt_winters_core_hours,
    holt_winters_forecast,
    seasonal_naive_core_hours,
    seasonal_naive_forecast,
)
from cicm.models.load.engine import CHUNK_CLUSTERS, forecast_load, forecast_load_arrays, forecast_load_batch
from cicm.models.load.history import HISTORY_COLUMNS, local_day_hours
from cicm.models.load.result import LoadForecast
from cicm.models.load.series import (
    ALPHA_GRID,
    BETA_GRID,
    LEVEL_EWMA,
    LEVEL_WINDOWS,
    MIN_ADJUST_DAYS,
    MOVING_AVERAGE,
    RESERVATIONS_QUANTILE,
    SEASONAL,
    SELECT_RESERVATIONS_MODEL,
)

__all__ = [
    "ALPHA_GRID",
    "BETA_GRID",
    "CHUNK_CLUSTERS",
    "HISTORY_COLUMNS",
    "LEVEL_EWMA",
    "LEVEL_WINDOWS",
    "MIN_ADJUST_DAYS",
    "MOVING_AVERAGE",
    "RESERVATIONS_QUANTILE",
    "SEASONAL",
    "SELECT_RESERVATIONS_MODEL",
    "LoadForecast",
    "forecast_load",
    "forecast_load_arrays",
    "forecast_load_batch",
    "holt_winters_core_hours",
    "holt_winters_forecast",
    "local_day_hours",
    "seasonal_naive_core_hours",
    "seasonal_naive_forecast",
]
