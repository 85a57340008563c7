"""The standalone ``llmtrace collector`` service, exercised for real on loopback.

Real OpenTelemetry SDK exporters (gRPC and HTTP) send synthetic llmtrace traffic
into a running :class:`CollectorService`; the tests read what it derived
(``on_record``), what it serves on ``/metrics`` and ``/healthz``, and what a real
OTLP receiver downstream got. Nothing is mocked except where a test has to hold
the derivation worker still (a wrapper around ``assembler.add`` waiting on an
event), which is how a full queue and a drain with work pending are made
deterministic. The fuzz test sends more than 10,000 malformed or random payloads
(seeded, so a failure reproduces) with valid ones interleaved, most straight into
``accept()`` and a sample over HTTP.
"""

from __future__ import annotations

import ast
import base64
import copy
import gzip
import http.client
import json
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import prometheus_client.metrics
import pytest
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcSpanExporter,
)
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as HttpSpanExporter,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

import llmtrace.collector.otlp as otlp
import llmtrace.collector.service as service_module
from llmtrace import cli
from llmtrace import semconv as sc
from llmtrace.collector import CollectorConfig, CollectorService, Refused, load_collector_config
from llmtrace.collector.otlp import EXPORT_PATH, TRACE_SERVICE
from llmtrace.config import ConfigError
from llmtrace.record import RequestRecord, UsageRecord
from llmtrace.record.labels import CUT_MARK, MAX_LABEL_LENGTH
from testbed.otlp_receiver import OTLPReceiver
from testbed.synthetic import ACCELERATOR_S, TTFT_S, make_payload, make_spans

pytestmark = pytest.mark.timeout(120)

LOOPBACK = "127.0.0.1:0"
PROTOBUF = "application/x-protobuf"
JSON = "application/json"
NAMES = sc.PROMETHEUS_NAMES
TTFT = NAMES[sc.METRIC_GEN_AI_SERVER_TIME_TO_FIRST_TOKEN]
ACCELERATOR = NAMES[sc.METRIC_LLMTRACE_COST_ACCELERATOR_SECONDS]
DERIVED = NAMES[sc.METRIC_LLMTRACE_PIPELINE_REQUESTS]
RECEIVED = NAMES[sc.METRIC_LLMTRACE_PIPELINE_RECEIVED_SPANS]
DROPPED = NAMES[sc.METRIC_LLMTRACE_PIPELINE_DROPPED_SPANS]
REJECTED = NAMES[sc.METRIC_LLMTRACE_PIPELINE_REJECTED_PAYLOADS]
QUEUED = NAMES[sc.METRIC_LLMTRACE_PIPELINE_QUEUED_SPANS]
REASON = "llmtrace_telemetry_reason"
TENANT = sc.LLMTRACE_TENANT.replace(".", "_")
ID_FIELDS = ("traceId", "spanId", "parentSpanId")
SPANS_PER_REQUEST = len(make_spans(1))


# -- helpers -----------------------------------------------------------------------------------


def wait_until(predicate: Callable[[], bool], timeout: float = 15.0, what: str = "") -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.005)


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def http_call(port: int, method: str, path: str, body: bytes | None = None,
              headers: dict[str, str] | None = None, timeout: float = 10) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def grpc_export(port: int, body: bytes, metadata: tuple[tuple[str, str], ...] | None = None
                ) -> bytes:
    """One raw OTLP/gRPC Export call with identity serializers (bytes in, bytes out)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        export = channel.unary_unary(EXPORT_PATH, request_serializer=None,
                                     response_deserializer=None)
        return export(body, metadata=metadata, timeout=10)


def grpc_code(port: int, body: bytes, metadata=None) -> tuple[grpc.StatusCode, str]:
    try:
        grpc_export(port, body, metadata)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def parse_samples(text: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    return sum(s.value for s in samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def by_label(samples: list[Sample], name: str, label: str) -> dict[str, float]:
    out: Counter[str] = Counter()
    for s in samples:
        if s.name == name:
            out[s.labels[label]] += s.value
    return dict(out)


def hex_id(value: int, size: int) -> str:
    return format(value, f"0{size * 2}x")


def root_ids(spans: list[ReadableSpan]) -> set[str]:
    return {hex_id(s.context.trace_id, 16) for s in spans if s.name == sc.SPAN_LLMTRACE_REQUEST}


def roots_in(body: bytes) -> set[str]:
    req = ExportTraceServiceRequest.FromString(body)
    return {span.trace_id.hex() for rs in req.resource_spans for ss in rs.scope_spans
            for span in ss.spans if span.name == sc.SPAN_LLMTRACE_REQUEST}


@dataclass(frozen=True)
class Payload:
    body: bytes
    spans: int
    roots: frozenset[str]


def payloads(spans: list[ReadableSpan], requests_each: int = 1) -> list[Payload]:
    """Group finished spans by trace (one request each) into OTLP payloads of ``requests_each``."""
    traces: dict[int, list[ReadableSpan]] = {}
    for s in spans:
        traces.setdefault(s.context.trace_id, []).append(s)
    groups = list(traces.values())
    out = []
    for i in range(0, len(groups), requests_each):
        chunk = [s for g in groups[i:i + requests_each] for s in g]
        out.append(Payload(encode_spans(chunk).SerializeToString(), len(chunk),
                           frozenset(root_ids(chunk))))
    return out


def to_otlp_json(body: bytes) -> bytes:
    """The OTLP/JSON form of a protobuf export: camelCase fields, hex ids."""
    def hexify(node):
        if isinstance(node, dict):
            return {k: base64.b64decode(v).hex() if k in ID_FIELDS else hexify(v)
                    for k, v in node.items()}
        if isinstance(node, list):
            return [hexify(v) for v in node]
        return node
    doc = json_format.MessageToDict(ExportTraceServiceRequest.FromString(body))
    return json.dumps(hexify(doc)).encode()


def deterministic(body: bytes, tag: int) -> bytes:
    """Rewrite ids and timestamps to fixed values so a mutation seed is the same every run."""
    req = ExportTraceServiceRequest.FromString(body)
    ids: dict[bytes, bytes] = {}

    def remap(old: bytes, size: int) -> bytes:
        if old and old not in ids:
            ids[old] = bytes([0xFE, tag]) + (len(ids) + 1).to_bytes(size - 2, "big")
        return ids.get(old, old)

    spans = [s for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]
    base = min(s.start_time_unix_nano for s in spans)
    for s in spans:
        s.trace_id, s.span_id = remap(s.trace_id, 16), remap(s.span_id, 8)
        s.parent_span_id = remap(s.parent_span_id, 8)
        s.start_time_unix_nano += 1_700_000_000 * 10**9 - base
        s.end_time_unix_nano += 1_700_000_000 * 10**9 - base
    return req.SerializeToString(deterministic=True)


@dataclass
class Running:
    """A started collector plus what it derived."""

    service: CollectorService
    records: list[RequestRecord] = field(default_factory=list)
    usage: list[UsageRecord] = field(default_factory=list)

    @property
    def ports(self) -> dict[str, int]:
        return self.service.ports

    def post(self, body: bytes, ctype: str | None = PROTOBUF, encoding: str | None = None,
             auth: str | None = None, path: str = "/v1/traces") -> Reply:
        headers = {}
        if ctype is not None:
            headers["Content-Type"] = ctype
        if encoding is not None:
            headers["Content-Encoding"] = encoding
        if auth is not None:
            headers["Authorization"] = auth
        return http_call(self.ports["http"], "POST", path, body, headers)

    def admin(self, path: str) -> Reply:
        return http_call(self.ports["admin"], "GET", path)

    def scrape(self) -> list[Sample]:
        reply = self.admin("/metrics")
        assert reply.status == 200
        return parse_samples(reply.body.decode())

    def registry(self) -> list[Sample]:
        """The same series without HTTP (the admin port is gone after stop())."""
        return parse_samples(generate_latest(self.service.metrics.registry).decode())

    def derived(self) -> set[str]:
        return {r.trace_id for r in list(self.records)}

    def wait_derived(self, trace_ids: set[str] | frozenset[str], timeout: float = 15.0) -> None:
        wait_until(lambda: set(trace_ids) <= self.derived(), timeout,
                   f"{len(set(trace_ids) - self.derived())} of {len(trace_ids)} traces derived")


def launch(**settings) -> Running:
    """A collector on free loopback ports (``settings`` override), started."""
    settings = {"grpc_endpoint": LOOPBACK, "http_endpoint": LOOPBACK,
                "admin_endpoint": LOOPBACK, **settings}
    records: list[RequestRecord] = []
    usage: list[UsageRecord] = []
    service = CollectorService(CollectorConfig(**settings), on_record=records.append,
                               on_usage=usage.append)
    return Running(service.start(), records, usage)


@pytest.fixture
def start_collector() -> Iterator[Callable[..., Running]]:
    """Start collectors with :func:`launch`; every one is stopped at teardown."""
    started: list[Running] = []

    def start(**settings) -> Running:
        started.append(launch(**settings))
        return started[-1]

    yield start
    for run in started:
        run.service.stop(1.0)


@pytest.fixture(scope="module")
def shared() -> Iterator[Running]:
    """One collector for the tests that only need deltas (malformed input, hypothesis)."""
    run = launch(max_payload_bytes=64 * 1024)
    yield run
    run.service.stop(1.0)


def block_worker(service: CollectorService) -> tuple[threading.Event, threading.Event]:
    """Hold the derivation worker inside ``assembler.add`` until ``release`` is set.

    Returns ``(release, busy)``; ``busy`` is set once the worker holds a batch.
    """
    release, busy = threading.Event(), threading.Event()
    add = service.assembler.add

    def held(spans) -> None:
        busy.set()
        release.wait(30)
        add(spans)

    service.assembler.add = held  # type: ignore[method-assign]
    return release, busy


# -- 1. real SDK exporters in, derived metrics out ---------------------------------------------


def test_one_bad_record_loses_only_itself_counted(start_collector):
    """Out-of-range values in one request of a payload: that request is refused and
    counted, its neighbours are derived, and no sum or counter is poisoned."""
    run = start_collector()
    spans = make_spans(5, tenants=5)
    bad = {"t1": {sc.GEN_AI_USAGE_OUTPUT_TOKENS: -5},
           "t2": {sc.LLMTRACE_LATENCY_TIME_TO_FIRST_TOKEN: float("nan")},
           "t3": {sc.GEN_AI_USAGE_INPUT_TOKENS: 2**63 - 1},
           "t4": {sc.LLMTRACE_LATENCY_E2E: float("inf")}}
    for span in spans:
        change = bad.get(span.attributes.get(sc.LLMTRACE_TENANT))
        if change and span.name == sc.SPAN_LLMTRACE_REQUEST:
            span._attributes = {**span.attributes, **change}
        if span.name == sc.SPAN_LLMTRACE_ENGINE_REQUEST and \
                span.attributes.get(sc.LLMTRACE_TENANT) == "t0":
            span._attributes = {**span.attributes, sc.LLMTRACE_COST_ACCELERATOR_SECONDS: -1.0}
    assert run.post(encode_spans(spans).SerializeToString()).status == 200
    wait_until(lambda: len(run.records) == 1 and len(run.usage) == 4, what="good records")
    wait_until(lambda: total(run.scrape(), DROPPED, **{REASON: "invalid_record"}) == 5,
               what="refused records counted")
    assert [r.tenant for r in run.records] == ["t0"]
    assert sorted(u.tenant for u in run.usage) == ["t1", "t2", "t3", "t4"]
    samples = run.scrape()
    for sample in samples:  # nothing non-finite or negative reached a series
        assert sample.value == sample.value and abs(sample.value) != float("inf"), sample
    assert total(samples, f"{TTFT}_count") == 1
    assert total(samples, f"{TTFT}_sum") == pytest.approx(TTFT_S)


def test_hostile_label_values_are_cut_and_counted(start_collector):
    """A 1 MB model attribute, a tenant with line breaks, a non-ASCII version: every
    /metrics label value stays within the length bound, cut values are recognisable
    and the changes are counted by reason; the records themselves are derived."""
    run = start_collector()
    huge = "m" * (1 << 20)
    spans = make_spans(2, model=huge, tenants=1) + make_spans(1, model="ok", version="v-ü")
    for span in spans:  # tenants with a control character and a line break
        if span.attributes.get(sc.LLMTRACE_TENANT) == "t0" and span.attributes.get(
                sc.GEN_AI_REQUEST_MODEL) == huge:
            span._attributes = {**span.attributes, sc.LLMTRACE_TENANT: "acme\n\x07evil"}
    body = encode_spans(spans).SerializeToString()
    assert run.post(body).status == 200
    run.wait_derived(root_ids(spans))
    reply = run.admin("/metrics")
    assert reply.status == 200 and len(reply.body) < 1 << 20  # not a copy of the 1 MB value
    samples = parse_samples(reply.body.decode())
    values = {v for s in samples for v in s.labels.values()}
    assert max(len(v) for v in values) <= MAX_LABEL_LENGTH
    assert "m" * (MAX_LABEL_LENGTH - 1) + CUT_MARK in values
    assert "acme\ufffd\ufffdevil" in values and "v-ü" in values and "ok" in values
    overflows = "llmtrace_telemetry_label_overflows_total"
    assert total(samples, overflows, **{REASON: "too_long"}) >= 1
    assert total(samples, overflows, **{REASON: "unprintable"}) >= 1


@pytest.mark.parametrize("transport", ["grpc", "http", "http+gzip"])
def test_sdk_exporter_traffic_is_derived_into_metrics(start_collector, transport):
    run = start_collector()
    n, tenants = 30, 4
    spans = make_spans(n, tenants=tenants)
    if transport == "grpc":
        exporter = GrpcSpanExporter(endpoint=f"127.0.0.1:{run.ports['grpc']}", insecure=True,
                                    timeout=10)
    else:
        exporter = HttpSpanExporter(
            endpoint=f"http://127.0.0.1:{run.ports['http']}/v1/traces", timeout=10,
            compression=Compression.Gzip if transport == "http+gzip" else Compression.NoCompression)
    try:
        assert exporter.export(spans) == SpanExportResult.SUCCESS
    finally:
        exporter.shutdown()

    run.wait_derived(root_ids(spans))
    wait_until(lambda: len(run.usage) == n, what="usage records")
    assert len(run.records) == n, "each request derived exactly once"
    assert {r.tenant for r in run.records} == {f"t{i}" for i in range(tenants)}

    samples = run.scrape()
    expected = Counter(f"t{i % tenants}" for i in range(n))
    assert by_label(samples, f"{TTFT}_count", TENANT) == expected
    for tenant, seconds in by_label(samples, f"{TTFT}_sum", TENANT).items():
        assert seconds == pytest.approx(expected[tenant] * TTFT_S)
    assert ACCELERATOR.endswith("_total")
    assert total(samples, ACCELERATOR) == pytest.approx(n * ACCELERATOR_S)
    per_tenant = by_label(samples, ACCELERATOR, TENANT)
    assert per_tenant == pytest.approx({t: c * ACCELERATOR_S for t, c in expected.items()})
    assert total(samples, DERIVED) == n
    assert total(samples, RECEIVED) == len(spans) == n * SPANS_PER_REQUEST
    assert total(samples, REJECTED) == 0 and total(samples, DROPPED) == 0
    assert total(samples, QUEUED) == 0

    health = run.admin("/healthz")
    assert health.status == 200
    status = json.loads(health.body)
    assert status["status"] == "ok" and status["derived_requests"] == n
    assert run.admin("/nope").status == 404


# -- 2. forwarding -----------------------------------------------------------------------------


def test_forwarding_delivers_every_span_unchanged(start_collector):
    spans = make_spans(12, tenants=3)
    pool = payloads(spans)
    with OTLPReceiver() as downstream:
        run = start_collector(forward_endpoint=downstream.grpc_endpoint)
        for i, p in enumerate(pool):
            if i % 4 == 0:
                assert run.post(p.body).status == 200
            elif i % 4 == 1:
                assert run.post(to_otlp_json(p.body), JSON).status == 200
            elif i % 4 == 2:
                assert run.post(gzip.compress(p.body), PROTOBUF, "gzip").status == 200
            else:
                assert ExportTraceServiceResponse.FromString(
                    grpc_export(run.ports["grpc"], p.body)) == ExportTraceServiceResponse()
        assert downstream.wait_for(lambda r: len(r.spans()) >= len(spans), timeout=15)
        run.wait_derived(root_ids(spans))
        wait_until(lambda: run.service.forward_spans == 0, what="forward queue empty")
        got = downstream.spans()

    assert len(got) == len(spans)
    assert Counter(s.span_id for s in got) == Counter(hex_id(s.context.span_id, 8) for s in spans)
    received = {s.span_id: s for s in got}
    for original in spans:
        arrived = received[hex_id(original.context.span_id, 8)]
        assert arrived.name == original.name
        assert arrived.trace_id == hex_id(original.context.trace_id, 16)
        parent = original.parent.span_id if original.parent else None
        assert arrived.parent_span_id == (hex_id(parent, 8) if parent else "")
        assert (arrived.start_ns, arrived.end_ns) == (original.start_time, original.end_time)
        assert arrived.attributes == {k: list(v) if isinstance(v, tuple) else v
                                      for k, v in original.attributes.items()}
        assert arrived.resource == dict(original.resource.attributes)
    samples = run.scrape()
    assert total(samples, DROPPED) == 0


class RawSink:
    """A downstream OTLP/gRPC endpoint that keeps the exact bytes and metadata it got."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.metadata: list[dict[str, str]] = []
        self._server = grpc.server(futures.ThreadPoolExecutor(2))

        def export(raw: bytes, context: grpc.ServicerContext) -> bytes:
            self.metadata.append(dict(context.invocation_metadata()))
            self.bodies.append(raw)
            return ExportTraceServiceResponse().SerializeToString()

        handler = grpc.unary_unary_rpc_method_handler(export, request_deserializer=None,
                                                      response_serializer=None)
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(TRACE_SERVICE, {"Export": handler}),))
        self.port = self._server.add_insecure_port(LOOPBACK)
        self._server.start()

    def stop(self) -> None:
        self._server.stop(0).wait()


def test_forwarded_bytes_are_the_senders_bytes(start_collector):
    sink = RawSink()
    try:
        run = start_collector(forward_endpoint=f"127.0.0.1:{sink.port}",
                              forward_headers={"X-Scope-OrgID": "tenant-a"})
        proto, grpc_body, as_json, zipped = (p.body for p in payloads(make_spans(4)))
        assert run.post(proto).status == 200
        grpc_export(run.ports["grpc"], grpc_body)
        assert run.post(to_otlp_json(as_json), JSON).status == 200
        assert run.post(gzip.compress(zipped), PROTOBUF, "gzip").status == 200
        wait_until(lambda: len(sink.bodies) == 4, what="4 forwarded exports")
    finally:
        sink.stop()
    forwarded = sorted(sink.bodies, key=lambda b: sorted(roots_in(b)))
    originals = sorted((proto, grpc_body, as_json, zipped), key=lambda b: sorted(roots_in(b)))
    for sent, got in zip(originals, forwarded, strict=True):
        if sent in (proto, grpc_body):
            assert got == sent, "uncompressed protobuf is forwarded as the original bytes"
        sent_req, got_req = (ExportTraceServiceRequest.FromString(b) for b in (sent, got))
        assert got_req == sent_req
        sent_kv = [kv.SerializeToString() for rs in sent_req.resource_spans
                   for ss in rs.scope_spans for s in ss.spans for kv in s.attributes]
        got_kv = [kv.SerializeToString() for rs in got_req.resource_spans
                  for ss in rs.scope_spans for s in ss.spans for kv in s.attributes]
        assert got_kv == sent_kv and sent_kv
    assert all(m.get("x-scope-orgid") == "tenant-a" for m in sink.metadata)


def test_downstream_outage_is_counted_and_derivation_goes_on(start_collector):
    with OTLPReceiver() as gone:
        dead = gone.grpc_endpoint
    run = start_collector(forward_endpoint=dead, forward_retries=0, forward_timeout_s=2)
    pool = payloads(make_spans(3))
    for p in pool:
        assert run.post(p.body).status == 200
    run.wait_derived({r for p in pool for r in p.roots})
    lost = sum(p.spans for p in pool)
    wait_until(lambda: total(run.scrape(), DROPPED, **{REASON: "forward_failed"}) == lost,
               what="forward_failed drops counted")
    assert total(run.scrape(), DERIVED) == len(pool)


# -- 3. authentication -------------------------------------------------------------------------


def test_a_second_collector_on_the_same_grpc_port_refuses_to_start(start_collector):
    """gRPC's default SO_REUSEPORT let a second collector take half the traffic."""
    first = start_collector()
    port = first.ports["grpc"]
    with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
        launch(grpc_endpoint=f"127.0.0.1:{port}")
    http_port = first.ports["http"]
    with pytest.raises(OSError, match=f"127.0.0.1:{http_port}"):
        launch(grpc_endpoint="", http_endpoint=f"127.0.0.1:{http_port}")


def _stall(port: int) -> socket.socket:
    """Send headers promising 100 bytes of body, then only 10 of them."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn.sendall(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 b"application/x-protobuf\r\nContent-Length: 100\r\n\r\n0123456789")
    return conn


def test_stalled_senders_and_request_floods_are_cut_off_and_counted(start_collector):
    """A body shorter than its Content-Length once held a thread forever; now the sender
    is answered 408 after ``read_timeout_s``, and requests beyond ``max_connections``
    in progress at once are answered 503 with Retry-After (OTLP exporters retry it)."""
    run = start_collector(read_timeout_s=1.0, max_connections=4)
    port = run.ports["http"]
    stalled = [_stall(port) for _ in range(4)]
    time.sleep(0.3)  # the four are in progress, waiting for their bodies
    reply = run.post(_VALID)
    assert reply.status == 503 and b"retry later" in reply.body, reply
    for conn in stalled:
        answer = conn.recv(4096)
        conn.close()
        assert answer.startswith(b"HTTP/1.1 408") and b"incomplete" in answer, answer
    assert run.post(_VALID).status == 200  # the slots are free again
    samples = run.scrape()
    assert total(samples, REJECTED, **{REASON: "timeout"}) == 4
    assert total(samples, REJECTED, **{REASON: "too_many_connections"}) == 1


def test_a_burst_of_500_senders_gets_an_answer_each_and_every_refusal_is_counted(
        start_collector):
    """With the standard library's backlog of 5, 25-45% of a 500-sender burst was reset
    and nothing counted it. Now every sender gets an HTTP answer: 200, or 503 with
    Retry-After that the collector counted."""
    run = start_collector()
    port = run.ports["http"]
    p = payloads(make_spans(1))[0]
    senders = 500
    start = threading.Barrier(senders)

    def send(_: int) -> int | str:
        start.wait(30)
        try:
            return http_call(port, "POST", "/v1/traces", p.body,
                             {"Content-Type": PROTOBUF}, timeout=60).status
        except OSError as exc:  # a reset or refused connection: what must not happen
            return type(exc).__name__

    with futures.ThreadPoolExecutor(senders) as pool:
        answers = Counter(pool.map(send, range(senders)))
    assert set(answers) <= {200, 503}, answers
    samples = run.scrape()
    refused = sum(total(samples, REJECTED, **{REASON: r})
                  for r in ("too_many_connections", "backpressure"))
    assert answers[503] == refused, (answers, refused)
    assert total(samples, RECEIVED) == answers[200] * p.spans


def test_chunked_uploads_are_accepted_within_the_payload_limit(start_collector):
    run = start_collector(max_payload_bytes=4096)
    p = payloads(make_spans(1))[0]

    def chunked(body: bytes) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", run.ports["http"], timeout=10)
        try:
            conn.request("POST", "/v1/traces", iter([body[:100], body[100:]]),
                         {"Content-Type": PROTOBUF, "Transfer-Encoding": "chunked"},
                         encode_chunked=True)
            return conn.getresponse().status
        finally:
            conn.close()

    assert chunked(p.body) == 200
    run.wait_derived(p.roots)
    assert chunked(make_payload(3)[0]) == 413  # counted while it streams in, never buffered
    assert total(run.scrape(), REJECTED, **{REASON: "too_large"}) == 1


def test_bearer_token_is_required_on_both_transports(start_collector):
    run = start_collector(bearer_token="s3cret")
    good, bad_http, via_grpc = payloads(make_spans(3))
    grpc_port = run.ports["grpc"]

    for auth in (None, "Bearer wrong", "s3cret", "Bearer s3cret "):
        reply = run.post(bad_http.body, auth=auth)
        assert reply.status == 401 and b"bearer token" in reply.body
    for metadata in (None, (("authorization", "Bearer nope"),)):
        code, details = grpc_code(grpc_port, via_grpc.body, metadata)
        assert code == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in details
    refused_sdk = GrpcSpanExporter(endpoint=f"127.0.0.1:{grpc_port}", insecure=True, timeout=5)
    try:
        assert refused_sdk.export(make_spans(1)) == SpanExportResult.FAILURE
    finally:
        refused_sdk.shutdown()

    assert run.post(good.body, auth="Bearer s3cret").status == 200
    lower = payloads(make_spans(1))[0]
    assert run.post(lower.body, auth="bearer s3cret").status == 200  # the scheme: any case
    grpc_export(grpc_port, via_grpc.body, (("authorization", "Bearer s3cret"),))
    sdk = GrpcSpanExporter(endpoint=f"127.0.0.1:{grpc_port}", insecure=True, timeout=5,
                           headers={"authorization": "Bearer s3cret"})
    try:
        spans = make_spans(1)
        assert sdk.export(spans) == SpanExportResult.SUCCESS
    finally:
        sdk.shutdown()
    accepted = good.roots | via_grpc.roots | root_ids(spans) | lower.roots
    run.wait_derived(accepted)
    assert run.derived() == set(accepted), "nothing from a refused payload was derived"
    assert not bad_http.roots & run.derived()

    samples = run.scrape()
    assert total(samples, REJECTED, **{REASON: "unauthenticated"}) == 4 + 2 + 1
    assert total(samples, REJECTED) == 7
    assert total(samples, RECEIVED) == good.spans + via_grpc.spans + len(spans) + lower.spans


# -- 4. malformed input ------------------------------------------------------------------------


def _short_span_id() -> bytes:
    req = ExportTraceServiceRequest.FromString(make_payload(1)[0])
    req.resource_spans[0].scope_spans[0].spans[2].span_id = b"\x01\x02\x03"
    return req.SerializeToString()


def _zero_trace_id() -> bytes:
    req = ExportTraceServiceRequest.FromString(make_payload(1)[0])
    req.resource_spans[0].scope_spans[0].spans[0].trace_id = bytes(16)
    return req.SerializeToString()


def _json_with(trace_id: str) -> bytes:
    doc = json.loads(to_otlp_json(make_payload(1)[0]))
    doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["traceId"] = trace_id
    return json.dumps(doc).encode()


_VALID = make_payload(1)[0]
MALFORMED = {
    # name: (body, content type, encoding, words the 400 must contain)
    "garbage protobuf": (b"\x0a\xff\xff\xff\xff\x0f garbage", PROTOBUF, None,
                         ["malformed OTLP protobuf"]),
    "truncated protobuf": (_VALID[: len(_VALID) // 2], PROTOBUF, None,
                           ["malformed OTLP protobuf"]),
    "bad JSON": (b'{"resourceSpans": [', JSON, None, ["malformed OTLP JSON"]),
    "JSON, wrong shape": (b'{"resourceSpans": 5}', JSON, None, ["malformed OTLP JSON"]),
    "JSON, wrong value type": (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"kind": []}]}]}]}',
                               JSON, None, ["malformed OTLP JSON"]),
    "JSON, non-hex traceId": (_json_with("zz" * 16), JSON, None, ["traceId", "is not hex"]),
    "JSON, short traceId": (_json_with("ab" * 8), JSON, None, ["trace_id must be 16", "got 8"]),
    "3-byte span_id": (_short_span_id(), PROTOBUF, None,
                       ["spans[2]", "span_id must be 8", "got 3"]),
    "all-zero trace_id": (_zero_trace_id(), PROTOBUF, None, ["trace_id must be 16 non-zero"]),
    "unsupported Content-Type": (_VALID, "text/plain", None,
                                 ["unsupported Content-Type 'text/plain'"]),
    "bad gzip": (b"this is not gzip", PROTOBUF, "gzip", ["bad gzip body"]),
    "truncated gzip": (gzip.compress(_VALID)[:-12], PROTOBUF, "gzip",
                       ["bad gzip body", "truncated"]),
    "bad deflate": (zlib.compress(_VALID)[:40] + b"\x00" * 8, PROTOBUF, "deflate",
                    ["bad deflate body"]),
    "unsupported Content-Encoding": (_VALID, PROTOBUF, "br",
                                     ["unsupported Content-Encoding 'br'"]),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_http_payload_gets_400_naming_the_problem(shared, case):
    body, ctype, encoding, words = MALFORMED[case]
    before = shared.registry()
    reply = shared.post(body, ctype, encoding)
    assert reply.status == 400, reply.body
    message = reply.body.decode()
    for word in words:
        assert word in message
    after = shared.registry()
    assert (total(after, REJECTED, **{REASON: "malformed"})
            - total(before, REJECTED, **{REASON: "malformed"})) == 1
    assert total(after, RECEIVED) == total(before, RECEIVED), "nothing of it was accepted"
    with pytest.raises(Refused) as refused:
        shared.service.accept(body, ctype, encoding)
    assert refused.value.reason == "malformed" and not refused.value.retryable
    # and a valid payload right after it still goes end to end
    p = payloads(make_spans(1))[0]
    assert shared.post(p.body).status == 200
    shared.wait_derived(p.roots)


def test_oversize_payloads_and_unknown_paths(start_collector, monkeypatch):
    run = start_collector(max_payload_bytes=4096)
    big = make_payload(3)[0]
    assert len(big) > 4096
    reply = run.post(big)
    assert reply.status == 413 and b"too large" in reply.body
    with pytest.raises(Refused, match="max_payload_bytes=4096") as refused:
        run.service.accept(big, PROTOBUF)
    assert refused.value.reason == "too_large" and not refused.value.retryable
    # a Content-Length that promises too much is refused before any of the body is read
    conn = http.client.HTTPConnection("127.0.0.1", run.ports["http"], timeout=10)
    try:
        conn.putrequest("POST", "/v1/traces")
        conn.putheader("Content-Length", str(10**12))
        conn.endheaders()
        assert conn.getresponse().status == 413
    finally:
        conn.close()
    code, _ = grpc_code(run.ports["grpc"], big)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED  # refused by gRPC itself, and counted
    wait_until(lambda: total(run.scrape(), REJECTED, **{REASON: "grpc_refused"}) == 1,
               what="the gRPC refusal counted")

    # a small body that inflates past the decoder's bound (a zip bomb)
    monkeypatch.setattr(otlp, "MAX_DECODED_BYTES", 1 << 20)
    bomb = gzip.compress(bytes(2 << 20))
    assert len(bomb) < 4096
    reply = run.post(bomb, PROTOBUF, "gzip")
    assert reply.status == 400 and b"decompresses to more than" in reply.body
    # several gzip members, the first exactly at the bound: the rest must not inflate
    # unbounded (a zero "room" meant "no limit" to zlib)
    members = gzip.compress(bytes(1 << 20)) + gzip.compress(bytes(2 << 20))
    assert len(members) < 4096
    reply = run.post(members, PROTOBUF, "gzip")
    assert reply.status == 400 and b"decompresses to more than" in reply.body, reply.body
    # deflate has one stream: bytes after it are refused, not ignored
    reply = run.post(zlib.compress(_VALID) + b"more", PROTOBUF, "deflate")
    assert reply.status == 400 and b"after the end" in reply.body, reply.body

    reply = run.post(_VALID, path="/v1/metrics")
    assert reply.status == 404 and b"/v1/metrics" in reply.body
    samples = run.scrape()
    assert total(samples, REJECTED, **{REASON: "too_large"}) == 3
    assert total(samples, REJECTED, **{REASON: "malformed"}) == 3  # bomb, members, deflate tail
    assert total(samples, RECEIVED) == 0
    p = payloads(make_spans(1))[0]
    assert run.post(p.body).status == 200
    run.wait_derived(p.roots)


def test_malformed_grpc_payload_gets_invalid_argument(start_collector):
    run = start_collector()
    port = run.ports["grpc"]
    code, details = grpc_code(port, b"\x0a\xff\xff\xff\xff\x0f garbage")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "malformed OTLP protobuf" in details
    code, details = grpc_code(port, _short_span_id())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "span_id must be 8" in details
    samples = run.scrape()
    assert total(samples, REJECTED, **{REASON: "malformed"}) == 2
    assert total(samples, RECEIVED) == 0
    p = payloads(make_spans(1))[0]
    grpc_export(port, p.body)
    run.wait_derived(p.roots)


def test_json_fields_unknown_to_this_version_are_ignored(start_collector):
    """OTLP/JSON receivers must ignore unknown fields (a newer sender's additions)."""
    run = start_collector()
    p = payloads(make_spans(1))[0]
    doc = json.loads(to_otlp_json(p.body))
    doc["futureTopLevel"] = {"x": 1}
    doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["futureSpanField"] = [1, 2]
    assert run.post(json.dumps(doc).encode(), JSON).status == 200
    run.wait_derived(p.roots)


# -- 5. fuzz -----------------------------------------------------------------------------------

OTLP_KEYS = ("resourceSpans", "scopeSpans", "spans", "resource", "scope", "attributes", "key",
             "value", "stringValue", "intValue", "doubleValue", "boolValue", "arrayValue",
             "kvlistValue", "bytesValue", "values", "name", "kind", "traceId", "spanId",
             "parentSpanId", "startTimeUnixNano", "endTimeUnixNano", "status", "code",
             "message", "events", "links", "flags", "traceState", "droppedAttributesCount")
CTYPES = (None, PROTOBUF, "application/protobuf", JSON, "application/json; charset=utf-8",
          "APPLICATION/X-PROTOBUF", "text/plain", "application/grpc", "",
          "multipart/form-data; boundary=x", "application/x-protobuf;;;", "*/*")
ENCODINGS = (None, "", "identity", "gzip", "deflate", "GZIP", " gzip ", "br", "zstd",
             "gzip, deflate", "x-gzip")
SEED_PROTO = deterministic(make_payload(2, tenants=2)[0], tag=1)
SEED_JSON = to_otlp_json(SEED_PROTO)
SEED_FORMS = (SEED_PROTO, SEED_JSON, gzip.compress(SEED_PROTO), zlib.compress(SEED_JSON))


class Fuzzer:
    """Seeded generator of malformed, random and mutated OTLP payloads."""

    KINDS = ("random", "truncated", "flipped", "spliced", "wire", "json_random",
             "json_mutated", "json_text", "compressed", "combo", "oversize")
    WEIGHTS = (10, 10, 14, 8, 12, 10, 14, 8, 10, 6, 1)

    def __init__(self, seed: int, max_bytes: int) -> None:
        self.rng = random.Random(seed)
        self.max_bytes = max_bytes

    def __call__(self) -> tuple[str, bytes, str | None, str | None]:
        kind = self.rng.choices(self.KINDS, self.WEIGHTS)[0]
        body, ctype, encoding = getattr(self, kind)()
        return kind, body, ctype, encoding

    def _ctype(self, natural: str) -> str | None:
        return natural if self.rng.random() < 0.85 else self.rng.choice(CTYPES)

    def _mutate(self, data: bytes) -> bytes:
        r = self.rng
        op = r.randrange(4)
        if op == 0 or not data:
            return data[: r.randrange(len(data) + 1)]
        b = bytearray(data)
        if op == 1:
            for _ in range(r.randint(1, 8)):
                b[r.randrange(len(b))] = r.randrange(256)
        elif op == 2:
            a = r.randrange(len(b))
            b[a:a + r.randint(0, 64)] = r.randbytes(r.randint(0, 64))
        else:
            a = r.randrange(len(b))
            del b[a:a + r.randint(1, 32)]
        return bytes(b)

    def random(self):
        return self.rng.randbytes(self.rng.randint(0, 1024)), self._ctype(PROTOBUF), None

    def truncated(self):
        return SEED_PROTO[: self.rng.randrange(len(SEED_PROTO))], self._ctype(PROTOBUF), None

    def flipped(self):
        b = bytearray(SEED_PROTO)
        for _ in range(self.rng.randint(1, 8)):
            b[self.rng.randrange(len(b))] ^= 1 << self.rng.randrange(8)
        return bytes(b), self._ctype(PROTOBUF), None

    def spliced(self):
        return self._mutate(self._mutate(SEED_PROTO)), self._ctype(PROTOBUF), None

    def _varint(self, v: int) -> bytes:
        out = bytearray()
        while True:
            out.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
            v >>= 7
            if not v:
                return bytes(out)

    def _field(self, depth: int) -> bytes:
        r = self.rng
        number = r.choice((1, 2, 3, 4, 5, 7, 8, 9, 15, r.randint(1, 2**29 - 1)))
        wire = r.choice((0, 1, 2, 2, 2, 5, 3, 4, 6, 7))
        tag = self._varint(number << 3 | wire)
        if wire == 0:
            return tag + self._varint(r.getrandbits(r.choice((7, 32, 64, 70))))
        if wire == 1:
            return tag + r.randbytes(8)
        if wire == 5:
            return tag + r.randbytes(4)
        if wire == 2:
            if depth < 6 and r.random() < 0.6:
                inner = b"".join(self._field(depth + 1) for _ in range(r.randint(0, 4)))
            else:
                inner = r.choice((r.randbytes(r.choice((0, 3, 8, 16, 17))), b"llmtrace.request"))
            length = len(inner) if r.random() < 0.9 else r.randint(0, 2**32)
            return tag + self._varint(length) + inner
        return tag  # group markers and invalid wire types

    def wire(self):
        body = b"".join(self._field(0) for _ in range(self.rng.randint(1, 12)))
        return body, self._ctype(PROTOBUF), None

    def _json_value(self, depth: int = 0):
        r = self.rng
        roll = r.random()
        if depth > 4 or roll < 0.35:
            return r.choice((
                None, True, False, 0, -1, 2**64, -(2**70), r.random() * 10 ** r.randint(-9, 300),
                float("inf"), float("nan"), "", "0" * 32, r.randbytes(8).hex(),
                r.randbytes(16).hex(), r.randbytes(r.randint(0, 20)).hex(), "zz" * 8,
                "ü\u0000\ud7ff",
                str(r.randint(-(2**65), 2**65)), "AAAAAAAAAAAAAAAAAAAAAA=="))
        if roll < 0.6:
            return [self._json_value(depth + 1) for _ in range(r.randint(0, 4))]
        keys = [r.choice(OTLP_KEYS) if r.random() < 0.85 else r.randbytes(3).hex()
                for _ in range(r.randint(0, 5))]
        return {k: self._json_value(depth + 1) for k in keys}

    def json_random(self):
        doc = self._json_value()
        if self.rng.random() < 0.5:
            doc = {"resourceSpans": [{"scopeSpans": [{"spans": [doc]}]}]}
        return json.dumps(doc).encode(), self._ctype(JSON), None

    def json_mutated(self):
        doc = json.loads(SEED_JSON)
        for _ in range(self.rng.randint(1, 3)):
            slots: list[tuple[dict | list, str | int]] = []
            stack: list = [doc]
            while stack:
                node = stack.pop()
                items = node.items() if isinstance(node, dict) else enumerate(node)
                for k, v in items:
                    slots.append((node, k))
                    if isinstance(v, dict | list):
                        stack.append(v)
            parent, key = self.rng.choice(slots)
            op = self.rng.randrange(4)
            if op == 0 and isinstance(parent, dict):
                del parent[key]
            elif op == 1:
                parent[key] = [copy.deepcopy(parent[key])]
            else:
                parent[key] = self._json_value(3)
        return json.dumps(doc).encode(), self._ctype(JSON), None

    def json_text(self):
        return self._mutate(SEED_JSON), self._ctype(JSON), None

    def compressed(self):
        r = self.rng
        inner, ctype, _ = getattr(self, r.choice(("flipped", "truncated", "json_mutated",
                                                   "random", "wire")))()
        if r.random() < 0.3:
            inner = SEED_PROTO if ctype != JSON else SEED_JSON
        encoding = r.choice(("gzip", "deflate"))
        body = gzip.compress(inner) if encoding == "gzip" else zlib.compress(inner)
        if r.random() < 0.5:
            body = self._mutate(body)
        if r.random() < 0.15:
            encoding = r.choice(ENCODINGS)
        return body, ctype, encoding

    def combo(self):
        r = self.rng
        return r.choice(SEED_FORMS), r.choice(CTYPES), r.choice(ENCODINGS)

    def oversize(self):
        return self.rng.randbytes(self.max_bytes + self.rng.randint(1, 4096)), PROTOBUF, None


FUZZ_PAYLOADS = 10_000
VALID_EVERY = 50
HTTP_EVERY = 33


def test_fuzz_ten_thousand_payloads_never_break_the_service(start_collector):
    max_bytes = 32 * 1024
    run = start_collector(max_payload_bytes=max_bytes)
    service = run.service
    fuzz = Fuzzer(seed=20240917, max_bytes=max_bytes)
    # valid payloads with unique traces, interleaved every VALID_EVERY-th, in four forms
    pool = payloads(make_spans(FUZZ_PAYLOADS // (VALID_EVERY - 1) + 2, tenants=5))
    forms = [((p.body, PROTOBUF, None), (gzip.compress(p.body), PROTOBUF, "gzip"),
              (to_otlp_json(p.body), JSON, None),
              (zlib.compress(p.body), PROTOBUF, "deflate"))[k % 4] for k, p in enumerate(pool)]
    valid_roots: set[str] = set()
    outcomes: Counter[str] = Counter()
    refused_by_kind: Counter[str] = Counter()
    http_statuses: Counter[int] = Counter()
    fuzzed = sent = 0
    started = time.perf_counter()
    while fuzzed < FUZZ_PAYLOADS:
        if sent % VALID_EVERY == 0:
            p = pool[sent // VALID_EVERY]
            body, ctype, encoding = forms[sent // VALID_EVERY]
            if (sent // VALID_EVERY) % 3 == 0:
                reply = run.post(body, ctype, encoding)
                assert reply.status == 200, reply.body
            else:
                assert service.accept(body, ctype, encoding) == p.spans
            valid_roots |= p.roots
            sent += 1
            continue
        kind, body, ctype, encoding = fuzz()
        fuzzed += 1
        sent += 1
        where = f"payload #{sent} ({kind}, {ctype!r}, {encoding!r}): {body[:60]!r}"
        if fuzzed % HTTP_EVERY == 0:
            reply = run.post(body, ctype, encoding)
            http_statuses[reply.status] += 1
            assert reply.status == 200 or reply.status in (400, 413, 415), where
            if reply.status != 200:
                assert reply.body.strip(), f"a refusal names the problem: {where}"
                outcomes["refused"] += 1
                refused_by_kind[kind] += 1
            else:
                outcomes["accepted"] += 1
            continue
        try:
            service.accept(body, ctype, encoding)
        except Refused as exc:
            assert not exc.retryable, f"{where} refused as retryable: {exc}"
            assert exc.reason in ("malformed", "too_large"), where
            assert str(exc), where
            outcomes["refused"] += 1
            refused_by_kind[kind] += 1
        except Exception as exc:  # noqa: BLE001 - any other exception is the failure
            pytest.fail(f"{where} raised {exc!r}")
        else:
            outcomes["accepted"] += 1
    elapsed = time.perf_counter() - started
    print(f"fuzz: {fuzzed} payloads + {len(valid_roots)} valid in {elapsed:.1f}s; {outcomes}; "
          f"refused by kind {dict(refused_by_kind)}; HTTP {dict(http_statuses)}; "
          f"derivation errors {service.errors}")

    assert fuzzed >= 10_000 and sent >= fuzzed + len(valid_roots)
    assert sum(http_statuses.values()) >= 300
    run.wait_derived(valid_roots, timeout=30)
    wait_until(lambda: service.queued_spans == 0, what="ingest queue drained")
    code, status = service.health()
    assert code == 200 and status["status"] == "ok"
    health = run.admin("/healthz")
    assert health.status == 200 and json.loads(health.body)["status"] == "ok"
    samples = run.scrape()
    refusals = total(samples, REJECTED)
    assert refusals == outcomes["refused"], "every refusal counted by reason"
    assert refusals == (total(samples, REJECTED, **{REASON: "malformed"})
                        + total(samples, REJECTED, **{REASON: "too_large"}))
    assert total(samples, DROPPED, **{REASON: "backpressure"}) == 0
    assert service.errors == 0, "whatever the decoder accepted, the derivation handled"
    # the generators do produce broken input of every kind, and mostly broken input
    assert set(refused_by_kind) == set(Fuzzer.KINDS)
    assert outcomes["refused"] > 0.6 * fuzzed
    # still serving: a fresh payload after the storm goes end to end
    p = payloads(make_spans(1))[0]
    assert run.post(p.body).status == 200
    run.wait_derived(p.roots)
    assert elapsed < 45, f"fuzzing {fuzzed} payloads took {elapsed:.1f}s"


_hyp_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    | st.binary(min_size=0, max_size=17).map(bytes.hex),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(OTLP_KEYS) | st.text(max_size=6), children, max_size=5),
    max_leaves=12)
_hyp_bodies = st.one_of(
    st.binary(max_size=1024).map(lambda b: (b, PROTOBUF)),
    _hyp_json.map(lambda d: (json.dumps(d).encode(), JSON)),
    _hyp_json.map(lambda d: (json.dumps(
        {"resourceSpans": [{"scopeSpans": [{"spans": [d]}]}]}).encode(), JSON)),
    st.tuples(st.integers(0, len(SEED_PROTO)), st.binary(min_size=1, max_size=12)).map(
        lambda t: (SEED_PROTO[:t[0]] + t[1] + SEED_PROTO[t[0] + len(t[1]):], PROTOBUF)),
    st.integers(0, len(SEED_PROTO) - 1).map(lambda n: (SEED_PROTO[:n], PROTOBUF)),
)


@settings(max_examples=400, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(body_ctype=_hyp_bodies, ctype=st.sampled_from(("natural",) * 6 + CTYPES),
       encoding=st.sampled_from((None, None, None, "gzip", "deflate", "identity", "br")),
       compress=st.booleans())
def test_hypothesis_payloads_are_accepted_or_refused_as_the_senders_fault(
        shared, body_ctype, ctype, encoding, compress):
    body, natural = body_ctype
    if compress and encoding == "gzip":
        body = gzip.compress(body)
    elif compress and encoding == "deflate":
        body = zlib.compress(body)
    try:
        shared.service.accept(body, natural if ctype == "natural" else ctype, encoding)
    except Refused as exc:
        assert not exc.retryable and exc.reason in ("malformed", "too_large")
        assert str(exc)
    assert shared.service.health()[0] == 200


# -- 6. backpressure ---------------------------------------------------------------------------


def test_full_ingest_queue_refuses_retryably_and_counts_exactly(start_collector):
    bound = 200
    run = start_collector(queue_spans=bound)
    service = run.service
    pool = payloads(make_spans(40), requests_each=2)
    size = pool[0].spans
    assert all(p.spans == size for p in pool) and size == 2 * SPANS_PER_REQUEST
    release, busy = block_worker(service)
    accepted: list[Payload] = []
    refused: list[Payload] = []
    try:
        assert run.post(pool[0].body).status == 200
        accepted.append(pool[0])
        assert busy.wait(10), "worker took the first batch"
        highest = service.queued_spans
        for i, p in enumerate(pool[1:]):
            if i % 2:
                reply = run.post(p.body)
                assert reply.status in (200, 503)
                ok = reply.status == 200
                if not ok:
                    assert reply.headers.get("retry-after") == "1"
                    assert b"ingest queue full" in reply.body
            else:
                code, details = grpc_code(run.ports["grpc"], p.body)
                assert code in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE), details
                ok = code == grpc.StatusCode.OK
            (accepted if ok else refused).append(p)
            highest = max(highest, service.queued_spans,
                          json.loads(run.admin("/healthz").body)["queued_spans"])
        with pytest.raises(Refused) as direct:
            service.accept(pool[-1].body, PROTOBUF)
        assert direct.value.retryable and direct.value.reason == "backpressure"
        refused_spans = sum(p.spans for p in refused) + pool[-1].spans

        # the queue filled to the bound and no further; everything past it was refused
        assert len(accepted) == bound // size and len(refused) == len(pool) - len(accepted)
        assert highest <= bound + size
        samples = run.scrape()
        assert total(samples, DROPPED, **{REASON: "backpressure"}) == refused_spans
        assert total(samples, REJECTED, **{REASON: "backpressure"}) == len(refused) + 1
        assert total(samples, QUEUED) == sum(p.spans for p in accepted)
        assert total(samples, RECEIVED) == sum(p.spans for p in accepted)
        assert run.records == []
    finally:
        release.set()

    run.wait_derived({r for p in accepted for r in p.roots})
    wait_until(lambda: service.queued_spans == 0, what="queue drained")
    assert not {r for p in refused for r in p.roots} & run.derived()
    # the senders retry, as told, and now get in
    for p in refused:
        deadline = time.monotonic() + 10
        while (status := run.post(p.body).status) == 503 and time.monotonic() < deadline:
            wait_until(lambda: service.queued_spans == 0)
        assert status == 200
    run.wait_derived({r for p in pool for r in p.roots})
    assert len(run.records) == 40


def test_sdk_grpc_exporter_retries_through_backpressure(start_collector):
    run = start_collector(queue_spans=50)
    service = run.service
    first, second = payloads(make_spans(4), requests_each=2)
    release, busy = block_worker(service)
    try:
        assert run.post(first.body).status == 200
        assert busy.wait(10)
        assert run.post(second.body).status == 200
        assert service.queued_spans == 44
        spans = make_spans(1)  # 11 more spans do not fit under 50
        exporter = GrpcSpanExporter(endpoint=f"127.0.0.1:{run.ports['grpc']}", insecure=True,
                                    timeout=20)
        result: list[SpanExportResult] = []
        sender = threading.Thread(target=lambda: result.append(exporter.export(spans)))
        sender.start()
        wait_until(lambda: total(run.scrape(), REJECTED, **{REASON: "backpressure"}) >= 1,
                   what="the exporter's first attempt refused")
        assert not result, "UNAVAILABLE is retried, not reported"
    finally:
        release.set()
    sender.join(25)
    exporter.shutdown()
    assert result == [SpanExportResult.SUCCESS]
    run.wait_derived(first.roots | second.roots | root_ids(spans))
    assert total(run.scrape(), DROPPED, **{REASON: "backpressure"}) >= len(spans)


# -- 7. graceful shutdown ----------------------------------------------------------------------


def test_stop_drains_accepted_payloads_and_refuses_new_ones_retryably(start_collector):
    run = start_collector(shutdown_grace_s=10)
    service = run.service
    pool = payloads(make_spans(10), requests_each=2)
    pending, late = pool[:3], pool[3:]
    release, busy = block_worker(service)
    stopper = threading.Thread(target=service.stop, kwargs={"grace_s": 10})
    try:
        assert run.post(pending[0].body).status == 200
        assert busy.wait(10)
        assert run.post(pending[1].body).status == 200
        grpc_export(run.ports["grpc"], pending[2].body)
        assert run.records == []
        stopper.start()
        wait_until(lambda: service.draining, what="draining")

        health = run.admin("/healthz")
        assert health.status == 503
        status = json.loads(health.body)
        assert status["status"] == "draining"
        assert status["queued_spans"] == sum(p.spans for p in pending)
        reply = run.post(late[0].body)
        assert reply.status == 503 and reply.headers.get("retry-after") == "1"
        assert b"shutting down" in reply.body
        with pytest.raises(Refused) as refused:
            service.accept(late[1].body, PROTOBUF)
        assert refused.value.retryable and refused.value.reason == "shutdown"
        code, _ = grpc_code(run.ports["grpc"], late[1].body)
        assert code == grpc.StatusCode.UNAVAILABLE
        assert stopper.is_alive(), "stop() waits for the accepted payloads"
    finally:
        released = time.monotonic()
        release.set()
    stopper.join(15)
    assert not stopper.is_alive()
    assert time.monotonic() - released < 5, "stop() returns once drained, not after the grace"
    assert run.derived() == {r for p in pending for r in p.roots}
    assert service.queued_spans == 0
    samples = run.registry()
    assert total(samples, REJECTED, **{REASON: "shutdown"}) >= 2
    assert total(samples, DERIVED) == 2 * len(pending)
    with pytest.raises(OSError):
        http_call(run.ports["admin"], "GET", "/healthz")


def test_payload_decoding_while_stop_begins_is_never_acknowledged_and_lost(start_collector,
                                                                          monkeypatch):
    run = start_collector()
    service = run.service
    p = payloads(make_spans(1))[0]
    decoding, resume = threading.Event(), threading.Event()
    decode = service_module.decode_traces

    def slow_decode(*args):
        decoding.set()
        resume.wait(10)
        return decode(*args)

    monkeypatch.setattr(service_module, "decode_traces", slow_decode)
    outcome: list = []

    def send() -> None:
        try:
            outcome.append(service.accept(p.body, PROTOBUF))
        except Refused as exc:
            outcome.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    assert decoding.wait(10), "the payload passed the early checks"
    service.stop(2.0)  # the worker is gone once this returns
    resume.set()
    sender.join(10)
    assert len(outcome) == 1
    if isinstance(outcome[0], Refused):
        assert outcome[0].retryable and outcome[0].reason == "shutdown"
        assert service.queued_spans == 0
    else:
        assert p.roots <= run.derived(), "accepted payload was derived"


# -- 8. configuration errors -------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("LLMTRACE_COLLECTOR_TOKEN", "LLMTRACE_FORWARD_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    # the CLI turns _created series off process-wide; put the setting back afterwards
    monkeypatch.setattr(prometheus_client.metrics, "_use_created",
                        prometheus_client.metrics._use_created)
    return monkeypatch


BAD_CONFIGS = {
    "unknown key": ("grpc_endpiont: 127.0.0.1:4317\n", ["grpc_endpiont", "Extra inputs"]),
    "wrong type": ("queue_spans: lots\n", ["queue_spans", "integer"]),
    "out of range": ("queue_spans: 0\nwindow_s: 30\n", ["queue_spans", "greater than"]),
    "wrong container": ("forward_headers: [a, b]\n", ["forward_headers"]),
    "not a mapping": ("- grpc_endpoint\n", ["top level must be a mapping"]),
    "not YAML": ("grpc_endpoint: [127.0.0.1\n", ["not valid YAML"]),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_file_names_file_and_key(tmp_path, clean_env, capsys, case):
    text, words = BAD_CONFIGS[case]
    path = tmp_path / "collector.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_collector_config(path)
    assert str(path) in str(err.value)
    for word in words:
        assert word in str(err.value)

    assert cli.main(["collector", "--config", str(path)]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("llmtrace collector: ") and str(path) in stderr
    for word in words:
        assert word in stderr


def test_unreadable_config_and_bad_flags(tmp_path, clean_env, capsys):
    missing = tmp_path / "missing.yaml"
    for path in (missing, tmp_path):
        with pytest.raises(ConfigError, match="cannot read") as err:
            load_collector_config(path)
        assert str(path) in str(err.value)
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.yaml"
        locked.write_text("queue_spans: 5\n")
        locked.chmod(0)
        with pytest.raises(ConfigError, match="cannot read"):
            load_collector_config(locked)

    assert cli.main(["collector", "--config", str(missing)]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert cli.main(["collector", "--queue-spans", "0"]) == 2
    err = capsys.readouterr().err
    assert "<flags>" in err and "queue_spans" in err
    assert cli.main(["collector", "--prices", str(missing), "--grpc-endpoint", LOOPBACK]) == 2
    assert str(missing) in capsys.readouterr().err


def test_config_precedence_file_then_environment_then_flags(tmp_path, clean_env):
    path = tmp_path / "collector.yaml"
    path.write_text("queue_spans: 10\nbearer_token: from-file\nwindow_s: 5\n")
    clean_env.setenv("LLMTRACE_COLLECTOR_TOKEN", "from-env")
    config = load_collector_config(path, queue_spans=20, window_s=None)
    assert (config.queue_spans, config.bearer_token, config.window_s) == (20, "from-env", 5.0)


def test_cli_reports_a_port_it_cannot_listen_on(clean_env, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = cli.main(["collector", "--grpc-endpoint", "", "--admin-endpoint", LOOPBACK,
                         "--http-endpoint", f"127.0.0.1:{port}"])
    assert code == 1
    assert "cannot listen" in capsys.readouterr().err


# -- 9. the console script, end to end ---------------------------------------------------------


def test_console_script_serves_and_stops_on_sigterm(tmp_path):
    script = Path(sys.executable).with_name("llmtrace")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "llmtrace.cli"]
    env = {k: v for k, v in os.environ.items()
           if k not in ("LLMTRACE_COLLECTOR_TOKEN", "LLMTRACE_FORWARD_ENDPOINT")}
    stderr = (tmp_path / "stderr.log").open("w")
    proc = subprocess.Popen(
        [*command, "collector", "--grpc-endpoint", LOOPBACK, "--http-endpoint", LOOPBACK,
         "--admin-endpoint", LOOPBACK, "--window-s", "30"],
        stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout],
                              daemon=True)
    reader.start()
    try:
        first = lines.get(timeout=30)
        assert first.startswith("llmtrace collector listening on "), first
        ports = ast.literal_eval(first.removeprefix("llmtrace collector listening on ").strip())
        assert set(ports) == {"grpc", "http", "admin"} and all(ports.values())

        by_http, by_grpc = payloads(make_spans(2))
        assert http_call(ports["http"], "POST", "/v1/traces", by_http.body,
                         {"Content-Type": PROTOBUF}).status == 200
        grpc_export(ports["grpc"], by_grpc.body)

        def derived() -> float:
            return total(parse_samples(http_call(ports["admin"], "GET", "/metrics")
                                       .body.decode()), DERIVED)
        wait_until(lambda: derived() == 2, what="2 requests derived by the subprocess")
        text = http_call(ports["admin"], "GET", "/metrics").body.decode()
        assert f"{TTFT}_count" in text and f"{ACCELERATOR}" in text
        assert f"{TTFT}_created" not in text, "the CLI drops _created series"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr.close()
    reader.join(10)
    rest = []
    while not lines.empty():
        rest.append(lines.get())
    output = "".join(rest)
    assert "llmtrace collector: draining" in output
    assert "llmtrace collector: stopped" in output and "'derived_requests': 2" in output
