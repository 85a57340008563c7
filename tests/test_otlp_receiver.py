"""The test receiver sees exactly what real OpenTelemetry exporters put on the wire."""

from __future__ import annotations

import gzip

import httpx
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
    OTLPMetricExporter as GrpcMetricExporter,
)
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcSpanExporter,
)
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
    OTLPMetricExporter as HttpMetricExporter,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as HttpSpanExporter,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind

from llmtrace import semconv
from testbed.otlp_receiver import OTLPReceiver


def _emit_trace(provider: TracerProvider, marker: str) -> None:
    tracer = provider.get_tracer("llmtrace.test")
    with tracer.start_as_current_span(semconv.SPAN_LLMTRACE_REQUEST, kind=SpanKind.SERVER,
                                      attributes={semconv.GEN_AI_REQUEST_MODEL: marker,
                                                  semconv.GEN_AI_USAGE_INPUT_TOKENS: 7}) as root:
        root.add_event(semconv.EVENT_LLMTRACE_FIRST_TOKEN)
        with tracer.start_as_current_span(semconv.SPAN_LLMTRACE_QUEUE,
                                          attributes={semconv.LLMTRACE_QUEUE_REASON: "arrival"}):
            pass


def test_spans_and_metrics_arrive_over_grpc_and_http():
    with OTLPReceiver() as rx:
        resource = Resource.create({"service.name": "receiver-test"})
        for transport, exporter in (
            ("grpc", GrpcSpanExporter(endpoint=rx.grpc_endpoint, insecure=True)),
            ("http", HttpSpanExporter(endpoint=f"{rx.http_endpoint}/v1/traces",
                                      compression=Compression.Gzip)),
        ):
            provider = TracerProvider(resource=resource)
            provider.add_span_processor(BatchSpanProcessor(exporter))
            _emit_trace(provider, f"model-{transport}")
            provider.shutdown()

        for transport, mexp in (
            ("grpc", GrpcMetricExporter(endpoint=rx.grpc_endpoint, insecure=True)),
            ("http", HttpMetricExporter(endpoint=f"{rx.http_endpoint}/v1/metrics")),
        ):
            reader = PeriodicExportingMetricReader(mexp, export_interval_millis=60_000)
            meters = MeterProvider(resource=resource, metric_readers=[reader])
            meter = meters.get_meter("llmtrace.test")
            hist = meter.create_histogram(semconv.METRIC_GEN_AI_SERVER_TIME_TO_FIRST_TOKEN,
                                          unit="s")
            for v in (0.05, 0.15, 0.3):
                hist.record(v, {semconv.GEN_AI_REQUEST_MODEL: f"model-{transport}"})
            meter.create_counter(semconv.METRIC_LLMTRACE_SERVER_REQUESTS, unit="{request}").add(
                3, {semconv.GEN_AI_REQUEST_MODEL: f"model-{transport}"})
            meters.shutdown()

        spans = rx.spans()
        assert {s.transport for s in spans} == {"grpc", "http"}
        for transport in ("grpc", "http"):
            mine = [s for s in spans if s.transport == transport]
            root = next(s for s in mine if s.name == semconv.SPAN_LLMTRACE_REQUEST)
            child = next(s for s in mine if s.name == semconv.SPAN_LLMTRACE_QUEUE)
            assert root.is_server and root.parent_span_id == ""
            assert child.parent_span_id == root.span_id and child.trace_id == root.trace_id
            assert root.attributes[semconv.GEN_AI_REQUEST_MODEL] == f"model-{transport}"
            assert root.attributes[semconv.GEN_AI_USAGE_INPUT_TOKENS] == 7
            assert [e.name for e in root.events] == [semconv.EVENT_LLMTRACE_FIRST_TOKEN]
            assert root.resource["service.name"] == "receiver-test"
            assert root.start_ns <= child.start_ns <= child.end_ns <= root.end_ns

        points = rx.points()
        for transport in ("grpc", "http"):
            model = f"model-{transport}"
            hist = next(p for p in points if p.kind == "histogram"
                        and p.attributes[semconv.GEN_AI_REQUEST_MODEL] == model)
            assert hist.count == 3 and abs(hist.sum - 0.5) < 1e-9 and hist.unit == "s"
            counter = next(p for p in points if p.kind == "sum"
                           and p.attributes[semconv.GEN_AI_REQUEST_MODEL] == model)
            assert counter.value == 3
        assert rx.request_counts["grpc"] >= 2 and rx.request_counts["http"] >= 2


def test_malformed_http_payload_gets_400_and_loses_nothing_else():
    with OTLPReceiver() as rx:
        bad = httpx.post(f"{rx.http_endpoint}/v1/traces", content=b"\xff\x00not-protobuf",
                         headers={"Content-Type": "application/x-protobuf"})
        assert bad.status_code == 400
        assert "malformed OTLP payload" in bad.text
        bad_gzip = httpx.post(f"{rx.http_endpoint}/v1/traces", content=b"not gzip",
                              headers={"Content-Type": "application/x-protobuf",
                                       "Content-Encoding": "gzip"})
        assert bad_gzip.status_code == 400
        assert httpx.post(f"{rx.http_endpoint}/v1/logs", content=b"").status_code == 404

        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(
            HttpSpanExporter(endpoint=f"{rx.http_endpoint}/v1/traces")))
        _emit_trace(provider, "after-garbage")
        provider.shutdown()
        assert len(rx.rejected) == 2
        assert {s.name for s in rx.spans()} == {semconv.SPAN_LLMTRACE_REQUEST,
                                                semconv.SPAN_LLMTRACE_QUEUE}


def test_json_and_gzip_encodings_are_decoded():
    with OTLPReceiver() as rx:
        body = '{"resourceSpans":[{"scopeSpans":[{"scope":{"name":"json"},"spans":[{' \
               '"traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b174",' \
               '"name":"llmtrace.queue","kind":1,"startTimeUnixNano":"1","endTimeUnixNano":"2"}]}]}]}'
        resp = httpx.post(f"{rx.http_endpoint}/v1/traces", content=body,
                          headers={"Content-Type": "application/json"})
        assert resp.status_code == 200
        req = ExportTraceServiceRequest()
        span = req.resource_spans.add().scope_spans.add().spans.add()
        span.name, span.trace_id, span.span_id = "gz", b"\x01" * 16, b"\x02" * 8
        resp = httpx.post(f"{rx.http_endpoint}/v1/traces",
                          content=gzip.compress(req.SerializeToString()),
                          headers={"Content-Type": "application/x-protobuf",
                                   "Content-Encoding": "gzip"})
        assert resp.status_code == 200
        assert rx.wait_for(lambda r: len(r.spans()) == 2, timeout=5)
        by_name = {s.name: s for s in rx.spans()}
        assert by_name["llmtrace.queue"].trace_id == "5b8efff798038103d269b633813fc60c"
        assert by_name["gz"].span_id == "02" * 8
