"""Span export in a separate process (``LLMTRACE_SPAN_EXPORT=process``).

A real exporter process, a real OTLP receiver: what arrives equals what the
in-process batch processor sends; the process stalling or dying never blocks
the emitting thread; what it lost is counted; it restarts, or stays down with
one warning. The vLLM half (a real ``vllm serve`` in this mode) is in
``test_vllm_instrumentation.py``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest
from opentelemetry.context import Context
from opentelemetry.trace import Status, StatusCode

from llmtrace.config import load_config
from llmtrace.telemetry import DROPPED, Telemetry, span_pipe
from testbed.otlp_receiver import OTLPReceiver


@pytest.fixture
def receiver() -> Iterator[OTLPReceiver]:
    with OTLPReceiver() as rx:
        yield rx


@pytest.fixture(autouse=True)
def quick_batches(monkeypatch) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "span-export-test")
    monkeypatch.setattr(span_pipe, "RESTART_BACKOFF_S", 0.05)


def telemetry(rx: OTLPReceiver, mode: str) -> Telemetry:
    return Telemetry(load_config(endpoint=rx.grpc_endpoint, span_export=mode,
                                 sample_ratio=1.0, metrics_enabled=False))


def emit(t: Telemetry, n: int, base_ns: int = 1_700_000_000_000_000_000,
         tag: str = "r") -> None:
    """``n`` requests of three spans each, as the builder makes them, at fixed times."""
    for i in range(n):
        start = base_ns + i * 1_000_000
        trace_id, span_id, sampled, _ = t.new_root("req", Context(), start)
        assert sampled
        root = t.build_root("req", Context(), trace_id, span_id, start,
                            {"i": i, "tag": tag, "buckets": [0, 1, 2], "ratio": 0.5})
        child = t.child_span("phase", root, start + 10, {"n": i, "tag": tag})
        t.child_span("chunk", child, start + 20, {"tokens": 8, "ok": True, "tag": tag}
                     ).end(start + 30)
        child.end(start + 40)
        root.add_event("first_token", timestamp=start + 15)
        if i % 2:
            root.set_status(Status(StatusCode.ERROR, "engine_error"))
        root.end(start + 50)


def shape(spans) -> list[tuple]:
    """Spans without their random ids: names, parent names, times, attributes, events."""
    names = {s.span_id: s.name for s in spans}
    resource = dict(spans[0].resource)
    resource.pop("service.instance.id", None)  # one per process
    return sorted((s.name, names.get(s.parent_span_id, ""), s.kind, s.start_ns, s.end_ns,
                   sorted(s.attributes.items(), key=str), s.events, s.status_code,
                   s.status_message, s.scope, sorted(resource.items()))
                  for s in spans)


def exporter_pid(t: Telemetry) -> int:
    pid = t._sink.pipe.pid
    assert pid is not None
    return pid


def test_the_exporter_process_sends_exactly_what_the_batch_processor_sends():
    received = {}
    for mode in ("thread", "process"):
        with OTLPReceiver() as rx:
            t = telemetry(rx, mode)
            emit(t, 40)
            t.flush()
            assert rx.wait_for(lambda r: len(r.spans()) >= 120, 30)
            t.shutdown()
            received[mode] = rx.spans()
    assert len(received["process"]) == len(received["thread"]) == 120
    assert shape(received["process"]) == shape(received["thread"])
    # the span ids the serving path handed out survive the trip
    roots = [s for s in received["process"] if s.name == "req"]
    children = [s for s in received["process"] if s.name == "phase"]
    assert {c.parent_span_id for c in children} == {r.span_id for r in roots}


def test_a_killed_exporter_process_is_counted_and_restarted(receiver, caplog):
    t = telemetry(receiver, "process")
    emit(t, 5)
    t.flush()
    first = exporter_pid(t)
    before = DROPPED[span_pipe.DIED]
    os.kill(first, signal.SIGSTOP)  # holds what it is sent: sent, never exported
    emit(t, 10, tag="lost")
    deadline = time.monotonic() + 10
    while t._sink.pipe.sent < 45 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert t._sink.pipe.sent == 45  # the 30 new spans are written to the stopped process
    with caplog.at_level(logging.WARNING, logger="llmtrace"):
        os.kill(first, signal.SIGKILL)
        while t._sink.pipe.restarts == 0 and time.monotonic() < deadline:
            time.sleep(0.02)  # noticed at once (its stdout closes), not at the next batch
        assert t._sink.pipe.restarts == 1
        done = threading.Event()
        worker = threading.Thread(target=lambda: (emit(t, 10, tag="after"), done.set()))
        worker.start()
        worker.join(10)
        assert done.is_set(), "emitting spans waited for the exporter process"
        assert t.flush(10_000)
    assert DROPPED[span_pipe.DIED] - before == 30
    assert exporter_pid(t) != first
    assert receiver.wait_for(
        lambda r: sum(s.attributes.get("tag") == "after" for s in r.spans()) == 30, 30)
    assert not [s for s in receiver.spans() if s.attributes.get("tag") == "lost"]
    deaths = [r for r in caplog.records if "span export process" in r.getMessage()]
    assert len(deaths) == 1 and "restarting it" in deaths[0].getMessage()
    t.shutdown()


def test_an_exporter_process_that_keeps_dying_stays_down_with_one_warning(
        receiver, caplog, monkeypatch):
    monkeypatch.setattr(span_pipe, "MAX_RESTARTS", 1)
    t = telemetry(receiver, "process")
    t.tracer  # noqa: B018 - the provider and its span pipe are built on first use
    pipe = t._sink.pipe
    with caplog.at_level(logging.WARNING, logger="llmtrace"):
        for dead in (lambda: pipe.restarts == 1, lambda: pipe.down):
            emit(t, 1)
            assert t.flush(10_000)
            os.kill(exporter_pid(t), signal.SIGKILL)
            deadline = time.monotonic() + 10
            while not dead() and time.monotonic() < deadline:
                emit(t, 1)  # the sender notices on its next batch
                time.sleep(0.1)
            assert dead()
        assert pipe.down
        down = DROPPED[span_pipe.DOWN]
        emit(t, 4)
        assert DROPPED[span_pipe.DOWN] - down == 12  # counted, not queued, not sent
        assert pipe.pid is None
    final = [r for r in caplog.records if "stays off" in r.getMessage()]
    assert len(final) == 1
    t.shutdown()


def test_a_stalled_exporter_process_drops_counted_and_never_blocks(receiver, monkeypatch):
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "60")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "30")
    t = telemetry(receiver, "process")
    emit(t, 2)
    t.flush()
    pid = exporter_pid(t)
    os.kill(pid, signal.SIGSTOP)
    full = DROPPED[span_pipe.QUEUE_FULL]
    try:
        done = threading.Event()
        # far more than the pipe buffer and the queue hold: the sender blocks in its
        # write, the queue fills, and the rest is dropped and counted
        worker = threading.Thread(target=lambda: (emit(t, 3000, tag="burst"), done.set()))
        worker.start()
        worker.join(60)
        assert done.is_set(), "emitting spans waited for a stalled exporter process"
        assert DROPPED[span_pipe.QUEUE_FULL] > full
        assert t._sink.pipe.pending <= 60
    finally:
        os.kill(pid, signal.SIGCONT)
    assert t.flush(30_000)
    burst = sum(s.attributes.get("tag") == "burst" for s in receiver.spans())
    # every span is either received or counted as dropped on the full queue
    assert burst + DROPPED[span_pipe.QUEUE_FULL] - full == 9000
    t.shutdown()
