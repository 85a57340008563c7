"""Decode time slices under priority scheduling, on a real vLLM server.

The dense model under ``--scheduling-policy priority`` with a 12-block KV cache
(1,536 tokens): three low-priority requests that each need about 700 tokens of KV
fill it, then two high-priority ones arrive. vLLM preempts the lowest-priority
running request when a step cannot get blocks, and re-queues it; it resumes (and
recomputes) when blocks free up. Each request's engine span must then show its
decode as slices separated by ``preempted`` waits, tiling from its first decode step
to its end, with its priority; its head-of-line blocking must cover the waits, and
the high-priority requests must have waited less.
"""

from __future__ import annotations

import secrets
import threading
import time

import httpx
import pytest
from conftest import dense_config, instrumented_env

from llmtrace import semconv as sc
from testbed.otlp_receiver import OTLPReceiver
from testbed.vllm_server import VLLMServer

pytestmark = pytest.mark.timeout(900)

SERVICE = "llmtrace-priority"
LOW, HIGH = 10, 0


@pytest.fixture(scope="module")
def server(server_pool, tiny_models, otlp_receiver: OTLPReceiver) -> VLLMServer:
    cfg = dense_config(tiny_models, "--scheduling-policy", "priority",
                       "--num-gpu-blocks-override", "12", "--max-num-batched-tokens", "256",
                       max_model_len=1024, env=instrumented_env(otlp_receiver, SERVICE))
    return server_pool.get(cfg)


def _request(server: VLLMServer, priority: int, prompt_words: int, max_tokens: int,
             out: dict[str, int]) -> None:
    trace_id = secrets.token_hex(16)
    resp = httpx.post(
        f"{server.base_url}/v1/completions",
        headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"},
        json={"model": server.config.served_name,
              # distinct from the first token: no prefix-cache sharing between them
              "prompt": f"{secrets.token_hex(3)} " + "slice " * prompt_words,
              "max_tokens": max_tokens, "min_tokens": max_tokens, "priority": priority},
        timeout=300)
    resp.raise_for_status()
    out[trace_id] = priority


@pytest.fixture(scope="module")
def engine_spans(server, otlp_receiver: OTLPReceiver) -> dict[str, object]:
    priorities: dict[str, int] = {}
    threads = [threading.Thread(target=_request, args=(server, LOW, 58, 400, priorities))
               for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.5)  # the low-priority ones are decoding
    high = [threading.Thread(target=_request, args=(server, HIGH, 58, 60, priorities))
            for _ in range(2)]
    for t in high:
        t.start()
    for t in threads + high:
        t.join()
    assert len(priorities) == 5

    def engine(r: OTLPReceiver):
        return {s.trace_id: s for s in r.spans()
                if s.name == sc.SPAN_LLMTRACE_ENGINE_REQUEST and s.trace_id in priorities}

    assert otlp_receiver.wait_for(lambda r: len(engine(r)) == 5, timeout=60)
    time.sleep(1)
    return {"spans": engine(otlp_receiver), "priorities": priorities}


def test_decode_is_slices_separated_by_waits_that_tile_it(
        engine_spans, otlp_receiver: OTLPReceiver) -> None:
    spans = otlp_receiver.spans()
    preempted_waits = 0
    for trace_id, eng in engine_spans["spans"].items():
        priority = engine_spans["priorities"][trace_id]
        assert eng.attributes[sc.LLMTRACE_REQUEST_PRIORITY] == priority
        kids = [s for s in spans if s.parent_span_id == eng.span_id]
        slices = sorted((s for s in kids if s.name == sc.SPAN_LLMTRACE_DECODE_SLICE),
                        key=lambda s: s.start_ns)
        waits = sorted((s for s in kids if s.name == sc.SPAN_LLMTRACE_DECODE_WAIT),
                       key=lambda s: s.start_ns)
        assert slices, trace_id
        assert len(slices) == len(waits) + 1
        assert [s.attributes[sc.LLMTRACE_DECODE_SLICE_INDEX] for s in slices] == \
            list(range(len(slices)))
        # slice, wait, slice, ...: each wait from its slice's end to the next one's start
        for i, wait in enumerate(waits):
            assert wait.start_ns == slices[i].end_ns
            assert wait.end_ns == slices[i + 1].start_ns
            assert wait.attributes[sc.LLMTRACE_REQUEST_PRIORITY] == priority
            preempted_waits += wait.attributes[sc.LLMTRACE_DECODE_WAIT_REASON] == "preempted"
        assert sum(s.attributes[sc.LLMTRACE_DECODE_SLICE_STEPS] for s in slices) >= 2
        assert eng.start_ns <= slices[0].start_ns and slices[-1].end_ns <= eng.end_ns
        # head-of-line blocking covers the time it sat out while others ran
        waited = sum(w.duration_s for w in waits)
        assert eng.attributes[sc.LLMTRACE_REQUEST_HOL_BLOCKING] >= 0.8 * waited
    assert preempted_waits >= 1  # the KV cache cannot hold the five requests


def test_high_priority_requests_wait_less_and_the_metric_counts_every_request(
        engine_spans, otlp_receiver: OTLPReceiver) -> None:
    hol = {p: [] for p in (LOW, HIGH)}
    for trace_id, eng in engine_spans["spans"].items():
        hol[engine_spans["priorities"][trace_id]].append(
            eng.attributes[sc.LLMTRACE_REQUEST_HOL_BLOCKING])
    assert max(hol[HIGH]) < max(hol[LOW]), hol

    def points(r: OTLPReceiver):
        return [p for p in r.points() if p.metric == sc.METRIC_LLMTRACE_REQUEST_HOL_BLOCKING
                and p.resource.get("service.name") == SERVICE]

    # cumulative histogram: its latest point counts every request the engine freed
    assert otlp_receiver.wait_for(lambda r: points(r) and points(r)[-1].count >= 5,
                                  timeout=30)
    last = points(otlp_receiver)[-1]
    assert last.sum >= sum(hol[LOW]) + sum(hol[HIGH]) - 1e-6


def test_a_chunked_generation_is_one_trace_of_numbered_chunks_with_their_gaps(
        server, otlp_receiver: OTLPReceiver) -> None:
    """A client splitting one generation the way llm-d's decode-chunk sidecar does:
    ``max_tokens`` capped per chunk, the answer so far sent back with
    ``continue_final_message``, the same ``traceparent`` on every chunk."""
    trace_id = secrets.token_hex(16)
    headers = {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
    messages = [{"role": "user", "content": "tell a long story " * 5}]
    answer = ""
    for chunk in range(3):
        body = {"model": server.config.served_name, "max_tokens": 8, "min_tokens": 8,
                "messages": messages + ([{"role": "assistant", "content": answer}]
                                        if chunk else [])}
        if chunk:
            body |= {"continue_final_message": True, "add_generation_prompt": False}
        resp = httpx.post(f"{server.base_url}/v1/chat/completions", headers=headers,
                          json=body, timeout=120)
        resp.raise_for_status()
        answer += resp.json()["choices"][0]["message"]["content"] or ""
        time.sleep(0.2 * (chunk + 1))  # the sidecar's turnaround: visible as the gap

    def requests(r: OTLPReceiver):
        return sorted((s for s in r.spans() if s.trace_id == trace_id
                       and s.name == sc.SPAN_LLMTRACE_REQUEST), key=lambda s: s.start_ns)

    assert otlp_receiver.wait_for(lambda r: len(requests(r)) == 3, timeout=30)
    first, *rest = requests(otlp_receiver)
    assert sc.LLMTRACE_REQUEST_CONTINUATION not in first.attributes
    assert sc.LLMTRACE_GENERATION_CHUNK_INDEX not in first.attributes
    previous = first
    for index, span in enumerate(rest, start=1):
        a = span.attributes
        assert a[sc.LLMTRACE_REQUEST_CONTINUATION] is True
        assert a[sc.LLMTRACE_GENERATION_CHUNK_INDEX] == index
        gap = (span.start_ns - previous.end_ns) / 1e9
        assert a[sc.LLMTRACE_GENERATION_GAP] == pytest.approx(gap, abs=1e-6)
        assert gap >= 0.2 * index  # at least the client's pause
        previous = span

    def gaps(r: OTLPReceiver):
        return [p for p in r.points() if p.metric == sc.METRIC_LLMTRACE_GENERATION_GAP
                and p.resource.get("service.name") == SERVICE]

    assert otlp_receiver.wait_for(lambda r: gaps(r) and gaps(r)[-1].count == 2, timeout=30)
    assert gaps(otlp_receiver)[-1].sum == pytest.approx(
        sum(s.attributes[sc.LLMTRACE_GENERATION_GAP] for s in rest), abs=1e-6)
