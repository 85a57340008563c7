"""Assemble spans by trace and derive a record when a request's root span arrives.

Bounded memory: at most ``max_traces`` traces are held, and spans whose root
has not arrived within ``window_s`` are evicted. Both losses are counted by
reason, never silent. One client trace may hold many requests (an agent making
several calls under one ``traceparent``), so decode chunks are matched to their
own root through the decode span, not by trace id alone.

Router (llm-d) spans of a trace wait with it and go to the first request root
that arrives after them; router spans arriving after the root are not joined
(they expire, counted). Engine-core usage spans carry their own labels and are
aggregated at once, never held.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable

from llmtrace import semconv as sc
from llmtrace.pipeline.derive import RequestRecord, UsageRecord, derive_request, derive_usage
from llmtrace.pipeline.router import routing_of
from llmtrace.pipeline.spans import ROOTS, USAGE, SpanView

_REQUEST_SIDE = frozenset({sc.SPAN_LLMTRACE_DECODE, sc.SPAN_LLMTRACE_DECODE_CHUNK})


class TraceAssembler:
    def __init__(self, on_record: Callable[[RequestRecord], None], *,
                 on_usage: Callable[[UsageRecord], None] | None = None,
                 window_s: float = 60.0, max_traces: int = 50_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.on_record = on_record
        self.on_usage = on_usage
        self.window_s = window_s
        self.max_traces = max_traces
        self.clock = clock
        #: trace id -> (first seen, spans waiting for their root); oldest first
        self._open: OrderedDict[bytes, tuple[float, list[SpanView]]] = OrderedDict()
        self.dropped: Counter[str] = Counter()
        self.derived = 0

    def __len__(self) -> int:
        return len(self._open)

    def add(self, spans: Iterable[SpanView]) -> None:
        now = self.clock()
        for span in spans:
            if span.name in ROOTS:
                self._derive(span)
                continue
            if span.name in USAGE:
                if self.on_usage is not None:
                    self.on_usage(derive_usage(span))
                continue
            entry = self._open.get(span.trace_id)
            if entry is None:
                if len(self._open) >= self.max_traces:
                    _, (_, lost) = self._open.popitem(last=False)
                    self.dropped["capacity"] += len(lost)
                entry = (now, [])
                self._open[span.trace_id] = entry
            entry[1].append(span)
        self.expire(now)

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
        record = derive_request(root, children)
        if router:
            record.routing = routing_of(router, trace_id=root.trace_id)
        self.derived += 1
        self.on_record(record)

    def expire(self, now: float | None = None) -> None:
        """Evict traces whose root never came within the window (counted)."""
        now = self.clock() if now is None else now
        while self._open:
            tid, (first_seen, spans) = next(iter(self._open.items()))
            if now - first_seen < self.window_s:
                break
            del self._open[tid]
            self.dropped["window"] += len(spans)
