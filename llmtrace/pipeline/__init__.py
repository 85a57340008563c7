"""Derivation pipeline: spans in, one record per request out.

The same code runs in three places: as an in-process span processor (the
embedded default), inside the standalone ``llmtrace collector`` service, and in
tests. It reads OTLP protobuf directly and only the attributes it needs, so it
can keep up with a fleet's spans on one core.

Pieces: span views (:mod:`spans` for OTLP protobuf, :mod:`processor` for SDK
spans), trace assembly (:mod:`assembler`), per-request records and usage
records (:mod:`derive`), llm-d router decisions (:mod:`router`) and the
Prometheus output (:mod:`metrics`). Price tables are :mod:`llmtrace.pricing`,
outside this package, because the SDK reads them too.
"""

from llmtrace.pipeline.assembler import TraceAssembler
from llmtrace.pipeline.derive import RequestRecord, derive_request
from llmtrace.pipeline.processor import DerivingSpanProcessor, view_of
from llmtrace.pipeline.spans import SpanView, spans_from_request

__all__ = ["DerivingSpanProcessor", "RequestRecord", "SpanView", "TraceAssembler",
           "derive_request", "spans_from_request", "view_of"]
