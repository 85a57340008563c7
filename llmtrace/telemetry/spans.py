"""Finished spans handed straight to llmtrace's own span processors.

The builder makes each span from timestamps that are already known, with
attributes of known types (names from the registry, values from records). On
llmtrace's own tracer provider the SDK's live-span machinery (a span object
guarded by a lock, every attribute value validated and copied, the sampler
asked again for each child) buys nothing, and was most of the builder's cost
per span. Here a span is a few slots until :meth:`DirectSpan.end`, which
makes the SDK's own ``ReadableSpan`` and gives it to the provider's processors,
so batching, export, drop counting and flush are the SDK's as before.

Used only where llmtrace owns the provider (never on one passed in or set
globally, whose processors may expect live spans) and where no attribute value
length limit is configured (``OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT``,
``OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT``), which the SDK path applies.
Children of a sampled span are sampled: true of every sampler llmtrace's own
provider can have (the ``OTEL_TRACES_SAMPLER`` built-ins).
"""

from __future__ import annotations

import os
import random
from typing import Any

from opentelemetry.sdk.environment_variables import (
    OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT,
    OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from llmtrace.telemetry.span_pipe import wire

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_UNSET = Status(StatusCode.UNSET)


def direct_spans_allowed() -> bool:
    """False when a span attribute limit is configured: the SDK path enforces it."""
    return not (os.environ.get(OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT)
                or os.environ.get(OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT))


class SpanSink:
    """Where :class:`DirectSpan` s go: the processors of llmtrace's own provider."""

    def __init__(self, resource: Resource, scope: InstrumentationScope,
                 processors: list, pipe=None) -> None:
        self.resource = resource
        self.scope = scope
        self.processors = processors
        #: the span export process's queue (``LLMTRACE_SPAN_EXPORT=process``): spans go
        #: there as tuples, no ``ReadableSpan`` is built in this process
        self.pipe = pipe

    def start(self, name: str, parent: SpanContext | None, trace_id: int, span_id: int,
              start_ns: int, attributes: dict[str, Any] | None = None,
              kind: SpanKind = SpanKind.INTERNAL, links: tuple[Link, ...] = ()) -> DirectSpan:
        trace_state = parent.trace_state if parent is not None else None
        context = SpanContext(trace_id, span_id, False, _SAMPLED, trace_state)
        return DirectSpan(self, name, context, parent, start_ns, dict(attributes or {}), kind,
                          links)

    def child(self, name: str, parent: SpanContext, start_ns: int,
              attributes: dict[str, Any] | None = None,
              links: tuple[Link, ...] = (), span_id: int = 0) -> DirectSpan:
        return self.start(name, parent, parent.trace_id, span_id or random.getrandbits(64) or 1,
                          start_ns, attributes, links=links)


class DirectSpan:
    """The subset of the Span API the builder uses, ended into a ``ReadableSpan``."""

    __slots__ = ("_sink", "name", "_context", "parent", "start_ns", "attributes", "events",
                 "status", "kind", "_ended", "links")

    def __init__(self, sink: SpanSink, name: str, context: SpanContext,
                 parent: SpanContext | None, start_ns: int, attributes: dict[str, Any],
                 kind: SpanKind, links: tuple[Link, ...] = ()) -> None:
        self.links = links
        self._sink = sink
        self.name = name
        self._context = context
        self.parent = parent
        self.start_ns = start_ns
        self.attributes = attributes
        self.events: list[Event] = []
        self.status = _UNSET
        self.kind = kind
        self._ended = False

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return not self._ended

    def set_attribute(self, key: str, value: Any) -> None:
        self.attributes[key] = value

    def set_attributes(self, attributes: dict[str, Any]) -> None:
        self.attributes.update(attributes)

    def add_event(self, name: str, attributes: dict[str, Any] | None = None,
                  timestamp: int | None = None) -> None:
        self.events.append(Event(name, attributes, timestamp))

    def set_status(self, status: Status) -> None:
        self.status = status

    def end(self, end_time: int | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        sink = self._sink
        end_ns = end_time if end_time is not None else self.start_ns
        if sink.pipe is not None:
            sink.pipe.put(self.wire(end_ns))
            return
        span = ReadableSpan(
            self.name, self._context, self.parent, sink.resource, self.attributes,
            tuple(self.events), self.links, self.kind, None, self.status, self.start_ns,
            end_ns, sink.scope)
        for processor in sink.processors:
            processor.on_end(span)

    def wire(self, end_ns: int) -> tuple:
        """This span as the span export process's pipe carries it."""
        return wire(self.name, self._context, self.parent, self.kind, self.start_ns, end_ns,
                    self.attributes, self.events, self.links, self.status)
