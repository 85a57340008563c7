"""Assemble spans by trace and derive a record when a request's root span arrives.

Bounded memory: at most ``max_traces`` traces are held, and spans whose root
has not arrived within ``window_s`` are evicted. Both losses are counted by
reason, never silent. One client trace may hold many requests (an agent making
several calls under one ``traceparent``), so decode chunks are matched to their
own root through the decode span, not by trace id alone.

Router (llm-d) spans of a trace wait with it and go to the first request root
that arrives after them. The router exports on its own schedule, often after
the engine: with ``router_wait_s`` > 0 a root whose trace has no router spans
yet is held that long (bounded, never lost) and derived as soon as they come,
or without them at the deadline. Router spans that arrive later still are not
joined (they expire, counted). Engine-core usage and KV-transfer spans carry
their own labels and are aggregated at once, never held (nor taken for router
spans).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable

from llmtrace import semconv as sc
from llmtrace.pipeline.inputs import (
    ROOTS,
    TRANSFER,
    USAGE,
    request_record,
    transfer_record,
    usage_record,
)
from llmtrace.pipeline.inputs.llm_d import routing_of
from llmtrace.pipeline.view import SpanView
from llmtrace.record import RequestRecord, TransferRecord, UsageRecord
from llmtrace.record.validate import request_problem, transfer_problem, usage_problem

_REQUEST_SIDE = frozenset({sc.SPAN_LLMTRACE_DECODE, sc.SPAN_LLMTRACE_DECODE_CHUNK})
#: drop reasons of spans whose record is refused (out-of-range values) or raised
INVALID_RECORD = "invalid_record"
DERIVATION_FAILED = "derivation_failed"
log = logging.getLogger("llmtrace.collector")


class TraceAssembler:
    def __init__(self, on_record: Callable[[RequestRecord], None], *,
                 on_usage: Callable[[UsageRecord], None] | None = None,
                 on_transfer: Callable[[TransferRecord], None] | None = None,
                 window_s: float = 60.0, max_traces: int = 50_000,
                 router_wait_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.on_record = on_record
        self.on_usage = on_usage
        self.on_transfer = on_transfer
        self.window_s = window_s
        self.max_traces = max_traces
        self.clock = clock
        #: trace id -> (first seen, spans waiting for their root); oldest first
        self._open: OrderedDict[bytes, tuple[float, list[SpanView]]] = OrderedDict()
        self.dropped: Counter[str] = Counter()
        self.derived = 0
        self.router_wait_s = router_wait_s
        #: roots held for their router spans: trace id -> [(deadline, root)], oldest first
        self._held: OrderedDict[bytes, list[tuple[float, SpanView]]] = OrderedDict()
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self._open)

    def add(self, spans: Iterable[SpanView]) -> None:
        now = self.clock()
        routed: set[bytes] = set()
        for span in spans:
            if span.name in ROOTS:
                if self.router_wait_s > 0 and not self._has_router(span.trace_id):
                    self._hold(span, now)
                else:
                    self._derive(span)
                continue
            if span.name in USAGE:  # engine-side spans: aggregated at once, never held
                if self.on_usage is not None:
                    self._usage(span)
                continue
            if span.name in TRANSFER:
                if self.on_transfer is not None:
                    self._transfer(span)
                continue
            if span.name not in _REQUEST_SIDE:
                routed.add(span.trace_id)
            entry = self._open.get(span.trace_id)
            if entry is None:
                if len(self._open) >= self.max_traces:
                    _, (_, lost) = self._open.popitem(last=False)
                    self.dropped["capacity"] += len(lost)
                entry = (now, [])
                self._open[span.trace_id] = entry
            entry[1].append(span)
        for trace_id in routed & self._held.keys():  # the router pass came: derive now
            for _, root in self._held.pop(trace_id):
                self._derive(root)
        self.expire(now)

    def _has_router(self, trace_id: bytes) -> bool:
        entry = self._open.get(trace_id)
        return entry is not None and any(s.name not in _REQUEST_SIDE for s in entry[1])

    def _hold(self, root: SpanView, now: float) -> None:
        if sum(len(v) for v in self._held.values()) >= self.max_traces:
            _, oldest = self._held.popitem(last=False)  # full: derive without routing
            for _, r in oldest:
                self._derive(r)
        self._held.setdefault(root.trace_id, []).append((now + self.router_wait_s, root))

    def flush(self) -> None:
        """Derive every held root now (shutdown)."""
        while self._held:
            for _, root in self._held.popitem(last=False)[1]:
                self._derive(root)

    def _derive(self, root: SpanView) -> None:
        entry = self._open.get(root.trace_id)
        children: list[SpanView] = []
        router: list[SpanView] = []
        if entry is not None:
            waiting = entry[1]
            decode_ids = {s.span_id for s in waiting
                          if s.name == sc.SPAN_LLMTRACE_DECODE and s.parent_span_id == root.span_id}
            children = [s for s in waiting
                        if s.span_id in decode_ids or s.parent_span_id in decode_ids]
            router = [s for s in waiting if s.name not in _REQUEST_SIDE]
            if children or router:
                taken = {id(s) for s in children} | {id(s) for s in router}
                rest = [s for s in waiting if id(s) not in taken]
                if rest:
                    self._open[root.trace_id] = (entry[0], rest)
                else:
                    del self._open[root.trace_id]
        try:  # one bad request loses only itself, counted; its neighbours go on
            record = request_record(root, children)
            if router:
                record.routing = routing_of(router, trace_id=root.trace_id)
        except Exception as exc:  # noqa: BLE001 - input the derivation did not foresee
            self._refuse(DERIVATION_FAILED, root, f"{type(exc).__name__}: {exc}")
            return
        if problem := request_problem(record):
            self._refuse(INVALID_RECORD, root, problem)
            return
        self.derived += 1
        self.on_record(record)

    def _usage(self, span: SpanView) -> None:
        self._aggregate(span, usage_record, usage_problem, self.on_usage)

    def _transfer(self, span: SpanView) -> None:
        self._aggregate(span, transfer_record, transfer_problem, self.on_transfer)

    def _aggregate(self, span: SpanView, derive: Callable, problem_of: Callable,
                   sink: Callable) -> None:
        """A span that is a record on its own (engine usage, a KV transfer): derived,
        checked and handed on at once; one that fails is counted as a request would be."""
        try:
            record = derive(span)
        except Exception as exc:  # noqa: BLE001 - input the derivation did not foresee
            self._refuse(DERIVATION_FAILED, span, f"{type(exc).__name__}: {exc}")
            return
        if problem := problem_of(record):
            self._refuse(INVALID_RECORD, span, problem)
            return
        sink(record)

    def _refuse(self, reason: str, span: SpanView, problem: str) -> None:
        """Count a span whose record cannot be used; the first of each reason is logged."""
        self.dropped[reason] += 1
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning("%s span of trace %s not derived (%s): %s; counted as "
                        "llmtrace_pipeline_dropped_spans_total{reason=%r}, later ones too",
                        span.name, span.trace_id.hex(), reason, problem, reason)

    def expire(self, now: float | None = None) -> None:
        """Derive held roots past their deadline; evict traces whose root never came."""
        now = self.clock() if now is None else now
        while self._held:
            trace_id, roots = next(iter(self._held.items()))
            if roots[0][0] > now:
                break
            del self._held[trace_id]
            for _, root in roots:
                self._derive(root)
        while self._open:
            tid, (first_seen, spans) = next(iter(self._open.items()))
            if now - first_seen < self.window_s:
                break
            del self._open[tid]
            self.dropped["window"] += len(spans)
