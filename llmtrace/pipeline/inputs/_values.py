"""Typed reads of decoded span attributes: a wrong type reads as missing, never raises."""

from __future__ import annotations

_NUMBER = (int, float)


def num(attrs: dict, key: str | None, default=None):
    value = attrs.get(key, default) if key else default
    return value if type(value) in _NUMBER else default  # bool is not a number here


def count(attrs: dict, key: str) -> int:
    value = num(attrs, key, 0)
    return int(value) if value >= 0 else 0
