"""Label values from outside, made safe; capped per label; shared by the SDK and collector.

Values that reach labels and span attributes from outside (a tenant header, a
model or tenant attribute on an ingested span) are cleaned by one rule,
:func:`clean_label`, in the SDK and in the collector alike: at most
:data:`MAX_LABEL_LENGTH` characters, printable characters only. One 1 MB
``x-tenant-id`` must not make every ``/metrics`` scrape 200 MB. Each change is
counted by reason (``llmtrace.telemetry.label_overflows``), like the cap on
distinct values.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable
from operator import itemgetter
from typing import Any, Generic, TypeVar

from llmtrace.schema import RECORD_LABELS, MetricSpec

OVERFLOW = "__overflow__"
#: longest value, in characters, a label or attribute takes from outside (default)
MAX_LABEL_LENGTH = 128
#: what a cut value ends with, and what replaces a character that is not printable
CUT_MARK = "\u2026"
REPLACEMENT = "\ufffd"
#: the reasons a label value was changed (``llmtrace.telemetry.reason``)
CARDINALITY_CAP = "cardinality_cap"
TOO_LONG = "too_long"
UNPRINTABLE = "unprintable"
#: reason -> values changed by :func:`clean_label` in this process
CLEANED: Counter[str] = Counter()
T = TypeVar("T")


def clean_label(value: str, max_length: int = MAX_LABEL_LENGTH) -> str:
    """``value`` as a label or attribute may carry it; every change is counted.

    Longer than ``max_length`` characters: cut, ending in an ellipsis (so a cut
    value is recognisable). Characters that are not printable (control and
    format characters, line breaks) become U+FFFD.
    """
    if len(value) > max_length:
        CLEANED[TOO_LONG] += 1
        value = value[:max_length - 1] + CUT_MARK
    if not value.isprintable():
        CLEANED[UNPRINTABLE] += 1
        value = "".join(c if c.isprintable() else REPLACEMENT for c in value)
    return value


def label_changes(limiter: LabelLimiter | None) -> dict[str, int]:
    """Label values changed so far in this process, by reason (for the overflow counter)."""
    out = {k: v for k, v in CLEANED.items() if v}
    capped = sum(limiter.overflows.values()) if limiter is not None else 0
    if capped:
        out[CARDINALITY_CAP] = capped
    return out


class LabelLimiter:
    """Cleans values (:func:`clean_label`) and keeps at most ``limit`` distinct values per
    label; the rest become ``__overflow__``."""

    def __init__(self, limit: int, max_length: int = MAX_LABEL_LENGTH) -> None:
        self.limit = limit
        self.max_length = max_length
        self._seen: dict[str, set[str]] = {}
        self.overflows: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, label: str, value: str) -> str:
        seen = self._seen.get(label)
        if seen is not None and value in seen:
            return value
        if len(value) > self.max_length or not value.isprintable():
            value = clean_label(value, self.max_length)
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
