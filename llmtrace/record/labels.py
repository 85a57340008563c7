"""Metric label values of a record, capped per label; shared by both metric outputs."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from operator import itemgetter
from typing import Any, Generic, TypeVar

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


class Feed(Generic[T]):
    """One output's metrics fed by one record kind, and how a record maps to their series.

    Built once per output from the schema: for each metric, the output's own
    metric object, the record field and a getter for its label values. Both
    outputs (OpenTelemetry instruments, Prometheus) call it per record, so the
    mapping from a record to series exists once. A None field records nothing.
    """

    def __init__(self, kind: str, metrics: Iterable[tuple[MetricSpec, T]]) -> None:
        self.rows = [(spec, target, spec.feeds[kind], itemgetter(*spec.labels))
                     for spec, target in metrics]
        used = {a for row in self.rows for a in row[0].labels}
        #: (attribute, record field) of every label these metrics use
        self.labels = [(a, f) for a, f in RECORD_LABELS.items() if a in used]

    def __call__(self, record: object,
                 limit: LabelLimiter) -> list[tuple[MetricSpec, T, Any, tuple]]:
        """(spec, target, value, label values) for every metric ``record`` feeds.

        A label whose field is None (no error) has value None: left off
        (OpenTelemetry) or empty (Prometheus), which PromQL treats alike.
        """
        values: dict[str, str | None] = {}
        for attr, name in self.labels:
            value = getattr(record, name, None)
            values[attr] = None if value is None else limit(attr, str(value))
        out = []
        for spec, target, field, labels_of in self.rows:
            value = getattr(record, field)
            if value is not None:
                out.append((spec, target, value, labels_of(values)))
        return out
