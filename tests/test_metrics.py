"""Request metrics from records: bulk ITL merging equals per-value recording; labels; SLO edge."""

from __future__ import annotations

import random

from conftest import metric_points
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource

from llmtrace import schema
from llmtrace import semconv as sc
from llmtrace.config import load_config
from llmtrace.record import Histogram, RequestRecord
from llmtrace.telemetry.metrics import build_instruments
from testbed.ports import free_port

TTFT_BUCKETS = schema.BY_NAME[sc.METRIC_GEN_AI_SERVER_TIME_TO_FIRST_TOKEN].buckets
ITL_BUCKETS = schema.BY_NAME[sc.METRIC_LLMTRACE_SERVER_INTER_TOKEN_LATENCY].buckets


def record(itls=(), **kw) -> RequestRecord:
    """A finished request's record, with ``itls`` as its inter-token gaps."""
    hist = None
    if itls:
        hist = Histogram()
        for gap in itls:
            hist.add(gap)
    fields = dict(source="llmtrace", trace_id="", request_id="r", model="m", tenant="acme",
                  version="v", finish_reason="length", error_type=None, start_ns=0,
                  end_ns=0, e2e_s=1.0, ttft_s=0.05, preprocess_s=0.001, queue_s=0.01,
                  prefill_s=0.02, first_token_delivery_s=0.019, decode_s=0.9,
                  prompt_tokens=10, output_tokens=len(itls) + 1, itl=hist)
    fields.update(kw)
    return RequestRecord(**fields)


def test_bulk_itl_histogram_equals_per_value_recording():
    rng = random.Random(7)
    requests = [[rng.choice([0.0005, 0.001, 0.0025, 0.004, 0.2, 3.0]) * rng.uniform(0.5, 1.5)
                 for _ in range(rng.randint(0, 40))] for _ in range(25)]
    # two readers, as with OTLP and Prometheus both on: each holds its own state
    reader, second = InMemoryMetricReader(), InMemoryMetricReader()
    _, instruments = build_instruments(load_config(), Resource.create({}), "t",
                                       [reader, second])
    reference = InMemoryMetricReader()
    ref_hist = MeterProvider(metric_readers=[reference]).get_meter("r").create_histogram(
        "ref", explicit_bucket_boundaries_advisory=ITL_BUCKETS)
    for i, itls in enumerate(requests):
        instruments.record_request(record(itls, tenant=f"t{i % 2}"))
        for v in itls:
            ref_hist.record(v, {"tenant": f"t{i % 2}"})
        if i in (0, 11):  # batches of 1, 11 and 13 requests, as the builder hands them over
            instruments.flush_pending()
    instruments.flush_pending()
    want = {p.attributes["tenant"]: p for p in metric_points(reference)["ref"]}
    for r in (reader, second):
        got = {p.attributes[sc.LLMTRACE_TENANT]: p
               for p in metric_points(r)[sc.METRIC_LLMTRACE_SERVER_INTER_TOKEN_LATENCY]}
        assert got.keys() == want.keys() == {"t0", "t1"}
        for tenant, p in got.items():
            w = want[tenant]
            assert tuple(p.bucket_counts) == tuple(w.bucket_counts)
            assert p.count == w.count and abs(p.sum - w.sum) < 1e-9
            assert (p.min, p.max) == (w.min, w.max)
            assert tuple(p.explicit_bounds) == ITL_BUCKETS


def test_batched_histograms_equal_per_value_recording():
    """Every histogram, not only ITL: a batch summed per series, then one API call and a
    merge, gives the points per-value recording gives."""
    rng = random.Random(11)
    reader = InMemoryMetricReader()
    _, instruments = build_instruments(load_config(), Resource.create({}), "t", [reader])
    reference = InMemoryMetricReader()
    ref = MeterProvider(metric_readers=[reference]).get_meter("r").create_histogram(
        "ref", explicit_bucket_boundaries_advisory=TTFT_BUCKETS)
    for batch in range(4):
        for i in range(rng.randint(1, 30)):
            ttft = rng.choice([0.0004, 0.02, 0.2, 0.21, 3.0, 120.0]) * rng.uniform(0.9, 1.1)
            tenant = f"t{(batch + i) % 3}"
            instruments.record_request(record([], ttft_s=ttft, tenant=tenant))
            ref.record(ttft, {"tenant": tenant})
        instruments.flush_pending()
    want = {p.attributes["tenant"]: p for p in metric_points(reference)["ref"]}
    got = {p.attributes[sc.LLMTRACE_TENANT]: p
           for p in metric_points(reader)[sc.METRIC_GEN_AI_SERVER_TIME_TO_FIRST_TOKEN]}
    assert got.keys() == want.keys() and len(got) == 3
    for tenant, p in got.items():
        w = want[tenant]
        assert tuple(p.bucket_counts) == tuple(w.bucket_counts)
        assert p.count == w.count and abs(p.sum - w.sum) < 1e-9
        assert (p.min, p.max) == (w.min, w.max)


def test_request_metrics_carry_fleet_labels_and_slo_bucket():
    reader = InMemoryMetricReader()
    _, instruments = build_instruments(load_config(deployment_version="v9"),
                                       Resource.create({}), "t", [reader])
    instruments.record_request(record(
        [0.01], version="v9", finish_reason="abort", error_type="aborted", ttft_s=0.15,
        e2e_s=0.5, preprocess_s=0.01, queue_s=None, prefill_s=None,
        first_token_delivery_s=None, decode_s=None, prompt_tokens=7, cached_tokens=3,
        preemptions=1))
    instruments.flush_pending()
    points = metric_points(reader)
    [ttft] = points[sc.METRIC_GEN_AI_SERVER_TIME_TO_FIRST_TOKEN]
    assert 0.2 in ttft.explicit_bounds and tuple(ttft.explicit_bounds) == TTFT_BUCKETS
    # llmtrace's own records carry no source label (the default definitions)
    assert dict(ttft.attributes) == {sc.GEN_AI_REQUEST_MODEL: "m", sc.LLMTRACE_TENANT: "acme",
                                     sc.LLMTRACE_DEPLOYMENT_VERSION: "v9"}
    [requests] = points[sc.METRIC_LLMTRACE_SERVER_REQUESTS]
    assert requests.attributes[sc.LLMTRACE_REQUEST_FINISH_REASON] == "abort"
    assert requests.attributes[sc.ERROR_TYPE] == "aborted"
    assert points[sc.METRIC_LLMTRACE_SERVER_CACHED_PROMPT_TOKENS][0].value == 3
    assert points[sc.METRIC_LLMTRACE_SERVER_PREEMPTIONS][0].value == 1
    assert sc.METRIC_LLMTRACE_SERVER_QUEUE_DURATION not in points  # unknown, not zero
    # a record from vLLM's built-in span says so on every series it feeds
    instruments.record_request(record([], source="vllm_builtin", version="v9"))
    instruments.flush_pending()
    sources = {p.attributes.get(sc.LLMTRACE_RECORD_SOURCE) for p in
               metric_points(reader)[sc.METRIC_GEN_AI_SERVER_TIME_TO_FIRST_TOKEN]}
    assert sources == {None, "vllm_builtin"}


def test_prometheus_endpoint_exposes_registry_names(monkeypatch):
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from llmtrace.telemetry import Telemetry

    port = free_port()
    cfg = load_config(metrics_exporter="prometheus", prometheus_host="127.0.0.1",
                      prometheus_port=port)
    telemetry = Telemetry(cfg)
    telemetry.instruments.record_request(record([0.1] * 4, ttft_s=0.1, cached_tokens=2))
    telemetry.flush()  # batched histogram updates reach the SDK
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    samples = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
    for otel_name in (sc.METRIC_GEN_AI_SERVER_TIME_TO_FIRST_TOKEN,
                      sc.METRIC_LLMTRACE_SERVER_INTER_TOKEN_LATENCY,
                      sc.METRIC_LLMTRACE_SERVER_REQUESTS,
                      sc.METRIC_LLMTRACE_SERVER_GENERATION_TOKENS):
        prom = sc.PROMETHEUS_NAMES[otel_name]
        assert prom in samples or f"{prom}_bucket" in samples, (prom, sorted(samples)[:20])
    assert 'le="0.2"' in text and 'llmtrace_tenant="acme"' in text
    telemetry.shutdown()


def test_exemplars_link_sampled_requests_to_their_traces():
    """With exemplars on, a sampled request's latencies carry its trace and span id; an
    unsampled one's go into the batch and carry none."""
    from opentelemetry.trace import (
        NonRecordingSpan,
        SpanContext,
        TraceFlags,
        set_span_in_context,
    )

    reader = InMemoryMetricReader()
    _, instruments = build_instruments(load_config(exemplars=True), Resource.create({}), "t",
                                       [reader])
    trace_id, span_id = 0x1234_5678_9ABC_DEF0_1122_3344_5566_7788, 0x0BAD_CAFE_F00D_0001
    context = set_span_in_context(NonRecordingSpan(
        SpanContext(trace_id, span_id, False, TraceFlags(TraceFlags.SAMPLED))))
    instruments.record_request(record([0.01, 0.02], ttft_s=0.3), context)  # sampled
    for _ in range(5):
        instruments.record_request(record([0.01], ttft_s=0.05))  # not sampled
    instruments.flush_pending()
    [ttft] = metric_points(reader)[sc.METRIC_GEN_AI_SERVER_TIME_TO_FIRST_TOKEN]
    assert ttft.count == 6
    linked = [e for e in ttft.exemplars if e.trace_id == trace_id]
    assert linked and all(e.span_id == span_id for e in linked)
    assert {e.value for e in linked} == {0.3}
    assert all(e.trace_id == trace_id for e in ttft.exemplars)  # none from unsampled ones
    # off (the default): no exemplar even with a context
    reader_off = InMemoryMetricReader()
    _, off = build_instruments(load_config(), Resource.create({}), "t", [reader_off])
    off.record_request(record([], ttft_s=0.3), context)
    off.flush_pending()
    [point] = metric_points(reader_off)[sc.METRIC_GEN_AI_SERVER_TIME_TO_FIRST_TOKEN]
    assert point.count == 1 and not point.exemplars
