"""Realistic llmtrace span traffic made with the real SDK, for tests and benchmarks.

Per request: the root span (latencies and usage), queue, prefill and two
prefill-chunk spans (skipped by the derivation after a name lookup), a decode
span with four decode chunks, and the engine core's usage span.
"""

from __future__ import annotations

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, set_span_in_context

from llmtrace import semconv as sc
from llmtrace.record import Histogram

TTFT_S = 0.05
ACCELERATOR_S = 0.25


def make_spans(requests: int, model: str = "m", tenants: int = 7,
               version: str = "v1") -> list[ReadableSpan]:
    """Finished spans of ``requests`` requests; request ``i`` has tenant ``t{i % tenants}``."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "vllm"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("llmtrace.vllm")
    for i in range(requests):
        tenant = f"t{i % tenants}"
        root = tracer.start_span(sc.SPAN_LLMTRACE_REQUEST, kind=SpanKind.SERVER, attributes={
            sc.GEN_AI_OPERATION_NAME: "chat", sc.GEN_AI_PROVIDER_NAME: "vllm",
            sc.GEN_AI_REQUEST_MODEL: model, sc.LLMTRACE_TENANT: tenant,
            sc.LLMTRACE_DEPLOYMENT_VERSION: version, sc.LLMTRACE_REQUEST_ID: f"r{i}",
            sc.GEN_AI_USAGE_INPUT_TOKENS: 100, sc.GEN_AI_USAGE_OUTPUT_TOKENS: 128,
            sc.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: 20,
            sc.LLMTRACE_LATENCY_TIME_TO_FIRST_TOKEN: TTFT_S, sc.LLMTRACE_LATENCY_E2E: 1.0,
            sc.LLMTRACE_LATENCY_DECODE: 0.9, sc.LLMTRACE_REQUEST_FINISH_REASON: "length"})
        ctx = set_span_in_context(root)
        for name in (sc.SPAN_LLMTRACE_QUEUE, sc.SPAN_LLMTRACE_PREFILL):
            tracer.start_span(name, context=ctx, attributes={
                sc.LLMTRACE_QUEUE_REASON: "arrival", sc.LLMTRACE_STEP_INDEX: i}).end()
        for c in range(2):
            tracer.start_span(sc.SPAN_LLMTRACE_PREFILL_CHUNK, context=ctx, attributes={
                sc.LLMTRACE_PREFILL_CHUNK_INDEX: c, sc.LLMTRACE_PREFILL_CHUNK_COMPUTED_TOKENS: 50,
                sc.LLMTRACE_STEP_BATCH_SIZE: 8, sc.LLMTRACE_STEP_SCHEDULED_TOKENS: 256}).end()
        tracer.start_span(sc.SPAN_LLMTRACE_ENGINE_REQUEST, context=ctx, attributes={
            sc.LLMTRACE_COST_ACCELERATOR_SECONDS: ACCELERATOR_S, sc.LLMTRACE_ENGINE_STEPS: 129,
            sc.GEN_AI_REQUEST_MODEL: model, sc.LLMTRACE_TENANT: tenant,
            sc.LLMTRACE_DEPLOYMENT_VERSION: version}).end()
        decode = tracer.start_span(sc.SPAN_LLMTRACE_DECODE, context=ctx)
        gaps = Histogram()
        for g in range(32):
            gaps.add(0.004 + 0.016 * g / 31)
        for c in range(4):
            tracer.start_span(sc.SPAN_LLMTRACE_DECODE_CHUNK, context=set_span_in_context(decode),
                              attributes={sc.LLMTRACE_DECODE_CHUNK_INDEX: c,
                                          sc.LLMTRACE_DECODE_CHUNK_TOKENS: 32,
                                          sc.LLMTRACE_DECODE_CHUNK_ITL_MIN: 0.004,
                                          sc.LLMTRACE_DECODE_CHUNK_ITL_MEAN: 0.007,
                                          sc.LLMTRACE_DECODE_CHUNK_ITL_MAX: 0.02,
                                          sc.LLMTRACE_DECODE_CHUNK_ITL_SUM: gaps.total,
                                          sc.LLMTRACE_DECODE_CHUNK_ITL_BUCKET_COUNTS:
                                              gaps.counts}).end()
        decode.end()
        root.end()
    return list(exporter.get_finished_spans())


def make_payload(requests: int, **kw) -> tuple[bytes, int]:
    """One OTLP/protobuf export request holding ``requests`` requests; (bytes, span count)."""
    spans = make_spans(requests, **kw)
    return encode_spans(spans).SerializeToString(), len(spans)
