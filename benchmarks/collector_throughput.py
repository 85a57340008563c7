"""Derivation pipeline throughput: spans/s per core from OTLP bytes to records.

Beside a parse-only baseline in the same run (``ParseFromString`` alone). The
workload is realistic llmtrace traffic: per request one root span, one decode
span, four decode chunks and, from the engine core, a queue, a prefill and two
prefill-chunk spans that the derivation skips after a name lookup.

    python benchmarks/collector_throughput.py [--requests 2000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import sys
import time

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, set_span_in_context

from llmtrace import semconv as sc
from llmtrace.pipeline import TraceAssembler, spans_from_request


def make_payload(requests: int) -> tuple[bytes, int]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "vllm"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("llmtrace.vllm")
    for i in range(requests):
        root = tracer.start_span(sc.SPAN_LLMTRACE_REQUEST, kind=SpanKind.SERVER, attributes={
            sc.GEN_AI_OPERATION_NAME: "chat", sc.GEN_AI_PROVIDER_NAME: "vllm",
            sc.GEN_AI_REQUEST_MODEL: "m", sc.LLMTRACE_TENANT: f"t{i % 7}",
            sc.LLMTRACE_DEPLOYMENT_VERSION: "v1", sc.LLMTRACE_REQUEST_ID: f"r{i}",
            sc.GEN_AI_USAGE_INPUT_TOKENS: 100, sc.GEN_AI_USAGE_OUTPUT_TOKENS: 128,
            sc.LLMTRACE_LATENCY_TIME_TO_FIRST_TOKEN: 0.05, sc.LLMTRACE_LATENCY_E2E: 1.0,
            sc.LLMTRACE_LATENCY_DECODE: 0.9, sc.LLMTRACE_REQUEST_FINISH_REASON: "length"})
        ctx = set_span_in_context(root)
        for name in (sc.SPAN_LLMTRACE_QUEUE, sc.SPAN_LLMTRACE_PREFILL):
            tracer.start_span(name, context=ctx, attributes={
                sc.LLMTRACE_QUEUE_REASON: "arrival", sc.LLMTRACE_STEP_INDEX: i}).end()
        for c in range(2):
            tracer.start_span(sc.SPAN_LLMTRACE_PREFILL_CHUNK, context=ctx, attributes={
                sc.LLMTRACE_PREFILL_CHUNK_INDEX: c, sc.LLMTRACE_PREFILL_CHUNK_COMPUTED_TOKENS: 50,
                sc.LLMTRACE_STEP_BATCH_SIZE: 8, sc.LLMTRACE_STEP_SCHEDULED_TOKENS: 256}).end()
        decode = tracer.start_span(sc.SPAN_LLMTRACE_DECODE, context=ctx)
        for c in range(4):
            tracer.start_span(sc.SPAN_LLMTRACE_DECODE_CHUNK, context=set_span_in_context(decode),
                              attributes={sc.LLMTRACE_DECODE_CHUNK_INDEX: c,
                                          sc.LLMTRACE_DECODE_CHUNK_TOKENS: 32,
                                          sc.LLMTRACE_DECODE_CHUNK_ITL_MIN: 0.004,
                                          sc.LLMTRACE_DECODE_CHUNK_ITL_MEAN: 0.007,
                                          sc.LLMTRACE_DECODE_CHUNK_ITL_MAX: 0.02}).end()
        decode.end()
        root.end()
    spans = exporter.get_finished_spans()
    return encode_spans(spans).SerializeToString(), len(spans)


def best_of(repeat: int, fn) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    payload, n_spans = make_payload(args.requests)

    def parse_only() -> None:
        ExportTraceServiceRequest().ParseFromString(payload)

    def derive() -> None:
        req = ExportTraceServiceRequest()
        req.ParseFromString(payload)
        records = []
        TraceAssembler(records.append).add(spans_from_request(req))
        assert len(records) == args.requests

    t_parse = best_of(args.repeat, parse_only)
    t_derive = best_of(args.repeat, derive)
    print(f"{n_spans} spans ({args.requests} requests, {len(payload) / 1e6:.1f} MB OTLP)")
    print(f"parse only:                  {n_spans / t_parse:>10,.0f} spans/s per core")
    print(f"parse + view + assemble +    {n_spans / t_derive:>10,.0f} spans/s per core "
          f"({t_derive / t_parse:.1f}x the parse time)")
    print(f"  derive (records)           {args.requests / t_derive:>10,.0f} requests/s per core")
    return 0


if __name__ == "__main__":
    sys.exit(main())
