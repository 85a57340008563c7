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
from llmtrace.pipeline.router import ROUTER_WANTED, router_keys
from llmtrace.pipeline.view import SpanView

#: span name -> attribute keys the derivation reads from it
WANTED: dict[str, frozenset[str]] = {
    sc.SPAN_LLMTRACE_REQUEST: frozenset({
        sc.GEN_AI_REQUEST_MODEL, sc.GEN_AI_RESPONSE_MODEL, sc.LLMTRACE_TENANT,
        sc.LLMTRACE_DEPLOYMENT_VERSION, sc.LLMTRACE_REQUEST_ID,
        sc.LLMTRACE_REQUEST_FINISH_REASON, sc.ERROR_TYPE, sc.GEN_AI_USAGE_INPUT_TOKENS,
        sc.GEN_AI_USAGE_OUTPUT_TOKENS, sc.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS,
        sc.LLMTRACE_REQUEST_PREEMPTIONS, sc.LLMTRACE_LATENCY_TIME_TO_FIRST_TOKEN,
        sc.LLMTRACE_LATENCY_E2E, sc.LLMTRACE_LATENCY_QUEUE, sc.LLMTRACE_LATENCY_PREFILL,
        sc.LLMTRACE_LATENCY_DECODE, sc.LLMTRACE_LATENCY_TIME_PER_OUTPUT_TOKEN,
        sc.LLMTRACE_COST_ACCELERATOR_SECONDS,
    }),
    sc.SPAN_LLMTRACE_DECODE_CHUNK: frozenset({
        sc.LLMTRACE_DECODE_CHUNK_INDEX, sc.LLMTRACE_DECODE_CHUNK_TOKENS,
        sc.LLMTRACE_DECODE_CHUNK_ITL_MIN, sc.LLMTRACE_DECODE_CHUNK_ITL_MEAN,
        sc.LLMTRACE_DECODE_CHUNK_ITL_MAX,
    }),
    sc.SPAN_LLMTRACE_DECODE: frozenset(),  # links decode chunks to their request
    sc.SPAN_LLMTRACE_ENGINE_REQUEST: frozenset({
        sc.LLMTRACE_COST_ACCELERATOR_SECONDS, sc.LLMTRACE_ENGINE_STEPS,
        sc.GEN_AI_REQUEST_MODEL, sc.LLMTRACE_TENANT, sc.LLMTRACE_DEPLOYMENT_VERSION,
    }),
    sc.SPAN_LLM_REQUEST: frozenset({
        sc.GEN_AI_LATENCY_TIME_TO_FIRST_TOKEN, sc.GEN_AI_LATENCY_E2E,
        sc.GEN_AI_LATENCY_TIME_IN_QUEUE, sc.GEN_AI_LATENCY_TIME_IN_MODEL_PREFILL,
        sc.GEN_AI_LATENCY_TIME_IN_MODEL_DECODE, sc.GEN_AI_USAGE_PROMPT_TOKENS,
        sc.GEN_AI_USAGE_COMPLETION_TOKENS, sc.GEN_AI_REQUEST_ID, sc.GEN_AI_RESPONSE_MODEL,
        sc.GEN_AI_REQUEST_MODEL,
        sc.GEN_AI_RESPONSE_FINISH_REASONS,
    }),
}
WANTED.update(ROUTER_WANTED)  # llm-d router / endpoint-picker spans
#: root spans: one per request; their arrival makes a trace derivable
ROOTS = frozenset({sc.SPAN_LLMTRACE_REQUEST, sc.SPAN_LLM_REQUEST})
#: spans that carry a request's cost on their own: aggregated, never held
USAGE = frozenset({sc.SPAN_LLMTRACE_ENGINE_REQUEST})
#: resource attributes read for every wanted span
RESOURCE_KEYS = frozenset({"service.name", "service.version", sc.LLMTRACE_COST_INSTANCE_TYPE,
                           sc.GEN_AI_REQUEST_MODEL})


def wanted_keys(name: str) -> frozenset[str] | None:
    """Attribute keys read from a span named ``name``; None: the span is skipped."""
    keys = WANTED.get(name)
    return keys if keys is not None else router_keys(name)


def _value(v) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def _pick(kvs, keys: frozenset[str]) -> dict[str, Any]:
    """Decode only the wanted keys; the hot loop of the pipeline, kept flat."""
    out: dict[str, Any] = {}
    for kv in kvs:
        key = kv.key
        if key in keys:
            v = kv.value
            kind = v.WhichOneof("value")
            out[key] = _value(v) if kind == "array_value" else (
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
                if resource is None:
                    resource = _pick(rs.resource.attributes, RESOURCE_KEYS)
                yield SpanView(span.name, span.trace_id, span.span_id, span.parent_span_id,
                               span.start_time_unix_nano, span.end_time_unix_nano,
                               span.status.code, _pick(span.attributes, keys), resource)
