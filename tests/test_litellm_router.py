"""LiteLLM's Router (PyPI) balancing over two real vLLM deployments: the route decision
span, checked against which deployment actually served each request.

The application here is the test: it holds a request span, asks ``litellm.Router``
(least-busy strategy) for a completion and forwards its ``traceparent`` with
``extra_headers``. The deployments are the session's dense servers: one
instrumented with llmtrace, one with vLLM's own tracing, both exporting to the
receiver (through the collector), so the trace says which one served.
"""

from __future__ import annotations

import asyncio
import os

import pytest
from opentelemetry.propagate import inject
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llmtrace import semconv as sc
from testbed.models import DENSE
from testbed.otlp_receiver import OTLPReceiver

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network here
litellm = pytest.importorskip("litellm")

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]


@pytest.fixture
def instrumented_litellm():
    from llmtrace.instrumentation.litellm import LiteLLMRouterInstrumentor

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = LiteLLMRouterInstrumentor()
    instrumentor.instrument(tracer_provider=provider, metrics_enabled=False)
    try:
        yield provider, exporter, instrumentor
    finally:
        instrumentor.uninstrument()


def test_each_route_decision_names_the_candidates_their_load_and_the_deployment_that_served(
        instrumented_litellm, vllm_servers, instrumented_servers, otlp_receiver: OTLPReceiver):
    provider, exporter, instrumentor = instrumented_litellm
    urls = {"builtin": vllm_servers[DENSE].base_url, "ours": instrumented_servers["dense"].base_url}
    router = litellm.Router(model_list=[
        {"model_name": "tiny", "model_info": {"id": name},
         "litellm_params": {"model": f"openai/{DENSE}", "api_base": f"{url}/v1",
                            "api_key": "none"}} for name, url in urls.items()],
        routing_strategy="least-busy", num_retries=0)
    tracer = provider.get_tracer("app")

    async def one(i: int) -> str:
        with tracer.start_as_current_span(f"app request {i}") as span:
            headers: dict[str, str] = {}
            inject(headers)  # the application forwards its trace context
            await router.acompletion(model="tiny", max_tokens=16, extra_headers=headers,
                                     messages=[{"role": "user", "content": f"route {i}"}])
            return format(span.get_span_context().span_id, "016x")

    async def run() -> list[str]:  # concurrent: least-busy sees requests in flight
        return await asyncio.gather(*(one(i) for i in range(8)))

    app_spans = asyncio.run(run())
    instrumentor.telemetry.flush()
    routes = [s for s in exporter.get_finished_spans() if s.name == sc.SPAN_LLMTRACE_ROUTER_ROUTE]
    by_parent = {format(s.parent.span_id, "016x"): s for s in routes if s.parent}
    assert set(by_parent) == set(app_spans), "one decision span per request, under its span"

    def served(r: OTLPReceiver) -> dict[str, str]:
        """app span id -> the deployment whose engine span is its child."""
        out = {}
        for s in r.spans():
            if s.parent_span_id not in by_parent:
                continue
            if s.name == sc.SPAN_LLMTRACE_REQUEST:
                out[s.parent_span_id] = "ours"
            elif s.name == sc.SPAN_LLM_REQUEST and \
                    s.resource.get("service.name") == "vllm-builtin":
                out[s.parent_span_id] = "builtin"
        return out

    assert otlp_receiver.wait_for(lambda r: len(served(r)) == len(app_spans), timeout=60)
    truth = served(otlp_receiver)
    loads_seen = 0
    for parent, span in by_parent.items():
        a = span.attributes
        assert a[sc.LLMTRACE_ROUTER_STRATEGY] == "least-busy"
        assert a[sc.LLMTRACE_ROUTER_MODEL_GROUP] == "tiny"
        assert list(a[sc.LLMTRACE_ROUTER_CANDIDATE_IDS]) == list(urls)
        assert list(a[sc.LLMTRACE_ROUTER_CANDIDATE_ENDPOINTS]) == \
            [f"{u}/v1" for u in urls.values()]
        # the choice recorded is the deployment whose engine served the request
        assert a[sc.LLMTRACE_ROUTER_DEPLOYMENT] == truth[parent]
        assert a[sc.LLMTRACE_ROUTER_ENDPOINT] == f"{urls[truth[parent]]}/v1"
        # and it is the least busy of the candidates by the figures recorded
        scores = list(a[sc.LLMTRACE_ROUTER_CANDIDATE_SCORES])
        assert a[sc.LLMTRACE_ROUTER_SCORE_NAME] == "in_flight_requests"
        chosen = list(urls).index(truth[parent])
        assert scores[chosen] == min(scores), scores
        loads_seen += sum(scores) > 0
        assert span.end_time >= span.start_time
    assert loads_seen > 0, "concurrent requests: some decisions saw requests in flight"
