"""Profiling regions of a sampled step, and their join with a real torch profiler trace.

The recorder is driven the way the worker and engine-core hooks drive it (begin a
sampled step, let vLLM's scopes and ``llmtrace.region()`` run, end it); the
profile is a real torch.profiler capture on CPU, converted by ``llmtrace profile
convert``'s converter. No vLLM needed: the vLLM side is covered by
tests/test_vllm_steps.py.
"""

from __future__ import annotations

import secrets
import threading
from contextlib import nullcontext

import torch

import llmtrace
from llmtrace.instrumentation.vllm.steps import moe_layer_stats
from llmtrace.profiling import chrome
from llmtrace.profiling.convert import convert
from llmtrace.profiling.regions import RECORDER, VLLMScope
from llmtrace.profiling.tags import parse


def test_outside_a_sampled_step_scopes_cost_what_vllm_would_have_used():
    scope = VLLMScope(nullcontext)
    assert isinstance(scope("gpu_model_runner: forward"), nullcontext)
    with llmtrace.region("not recorded"):
        pass
    assert RECORDER.end() == ([], 0)


def test_a_sampled_step_records_nested_regions_with_their_sources_on_its_thread_only():
    trace_id = secrets.randbits(128)
    scope = VLLMScope(nullcontext)
    RECORDER.begin(trace_id)
    other: list = []
    with scope("gpu_model_runner: forward"), llmtrace.region("my_logits_processor"):
        t = threading.Thread(target=lambda: other.append(scope("elsewhere")))
        t.start()
        t.join()

    @llmtrace.region("decorated")
    def work() -> int:
        return 7

    assert work() == 7
    regions, dropped = RECORDER.end()
    assert dropped == 0
    by_name = {r[0]: r for r in regions}
    assert set(by_name) == {"gpu_model_runner: forward", "my_logits_processor", "decorated"}
    forward, user = by_name["gpu_model_runner: forward"], by_name["my_logits_processor"]
    assert forward[1] == "vllm" and user[1] == "user"
    assert user[5] == forward[4]  # nested: the user region's parent is the scope's span
    assert forward[2] <= user[2] <= user[3] <= forward[3]
    assert by_name["decorated"][5] == 0  # top level
    assert isinstance(other[0], nullcontext)  # another thread is not the sampled step


def test_under_a_profiler_regions_are_tagged_with_their_span_ids_and_convert_into_the_step(
        tmp_path):
    trace_id = secrets.randbits(128)
    scope = VLLMScope(nullcontext)
    model = torch.nn.Linear(64, 64)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        RECORDER.begin(trace_id)
        with scope("gpu_model_runner: forward"), llmtrace.region("user_block"):
            model(torch.randn(32, 64))
        regions, _ = RECORDER.end()
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    profile = chrome.load(path)
    tagged = {}
    for e in profile.events:
        t = parse(e.name)
        if t is not None:
            tagged[t[0]] = (t[1], t[2])
    span_ids = {r[0]: r[4] for r in regions}
    assert tagged == {name: (trace_id, span_ids[name]) for name in span_ids}
    out = convert(profile)
    excerpts = [s for s in out.spans if s.parent is not None
                and s.parent.span_id in set(span_ids.values())]
    assert {s.parent.span_id for s in excerpts} == set(span_ids.values())
    assert all(s.context.trace_id == trace_id for s in excerpts)
    assert out.traces == [trace_id]


def test_moe_layer_statistics():
    assert moe_layer_stats([4, 4, 4, 4]) == (16, 1.0, 0, 0.25)
    total, imbalance, hot, share = moe_layer_stats([1, 9, 9, 1])
    assert (total, imbalance, hot, share) == (20, 9 / 5, 1, 9 / 20)  # lowest id on a tie
    assert moe_layer_stats([0, 0]) == (0, 1.0, 0, 0.0)
