"""Inside the engine step, on real vLLM servers of the tiny Qwen3-MoE (8 experts, top-2).

Two instrumented servers, every step sampled (``LLMTRACE_STEP_SAMPLE_EVERY=1``):

- ``eager``: the model as generated, ``--enforce-eager``;
- ``compiled``: a copy whose routers prefer expert 5 in every layer, under
  torch.compile (vLLM's default compilation; on CPU Dynamo traces through the router,
  so the capture callback runs inside the compiled graph), with the opt-in
  per-expert counters capped at 10 series.

Checked per sampled step span: the MoE events' expert counts add up exactly to the
step's scheduled tokens x top_k in every MoE layer; the phases and profiling
regions are children of the step; the step links to its requests' spans and the
requests' engine spans link back. Then the skew: the biased expert is hot in every
layer and the imbalance metric rises past the unbiased server's, and the metric
series stay within the documented bound.
"""

from __future__ import annotations

import json
import random
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import httpx
import pytest
from conftest import instrumented_env, moe_config

from llmtrace import semconv as sc
from testbed.models import biased_moe
from testbed.otlp_receiver import OTLPReceiver, ReceivedSpan
from testbed.vllm_server import VLLMServer

pytestmark = pytest.mark.timeout(900)

HOT = 5  # the expert the biased model's routers prefer
TOP_K = 2
EXPERTS = 8
MOE_LAYERS = 2  # every layer of the tiny model is sparse
EAGER, COMPILED = "llmtrace-steps-eager", "llmtrace-steps-compiled"


@pytest.fixture(scope="module")
def servers(server_pool, tiny_models, otlp_receiver: OTLPReceiver,
            scratch_dir) -> dict[str, VLLMServer]:
    biased = biased_moe(tiny_models.moe, scratch_dir / "tiny-qwen3moe-hot5", HOT)
    eager = moe_config(tiny_models, env=instrumented_env(
        otlp_receiver, EAGER, LLMTRACE_STEP_SAMPLE_EVERY="1"))
    compiled = moe_config(tiny_models, enforce_eager=False, env=instrumented_env(
        otlp_receiver, COMPILED, LLMTRACE_STEP_SAMPLE_EVERY="1",
        LLMTRACE_MOE_EXPERT_METRICS="1", LLMTRACE_MOE_EXPERT_SERIES="10"))
    compiled = replace(compiled, model_dir=biased)
    started = server_pool.get_many([eager, compiled], timeout=600)
    return {EAGER: started[0], COMPILED: started[1]}


def _traceparent() -> tuple[str, str]:
    trace_id = secrets.token_hex(16)
    return trace_id, f"00-{trace_id}-{secrets.token_hex(8)}-01"


WORDS = ("river", "stone", "light", "market", "engine", "garden", "silver", "winter",
         "number", "music", "planet", "letter", "circle", "forest", "window", "bridge",
         "signal", "paper", "orange", "valley", "thunder", "pocket", "ladder", "mirror",
         "candle", "rocket", "summer", "castle", "shadow", "button", "island", "velvet",
         "harbor", "meadow", "copper", "lantern", "puzzle", "falcon")


def _prompt(i: int) -> str:
    """Varied words: a repeated word routes the same way every time, whatever the router."""
    rng = random.Random(i)
    return " ".join(rng.choice(WORDS) for _ in range(8 + 12 * i))


def _one(server: VLLMServer, i: int) -> str:
    trace_id, tp = _traceparent()
    resp = httpx.post(f"{server.base_url}/v1/chat/completions", headers={"traceparent": tp},
                      json={"model": server.config.served_name, "max_tokens": 6 + i % 5,
                            "messages": [{"role": "user", "content": _prompt(i)}]},
                      timeout=120)
    resp.raise_for_status()
    return trace_id


def _drive(server: VLLMServer, n: int = 8) -> list[str]:
    """``n`` concurrent requests of different lengths (batches of several tokens: a
    one-token step routes 2 assignments over 8 experts, imbalance 4 whatever the
    router); their trace ids."""
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda i: _one(server, i), range(n)))


def _steps(receiver: OTLPReceiver, service: str) -> list[ReceivedSpan]:
    return [s for s in receiver.spans() if s.name == sc.SPAN_LLMTRACE_ENGINE_STEP
            and s.resource.get("service.name") == service]


@pytest.fixture(scope="module")
def traffic(servers, otlp_receiver: OTLPReceiver) -> dict[str, list[str]]:
    out = {name: _drive(server) for name, server in servers.items()}
    engine_spans = {t for ids in out.values() for t in ids}

    def arrived(r: OTLPReceiver) -> bool:
        got = {s.trace_id for s in r.spans() if s.name == sc.SPAN_LLMTRACE_ENGINE_REQUEST}
        return engine_spans <= got and all(_steps(r, name) for name in out)

    assert otlp_receiver.wait_for(arrived, timeout=60)
    time.sleep(2)  # the last steps' spans trail the engine spans by one batch
    return out


def _events(step: ReceivedSpan) -> list:
    return [e for e in step.events if e.name == sc.EVENT_LLMTRACE_MOE_DISPATCH]


@pytest.mark.parametrize("service", [EAGER, COMPILED])
def test_expert_counts_add_up_to_scheduled_tokens_times_top_k_in_every_layer(
        traffic, otlp_receiver: OTLPReceiver, service: str) -> None:
    steps = _steps(otlp_receiver, service)
    assert len(steps) >= 10, len(steps)  # prefill and decode steps of three requests
    for step in steps:
        events = _events(step)
        assert sorted(e.attributes[sc.LLMTRACE_MOE_LAYER] for e in events) == \
            list(range(MOE_LAYERS)), step.attributes
        scheduled = step.attributes[sc.LLMTRACE_STEP_SCHEDULED_TOKENS]
        for e in events:
            counts = list(e.attributes[sc.LLMTRACE_MOE_EXPERT_TOKENS])
            assert len(counts) == EXPERTS
            assert sum(counts) == scheduled * TOP_K, (service, scheduled, counts)
            assert e.attributes[sc.LLMTRACE_MOE_TOKENS] == scheduled
            assert e.attributes[sc.LLMTRACE_MOE_TOP_K] == TOP_K
    # batch composition adds up; prefill and decode steps both seen
    kinds = set()
    for step in steps:
        a = step.attributes
        assert a[sc.LLMTRACE_STEP_PREFILL_TOKENS] + a[sc.LLMTRACE_STEP_DECODE_TOKENS] == \
            a[sc.LLMTRACE_STEP_SCHEDULED_TOKENS]
        kinds.add("prefill" if a[sc.LLMTRACE_STEP_PREFILL_TOKENS] else "decode")
    assert kinds == {"prefill", "decode"}


def test_the_biased_expert_is_hot_in_every_layer_and_the_imbalance_rises(
        traffic, otlp_receiver: OTLPReceiver) -> None:
    def layer_stats(service):
        return [e.attributes for step in _steps(otlp_receiver, service) for e in _events(step)]

    hot = layer_stats(COMPILED)
    assert hot and all(a[sc.LLMTRACE_MOE_HOT_EXPERT] == HOT for a in hot)
    # every token picks the hot expert once: half of the top-2 assignments
    assert all(a[sc.LLMTRACE_MOE_HOT_EXPERT_SHARE] == pytest.approx(0.5) for a in hot)
    assert all(a[sc.LLMTRACE_MOE_LOAD_IMBALANCE] == pytest.approx(EXPERTS / TOP_K)
               for a in hot)
    # the random router spreads a prefill's tokens: far from the biased model's 4.0
    plain = [e.attributes for step in _steps(otlp_receiver, EAGER) for e in _events(step)
             if step.attributes[sc.LLMTRACE_STEP_SCHEDULED_TOKENS] >= 32]
    assert plain
    plain_mean = sum(a[sc.LLMTRACE_MOE_LOAD_IMBALANCE] for a in plain) / len(plain)
    assert plain_mean < EXPERTS / TOP_K - 1, plain_mean

    # the metrics say the same: the histogram's mean and the per-layer gauge
    def points(service, metric):
        return [p for p in otlp_receiver.points()
                if p.metric == metric and p.resource.get("service.name") == service]

    assert otlp_receiver.wait_for(
        lambda r: points(COMPILED, sc.METRIC_LLMTRACE_MOE_LOAD_IMBALANCE)
        and points(EAGER, sc.METRIC_LLMTRACE_MOE_LOAD_IMBALANCE), timeout=30)
    means = {}
    for service in (EAGER, COMPILED):
        last = points(service, sc.METRIC_LLMTRACE_MOE_LOAD_IMBALANCE)[-1]
        means[service] = last.sum / last.count
    assert means[COMPILED] == pytest.approx(EXPERTS / TOP_K)
    assert means[EAGER] < means[COMPILED]
    gauges = points(COMPILED, sc.METRIC_LLMTRACE_MOE_LAYER_LOAD_IMBALANCE)
    assert {p.attributes[sc.LLMTRACE_MOE_LAYER] for p in gauges} == set(range(MOE_LAYERS))


def test_moe_metric_series_stay_within_the_documented_bound(
        traffic, otlp_receiver: OTLPReceiver) -> None:
    """Default: no expert label at all; the per-layer gauge has one series per MoE layer.
    Opt-in per-expert counters stop at LLMTRACE_MOE_EXPERT_SERIES (10 here, of 16)."""
    def series(service, metric):
        return {json.dumps(p.attributes, sort_keys=True) for p in otlp_receiver.points()
                if p.metric == metric and p.resource.get("service.name") == service}

    assert otlp_receiver.wait_for(
        lambda r: series(COMPILED, sc.METRIC_LLMTRACE_MOE_EXPERT_ASSIGNMENTS), timeout=30)
    for metric in (sc.METRIC_LLMTRACE_MOE_LOAD_IMBALANCE, sc.METRIC_LLMTRACE_MOE_HOT_EXPERT_SHARE,
                   sc.METRIC_LLMTRACE_MOE_DISPATCHED):
        assert len(series(EAGER, metric)) == 1, metric
    assert len(series(EAGER, sc.METRIC_LLMTRACE_MOE_LAYER_LOAD_IMBALANCE)) == MOE_LAYERS
    assert not series(EAGER, sc.METRIC_LLMTRACE_MOE_EXPERT_ASSIGNMENTS)
    assert len(series(COMPILED, sc.METRIC_LLMTRACE_MOE_EXPERT_ASSIGNMENTS)) == 10
    capped = [p for p in otlp_receiver.points() if p.metric == sc.METRIC_LLMTRACE_TELEMETRY_DROPPED
              and p.resource.get("service.name") == COMPILED
              and p.attributes.get(sc.LLMTRACE_TELEMETRY_REASON) == "moe_expert_series_cap"]
    assert capped and capped[-1].value > 0  # the other 6 pairs' updates, counted
    # every step's assignments are counted, sampled or not
    dispatched = [p for p in otlp_receiver.points()
                  if p.metric == sc.METRIC_LLMTRACE_MOE_DISPATCHED
                  and p.resource.get("service.name") == EAGER][-1].value
    steps = _steps(otlp_receiver, EAGER)
    assert dispatched >= sum(s.attributes[sc.LLMTRACE_STEP_SCHEDULED_TOKENS] for s in steps) \
        * TOP_K * MOE_LAYERS * 0.9


def test_step_spans_tile_their_phases_hold_regions_and_link_both_ways(
        traffic, otlp_receiver: OTLPReceiver) -> None:
    spans = otlp_receiver.spans()
    steps = _steps(otlp_receiver, EAGER)
    children: dict[str, list[ReceivedSpan]] = {}
    for s in spans:
        children.setdefault(s.parent_span_id, []).append(s)
    region_names = set()
    for step in steps:
        kids = children.get(step.span_id, [])
        phases = sorted((k for k in kids if k.name == sc.SPAN_LLMTRACE_STEP_PHASE),
                        key=lambda k: k.start_ns)
        names = [p.attributes[sc.LLMTRACE_STEP_PHASE] for p in phases]
        assert names[0] == "schedule" and names[-1] == "output" and "execute" in names, names
        for a, b in zip(phases, phases[1:], strict=False):
            assert a.end_ns <= b.start_ns + 1_000_000  # one after the other (two clocks)
        assert step.start_ns == phases[0].start_ns and step.end_ns == phases[-1].end_ns
        for k in kids:
            if k.name == sc.SPAN_LLMTRACE_REGION:
                region_names.add(k.attributes[sc.LLMTRACE_REGION_NAME])
                assert step.start_ns <= k.start_ns <= k.end_ns <= step.end_ns
    # vLLM's own profiling scopes in the worker's model runner
    assert any("forward" in n for n in region_names), region_names
    # links: each request's engine span to the steps it ran in, the steps back to it
    step_ids = {(s.trace_id, s.span_id) for s in steps}
    for trace_id in traffic[EAGER]:
        engine = next(s for s in spans if s.trace_id == trace_id
                      and s.name == sc.SPAN_LLMTRACE_ENGINE_REQUEST)
        request = next(s for s in spans if s.trace_id == trace_id
                       and s.name == sc.SPAN_LLMTRACE_REQUEST)
        linked = [link for link in engine.links if link in step_ids]
        assert len(linked) >= 2, engine.links  # its prefill and decode steps
        for link in linked:
            step = next(s for s in steps if (s.trace_id, s.span_id) == link)
            assert (trace_id, request.span_id) in step.links

