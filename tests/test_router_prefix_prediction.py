"""A router's predicted prefix-cache hit against what the engine found, joined in the collector.

The router side is llm-d's endpoint picker as its spans look (names and attributes
of llm-d-router, llmtrace/pipeline/inputs/llm_d.py): no EPP runs here (it needs a
Kubernetes cluster and the Gateway API), so the test exports those spans itself
over OTLP, in the client's trace, with a prefix-cache scorer value it chooses.
The engine side is real: the instrumented dense ``vllm serve`` of the session,
whose prefix cache holds the prompt or not, and whose ``llmtrace.request`` span
reports the cached tokens it found. The collector joins the two by trace and
derives the prediction error; the expected values come from the engine's own
own count of prefix-cache hits (``vllm:prefix_cache_hits_total`` on its /metrics,
one request at a time).
"""

from __future__ import annotations

import secrets
import time

import httpx
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context
from prometheus_client.parser import text_string_to_metric_families

from llmtrace import semconv as sc
from llmtrace.collector import CollectorService
from testbed.models import DENSE

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(300)]


def _epp_spans(collector: CollectorService, trace_id: str, client_span: str,
               endpoint: str, prefix_score: float) -> None:
    """One llm-d router pass for the request: a decode profile run scoring with the
    prefix-cache scorer, and the pick, exported before the request is sent."""
    provider = TracerProvider(resource=Resource.create({"service.name": "llm-d-epp"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(
        endpoint=f"127.0.0.1:{collector.ports['grpc']}", insecure=True)))
    tracer = provider.get_tracer("llm-d-epp-shaped")
    client = NonRecordingSpan(SpanContext(int(trace_id, 16), int(client_span, 16), True,
                                          TraceFlags(TraceFlags.SAMPLED)))
    with tracer.start_as_current_span("gateway.request_orchestration",
                                      context=set_span_in_context(client)), \
            tracer.start_as_current_span(
                "run_scheduler_profile",
                attributes={sc.LLM_D_EPP_SCHEDULING_PROFILE_NAME: "decode"}):
        with tracer.start_as_current_span("llm_d.epp.scoring"):
            for kind, score in (("prefix-cache-scorer", prefix_score), ("queue-scorer", 1.0)):
                with tracer.start_as_current_span(
                        f"llm_d.epp.scorer.{kind}",
                        attributes={sc.LLM_D_EPP_SCORER_TYPE: kind,
                                    sc.LLM_D_EPP_SCORER_SCORE_MAX: score}):
                    pass
        with tracer.start_as_current_span("pick_endpoints", attributes={
                sc.LLM_D_EPP_PICKER_TOP_ENDPOINTS: [endpoint],
                sc.LLM_D_EPP_PICKER_TOP_SCORES: [prefix_score + 1.0]}):
            pass
    provider.shutdown()


def _scrape(collector: CollectorService) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{collector.ports['admin']}/metrics").text
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith("llmtrace_router_prefix_cache_") and \
                    s.labels.get(sc.GEN_AI_REQUEST_MODEL.replace(".", "_")) == DENSE:
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def test_the_routers_predicted_prefix_hit_is_scored_against_the_engines_cached_tokens(
        instrumented_servers, collector: CollectorService):
    server = instrumented_servers["dense"]
    prompt = f"{secrets.token_hex(6)} " + "the router predicts the prefix cache " * 40

    def hits() -> float:
        """vLLM's own count of prompt tokens found in its prefix cache."""
        text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
        return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                   if s.name == "vllm:prefix_cache_hits_total")

    def ask(trace_id: str, span_id: str) -> tuple[int, int]:
        """(prompt tokens, cached tokens) of one request, by vLLM's own accounts."""
        before = hits()
        resp = httpx.post(f"{server.base_url}/v1/chat/completions", timeout=120, json={
            "model": DENSE, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 4}, headers={"traceparent": f"00-{trace_id}-{span_id}-01"})
        assert resp.status_code == 200, resp.text
        deadline = time.monotonic() + 10  # vLLM's stats reach /metrics with the next log pass
        while (cached := hits() - before) == 0 and time.monotonic() < deadline and \
                trace_id == warm_trace[0]:
            time.sleep(0.5)
        return resp.json()["usage"]["prompt_tokens"], int(cached)

    before = _scrape(collector)
    # cold: the router expects a 0.9 hit where nothing is cached; warm: it expects 0.2
    # where the whole prefix (but the last partial block) is
    cases = []
    warm_trace = [""]
    for predicted in (0.9, 0.2):
        trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
        if predicted == 0.2:
            warm_trace[0] = trace_id
        _epp_spans(collector, trace_id, span_id, server.base_url, predicted)
        time.sleep(0.5)  # the router pass is in the collector before the engine's root
        prompt_tokens, cached = ask(trace_id, span_id)
        cases.append((trace_id, predicted, prompt_tokens, cached))
    assert cases[0][3] == 0 and cases[1][3] > 0, cases  # the engine's truth, as it answered

    def derived() -> dict:
        return {r.trace_id: r for r in collector.records
                if r.trace_id in {c[0] for c in cases}}

    deadline = time.monotonic() + 30
    while len(derived()) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    records = derived()
    assert len(records) == 2
    errors, predicted_tokens, actual_tokens = 0.0, 0.0, 0
    for trace_id, predicted, prompt_tokens, cached in cases:
        r = records[trace_id]
        assert r.routing[sc.LLMTRACE_ROUTER_PREFIX_CACHE_SCORE] == predicted
        assert r.routing[sc.LLMTRACE_ROUTER_ENDPOINT] == server.base_url
        assert (r.prompt_tokens, r.cached_tokens) == (prompt_tokens, cached)
        assert r.prefix_prediction_error == pytest.approx(abs(predicted - cached / prompt_tokens))
        errors += abs(predicted - cached / prompt_tokens)
        predicted_tokens += predicted * prompt_tokens
        actual_tokens += cached
    after = _scrape(collector)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("llmtrace_router_prefix_cache_prediction_error_count") == 2
    assert delta("llmtrace_router_prefix_cache_prediction_error_sum") == pytest.approx(errors)
    assert delta("llmtrace_router_prefix_cache_predicted_tokens_total") == \
        pytest.approx(predicted_tokens)
    assert delta("llmtrace_router_prefix_cache_actual_tokens_total") == actual_tokens
