"""Span export in a separate process: finished spans leave vLLM's process as tuples.

At 100% sampling most of llmtrace's CPU in vLLM's processes was the SDK's OTLP
export (protobuf encoding, about 60 us per span, plus gRPC), not the hooks.
With ``LLMTRACE_SPAN_EXPORT=process`` llmtrace's own tracer provider gets one
span processor, :class:`PipeSpanProcessor`, instead of its batch processors:
each finished span becomes a flat tuple of plain values (:func:`span_tuple`,
or :meth:`DirectSpan.wire` without building a ``ReadableSpan`` at all), a
sender thread writes batches of them (sized and timed by the ``OTEL_BSP_*``
settings), ``marshal``-encoded and length-framed, to the stdin of
``python -m llmtrace.telemetry.exporter_process``, which exports each batch
with the SDK's exporters and does the encoding and network work. Metrics stay
in-process: they are summed per batch already, and the API server's
``/metrics`` must see them.

Never blocking serving, never unbounded:
- ``on_end`` appends to a bounded deque (``OTEL_BSP_MAX_QUEUE_SIZE``); when it
  is full the span is dropped and counted (``reason="queue_full"``).
- Only the sender thread writes to the pipe; if the exporter process stalls,
  the pipe and then the deque fill, and spans are dropped, counted.
- The exporter process reports what it has settled and dropped (once a second
  when that changed, and on each flush); its drops are added to this process's
  ``llmtrace.telemetry.dropped``.
- If it dies, the spans it had not exported are counted
  (``reason="export_process_died"``) and it is restarted after a back-off, at
  most :data:`MAX_RESTARTS` times; then span export stays off in this process
  with one warning, and spans are counted (``reason="export_process_down"``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import marshal
import os
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections import Counter, deque
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor

logger = logging.getLogger("llmtrace")

#: restarts of a dead exporter process before span export stays off in this process
MAX_RESTARTS = 3
#: seconds before the first restart; doubled for each later one
RESTART_BACKOFF_S = 1.0
#: frame header: payload length, little-endian
HEADER = struct.Struct("<I")
#: this process's drop reasons for spans the exporter process lost or could not take
DIED = "export_process_died"
DOWN = "export_process_down"
QUEUE_FULL = "queue_full"

_MARSHAL_VERSION = 4


def encode(message: Any) -> bytes:
    """One frame: header + marshal payload (both ends run the same interpreter)."""
    payload = marshal.dumps(message, _MARSHAL_VERSION)
    return HEADER.pack(len(payload)) + payload


def span_tuple(span: ReadableSpan) -> tuple:
    """A finished SDK span as plain values (the exporter process rebuilds it)."""
    return wire(span.name, span.context, span.parent, span.kind, span.start_time,
                span.end_time, span.attributes, span.events, span.links, span.status)


def wire(name, context, parent, kind, start_ns, end_ns, attributes, events, links,
         status) -> tuple:
    """The pipe's span tuple, from a span's parts (an SDK span's or a ``DirectSpan``'s)."""
    state = context.trace_state
    return (
        name, context.trace_id, context.span_id, int(context.trace_flags),
        tuple(state.items()) if state else None,
        (parent.span_id, parent.is_remote) if parent is not None else None,
        kind.value, start_ns, end_ns, plain_attributes(attributes),
        tuple((e.name, e.timestamp, plain_attributes(e.attributes)) for e in events),
        tuple((link.context.trace_id, link.context.span_id, int(link.context.trace_flags),
               plain_attributes(link.attributes)) for link in links),
        status.status_code.value, status.description,
    )


def plain_attributes(attributes) -> dict | None:
    """Attributes as marshal-able plain values (sequences as tuples); None when empty."""
    if not attributes:
        return None
    return {k: (tuple(v) if isinstance(v, list | tuple) else v)
            for k, v in attributes.items()}


def exporter_environment(environ) -> dict[str, str]:
    """The exporter process's environment: the parent's, minus auto-instrumentation.

    Under ``opentelemetry-instrument`` the parent's PYTHONPATH holds the SDK's
    auto-instrumentation ``sitecustomize``, which would set up a second pipeline
    and load every instrumentor (vLLM's included) in the exporter process.
    """
    env = dict(environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
             if p and not p.rstrip("/").endswith(_AUTO_INSTRUMENTATION)]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    else:
        env.pop("PYTHONPATH", None)
    env["LLMTRACE_ENABLED"] = "0"  # nothing here is to be instrumented
    return env


_AUTO_INSTRUMENTATION = os.path.join("opentelemetry", "instrumentation", "auto_instrumentation")


class PipeSpanProcessor(SpanProcessor):
    """Ships finished spans to an exporter process; see the module docstring."""

    def __init__(self, handshake: dict[str, Any], dropped: Counter, max_queue: int,
                 batch: int = 512, interval_s: float = 5.0) -> None:
        self._handshake = handshake
        self._dropped = dropped
        self.max_queue = max_queue
        self._batch = batch  # spans per frame: one export in the exporter process
        self._interval = interval_s
        self._spans: deque[tuple] = deque()
        self._lock = threading.Lock()  # the child process and its counts
        self._send_lock = threading.Lock()  # one writer on the pipe, frames in order
        self._wake = threading.Event()
        self._acked = threading.Condition()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None
        self._closed = False
        self.down = False  # restarts used up: spans are counted, not sent
        self.restarts = 0
        self._next_start = 0.0
        # per exporter process: spans written to it, and its last report
        self._sent = 0
        self._report: dict[str, Any] = {}
        self._flush_seq = 0
        self._acked_seq = 0
        if hasattr(os, "register_at_fork"):
            ref = weakref.ref(self)

            def after_fork_in_child() -> None:
                if (me := ref()) is not None:
                    me._forget_after_fork()

            os.register_at_fork(after_in_child=after_fork_in_child)

    # -- serving side: the builder thread (or an SDK span's end) ------------------
    def on_end(self, span: ReadableSpan) -> None:
        if span.context is not None and span.context.trace_flags.sampled:
            self.put(span_tuple(span))

    def put(self, item: tuple) -> None:
        """Queue one span tuple; counted, never waited for, when full or down."""
        if self.down or self._closed:
            self._dropped[DOWN] += 1
            return
        spans = self._spans
        if len(spans) >= self.max_queue:
            self._dropped[QUEUE_FULL] += 1
            from llmtrace.telemetry import log_drop

            log_drop(QUEUE_FULL, f"the queue to the span export process is full "
                                 f"({self.max_queue} spans): it or its backend is slow")
            return
        spans.append(item)
        if self._thread is None:
            self._start_thread()
        elif len(spans) >= self._batch:
            self._wake.set()

    def _start_thread(self) -> None:
        with self._lock:
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="llmtrace-span-pipe",
                                          daemon=True)
                self._thread = thread
                thread.start()

    # -- the sender thread -------------------------------------------------------
    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self._interval)
            self._wake.clear()
            self._send_all()

    def _send_all(self) -> None:
        with self._send_lock:
            self._send_all_locked()

    def _send_all_locked(self) -> None:
        spans = self._spans
        while spans and not self.down:
            proc = self._ensure_process()
            if proc is None:  # waiting to restart: the queue bounds what waits
                return
            batch = []
            while spans and len(batch) < self._batch:
                batch.append(spans.popleft())
            if not self._write(proc, ("spans", batch)):
                # never read by the dead process: kept for the next one
                spans.extendleft(reversed(batch))
                return
            self._sent += len(batch)
        if self.down and spans:
            self._dropped[DOWN] += len(spans)
            spans.clear()

    def _write(self, proc: subprocess.Popen, message: Any) -> bool:
        try:
            proc.stdin.write(encode(message))
            proc.stdin.flush()
            return True
        except (OSError, ValueError):  # broken pipe, or closed by a concurrent death
            self._on_death(proc)
            return False

    def _ensure_process(self) -> subprocess.Popen | None:
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                return proc
            self._on_death(proc)
        if self.down or time.monotonic() < self._next_start:
            return None
        return self._spawn()

    def _spawn(self) -> subprocess.Popen | None:
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "llmtrace.telemetry.exporter_process"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True,
                env=exporter_environment(os.environ))
            proc.stdin.write(encode(self._handshake))
            proc.stdin.flush()
        except OSError as exc:
            logger.warning("llmtrace: cannot start the span export process (%s); spans "
                           "are dropped and counted (reason=%s)", exc, DOWN)
            self.down = True
            return None
        with self._lock:
            self._proc = proc
            self._sent = 0
            self._report = {}
        threading.Thread(target=self._read_reports, args=(proc,),
                         name="llmtrace-span-pipe-reports", daemon=True).start()
        return proc

    def _read_reports(self, proc: subprocess.Popen) -> None:
        """The exporter process's reports: cumulative counts, one JSON line each."""
        seen: Counter = Counter()
        for line in proc.stdout:
            try:
                report = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                if proc is self._proc:
                    self._report = report
                for reason, count in report.get("dropped", {}).items():
                    if count > seen[reason]:
                        self._dropped[reason] += count - seen[reason]
                        seen[reason] = count
            if "flushed" in report:
                with self._acked:
                    self._acked_seq = max(self._acked_seq, report["flushed"])
                    self._acked.notify_all()
        # EOF: the process ended (or closed its stdout): count and restart now, not at
        # the next batch, so spans are not written into a dying process's pipe
        self._on_death(proc)
        with self._acked:
            self._acked.notify_all()

    def _on_death(self, proc: subprocess.Popen) -> None:
        with self._lock:
            if proc is not self._proc:
                return  # already handled
            self._proc = None
            report, sent = self._report, self._sent
        if self._closed:
            return
        try:
            code = proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        lost = max(0, sent - report.get("settled", 0))
        self._dropped[DIED] += lost
        for stream in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError, ValueError):
                stream.close()
        if self.restarts >= MAX_RESTARTS:
            self.down = True
            logger.warning(
                "llmtrace: the span export process (pid %d) exited with %s, %d spans "
                "unexported; it was restarted %d times already, so span export stays off "
                "in this process. Spans are dropped and counted "
                "(llmtrace.telemetry.dropped{reason=%r}); serving is unaffected.",
                proc.pid, code, lost, self.restarts, DOWN)
            return
        delay = RESTART_BACKOFF_S * (2 ** self.restarts)
        self.restarts += 1
        self._next_start = time.monotonic() + delay
        logger.warning("llmtrace: the span export process (pid %d) exited with %s; %d "
                       "spans unexported (counted, reason=%r); restarting it in %.0f s "
                       "(restart %d of %d)", proc.pid, code, lost, DIED, delay,
                       self.restarts, MAX_RESTARTS)

    # -- flush and shutdown --------------------------------------------------------
    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Send what is queued and wait until the exporter process has exported it."""
        deadline = time.monotonic() + timeout_millis / 1000
        if self._thread is None:
            return True
        while True:
            seq = 0
            with self._send_lock:  # what is queued, then the flush marker, in pipe order
                self._send_all_locked()
                proc = self._proc
                if self.down:
                    return False
                if proc is not None and not self._spans:
                    self._flush_seq += 1
                    seq = self._flush_seq
                    if not self._write(proc, ("flush", seq)):
                        seq = 0
            if seq:
                with self._acked:
                    while self._acked_seq < seq and self._proc is proc and \
                            time.monotonic() < deadline:
                        self._acked.wait(min(0.05, max(0.0, deadline - time.monotonic())))
                    if self._acked_seq >= seq:
                        return True
            # a restart pending, or the process died before exporting: go round again
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def shutdown(self) -> None:
        if self._closed:
            return
        self.force_flush(10_000)
        self._closed = True
        self._wake.set()
        proc = self._proc
        if proc is not None:
            try:
                proc.stdin.close()  # EOF: the exporter process flushes and exits
                proc.wait(timeout=10)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                proc.kill()

    @property
    def pending(self) -> int:
        """Spans queued here, not yet written to the exporter process."""
        return len(self._spans)

    @property
    def sent(self) -> int:
        """Spans written to the current exporter process."""
        return self._sent

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None else None

    def _forget_after_fork(self) -> None:
        """A forked child: the exporter process and the threads belong to the parent."""
        proc = self._proc
        if proc is not None:
            for stream in (proc.stdin, proc.stdout):
                with contextlib.suppress(OSError, ValueError):
                    os.close(stream.fileno())
        self._proc = None
        self._thread = None
        self._spans.clear()
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._acked = threading.Condition()
        self._wake = threading.Event()
