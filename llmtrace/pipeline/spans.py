"""A thin view of the OTLP spans the derivation needs, read straight from protobuf.

Copying every attribute of every span into dicts caps a Python pipeline near
80k spans/s; most spans (decode chunks aside) carry nothing the derivation
uses. So spans are filtered by name first and only known keys are decoded.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from llmtrace import semconv as sc
from llmtrace.pipeline.inputs import wanted_keys
from llmtrace.pipeline.view import SpanView
from llmtrace.record import VLLM_DUPLICATE_STATE

#: resource attributes read for every wanted span
RESOURCE_KEYS = frozenset({"service.name", "service.version", sc.LLMTRACE_COST_INSTANCE_TYPE,
                           sc.GEN_AI_REQUEST_MODEL})


def _array(v) -> list:
    """An array attribute's values (nested arrays are not read: no wanted key has them).

    One comprehension over upb messages: decoding the ITL bucket counts of every
    decode chunk is the pipeline's second-hottest loop.
    """
    return [getattr(x, k) if (k := x.WhichOneof("value")) and k != "array_value" else None
            for x in v.array_value.values]


def _pick(kvs, keys: frozenset[str]) -> dict[str, Any]:
    """Decode only the wanted keys; the hot loop of the pipeline, kept flat."""
    out: dict[str, Any] = {}
    for kv in kvs:
        key = kv.key
        if key in keys:
            v = kv.value
            kind = v.WhichOneof("value")
            out[key] = _array(v) if kind == "array_value" else (
                getattr(v, kind) if kind else None)
    return out


def spans_from_request(request: ExportTraceServiceRequest) -> Iterator[SpanView]:
    """Yield the spans the derivation uses; every other span costs one name lookup."""
    for rs in request.resource_spans:
        resource = None
        for ss in rs.scope_spans:
            for span in ss.spans:
                keys = wanted_keys(span.name)
                if keys is None:
                    continue
                if span.name == sc.SPAN_LLM_REQUEST and VLLM_DUPLICATE_STATE in span.trace_state:
                    continue  # vLLM's span of a request llmtrace's own record covers
                if resource is None:
                    resource = _pick(rs.resource.attributes, RESOURCE_KEYS)
                yield SpanView(span.name, span.trace_id, span.span_id, span.parent_span_id,
                               span.start_time_unix_nano, span.end_time_unix_nano,
                               span.status.code, _pick(span.attributes, keys), resource)
