"""Metric label values of a record, capped per label; shared by both metric outputs."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from llmtrace.schema import RECORD_LABELS, MetricSpec

OVERFLOW = "__overflow__"
T = TypeVar("T")


class LabelLimiter:
    """Keeps at most ``limit`` distinct values per label; the rest become ``__overflow__``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: dict[str, set[str]] = {}
        self.overflows: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, label: str, value: str) -> str:
        seen = self._seen.get(label)
        if seen is not None and value in seen:
            return value
        with self._lock:
            seen = self._seen.setdefault(label, set())
            if value in seen:
                return value
            if len(seen) < self.limit:
                seen.add(value)
                return value
            self.overflows[label] = self.overflows.get(label, 0) + 1
            return OVERFLOW


def record_labels(record: object, limit: LabelLimiter) -> dict[str, str | None]:
    """Attribute -> capped value for every label the schema reads off ``record``.

    A field the record does not have, or that is None (no error), gives None:
    the label is left off (OpenTelemetry) or empty (Prometheus), which PromQL
    treats alike.
    """
    out: dict[str, str | None] = {}
    for attr, name in RECORD_LABELS.items():
        value = getattr(record, name, None)
        out[attr] = None if value is None else limit(attr, str(value))
    return out


def fed(feeds: Iterable[tuple[MetricSpec, T, str]], record: object,
        limit: LabelLimiter) -> Iterator[tuple[MetricSpec, T, Any, tuple[str | None, ...]]]:
    """(spec, output's metric, value, label values) for every metric ``record`` feeds.

    ``feeds`` is an output's (spec, its metric, record field) list for this record
    kind; a None field records nothing. Both outputs loop over this, so the mapping
    from a record to series exists once.
    """
    values = record_labels(record, limit)
    for spec, target, field in feeds:
        value = getattr(record, field)
        if value is not None:
            yield spec, target, value, tuple(values[a] for a in spec.labels)
