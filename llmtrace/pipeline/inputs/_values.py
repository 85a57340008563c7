"""Typed reads of decoded span attributes: a wrong type reads as missing, never raises."""

from __future__ import annotations

_NUMBER = (int, float)


def num(attrs: dict, key: str | None, default=None):
    value = attrs.get(key, default) if key else default
    return value if type(value) in _NUMBER else default  # bool is not a number here


def count(attrs: dict, key: str) -> int | float:
    """A count as sent: an integral float becomes an int; anything else (negative,
    fractional, NaN, infinite) is passed on for the record's range check to refuse,
    counted, rather than clamped here without a trace."""
    value = num(attrs, key, 0)
    if type(value) is float and value.is_integer():
        return int(value)
    return value
