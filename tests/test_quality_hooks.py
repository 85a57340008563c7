"""The API server's quality hooks in-process: the serving path's decisions, and the
builder's hand-off to a judge that cannot keep up (a real worker, a real socket that
accepts nothing). The real-server path is tests/test_quality_loop.py."""

from __future__ import annotations

import time
from types import SimpleNamespace

from llmtrace.config import Config
from llmtrace.instrumentation.vllm.frontend import RequestState
from llmtrace.instrumentation.vllm.http import HttpInfo
from llmtrace.instrumentation.vllm.quality import QualityHooks
from llmtrace.quality.judge import JUDGE_QUEUE_FULL, judge_sampled
from llmtrace.record import RequestRecord, Timeline
from llmtrace.telemetry import DROPPED
from testbed.ports import free_port


def _state(trace_id: int, prompt_ids=(1, 2, 3), logprobs=None, continuation=False,
           tenant="t") -> RequestState:
    http = HttpInfo(arrival_ns=0, operation="chat", parent=None, tenant=tenant,
                    continuation=continuation)
    rec = RequestState(f"r{trace_id}", trace_id, 1, True, None, "m", tenant, len(prompt_ids),
                       http, Timeline(read_ns=time.time_ns()), SimpleNamespace(logprobs=logprobs))
    rec.prompt_ids = list(prompt_ids)  # as begin() keeps vLLM's list
    return rec


def _record(rec: RequestState, error: str | None = None) -> RequestRecord:
    return RequestRecord(source="llmtrace", trace_id=f"{rec.trace_id:032x}",
                         request_id=rec.request_id, model="m", tenant=rec.tenant, version="v",
                         finish_reason="stop", error_type=error, start_ns=0, end_ns=1, e2e_s=1.0)


def test_entropy_sampling_asks_for_logprobs_only_where_the_client_did_not():
    hooks = QualityHooks(Config(entropy_sample_ratio=1.0, entropy_top_k=8), telemetry=None)
    hooks.start(SimpleNamespace(max_logprobs=5))  # vLLM's limit caps llmtrace's ask
    mine = _state(7)
    hooks.on_begin(mine, "a prompt")
    assert mine.params.logprobs == 5 and mine.entropy
    asked = _state(8, logprobs=3)
    hooks.on_begin(asked, "a prompt")
    assert asked.params.logprobs == 3 and asked.entropy  # the client's own ask stands
    zero = _state(9, logprobs=0)
    hooks.on_begin(zero, "a prompt")
    assert zero.params.logprobs == 0 and not zero.entropy  # the sampled token alone
    off = QualityHooks(Config(entropy_sample_ratio=0.0), telemetry=None)
    off.start(SimpleNamespace(max_logprobs=20))
    plain = _state(10)
    off.on_begin(plain, "a prompt")
    assert plain.params.logprobs is None and not plain.entropy
    assert not plain.judged  # no judge configured


def test_regenerations_need_the_same_tenant_and_prompt_and_skip_continuations():
    hooks = QualityHooks(Config(regeneration_window_s=60), telemetry=None)
    seen = []
    for rec in (_state(1), _state(2), _state(3, tenant="other"), _state(4, (1, 2, 4)),
                _state(5, continuation=True)):
        record = _record(rec)
        hooks.on_record(rec, record)
        seen.append(record.regeneration)
        assert rec.prompt_ids is None  # released once hashed
    assert seen == [False, True, False, False, False]


def test_a_judge_that_cannot_keep_up_costs_counted_drops_and_bounded_text():
    port = free_port()  # nothing listens: every call fails as unreachable
    config = Config(judge_endpoint=f"http://127.0.0.1:{port}/v1", judge_model="j",
                    judge_sample_ratio=1.0, judge_queue_size=1, judge_concurrency=1,
                    judge_max_rate=0.5)
    verdicts = []  # the builder would build each verdict's span and records
    builder = SimpleNamespace(submit=lambda job, verdict: verdicts.append(verdict))
    hooks = QualityHooks(config, telemetry=SimpleNamespace(builder=builder))
    hooks.start(SimpleNamespace(max_logprobs=20))
    assert hooks.judge is not None
    keep = hooks.judge.max_chars + 1
    sent = []
    hooks.judge.submit = (lambda submit: lambda j: (sent.append(j), submit(j))[1])(
        hooks.judge.submit)
    before = DROPPED[JUDGE_QUEUE_FULL]
    try:
        huge = "x" * 100_000
        for i in range(1, 9):
            rec = _state(i)
            hooks.on_begin(rec, huge)
            assert rec.judged == judge_sampled(i, 1.0) is True
            rec.completion = huge
            hooks.on_record(rec, _record(rec))
            assert rec.judge_prompt is None and rec.completion is None  # released
        failed = _state(99)
        hooks.on_begin(failed, "p")
        failed.completion = "c"
        hooks.on_record(failed, _record(failed, error="engine_error"))  # not judged
    finally:
        hooks.close()
    assert len(sent) == 8
    assert all(len(j.prompt) <= keep and len(j.completion) <= keep for j in sent)
    # a queue of one and one call per 2 s: most of the eight were dropped and counted,
    # which a hand-off that waited for the judge could not do
    dropped = DROPPED[JUDGE_QUEUE_FULL] - before
    assert dropped >= 5, dropped
    assert all(v.error == "unreachable" for v in verdicts), verdicts
