"""A real OTLP receiver (gRPC and HTTP/protobuf) that keeps what it receives.

Tests point real OpenTelemetry exporters (in-process or inside a ``vllm serve``
process) at it and assert on what arrived on the wire, exactly as a collector
would see it. It is deliberately small: decode, flatten, store, and wait.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

from llmtrace.collector.otlp import OTLPError, decode
from testbed.ports import free_port


def any_value(value: AnyValue) -> Any:
    """Convert an OTLP AnyValue into the matching Python value."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    return getattr(value, kind)


def attributes(kvs: list[KeyValue]) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in kvs}


@dataclass(frozen=True)
class ReceivedEvent:
    name: str
    time_ns: int
    attributes: dict[str, Any]


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as it arrived, flattened with its resource and scope."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    events: tuple[ReceivedEvent, ...]
    status_code: int
    status_message: str
    resource: dict[str, Any]
    scope: str
    transport: str
    #: (trace id, span id) of each span link, hex
    links: tuple[tuple[str, str], ...] = ()

    @property
    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9

    @property
    def is_server(self) -> bool:
        return self.kind == PbSpan.SPAN_KIND_SERVER


@dataclass(frozen=True)
class ReceivedPoint:
    """One metric data point (number or histogram), flattened with its metric."""

    metric: str
    unit: str
    kind: str  # gauge | sum | histogram | exponential_histogram | summary
    attributes: dict[str, Any]
    value: float | None
    count: int | None
    sum: float | None
    bucket_counts: tuple[int, ...]
    explicit_bounds: tuple[float, ...]
    resource: dict[str, Any]
    scope: str
    time_ns: int


@dataclass
class _Store:
    lock: threading.Condition = field(default_factory=threading.Condition)
    spans: list[ReceivedSpan] = field(default_factory=list)
    points: list[ReceivedPoint] = field(default_factory=list)
    requests: dict[str, int] = field(default_factory=lambda: {"grpc": 0, "http": 0})
    rejected: list[str] = field(default_factory=list)

    def add_traces(self, req: trace_service_pb2.ExportTraceServiceRequest, transport: str) -> None:
        out = []
        for rs in req.resource_spans:
            resource = attributes(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    out.append(
                        ReceivedSpan(
                            name=s.name,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            kind=s.kind,
                            start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                            attributes=attributes(s.attributes),
                            events=tuple(
                                ReceivedEvent(e.name, e.time_unix_nano, attributes(e.attributes))
                                for e in s.events
                            ),
                            status_code=s.status.code,
                            status_message=s.status.message,
                            resource=resource,
                            scope=ss.scope.name,
                            transport=transport,
                            links=tuple((lk.trace_id.hex(), lk.span_id.hex())
                                        for lk in s.links),
                        )
                    )
        with self.lock:
            self.spans.extend(out)
            self.requests[transport] += 1
            self.lock.notify_all()

    def add_metrics(
        self, req: metrics_service_pb2.ExportMetricsServiceRequest, transport: str
    ) -> None:
        out = []
        for rm in req.resource_metrics:
            resource = attributes(rm.resource.attributes)
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    out.extend(_points(m, resource, sm.scope.name))
        with self.lock:
            self.points.extend(out)
            self.requests[transport] += 1
            self.lock.notify_all()


def _points(m, resource: dict[str, Any], scope: str) -> list[ReceivedPoint]:
    kind = m.WhichOneof("data")
    if kind is None:
        return []
    data = getattr(m, kind)
    points = []
    for dp in data.data_points:
        common = dict(
            metric=m.name, unit=m.unit, kind=kind, attributes=attributes(dp.attributes),
            resource=resource, scope=scope, time_ns=dp.time_unix_nano,
        )
        if kind in ("gauge", "sum"):
            value = dp.as_double if dp.WhichOneof("value") == "as_double" else dp.as_int
            points.append(ReceivedPoint(**common, value=value, count=None, sum=None,
                                        bucket_counts=(), explicit_bounds=()))
        elif kind == "histogram":
            points.append(ReceivedPoint(**common, value=None, count=dp.count, sum=dp.sum,
                                        bucket_counts=tuple(dp.bucket_counts),
                                        explicit_bounds=tuple(dp.explicit_bounds)))
        else:
            points.append(ReceivedPoint(**common, value=None, count=dp.count,
                                        sum=getattr(dp, "sum", None), bucket_counts=(),
                                        explicit_bounds=()))
    return points


class _TraceServicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, store: _Store) -> None:
        self._store = store

    def Export(self, request, context):  # noqa: N802 - gRPC method name
        self._store.add_traces(request, "grpc")
        return trace_service_pb2.ExportTraceServiceResponse()


class _MetricsServicer(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, store: _Store) -> None:
        self._store = store

    def Export(self, request, context):  # noqa: N802 - gRPC method name
        self._store.add_metrics(request, "grpc")
        return metrics_service_pb2.ExportMetricsServiceResponse()


_HTTP_ROUTES = {
    "/v1/traces": (trace_service_pb2.ExportTraceServiceRequest,
                   trace_service_pb2.ExportTraceServiceResponse, "add_traces"),
    "/v1/metrics": (metrics_service_pb2.ExportMetricsServiceRequest,
                    metrics_service_pb2.ExportMetricsServiceResponse, "add_metrics"),
}


def _make_handler(store: _Store) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        def _reply(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:  # noqa: N802 - http.server API
            route = _HTTP_ROUTES.get(self.path.split("?")[0])
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if route is None:
                self._reply(404, b"unknown OTLP path", "text/plain")
                return
            req_cls, resp_cls, add = route
            try:
                msg = decode(req_cls, raw, self.headers.get("Content-Type"),
                             self.headers.get("Content-Encoding"))
            except OTLPError as exc:
                store.rejected.append(f"{self.path}: {exc}")
                self._reply(400, f"malformed OTLP payload: {exc}".encode(), "text/plain")
                return
            getattr(store, add)(msg, "http")
            self._reply(200, resp_cls().SerializeToString(), "application/x-protobuf")

    return Handler


class OTLPReceiver:
    """OTLP/gRPC and OTLP/HTTP receiver on loopback; use as a context manager."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self._store = _Store()
        self._grpc: grpc.Server | None = None
        self._http: ThreadingHTTPServer | None = None
        self.grpc_port = 0
        self.http_port = 0

    @property
    def grpc_endpoint(self) -> str:
        return f"http://{self.host}:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def start(self) -> OTLPReceiver:
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(
            _TraceServicer(self._store), self._grpc)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(
            _MetricsServicer(self._store), self._grpc)
        self.grpc_port = self._grpc.add_insecure_port(f"{self.host}:{free_port()}")
        self._grpc.start()
        self._http = ThreadingHTTPServer((self.host, 0), _make_handler(self._store))
        self._http.daemon_threads = True
        self.http_port = self._http.server_address[1]
        threading.Thread(target=self._http.serve_forever, daemon=True,
                         name="otlp-http-receiver").start()
        return self

    def stop(self) -> None:
        if self._grpc is not None:
            self._grpc.stop(grace=1).wait()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()

    def __enter__(self) -> OTLPReceiver:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- reading what arrived -------------------------------------------------
    def spans(self) -> list[ReceivedSpan]:
        with self._store.lock:
            return list(self._store.spans)

    def points(self) -> list[ReceivedPoint]:
        with self._store.lock:
            return list(self._store.points)

    @property
    def rejected(self) -> list[str]:
        return list(self._store.rejected)

    @property
    def request_counts(self) -> dict[str, int]:
        with self._store.lock:
            return dict(self._store.requests)

    def clear(self) -> None:
        with self._store.lock:
            self._store.spans.clear()
            self._store.points.clear()

    def wait_for(self, predicate: Callable[[OTLPReceiver], bool], timeout: float = 30.0) -> bool:
        """Block until ``predicate(self)`` holds or ``timeout`` passes; return whether it held."""
        deadline = time.monotonic() + timeout
        with self._store.lock:
            while True:
                self._store.lock.release()
                try:
                    if predicate(self):
                        return True
                finally:
                    self._store.lock.acquire()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._store.lock.wait(min(remaining, 0.5))

    def traces(self) -> dict[str, list[ReceivedSpan]]:
        """Spans grouped by trace id."""
        out: dict[str, list[ReceivedSpan]] = {}
        for s in self.spans():
            out.setdefault(s.trace_id, []).append(s)
        return out
