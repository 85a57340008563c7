"""Data-parallel serving (``--data-parallel-size 2``): the rank choice on each request's trace.

A real DP=2 ``vllm serve`` (two API servers, a DP coordinator, two engine cores)
under ``tests/helpers/serve_recording_dp_choices.py``, which logs every choice
vLLM's balancer makes, from inside, independently of llmtrace. The test checks
llmtrace's record of each choice against that log and against the engine core
that actually served the request (its own span's rank).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, dense_config, instrumented_env

from llmtrace import semconv as sc
from llmtrace.instrumentation.vllm.dp import BALANCED, REQUESTED, RankChoice
from testbed.models import DENSE
from testbed.otlp_receiver import OTLPReceiver, ReceivedSpan
from testbed.stream_client import run_load
from testbed.vllm_server import VLLMServer

SERVICE = "llmtrace-dp"


def test_load_imbalance_is_busiest_over_mean_and_only_for_balanced_choices():
    choice = RankChoice(0, 1, 1, BALANCED, (0, 1), waiting=(2, 0), running=(4, 2))
    assert choice.load_imbalance == pytest.approx(6 / 4)
    assert RankChoice(0, 1, 0, BALANCED, (0, 1), (0, 0), (0, 0)).load_imbalance == 1.0
    assert RankChoice(0, 1, 1, REQUESTED, (0, 1), (9, 0), (0, 0)).load_imbalance is None


@pytest.fixture(scope="module")
def dp_server(tiny_models, otlp_receiver: OTLPReceiver, collector, scratch_dir: Path
              ) -> Iterator[tuple[VLLMServer, Path]]:
    """Traces go through the session's collector (which forwards them to the receiver),
    so its derivation of the rank choice is checked against the same spans."""
    work = scratch_dir / "dp2"
    work.mkdir(parents=True, exist_ok=True)
    log = work / "choices.jsonl"
    config = dense_config(
        tiny_models, "--data-parallel-size", "2", max_model_len=512,
        launcher=(str(REPO / "tests" / "helpers" / "serve_recording_dp_choices.py"),),
        env=instrumented_env(otlp_receiver, SERVICE, LLMTRACE_TEST_DP_LOG=str(log),
                             traces_to=f"http://127.0.0.1:{collector.ports['grpc']}"))
    server = VLLMServer(config, work / "server").start()
    try:
        server.wait_ready(420)
        yield server, log
    finally:
        server.stop()


def _ours(receiver: OTLPReceiver) -> list[ReceivedSpan]:
    return [s for s in receiver.spans() if s.resource.get("service.name") == SERVICE]


@pytest.mark.vllm
@pytest.mark.timeout(900)
def test_every_request_records_the_rank_that_served_it_and_the_loads_it_was_chosen_from(
        dp_server, otlp_receiver: OTLPReceiver, collector):
    server, log = dp_server
    balanced = [{"prompt": f"balanced request {i}", "max_tokens": 12} for i in range(24)]
    requested = [{"prompt": f"pinned request {i}", "max_tokens": 12,
                  "headers": {"X-data-parallel-rank": "1"}} for i in range(3)]
    timings = run_load(server.base_url, DENSE, balanced + requested, 6)
    assert all(t.status == 200 and not t.error for t in timings)
    n = len(timings)

    def complete(r: OTLPReceiver) -> bool:
        spans = _ours(r)
        return sum(s.name == sc.SPAN_LLMTRACE_ROUTE_DP for s in spans) >= n and \
            sum(s.name == sc.SPAN_LLMTRACE_ENGINE_REQUEST for s in spans) >= n

    assert otlp_receiver.wait_for(complete, timeout=60)
    spans = _ours(otlp_receiver)
    by_trace: dict[str, dict[str, ReceivedSpan]] = {}
    for s in spans:
        by_trace.setdefault(s.trace_id, {})[s.name] = s
    logged = {c["request_id"]: c for c in map(json.loads, log.read_text().splitlines())}
    roots = {t[sc.SPAN_LLMTRACE_REQUEST].trace_id for t in by_trace.values()
             if sc.SPAN_LLMTRACE_REQUEST in t}
    deadline = time.monotonic() + 30
    while not roots <= {r.trace_id for r in list(collector.records)}:
        assert time.monotonic() < deadline, "the collector did not derive every request"
        time.sleep(0.2)

    reasons: Counter[str] = Counter()
    ranks: Counter[int] = Counter()
    for trace in by_trace.values():
        if sc.SPAN_LLMTRACE_REQUEST not in trace:
            continue
        root, route = trace[sc.SPAN_LLMTRACE_REQUEST], trace[sc.SPAN_LLMTRACE_ROUTE_DP]
        engine = trace[sc.SPAN_LLMTRACE_ENGINE_REQUEST]
        a = route.attributes
        rank, reason = a[sc.LLMTRACE_ENGINE_INDEX], a[sc.LLMTRACE_DP_REASON]
        # the rank recorded at the choice is the rank whose engine core served it
        assert engine.attributes[sc.LLMTRACE_ENGINE_INDEX] == rank
        assert root.attributes[sc.LLMTRACE_ENGINE_INDEX] == rank
        assert root.attributes[sc.LLMTRACE_DP_REASON] == reason
        assert route.parent_span_id == root.span_id
        assert root.start_ns <= route.start_ns <= route.end_ns <= root.end_ns
        # the loads recorded are the balancer's own inputs, as logged from inside
        seen = logged[root.attributes[sc.LLMTRACE_REQUEST_ID]]
        assert seen["rank"] == rank
        assert list(a[sc.LLMTRACE_DP_CANDIDATE_RANKS]) == [0, 1]
        assert list(a[sc.LLMTRACE_DP_CANDIDATE_WAITING]) == [c[0] for c in seen["counts"]]
        assert list(a[sc.LLMTRACE_DP_CANDIDATE_RUNNING]) == [c[1] for c in seen["counts"]]
        assert list(a[sc.LLMTRACE_DP_CANDIDATE_KV_CACHE_USAGE]) == pytest.approx(
            [c[2] for c in seen["counts"]])
        loads = [w + r for w, r in zip(a[sc.LLMTRACE_DP_CANDIDATE_WAITING],
                                       a[sc.LLMTRACE_DP_CANDIDATE_RUNNING], strict=True)]
        if reason == BALANCED:
            mean = sum(loads) / 2
            assert a[sc.LLMTRACE_DP_LOAD_IMBALANCE] == pytest.approx(
                max(loads) / mean if mean else 1.0)
        else:
            assert sc.LLMTRACE_DP_LOAD_IMBALANCE not in a
        reasons[reason] += 1
        ranks[rank] += 1
        # the collector derives the same choice from the request span
        derived = [r for r in list(collector.records) if r.trace_id == root.trace_id]
        assert len(derived) == 1, root.trace_id
        assert (derived[0].dp_rank, derived[0].dp_reason) == (rank, reason)
        assert derived[0].dp_load_imbalance == a.get(sc.LLMTRACE_DP_LOAD_IMBALANCE)
    assert reasons[REQUESTED] == 3 and reasons[BALANCED] >= 24, reasons
    assert ranks[0] > 0 and ranks[1] > 3, ranks  # the balancer used both ranks

    # metrics: requests per rank and reason, and the imbalance at each balanced choice
    def routed(r: OTLPReceiver) -> dict:
        latest: dict = {}
        for p in r.points():
            if p.metric == sc.METRIC_LLMTRACE_DP_ROUTED_REQUESTS and \
                    p.resource.get("service.name") == SERVICE:
                key = (p.resource.get("service.instance.id"),
                       p.attributes[sc.LLMTRACE_ENGINE_INDEX], p.attributes[sc.LLMTRACE_DP_REASON])
                latest[key] = p.value
        return latest

    assert otlp_receiver.wait_for(
        lambda r: sum(routed(r).values()) >= sum(ranks.values()), timeout=30)
    per_rank: Counter = Counter()
    for (_, rank, _), value in routed(otlp_receiver).items():
        per_rank[int(rank)] += value
    assert per_rank[0] >= ranks[0] and per_rank[1] >= ranks[1]
