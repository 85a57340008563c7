"""The embedded default: derive records in-process from the SDK's own spans.

A span processor on llmtrace's tracer provider hands each ended span that the
derivation reads to a :class:`TraceAssembler`, with no OTLP round trip and no
extra service. The same assembler and derivation run in the collector service.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor

from llmtrace.pipeline.assembler import TraceAssembler
from llmtrace.pipeline.derive import RequestRecord
from llmtrace.pipeline.spans import RESOURCE_KEYS, SpanView, wanted_keys


def view_of(span: ReadableSpan) -> SpanView | None:
    """The :class:`SpanView` of an SDK span, or None if the derivation does not read it."""
    keys = wanted_keys(span.name)
    if keys is None or span.context is None:
        return None
    attrs = span.attributes or {}
    resource = span.resource.attributes if span.resource is not None else {}
    parent = span.parent.span_id.to_bytes(8, "big") if span.parent is not None else b""
    return SpanView(
        span.name, span.context.trace_id.to_bytes(16, "big"),
        span.context.span_id.to_bytes(8, "big"), parent, span.start_time or 0,
        span.end_time or 0, span.status.status_code.value,
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in attrs.items() if k in keys},
        {k: v for k, v in resource.items() if k in RESOURCE_KEYS})


class DerivingSpanProcessor(SpanProcessor):
    """Feeds ended spans to a :class:`TraceAssembler`; thread-safe, never raises."""

    def __init__(self, on_record: Callable[[RequestRecord], None], **assembler_kw) -> None:
        self.assembler = TraceAssembler(on_record, **assembler_kw)
        self._lock = threading.Lock()
        self.errors = 0

    def on_end(self, span: ReadableSpan) -> None:
        view = view_of(span)
        if view is None:
            return
        try:
            with self._lock:
                self.assembler.add((view,))
        except Exception:  # noqa: BLE001 - a derivation bug must not break the traced app
            self.errors += 1

    def shutdown(self) -> None:
        with self._lock:
            self.assembler.expire()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True
