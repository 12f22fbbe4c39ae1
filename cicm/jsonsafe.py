"""Bounded JSON parsing for input from outside (provider responses, plan files): one helper, one error.

``json.loads`` alone lets hostile input crash the caller with a traceback: 200,000 nested brackets raise
``RecursionError``, a 400-digit integer parses fine and raises ``OverflowError`` later, where it is made a float, and
a 5,000-digit one raises Python's int-conversion ``ValueError``. :func:`loads_bounded` refuses, before parsing:

* a payload larger than ``max_bytes`` (default :data:`MAX_BYTES`, 20 MB; a year of 5-minute points is ~10 MB);
* nesting deeper than ``max_depth`` (default :data:`MAX_DEPTH`, 64; our documents nest 4 deep);

and while parsing:

* an integer literal longer than :data:`MAX_INT_DIGITS` (30) digits, or a decimal literal that overflows to
  infinity (``1e400``): no real reading has either;
* anything ``json.loads`` rejects (malformed text, bad UTF-8).

Every refusal is a :class:`JSONRejected` (a ValueError) naming the field (the document) and saying why. This module
sits in the lowest layer, below ``cicm.errors``; callers map it to their error (``InputError``, ``ProviderError``,
``PlanUnavailable``) keeping ``field`` and ``message``.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

__all__ = ["JSONRejected", "MAX_BYTES", "MAX_DEPTH", "MAX_INT_DIGITS", "json_depth", "loads_bounded"]

MAX_BYTES = 20 * 1024 * 1024
MAX_DEPTH = 64
MAX_INT_DIGITS = 30

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]")


class JSONRejected(ValueError):
    """Refused JSON: ``field`` names the document (or value), ``message`` says why."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")

    def __reduce__(self) -> "tuple[type[JSONRejected], tuple[str, str]]":
        return (type(self), (self.field, self.message))


def json_depth(data: bytes) -> int:
    """Deepest bracket nesting of JSON text, brackets inside strings not counted (no parsing, no recursion)."""
    depth = deepest = 0
    for match in _BRACKETS.finditer(_STRING.sub(b'""', data)):
        if match.group() in (b"[", b"{"):
            depth += 1
            if depth > deepest:
                deepest = depth
        else:
            depth -= 1
    return deepest


def _parse_int(field: str):
    def parse(text: str) -> int:
        if len(text.lstrip("-")) > MAX_INT_DIGITS:
            raise JSONRejected(field, f"integer of {len(text.lstrip('-'))} digits is out of range "
                                      f"(at most {MAX_INT_DIGITS}): {text[:20]}...")
        return int(text)
    return parse


def _parse_float(field: str):
    def parse(text: str) -> float:
        value = float(text)
        if math.isinf(value):
            raise JSONRejected(field, f"number out of range (overflows a float): {text[:40]}")
        return value
    return parse


def loads_bounded(text: str | bytes, field: str, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """``text`` parsed as JSON, or JSONRejected(field, why) if it is too large, too deep or malformed (see above)."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    if len(data) > max_bytes:
        raise JSONRejected(field, f"JSON of {len(data):,} bytes is larger than the {max_bytes:,}-byte limit")
    if not data.strip():
        raise JSONRejected(field, "empty JSON document")
    depth = json_depth(data)
    if depth > max_depth:
        raise JSONRejected(field, f"JSON nested {depth:,} deep, deeper than the limit of {max_depth}")
    try:
        return json.loads(data, parse_int=_parse_int(field), parse_float=_parse_float(field))
    except JSONRejected:
        raise
    except RecursionError as exc:  # not reached below max_depth; kept so no traceback can escape
        raise JSONRejected(field, "JSON nested too deep") from exc
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise JSONRejected(field, f"malformed JSON: {exc}") from exc
