"""An exporter outage costs bounded memory and counted drops, never a blocked caller."""

from __future__ import annotations

import socket
import threading

from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from llmtrace.config import load_config
from llmtrace.telemetry import DROPPED, Telemetry


def test_collector_outage_is_bounded_and_counted(monkeypatch):
    # A peer that accepts TCP connections but never speaks gRPC: exports hang until
    # their timeout, which is the worst case for a caller that would wait on them.
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(64)
    port = blackhole.getsockname()[1]
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "16")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "8")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "10")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    telemetry = Telemetry(load_config(endpoint=f"http://127.0.0.1:{port}", sample_ratio=1.0))
    before_full, before_failed = DROPPED["queue_full"], DROPPED["export_failed"]
    try:
        tracer = telemetry.tracer
        for i in range(500):
            tracer.start_span(f"span-{i}").end()
        processor = telemetry._tracer_provider._active_span_processor._span_processors[0]
        # the SDK's private queue: on the processor up to 1.30, on a helper since
        inner = getattr(processor, "_batch_processor", processor)
        queue = inner._queue if hasattr(inner, "_queue") else inner.queue
        assert queue.maxlen == 16 and len(queue) <= 16  # memory stays bounded
        assert DROPPED["queue_full"] - before_full >= 500 - 16 - 8 * 2
    finally:
        telemetry.shutdown()  # gives up on the hung export after its timeout
        blackhole.close()
    assert DROPPED["export_failed"] > before_failed


def test_queue_full_count_matches_the_spans_never_exported(monkeypatch):
    """The drop count (public calls only) equals what the SDK's queue really lost."""

    class Stuck(SpanExporter):
        def __init__(self) -> None:
            self.entered, self.release, self.received = threading.Event(), threading.Event(), 0

        def export(self, spans) -> SpanExportResult:
            self.received += len(spans)
            self.entered.set()
            self.release.wait(10)
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            pass

    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "10")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "5")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "60000")  # only a full batch wakes the worker
    exporter = Stuck()
    telemetry = Telemetry(load_config(sample_ratio=1.0), span_exporter=exporter)
    before = DROPPED["queue_full"]
    try:
        tracer = telemetry.tracer
        for i in range(5):
            tracer.start_span(f"first-{i}").end()
        assert exporter.entered.wait(10), "the first batch is being exported"
        for i in range(25):  # the queue holds 10 while the export hangs: 15 lost
            tracer.start_span(f"more-{i}").end()
        assert DROPPED["queue_full"] - before == 15
    finally:
        exporter.release.set()
        telemetry.shutdown()
    assert exporter.received == 30 - 15


def test_drops_are_logged_naming_the_endpoint_once_a_minute_not_per_span(monkeypatch, caplog):
    """http/protobuf to a port nobody listens on: the failure names the endpoint; a
    flood of drops logs once per reason, not once per span."""
    import logging
    import time

    from opentelemetry.context import Context

    import llmtrace.telemetry as telemetry_module

    with socket.socket() as s:  # a free port, closed again: nobody listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "1")
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "8")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "8")
    monkeypatch.setattr(telemetry_module, "_drop_logged", {})
    t = Telemetry(load_config(endpoint=f"http://127.0.0.1:{port}", protocol="http/protobuf",
                              sample_ratio=1.0, metrics_enabled=False))
    before = dict(DROPPED)
    with caplog.at_level(logging.WARNING, logger="llmtrace"):
        for _ in range(200):  # far more than the queue holds while exports fail
            trace_id, span_id, _, _ = t.new_root("req", Context(), time.time_ns())
            t.build_root("req", Context(), trace_id, span_id, time.time_ns(), {}).end()
        t.flush(5_000)
    lines = [r.getMessage() for r in caplog.records if "dropping spans" in r.getMessage()]
    failed = [m for m in lines if "(export_failed)" in m]
    full = [m for m in lines if "(queue_full)" in m]
    assert len(failed) == 1 and f"http://127.0.0.1:{port}/v1/traces" in failed[0]
    assert len(full) == 1 and "OTEL_BSP_MAX_QUEUE_SIZE" in full[0]
    assert DROPPED["queue_full"] - before.get("queue_full", 0) >= 1  # many: logged once
    assert DROPPED["export_failed"] > before.get("export_failed", 0)
    t.shutdown()
