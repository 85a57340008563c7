"""The span export process: ``python -m llmtrace.telemetry.exporter_process``.

Started by :class:`llmtrace.telemetry.span_pipe.PipeSpanProcessor` in a vLLM
process that emits spans (``LLMTRACE_SPAN_EXPORT=process``). It reads frames
from stdin: first the handshake (llmtrace's configuration, the resource and the
instrumentation scope), then batches of span tuples and flush markers. It
rebuilds each span as the SDK's ``ReadableSpan`` and hands each batch to the same
exporters llmtrace would use in-process (the parent batches as the SDK's batch
processor does), so what reaches the backend is identical. Once a second when
they changed, and after each flush, it writes one JSON line of cumulative counts
(received, settled, dropped by reason) to stdout for the parent's self-telemetry.

It exits when stdin closes (the parent ended, or shut llmtrace down), after
exporting what it holds. Ctrl-C in the server's terminal reaches the whole
process group: it is ignored here, so the parent's shutdown decides.
"""

from __future__ import annotations

import json
import marshal
import signal
import sys
import threading
import time
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from llmtrace.config import Config
from llmtrace.telemetry.span_pipe import HEADER

_KINDS = {k.value: k for k in SpanKind}
_CODES = {c.value: c for c in StatusCode}


def _read_exact(stream, n: int) -> bytes | None:
    data = stream.read(n)
    return data if data is not None and len(data) == n else None


def read_frames(stream):
    """Yield decoded frames until EOF (or a truncated frame: the writer died mid-frame)."""
    while True:
        header = _read_exact(stream, HEADER.size)
        if header is None:
            return
        (size,) = HEADER.unpack(header)
        payload = _read_exact(stream, size)
        if payload is None:
            return
        yield marshal.loads(payload)


def rebuild(item: tuple, resource: Resource, scope: InstrumentationScope) -> ReadableSpan:
    """A span tuple (see ``span_pipe.span_tuple``) back into the SDK's finished span."""
    (name, trace_id, span_id, flags, state, parent, kind, start, end, attributes, events,
     links, code, description) = item
    trace_state = TraceState(list(state)) if state else None
    context = SpanContext(trace_id, span_id, False, TraceFlags(flags), trace_state)
    parent_ctx = SpanContext(trace_id, parent[0], parent[1], TraceFlags(flags),
                             trace_state) if parent else None
    return ReadableSpan(
        name, context, parent_ctx, resource, attributes or {},
        tuple(Event(n, a, t) for n, t, a in events),
        tuple(Link(SpanContext(t, s, True, TraceFlags(f)), a) for t, s, f, a in links),
        _KINDS[kind], None, Status(_CODES[code], description), start, end, scope)


def _exit_on_sigterm(_signum, _frame) -> None:
    raise SystemExit(0)


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    stdin = sys.stdin.buffer
    frames = read_frames(stdin)
    handshake = next(frames, None)
    if not isinstance(handshake, dict):
        return 2
    # imported late: the package's telemetry module builds the exporters as in-process
    from llmtrace.telemetry import (
        DROPPED,
        FrozenResource,
        Telemetry,
        _CountingExporter,
        start_overhead_reporter,
    )

    config = Config.model_validate_json(handshake["config"])
    resource = FrozenResource(handshake["resource"], handshake.get("schema_url") or "")
    scope = InstrumentationScope(*handshake["scope"])
    exporters = [_CountingExporter(exp, config.measure_overhead)
                 for exp in Telemetry(config)._span_exporters()]
    counts = {"received": 0, "settled": 0}
    out = sys.stdout
    write_lock = threading.Lock()
    stop = threading.Event()

    def report(**extra: Any) -> None:
        line = {**counts, "dropped": dict(DROPPED), "cpu_s": time.process_time(), **extra}
        with write_lock:
            try:
                out.write(json.dumps(line) + "\n")
                out.flush()
            except (OSError, ValueError):
                pass

    def reporter() -> None:
        last = None
        while not stop.wait(1.0):
            now = (counts["received"], counts["settled"], sum(DROPPED.values()))
            if now != last:  # an idle exporter process writes nothing
                last = now
                report()

    threading.Thread(target=reporter, name="llmtrace-export-reports", daemon=True).start()
    if config.measure_overhead:
        start_overhead_reporter(role="exporter_process")
    try:
        for frame in frames:
            if frame[0] == "spans":
                # each frame is one export batch (the parent batches as the SDK's batch
                # processor would), exported here and now: a slow or failing backend
                # holds the pipe, and the parent's bounded queue counts what it drops
                items = frame[1]
                counts["received"] += len(items)
                spans = [rebuild(item, resource, scope) for item in items]
                for exporter in exporters:  # failures are counted as export_failed
                    exporter.export(spans)
                counts["settled"] += len(items)
            elif frame[0] == "flush":
                report(flushed=frame[1])
    finally:  # stdin closed, or SIGTERM: report and exit
        stop.set()
        for exporter in exporters:
            exporter.shutdown()
        report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
