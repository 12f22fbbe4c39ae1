"""Small pure parsers shared by the provider clients: wire values -> typed values, or InputError naming the field."""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from cicm.errors import InputError


def _show(items: Sequence[Any], limit: int = 5) -> str:
    shown = ", ".join(str(x) for x in items[:limit])
    return shown + (f", ... ({len(items)} in total)" if len(items) > limit else "")


def _clip(value: Any, limit: int = 60) -> str:
    """repr of a wire value, cut short: a hostile 400-digit number must not flood the message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def parse_utc_timestamp(value: Any, field: str) -> pd.Timestamp:
    """One ISO-8601 timestamp with an explicit offset -> tz-aware UTC Timestamp (ns)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise InputError(field, "missing timestamp")
    try:
        ts = pd.Timestamp(value)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InputError(field, f"unparseable timestamp {_clip(value)}") from exc
    if ts is pd.NaT:
        raise InputError(field, f"unparseable timestamp {_clip(value)}")
    if ts.tzinfo is None:
        raise InputError(field, f"naive timestamp {_clip(value)}: an explicit UTC offset is required")
    try:
        return ts.tz_convert("UTC").as_unit("ns")
    except (ValueError, OverflowError) as exc:  # OutOfBoundsDatetime is a ValueError
        raise InputError(field, f"timestamp out of range {_clip(value)}") from exc


def parse_utc_timestamps(values: Iterable[Any], field: str) -> pd.DatetimeIndex:
    """Many ISO-8601 timestamps -> tz-aware UTC DatetimeIndex (ns). Naive or unparseable ones raise, all named."""
    parsed: list[pd.Timestamp] = []
    bad: list[str] = []
    naive: list[str] = []
    for i, value in enumerate(values):
        try:
            parsed.append(parse_utc_timestamp(value, field))
        except InputError as exc:
            (naive if "naive" in exc.message else bad).append(f"#{i}={_clip(value)}")
    if naive:
        raise InputError(field, f"naive timestamp(s) without UTC offset: {_show(naive)}")
    if bad:
        raise InputError(field, f"missing or unparseable timestamp(s): {_show(bad)}")
    return pd.DatetimeIndex(parsed, dtype="datetime64[ns, UTC]")


def parse_float_values(values: Iterable[Any], field: str) -> np.ndarray:
    """Numbers (or JSON null -> NaN, checked later by validation) -> float64 array. Strings/bools/objects raise,
    and so do integers too large for a float (a hostile 400-digit one), named."""
    out, bad, huge = [], [], []
    for i, value in enumerate(values):
        if value is None:
            out.append(float("nan"))
        elif isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            bad.append(f"#{i}={_clip(value)}")
        else:
            try:
                out.append(float(value))
            except OverflowError:
                huge.append(f"#{i}={_clip(value)}")
    if bad:
        raise InputError(field, f"non-numeric value(s): {_show(bad)}")
    if huge:
        raise InputError(field, f"number(s) out of range (too large for a float): {_show(huge)}")
    return np.asarray(out, dtype="float64")


def require_key(obj: Any, key: str, where: str) -> Any:
    """obj[key] for a JSON object, or InputError naming ``where`` + key (the wire field)."""
    field = f"{where}.{key}" if where else key
    if not isinstance(obj, dict):
        raise InputError(where or key, f"expected a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise InputError(field, "missing field in provider response")
    return obj[key]


def require_list(obj: Any, key: str, where: str = "", *, nonempty: bool = False) -> list:
    """obj[key] as a list; with ``nonempty`` an empty one raises InputError saying "empty" (not a later, misleading
    complaint about the empty frame's timestamps)."""
    value = require_key(obj, key, where)
    field = f"{where}.{key}" if where else key
    if not isinstance(value, list):
        raise InputError(field, f"expected a list, got {type(value).__name__}")
    if nonempty and not value:
        raise InputError(field, "empty list in provider response: no points to read")
    return value
