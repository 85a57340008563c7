"""``vllm-router`` (PyPI) in front of two real replicas: what reaches the engines, and
whether the router's own count of where it sent requests agrees with the traces.

The replicas serve the same model: one instrumented with llmtrace, one with only
vLLM's built-in tracing. vllm-router 0.1.17 emits no spans by default (its CLI has
no tracing switch) and forwards the client's ``traceparent``, ``tracestate`` and
other headers unchanged in its default (non-PD) mode, so each replica's spans join
the client's trace as children of the client's span. docs/routers.md has the rest
(its PD mode, its metrics).
"""

from __future__ import annotations

import secrets
from collections import Counter

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmtrace import semconv as sc
from llmtrace.dashboards.common import (
    ROUTER_ERRORS,
    ROUTER_METRICS,
    ROUTER_PROCESSED,
    ROUTER_REQUESTS,
    ROUTER_RETRIES,
    ROUTER_WORKER_HEALTH,
)
from testbed.models import DENSE
from testbed.otlp_receiver import OTLPReceiver
from testbed.router import Router

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

TENANT = "routed-tenant"


@pytest.fixture
def router(vllm_router: Router) -> Router:
    return vllm_router


def processed(router: Router) -> Counter[str]:
    """vllm-router's own count of requests sent to each worker."""
    text = httpx.get(router.metrics_url, timeout=10).text
    out: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "vllm_router_processed_requests_total":
                out[s.labels["worker"]] += s.value
    return out


def test_round_robin_requests_join_the_clients_trace_on_whichever_replica_served_them(
        router: Router, vllm_servers, instrumented_servers, otlp_receiver: OTLPReceiver):
    builtin, ours = vllm_servers[DENSE].base_url, instrumented_servers["dense"].base_url
    before = processed(router)
    sent: dict[str, str] = {}  # trace id -> the client's span id
    for i in range(8):
        trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
        resp = httpx.post(f"{router.base_url}/v1/chat/completions", timeout=120, json={
            "model": DENSE, "messages": [{"role": "user", "content": f"routed {i}"}],
            "max_tokens": 8}, headers={"traceparent": f"00-{trace_id}-{span_id}-01",
                                       "x-tenant-id": TENANT})
        assert resp.status_code == 200, resp.text
        sent[trace_id] = span_id

    def served_by(r: OTLPReceiver) -> dict[str, str]:
        """trace id -> which replica's request span it has (llmtrace's or vLLM's own)."""
        out = {}
        for s in r.spans():
            if s.trace_id in sent and s.parent_span_id == sent[s.trace_id]:
                if s.name == sc.SPAN_LLMTRACE_REQUEST:
                    out[s.trace_id] = ours
                elif s.name == sc.SPAN_LLM_REQUEST and \
                        s.resource.get("service.name") == "vllm-builtin":
                    out[s.trace_id] = builtin
        return out

    assert otlp_receiver.wait_for(lambda r: len(served_by(r)) == len(sent), timeout=60), \
        f"{len(served_by(otlp_receiver))} of {len(sent)} traces joined"
    by_replica = Counter(served_by(otlp_receiver).values())
    assert by_replica == {builtin: 4, ours: 4}  # round robin over the two
    # the router's own count agrees with where the traces say requests ran
    after = processed(router)
    assert {w: after[w] - before[w] for w in (builtin, ours)} == by_replica
    # the tenant header reaches the engine unchanged (non-PD mode forwards it)
    tenants = {s.attributes.get(sc.LLMTRACE_TENANT) for s in otlp_receiver.spans()
               if s.trace_id in sent and s.name == sc.SPAN_LLMTRACE_REQUEST}
    assert tenants == {TENANT}


def test_the_router_metrics_the_dashboards_query_are_exposed(router: Router):
    text = httpx.get(router.metrics_url, timeout=10).text
    exposed = {s.name for family in text_string_to_metric_families(text)
               for s in family.samples}
    # errors and retries appear once the first one happens; their type lines do not
    declared = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    missing = [m for m in ROUTER_METRICS if m not in exposed
               and m.removesuffix("_total") not in declared and m not in declared]
    assert not missing or set(missing) <= {ROUTER_ERRORS, ROUTER_RETRIES}, (missing, exposed)
    assert {ROUTER_PROCESSED, ROUTER_REQUESTS, ROUTER_WORKER_HEALTH} <= exposed
