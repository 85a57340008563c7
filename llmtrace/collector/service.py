"""``llmtrace collector``: OTLP in, derived Prometheus metrics out, spans forwarded.

Data path: the gRPC (4317) and HTTP (4318) receivers (:mod:`.receivers`) hand
each payload to :meth:`CollectorService.accept`, which decodes and checks it,
then puts it on a queue bounded in spans; one worker derives records through
the same :class:`~llmtrace.pipeline.TraceAssembler` as the in-process processor
and updates :class:`~llmtrace.pipeline.metrics.DerivedMetrics`. The original
bytes go, unchanged, to the :class:`~.forwarder.Forwarder` for the downstream
OTLP endpoint.

Bounded memory: both queues are bounded in spans, the assembler in traces
and time. When the ingest queue is full the sender gets a retryable answer
(gRPC ``UNAVAILABLE``, HTTP 503 with ``Retry-After``) and the refusal is
counted; when the forward queue is full or the downstream fails, the payload
is dropped for the downstream only, counted. A malformed payload gets a 4xx
naming the problem and nothing else is touched.

This module is the wiring and the lifecycle: it owns the ingest queue, the
derivation worker, start/stop and health; the transports (with the admin
endpoint, ``/metrics`` and ``/healthz``) and the forwarding leg live beside it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client import Counter, Gauge

from llmtrace import semconv as sc
from llmtrace.collector.asgi import HTTPServer, admin_app, ingest_app
from llmtrace.collector.config import CollectorConfig
from llmtrace.collector.forwarder import Forwarder
from llmtrace.collector.otlp import OTLPError, decode_traces
from llmtrace.collector.receivers import Refused, check_bearer, grpc_receiver
from llmtrace.pipeline.assembler import TraceAssembler
from llmtrace.pipeline.disaggregated import DisaggregatedJoin
from llmtrace.pipeline.metrics import DerivedMetrics
from llmtrace.pipeline.spans import spans_from_request
from llmtrace.pricing import PriceTable
from llmtrace.quality import drift
from llmtrace.record import DisaggregatedRecord, RequestRecord, TransferRecord, UsageRecord

__all__ = ["CollectorService", "Refused"]

log = logging.getLogger("llmtrace.collector")


@dataclass(slots=True)
class _Batch:
    request: ExportTraceServiceRequest
    spans: int


class CollectorService:
    """Owns the receivers, the derivation worker and the forwarder."""

    def __init__(self, config: CollectorConfig,
                 on_record=None, on_usage=None) -> None:
        self.config = config
        prices = PriceTable.load(config.prices) if config.prices else None
        self.metrics = DerivedMetrics(max_label_values=config.max_label_values,
                                      max_label_length=config.max_label_length, prices=prices,
                                      drift=drift.monitor_for(config))
        self._on_record, self._on_usage = on_record, on_usage
        #: called with each disaggregated request's TTFT breakdown (tests, embedding)
        self.on_disaggregated: Callable[[DisaggregatedRecord], None] | None = None
        self.assembler = TraceAssembler(self._record, on_usage=self._usage,
                                        on_transfer=self._transfer,
                                        window_s=config.window_s, max_traces=config.max_traces,
                                        router_wait_s=config.router_wait_s)
        self.disaggregated = DisaggregatedJoin(self._disaggregated, window_s=config.window_s,
                                               max_traces=config.max_traces)
        reg = self.metrics.registry

        def counter(metric: str, labels: tuple[str, ...] = ()) -> Counter:
            name = sc.PROMETHEUS_NAMES[metric].removesuffix("_total")
            return Counter(name, sc.METRIC_BRIEFS[metric], labels, registry=reg)

        reason = ("llmtrace_telemetry_reason",)
        self.received = counter(sc.METRIC_LLMTRACE_PIPELINE_RECEIVED_SPANS)
        self.dropped = counter(sc.METRIC_LLMTRACE_PIPELINE_DROPPED_SPANS, reason)
        self.rejected = counter(sc.METRIC_LLMTRACE_PIPELINE_REJECTED_PAYLOADS, reason)
        Gauge(sc.PROMETHEUS_NAMES[sc.METRIC_LLMTRACE_PIPELINE_OPEN_TRACES],
              sc.METRIC_BRIEFS[sc.METRIC_LLMTRACE_PIPELINE_OPEN_TRACES],
              registry=reg).set_function(lambda: len(self.assembler))
        Gauge(sc.PROMETHEUS_NAMES[sc.METRIC_LLMTRACE_PIPELINE_QUEUED_SPANS],
              sc.METRIC_BRIEFS[sc.METRIC_LLMTRACE_PIPELINE_QUEUED_SPANS],
              registry=reg).set_function(lambda: self.queued_spans)

        self._queue: queue.Queue[_Batch | None] = queue.Queue()
        self._lock = threading.Lock()  # guards queued_spans and draining
        self.queued_spans = 0
        self.forwarder = (Forwarder(config, self.dropped, lambda: self.draining)
                          if config.forward_endpoint else None)
        self._assembler_dropped: Tally[str] = Tally()
        self.errors = 0
        self.draining = False
        self._threads: list[threading.Thread] = []
        self._grpc: grpc.Server | None = None
        self._http: list[HTTPServer] = []
        self.ports: dict[str, int] = {}

    @property
    def forward_spans(self) -> int:
        """Spans waiting for the downstream."""
        return self.forwarder.queued_spans if self.forwarder is not None else 0

    # -- ingest ----------------------------------------------------------------
    def accept(self, body: bytes, content_type: str | None = None,
               encoding: str | None = None, auth: str | None = None) -> int:
        """Decode, check and enqueue one payload; returns its span count or raises Refused."""
        try:
            check_bearer(self.config.bearer_token, auth)
            if self.draining:
                raise Refused("shutdown", "collector is shutting down", retryable=True)
            if len(body) > self.config.max_payload_bytes:
                raise Refused("too_large", f"payload of {len(body)} bytes exceeds "
                              f"max_payload_bytes={self.config.max_payload_bytes}")
            try:
                request, n = decode_traces(body, content_type, encoding)
            except OTLPError as exc:
                raise Refused("malformed", str(exc)) from exc
            raw = None
            if self.forwarder is not None and n:
                raw = body if not encoding and (content_type or "").endswith(
                    "protobuf") else request.SerializeToString()
            # Checked again and enqueued under the lock that stop() sets ``draining``
            # under: an accepted batch is always ahead of the workers' stop sentinels.
            with self._lock:
                if self.draining:
                    raise Refused("shutdown", "collector is shutting down", retryable=True)
                if self.queued_spans + n > self.config.queue_spans and self.queued_spans:
                    self.dropped.labels("backpressure").inc(n)
                    raise Refused("backpressure", f"ingest queue full ({self.queued_spans} "
                                  "spans waiting); retry later", retryable=True)
                self.queued_spans += n
                self._queue.put(_Batch(request, n))
                if raw is not None:
                    self.forwarder.offer(raw, n)
        except Refused as exc:
            self.rejected.labels(exc.reason).inc()
            raise
        self.received.inc(n)
        return n

    # -- derivation worker -----------------------------------------------------
    def _record(self, record: RequestRecord) -> None:
        self.metrics.observe(record)
        if self._on_record is not None:
            self._on_record(record)
        self.disaggregated.add_request(record)

    def _transfer(self, transfer: TransferRecord) -> None:
        self.metrics.observe_transfer(transfer)
        self.disaggregated.add_transfer(transfer)

    def _disaggregated(self, record: DisaggregatedRecord) -> None:
        self.metrics.observe_disaggregated(record)
        if self.on_disaggregated is not None:
            self.on_disaggregated(record)

    def _usage(self, usage: UsageRecord) -> None:
        self.metrics.observe_usage(usage)
        if self._on_usage is not None:
            self._on_usage(usage)

    def _work(self) -> None:
        while True:
            try:
                batch = self._queue.get(timeout=1.0)
            except queue.Empty:
                self._tick()
                continue
            if batch is None:
                self.assembler.flush()  # roots held for router spans are derived, not lost
                self._tick()
                return
            try:
                self.assembler.add(spans_from_request(batch.request))
            except Exception:  # noqa: BLE001 - one bad batch must not stop the service
                self.errors += 1
                log.exception("derivation failed for a batch of %d spans", batch.spans)
            finally:
                with self._lock:
                    self.queued_spans -= batch.spans
            self._tick()

    def _tick(self) -> None:
        self.assembler.expire()
        self.disaggregated.expire()
        for reason, n in self.assembler.dropped.items():
            delta = n - self._assembler_dropped[reason]
            if delta:
                self.dropped.labels(reason).inc(delta)
                self._assembler_dropped[reason] = n

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> CollectorService:
        cfg = self.config
        self._spawn(self._work, "llmtrace-derive")
        if self.forwarder is not None:
            self._spawn(self.forwarder.run, "llmtrace-forward")
        if cfg.grpc_endpoint:
            self._grpc, self.ports["grpc"] = grpc_receiver(self, cfg.grpc_endpoint)
        if cfg.http_endpoint:
            self._serve_http("http", cfg.http_endpoint, ingest_app(self))
        if cfg.admin_endpoint:
            self._serve_http("admin", cfg.admin_endpoint, admin_app(self))
        log.info("llmtrace collector listening: %s", self.ports)
        return self

    def _spawn(self, target, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _serve_http(self, kind: str, endpoint: str, app) -> None:
        server = HTTPServer(app, endpoint, kind, backlog=self.config.listen_backlog,
                            max_connections=self.config.max_connections)
        self.ports[kind] = server.port
        self._http.append(server.start())

    def stop(self, grace_s: float | None = None) -> None:
        """Refuse new payloads (retryable), derive and forward what was accepted, then stop."""
        grace = self.config.shutdown_grace_s if grace_s is None else grace_s
        with self._lock:
            self.draining = True
        if self._grpc is not None:
            self._grpc.stop(grace).wait(grace + 1)
        deadline = time.monotonic() + grace
        self._queue.put(None)
        if self.forwarder is not None:
            self.forwarder.close()
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        # The HTTP receiver stays up while draining so senders get 503 + Retry-After
        # rather than a connection that hangs until the drain ends.
        for server in self._http:
            server.stop()

    def health(self) -> tuple[int, dict]:
        status = {"status": "draining" if self.draining else "ok",
                  "queued_spans": self.queued_spans, "queue_limit": self.config.queue_spans,
                  "open_traces": len(self.assembler), "forward_queued_spans": self.forward_spans,
                  "derived_requests": self.assembler.derived, "errors": self.errors}
        return (503 if self.draining else 200), status
