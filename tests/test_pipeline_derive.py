"""Trace assembly and per-request derivation from real OTLP protobuf."""

from __future__ import annotations

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, set_span_in_context

from llmtrace import semconv as sc
from llmtrace.pipeline import TraceAssembler, spans_from_request
from llmtrace.record import Histogram

MS = 1_000_000


def _provider():
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "svc"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("llmtrace.vllm"), exporter


def _request(tracer, parent_ctx, t0: int, model: str, chunk_tokens: list[int], ttft: float):
    root = tracer.start_span(sc.SPAN_LLMTRACE_REQUEST, context=parent_ctx, kind=SpanKind.SERVER,
                             start_time=t0, attributes={
                                 sc.GEN_AI_REQUEST_MODEL: model, sc.LLMTRACE_TENANT: "acme",
                                 sc.LLMTRACE_DEPLOYMENT_VERSION: "v1",
                                 sc.GEN_AI_USAGE_INPUT_TOKENS: 12})
    first = t0 + int(ttft * 1e9)
    decode = tracer.start_span(sc.SPAN_LLMTRACE_DECODE, context=set_span_in_context(root),
                               start_time=first)
    t = first
    for i, n in enumerate(chunk_tokens):
        end = t + n * 5 * MS
        gaps = Histogram()
        for _ in range(n - 1 if i == 0 else n):
            gaps.add(0.005)
        tracer.start_span(sc.SPAN_LLMTRACE_DECODE_CHUNK, context=set_span_in_context(decode),
                          start_time=t, attributes={
                              sc.LLMTRACE_DECODE_CHUNK_INDEX: i,
                              sc.LLMTRACE_DECODE_CHUNK_TOKENS: n,
                              sc.LLMTRACE_DECODE_CHUNK_ITL_MEAN: 0.005,
                              sc.LLMTRACE_DECODE_CHUNK_ITL_SUM: gaps.total,
                              sc.LLMTRACE_DECODE_CHUNK_ITL_BUCKET_COUNTS: gaps.counts,
                          }).end(end_time=end)
        t = end
    decode.end(end_time=t)
    out = sum(chunk_tokens)
    root.set_attributes({sc.GEN_AI_USAGE_OUTPUT_TOKENS: out,
                         sc.LLMTRACE_LATENCY_TIME_TO_FIRST_TOKEN: ttft,
                         sc.LLMTRACE_LATENCY_E2E: (t - t0) / 1e9,
                         sc.LLMTRACE_LATENCY_DECODE: (t - first) / 1e9,
                         sc.LLMTRACE_REQUEST_FINISH_REASON: "length"})
    root.end(end_time=t)


def test_two_requests_in_one_client_trace_are_derived_separately():
    tracer, exporter = _provider()
    client = tracer.start_span("client call")
    ctx = set_span_in_context(client)
    _request(tracer, ctx, 10**18, "m-a", [8, 8, 3], 0.040)
    _request(tracer, ctx, 10**18 + 500 * MS, "m-b", [5], 0.025)
    client.end()
    wire = encode_spans(exporter.get_finished_spans())
    records = []
    asm = TraceAssembler(records.append)
    asm.add(spans_from_request(wire))
    assert len(records) == 2 and len(asm) == 0
    a, b = sorted(records, key=lambda r: r.model)
    assert (a.model, a.tenant, a.version, a.source) == ("m-a", "acme", "v1", "llmtrace")
    assert a.ttft_s == 0.040 and b.ttft_s == 0.025
    assert a.itl.count == a.output_tokens - 1 == 18 and b.itl.count == 4
    assert abs(a.itl.total - 18 * 0.005) < 1e-12
    assert a.trace_id == b.trace_id
    assert abs(a.tpot_s - a.decode_s / 18) < 1e-12


def test_vllm_builtin_llm_request_span_is_understood():
    tracer, exporter = _provider()
    tracer.start_span(sc.SPAN_LLM_REQUEST, kind=SpanKind.SERVER, attributes={
        sc.GEN_AI_LATENCY_TIME_TO_FIRST_TOKEN: 0.03, sc.GEN_AI_LATENCY_E2E: 0.4,
        sc.GEN_AI_LATENCY_TIME_IN_QUEUE: 0.001, sc.GEN_AI_LATENCY_TIME_IN_MODEL_PREFILL: 0.02,
        sc.GEN_AI_LATENCY_TIME_IN_MODEL_DECODE: 0.37, sc.GEN_AI_USAGE_PROMPT_TOKENS: 20,
        sc.GEN_AI_USAGE_COMPLETION_TOKENS: 32, sc.GEN_AI_REQUEST_ID: "cmpl-1",
        sc.GEN_AI_RESPONSE_MODEL: "tiny", sc.GEN_AI_RESPONSE_FINISH_REASONS: ["stop"],
    }).end()
    records = []
    TraceAssembler(records.append).add(spans_from_request(
        encode_spans(exporter.get_finished_spans())))
    [r] = records
    assert (r.source, r.model, r.request_id, r.finish_reason) == (
        "vllm_builtin", "tiny", "cmpl-1", "stop")
    assert (r.ttft_s, r.queue_s, r.prefill_s, r.decode_s) == (0.03, 0.001, 0.02, 0.37)
    # phases vLLM's span cannot know are unknown, not zero
    assert (r.preprocess_s, r.first_token_delivery_s, r.itl) == (None, None, None)
    assert (r.prompt_tokens, r.output_tokens) == (20, 32)


def test_orphans_are_evicted_after_the_window_and_capacity_is_bounded():
    tracer, exporter = _provider()
    for _ in range(5):  # decode spans whose root never arrives
        tracer.start_span(sc.SPAN_LLMTRACE_DECODE).end()
    tracer.start_span("not.ours").end()  # ignored at the view: never held
    now = [0.0]
    asm = TraceAssembler(lambda r: None, window_s=10, max_traces=3, clock=lambda: now[0])
    asm.add(spans_from_request(encode_spans(exporter.get_finished_spans())))
    assert len(asm) == 3 and asm.dropped["capacity"] == 2
    now[0] = 11.0
    asm.expire()
    assert len(asm) == 0 and asm.dropped["window"] == 3


def test_derived_metrics_expose_registry_names_and_count_every_request():
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from llmtrace.pipeline.metrics import DerivedMetrics

    tracer, exporter = _provider()
    ttfts = [0.03, 0.05, 0.25]
    for i, ttft in enumerate(ttfts):
        _request(tracer, None, 10**18 + i * MS, "m", [4, 3], ttft)
    metrics = DerivedMetrics()
    TraceAssembler(metrics.observe).add(spans_from_request(
        encode_spans(exporter.get_finished_spans())))
    text = generate_latest(metrics.registry).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    labels = (("gen_ai_request_model", "m"), ("llmtrace_deployment_version", "v1"),
              ("llmtrace_record_source", ""), ("llmtrace_tenant", "acme"))
    ttft = sc.PROMETHEUS_NAMES[sc.METRIC_GEN_AI_SERVER_TIME_TO_FIRST_TOKEN]
    assert samples[(f"{ttft}_count", labels)] == 3
    assert abs(samples[(f"{ttft}_sum", labels)] - sum(ttfts)) < 1e-9
    le = tuple(sorted(labels + (("le", "0.2"),)))
    assert samples[(f"{ttft}_bucket", le)] == 2  # the 200 ms SLO is a bucket edge
    requests = sc.PROMETHEUS_NAMES[sc.METRIC_LLMTRACE_SERVER_REQUESTS]
    assert samples[(requests, tuple(sorted(labels + (("error_type", ""), (
        "llmtrace_request_finish_reason", "length")))))] == 3
    itl = sc.PROMETHEUS_NAMES[sc.METRIC_LLMTRACE_SERVER_INTER_TOKEN_LATENCY]
    assert samples[(f"{itl}_count", labels)] == 3 * 6  # output tokens - 1 per request
    assert samples[(sc.PROMETHEUS_NAMES[sc.METRIC_LLMTRACE_PIPELINE_REQUESTS], labels)] == 3


def test_data_parallel_rank_choice_is_derived_and_counted_per_rank():
    """The request span's rank, reason and imbalance become the record's, and the
    collector's per-rank counter and imbalance histogram."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from llmtrace.pipeline.metrics import DerivedMetrics

    tracer, exporter = _provider()
    choices = [(0, "load_balanced", 1.0), (1, "load_balanced", 1.5), (1, "requested_rank", None)]
    for i in range(len(choices)):
        _request(tracer, None, 10**18 + i * MS, "m", [2], 0.05)
    spans = list(exporter.get_finished_spans())
    roots = [s for s in spans if s.name == sc.SPAN_LLMTRACE_REQUEST]
    for span, (rank, reason, imbalance) in zip(roots, choices, strict=True):
        extra = {sc.LLMTRACE_ENGINE_INDEX: rank, sc.LLMTRACE_DP_REASON: reason}
        if imbalance is not None:
            extra[sc.LLMTRACE_DP_LOAD_IMBALANCE] = imbalance
        span._attributes = {**span.attributes, **extra}  # finished spans are read-only
    records = []
    metrics = DerivedMetrics()

    def observe(record) -> None:
        records.append(record)
        metrics.observe(record)

    TraceAssembler(observe).add(spans_from_request(encode_spans(spans)))
    got = sorted((r.dp_rank, r.dp_reason, r.dp_load_imbalance) for r in records)
    assert got == sorted(choices)
    text = generate_latest(metrics.registry).decode()
    routed = sc.PROMETHEUS_NAMES[sc.METRIC_LLMTRACE_DP_ROUTED_REQUESTS]
    imbalance = sc.PROMETHEUS_NAMES[sc.METRIC_LLMTRACE_DP_LOAD_IMBALANCE]
    per_rank = {}
    counted = 0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == routed:
                key = (s.labels["llmtrace_engine_index"], s.labels["llmtrace_dp_reason"])
                per_rank[key] = s.value
            elif s.name == f"{imbalance}_count":
                counted += s.value
    assert per_rank == {("0", "load_balanced"): 1, ("1", "load_balanced"): 1,
                        ("1", "requested_rank"): 1}
    assert counted == 2  # only the balanced choices have an imbalance
