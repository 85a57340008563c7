"""A torch profile captured through vLLM's /start_profile joins the request's trace.

One instrumented dense server with vLLM's torch profiler configured
(``--profiler-config``; no Python stacks, so /stop_profile is quick) and every step
sampled. Between /start_profile and /stop_profile one traced request runs. The
worker's profile (vLLM writes it) must then hold llmtrace's tagged regions, whose
(trace id, span id) are exactly the ``llmtrace.region`` spans the worker's sampled
steps exported, and ``llmtrace profile convert`` must put the profile's events
under those spans, while the file's root span links to the step traces.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import dense_config, instrumented_env

from llmtrace import semconv as sc
from llmtrace.profiling import chrome
from llmtrace.profiling.tags import parse
from testbed.otlp_receiver import OTLPReceiver

pytestmark = pytest.mark.timeout(900)

SERVICE = "llmtrace-profiled"


@pytest.fixture(scope="module")
def profiled(server_pool, tiny_models, otlp_receiver: OTLPReceiver, scratch_dir: Path):
    out = scratch_dir / "torch-profiles"
    config = {"profiler": "torch", "torch_profiler_dir": str(out),
              "torch_profiler_with_stack": False, "ignore_frontend": True}
    server = server_pool.get(dense_config(
        tiny_models, "--profiler-config", json.dumps(config),
        env=instrumented_env(otlp_receiver, SERVICE, LLMTRACE_STEP_SAMPLE_EVERY="1")))
    trace_id = secrets.token_hex(16)
    httpx.post(f"{server.base_url}/start_profile", timeout=120).raise_for_status()
    resp = httpx.post(f"{server.base_url}/v1/completions",
                      headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"},
                      json={"model": server.config.served_name, "prompt": "profile me " * 20,
                            "max_tokens": 6}, timeout=120)
    resp.raise_for_status()
    httpx.post(f"{server.base_url}/stop_profile", timeout=600).raise_for_status()
    files = sorted(p for p in out.rglob("*.pt.trace.json*") if "rank" in p.name)
    assert files, list(out.rglob("*"))
    return files[-1], trace_id


def test_the_workers_profile_carries_the_ids_of_the_region_spans_llmtrace_exported(
        profiled, otlp_receiver: OTLPReceiver) -> None:
    path, _ = profiled
    profile = chrome.load(path)
    tags = {(t[1], t[2]): t[0] for t in map(parse, (e.name for e in profile.events))
            if t is not None}
    assert tags, "no tagged region in the worker's profile"

    def regions(r: OTLPReceiver) -> dict:
        return {(int(s.trace_id, 16), int(s.span_id, 16)): s for s in r.spans()
                if s.name == sc.SPAN_LLMTRACE_REGION
                and s.resource.get("service.name") == SERVICE}

    assert otlp_receiver.wait_for(lambda r: set(tags) <= set(regions(r)), timeout=60)
    exported = regions(otlp_receiver)
    for ids, name in tags.items():
        assert exported[ids].attributes[sc.LLMTRACE_REGION_NAME] == name
    # the tagged regions sit under sampled step spans of the worker's forward passes
    steps = {s.span_id: s for s in otlp_receiver.spans() if s.name == sc.SPAN_LLMTRACE_ENGINE_STEP}
    parents = {exported[ids].parent_span_id for ids in tags}
    assert any(p in steps for p in parents)
    assert any("forward" in name for name in tags.values())


def test_convert_puts_the_profiles_events_under_those_spans(
        profiled, otlp_receiver: OTLPReceiver) -> None:
    path, _ = profiled
    profile = chrome.load(path)
    tagged = {t[2]: t[1] for t in map(parse, (e.name for e in profile.events)) if t is not None}
    before = len(otlp_receiver.spans())
    done = subprocess.run([sys.executable, "-m", "llmtrace.cli", "profile", "convert", str(path),
                           "--endpoint", otlp_receiver.grpc_endpoint],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    def converted(r: OTLPReceiver) -> list:
        return [s for s in r.spans()[before:] if s.scope == "llmtrace.profiling"]

    assert otlp_receiver.wait_for(lambda r: converted(r), timeout=30)
    spans = converted(otlp_receiver)
    excerpts = [s for s in spans if s.name == sc.SPAN_LLMTRACE_PROFILE_EXCERPT]
    assert excerpts
    for s in excerpts:  # each under the region span its tag named, in that span's trace
        span_id = int(s.parent_span_id, 16)
        assert span_id in tagged and int(s.trace_id, 16) == tagged[span_id]
    root = next(s for s in spans if s.name == sc.SPAN_LLMTRACE_PROFILE)
    assert {int(t, 16) for t, _ in root.links} == set(tagged.values())
