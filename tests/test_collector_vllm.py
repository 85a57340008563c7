"""Real vLLM into the standalone collector over the wire.

Two sources: the instrumented dense server (llmtrace spans, sent to the
collector, which forwards them to the test receiver) and a plain dense server
with vLLM's own tracing (``--otlp-traces-endpoint``) pointed at the collector.
The collector's derived records must equal the span-level values, and its
Prometheus exposition must count every request.
"""

from __future__ import annotations

import secrets
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmtrace import semconv as sc
from llmtrace.collector import CollectorService
from testbed.models import DENSE
from testbed.otlp_receiver import OTLPReceiver
from testbed.stream_client import run_load

pytestmark = pytest.mark.vllm


def _traced(i: int, tenant: str) -> tuple[str, dict]:
    trace_id = secrets.token_hex(16)
    body = {"messages": [{"role": "user", "content": f"collector {i}: " + "word " * (3 * i)}],
            "max_tokens": 8 + 3 * i,
            "headers": {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01",
                        "x-tenant-id": tenant}}
    return trace_id, body


def _send_traced(server, tenant: str, n: int, concurrency: int) -> set[str]:
    """``n`` streamed chats with their own trace ids; returns the trace ids."""
    sent = [_traced(i, tenant) for i in range(n)]
    timings = run_load(server.base_url, DENSE, [b for _, b in sent], concurrency)
    assert all(t.ok for t in timings), [t.error for t in timings]
    return {tid for tid, _ in sent}


def _wait(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def _scrape(collector: CollectorService) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"http://127.0.0.1:{collector.ports['admin']}/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _sum(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in samples.items()
               if n == name and all(dict(lab).get(k) == x for k, x in labels.items()))


def test_collector_derives_llmtrace_spans_from_vllm(instrumented_servers, collector,
                                                    otlp_receiver: OTLPReceiver):
    server = instrumented_servers["dense"]
    tenant = "collector-tenant"
    ids = _send_traced(server, tenant, 6, 3)

    def derived() -> dict[str, object]:
        return {r.trace_id: r for r in list(collector.records) if r.trace_id in ids}

    assert _wait(lambda: len(derived()) == len(ids)), f"derived {len(derived())} of {len(ids)}"
    assert _wait(lambda: ids <= {u.trace_id for u in list(collector.usage)})
    records = derived()
    # forwarded downstream unchanged: the span-level values the records must equal

    def forwarded(rx: OTLPReceiver) -> bool:
        return ids <= {s.trace_id for s in rx.spans() if s.name == sc.SPAN_LLMTRACE_REQUEST}

    assert otlp_receiver.wait_for(forwarded, 30)
    roots = {s.trace_id: s for s in otlp_receiver.spans()
             if s.name == sc.SPAN_LLMTRACE_REQUEST and s.trace_id in ids}
    assert set(roots) == ids
    for tid, rec in records.items():
        a = roots[tid].attributes
        assert rec.source == "llmtrace" and rec.tenant == tenant and rec.model == DENSE
        assert rec.ttft_s == a[sc.LLMTRACE_LATENCY_TIME_TO_FIRST_TOKEN]
        assert rec.e2e_s == a[sc.LLMTRACE_LATENCY_E2E]
        assert rec.output_tokens == a[sc.GEN_AI_USAGE_OUTPUT_TOKENS]
        assert rec.prompt_tokens == a[sc.GEN_AI_USAGE_INPUT_TOKENS]
        assert rec.itl is not None and rec.itl.count == rec.output_tokens - 1
    usage = {u.trace_id: u for u in list(collector.usage) if u.trace_id in ids}
    assert all(u.tenant == tenant and u.accelerator_s > 0 for u in usage.values())

    samples = _scrape(collector)
    labels = {"gen_ai_request_model": DENSE, "llmtrace_tenant": tenant}
    ttft = sc.PROMETHEUS_NAMES[sc.METRIC_GEN_AI_SERVER_TIME_TO_FIRST_TOKEN]
    assert _sum(samples, f"{ttft}_count", **labels) == len(ids)
    assert _sum(samples, f"{ttft}_sum", **labels) == pytest.approx(
        sum(r.ttft_s for r in records.values()))
    itl = sc.PROMETHEUS_NAMES[sc.METRIC_LLMTRACE_SERVER_INTER_TOKEN_LATENCY]
    assert _sum(samples, f"{itl}_count", **labels) == sum(
        r.output_tokens - 1 for r in records.values())
    seconds = sc.PROMETHEUS_NAMES[sc.METRIC_LLMTRACE_COST_ACCELERATOR_SECONDS]
    assert _sum(samples, seconds, **labels, llmtrace_cost_basis="batch_share") == \
        pytest.approx(sum(u.accelerator_s for u in usage.values()))
    usd = sc.PROMETHEUS_NAMES[sc.METRIC_LLMTRACE_COST_USD]
    assert _sum(samples, usd, **labels, llmtrace_cost_basis="price_table") > 0  # priced model


def test_collector_derives_vllm_builtin_tracing(vllm_servers, collector,
                                                otlp_receiver: OTLPReceiver):
    """Users without the SDK: vLLM's own ``llm_request`` spans give the same records."""
    server = vllm_servers[DENSE]
    before = {r.request_id for r in list(collector.records) if r.source == "vllm_builtin"}
    bodies = [{"messages": [{"role": "user", "content": f"builtin {i}"}], "max_tokens": 6 + i}
              for i in range(4)]
    timings = run_load(server.base_url, DENSE, bodies, 2)
    assert all(t.ok for t in timings)

    def fresh() -> list:
        return [r for r in list(collector.records)
                if r.source == "vllm_builtin" and r.request_id not in before]

    assert _wait(lambda: len(fresh()) == len(bodies)), [r.request_id for r in fresh()]
    wanted = {r.request_id for r in fresh()}

    def forwarded(rx: OTLPReceiver) -> bool:
        return wanted <= {s.attributes.get(sc.GEN_AI_REQUEST_ID) for s in rx.spans()}

    assert otlp_receiver.wait_for(forwarded, 30)
    spans = {s.attributes.get(sc.GEN_AI_REQUEST_ID): s for s in otlp_receiver.spans()
             if s.name == sc.SPAN_LLM_REQUEST}
    for rec in fresh():
        a = spans[rec.request_id].attributes  # forwarded by the collector, as vLLM sent it
        # vLLM 0.32's span has no finish reason; the model comes from the resource
        assert rec.model == DENSE and rec.finish_reason == "unknown"
        assert rec.ttft_s == a[sc.GEN_AI_LATENCY_TIME_TO_FIRST_TOKEN]
        assert rec.e2e_s == a[sc.GEN_AI_LATENCY_E2E]
        assert rec.output_tokens == a[sc.GEN_AI_USAGE_COMPLETION_TOKENS]
        assert rec.queue_s == a[sc.GEN_AI_LATENCY_TIME_IN_QUEUE]
    assert sorted(r.output_tokens for r in fresh()) == sorted(t.completion_tokens
                                                             for t in timings)
    samples = _scrape(collector)
    requests = sc.PROMETHEUS_NAMES[sc.METRIC_LLMTRACE_SERVER_REQUESTS]
    # the series say which record (and so which TTFT definition) they carry
    assert _sum(samples, requests, gen_ai_request_model=DENSE, llmtrace_tenant="default",
                llmtrace_record_source="vllm_builtin") >= len(bodies)


def test_vllm_tracing_and_llmtrace_share_one_trace_counted_once(instrumented_servers, collector,
                                                               otlp_receiver: OTLPReceiver):
    """The instrumented server also runs vLLM's own tracing (``--otlp-traces-endpoint``):
    vLLM's ``llm_request`` span is a child of llmtrace's request span, in the same trace,
    and the collector derives one record per request, not two."""
    server = instrumented_servers["dense"]
    ids = _send_traced(server, "coexist", 3, 1)

    def both(rx: OTLPReceiver) -> bool:
        names = {(s.trace_id, s.name) for s in rx.spans() if s.trace_id in ids}
        return all((t, n) in names for t in ids
                   for n in (sc.SPAN_LLMTRACE_REQUEST, sc.SPAN_LLM_REQUEST))

    assert otlp_receiver.wait_for(both, 30)
    spans = [s for s in otlp_receiver.spans() if s.trace_id in ids]
    for tid in ids:
        [ours] = [s for s in spans if s.trace_id == tid and s.name == sc.SPAN_LLMTRACE_REQUEST]
        [vllms] = [s for s in spans if s.trace_id == tid and s.name == sc.SPAN_LLM_REQUEST]
        assert vllms.parent_span_id == ours.span_id
        # vLLM's span names the external id; ours the engine's, which extends it
        assert ours.attributes[sc.LLMTRACE_REQUEST_ID].startswith(
            vllms.attributes[sc.GEN_AI_REQUEST_ID])
    assert _wait(lambda: ids <= {r.trace_id for r in list(collector.records)})
    time.sleep(1.0)  # a duplicate, were it derived, would arrive in the same batches
    derived = [r for r in list(collector.records) if r.trace_id in ids]
    assert sorted(r.source for r in derived) == ["llmtrace"] * len(ids)
