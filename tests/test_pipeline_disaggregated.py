"""The pipeline's disaggregated TTFT join, on records whose timestamps are chosen so the
expected breakdown is known (the real-process check is tests/test_vllm_pd.py)."""

from __future__ import annotations

import pytest

from llmtrace.pipeline.disaggregated import DisaggregatedJoin
from llmtrace.record import RequestRecord, TransferRecord

MS = 1_000_000


def request(trace: str, start_ms: float, end_ms: float, ttft_ms: float) -> RequestRecord:
    return RequestRecord(source="llmtrace", trace_id=trace, request_id="", model="m",
                         tenant="t", version="v", finish_reason="stop", error_type=None,
                         start_ns=int(start_ms * MS), end_ns=int(end_ms * MS),
                         e2e_s=(end_ms - start_ms) / 1e3, ttft_s=ttft_ms / 1e3)


def load(trace: str, start_ms: float, end_ms: float, error: str | None = None) -> TransferRecord:
    return TransferRecord(trace_id=trace, model="m", version="v", connector="NixlConnector",
                          direction="load", duration_s=(end_ms - start_ms) / 1e3, blocks=4,
                          bytes=4 * 16384, error_type=error, start_ns=int(start_ms * MS),
                          end_ns=int(end_ms * MS))


@pytest.mark.parametrize("load_first", [False, True])
def test_the_parts_tile_the_ttft_whatever_order_the_spans_arrive_in(load_first: bool):
    out = []
    join = DisaggregatedJoin(out.append)
    # an unrelated earlier request in the same trace (an agent's first call)
    items = [request("t1", 0, 50, 10), request("t1", 100, 140, 38),  # prefill
             request("t1", 145, 400, 60), load("t1", 150, 180)]      # decode and its load
    if load_first:
        items.reverse()
    for item in items:
        (join.add_transfer if isinstance(item, TransferRecord) else join.add_request)(item)
    assert len(out) == 1
    r = out[0]
    assert r.remote_prefill_s == pytest.approx(0.040)
    assert r.handoff_s == pytest.approx(0.005)
    assert r.kv_transfer_s == pytest.approx(0.030)
    assert r.local_s == pytest.approx(0.030)
    assert r.ttft_s == pytest.approx(0.105)  # decode first token at 205 ms, prefill from 100
    assert r.remote_prefill_s + r.handoff_s + r.kv_transfer_s + r.local_s == \
        pytest.approx(r.ttft_s)
    assert len(join) == 1  # the unrelated request waits alone, then expires
    join.expire(now=join.clock() + 120)
    assert len(join) == 0


def test_failed_loads_and_traces_without_a_prefill_join_nothing():
    out = []
    join = DisaggregatedJoin(out.append, max_traces=2)
    join.add_transfer(load("a", 10, 20, error="load_failed"))
    join.add_request(request("a", 0, 100, 50))
    join.add_transfer(load("b", 10, 20))
    join.add_request(request("b", 0, 100, 50))  # a decode request with no prefill before it
    join.add_request(request("c", 0, 10, 5))  # a third trace evicts the oldest
    assert out == [] and len(join) == 2
