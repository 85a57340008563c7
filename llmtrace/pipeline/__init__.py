"""Derivation pipeline: spans in, one record per request out, metrics out.

The same code runs inside the standalone ``llmtrace collector`` service and in
tests. It reads OTLP protobuf directly and only the attributes it needs, so it
can keep up with a fleet's spans on one core.

Pieces, in data-path order: span views (:mod:`spans`), trace assembly
(:mod:`assembler`), one input module per span source (:mod:`inputs`: llmtrace's
spans, vLLM's built-in span, llm-d router spans) producing the records of
``llmtrace.record``, and the Prometheus output (:mod:`metrics`) iterating the
generated metric schema, as the SDK's instruments do.
"""

from llmtrace.pipeline.assembler import TraceAssembler
from llmtrace.pipeline.inputs import request_record, usage_record
from llmtrace.pipeline.spans import SpanView, spans_from_request
from llmtrace.record import RequestRecord, UsageRecord

__all__ = ["RequestRecord", "SpanView", "TraceAssembler", "UsageRecord", "request_record",
           "spans_from_request", "usage_record"]
