"""The disaggregated TTFT breakdown: a trace's prefill request, KV load and decode request.

With prefill/decode disaggregation one client request is two requests on two
instances (the proxy calls the prefill instance, then the decode instance with
the ``kv_transfer_params`` the first answered) and a KV load between them; no
single process sees all three. The pipeline does, once their spans arrive: the
two request records (each instance's ``llmtrace.request``) and the decode
side's load (``llmtrace.kv_transfer``, direction ``load``) in one trace.

Matching, within one trace (which may hold other requests, an agent's say): the
decode request is the one whose time to first token contains the load's start;
the prefill request is the latest other request that ended before the decode
request began. Each part is read from its own span, so the parts tile the
total exactly only when the spans do (the test checks them against the spans):
remote prefill, handoff, KV transfer, local work (see
:class:`~llmtrace.record.DisaggregatedRecord`).

Bounded: at most ``max_traces`` traces wait, each at most ``window_s``; a trace
that never completes a pair (most traces: no disaggregation) just expires.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from llmtrace.record import DisaggregatedRecord, RequestRecord, TransferRecord

#: clock skew tolerated between the two instances' spans (same host: none expected)
SLACK_NS = 1_000_000


@dataclass
class _Waiting:
    first_seen: float
    requests: list[RequestRecord] = field(default_factory=list)
    loads: list[TransferRecord] = field(default_factory=list)


class DisaggregatedJoin:
    def __init__(self, on_record: Callable[[DisaggregatedRecord], None], *,
                 window_s: float = 60.0, max_traces: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.on_record = on_record
        self.window_s = window_s
        self.max_traces = max_traces
        self.clock = clock
        self._traces: OrderedDict[str, _Waiting] = OrderedDict()
        self.joined = 0

    def __len__(self) -> int:
        return len(self._traces)

    def _entry(self, trace_id: str) -> _Waiting:
        entry = self._traces.get(trace_id)
        if entry is None:
            if len(self._traces) >= self.max_traces:
                self._traces.popitem(last=False)
            entry = self._traces[trace_id] = _Waiting(self.clock())
        return entry

    def add_request(self, record: RequestRecord) -> None:
        if record.ttft_s is None or not record.trace_id:
            return
        self._entry(record.trace_id).requests.append(record)
        self._match(record.trace_id)

    def add_transfer(self, transfer: TransferRecord) -> None:
        if transfer.direction != "load" or transfer.error_type or not transfer.trace_id:
            return
        self._entry(transfer.trace_id).loads.append(transfer)
        self._match(transfer.trace_id)

    def _match(self, trace_id: str) -> None:
        entry = self._traces[trace_id]
        for load in list(entry.loads):
            decode = next((r for r in entry.requests
                           if r.start_ns - SLACK_NS <= load.start_ns
                           <= r.start_ns + r.ttft_s * 1e9 + SLACK_NS), None)
            if decode is None:
                continue
            prefill = max((r for r in entry.requests
                           if r is not decode and r.end_ns <= decode.start_ns + SLACK_NS),
                          key=lambda r: r.end_ns, default=None)
            if prefill is None:
                continue
            for used in (decode, prefill):
                entry.requests.remove(used)
            entry.loads.remove(load)
            first_token_ns = decode.start_ns + decode.ttft_s * 1e9
            self.joined += 1
            self.on_record(DisaggregatedRecord(
                trace_id=trace_id, model=decode.model, version=decode.version,
                connector=load.connector,
                ttft_s=(first_token_ns - prefill.start_ns) / 1e9,
                remote_prefill_s=(prefill.end_ns - prefill.start_ns) / 1e9,
                handoff_s=max(0, decode.start_ns - prefill.end_ns) / 1e9,
                kv_transfer_s=load.duration_s,
                local_s=max(0.0, decode.ttft_s - load.duration_s)))
        if not entry.requests and not entry.loads:
            del self._traces[trace_id]

    def expire(self, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        while self._traces:
            entry = next(iter(self._traces.values()))
            if now - entry.first_seen < self.window_s:
                break
            self._traces.popitem(last=False)
