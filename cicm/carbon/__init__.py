"""Carbon-intensity forecast ingestion: providers -> validated canonical hourly frames (see schema.FORECAST_COLUMNS)."""
from cicm.carbon.providers import PROVIDERS, fetch_forecast
from cicm.carbon.schema import FORECAST_COLUMNS
from cicm.carbon.trace import gb_error_calibration, load_actual_intensity, trace_forecast
from cicm.carbon.validate import to_hourly, validate_forecast

__all__ = [
    "FORECAST_COLUMNS",
    "PROVIDERS",
    "fetch_forecast",
    "gb_error_calibration",
    "load_actual_intensity",
    "to_hourly",
    "trace_forecast",
    "validate_forecast",
]
