"""The LLM-as-judge worker against real HTTP servers: scores, each failure reason, no
blocking of the submitter, counted drops, the rate limit, and a real vLLM judge."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

from llmtrace.quality.judge import (
    DIMENSIONS,
    ERROR_REASONS,
    EXPLANATION_MAX_CHARS,
    RUBRIC,
    SCHEMA,
    JudgeWorker,
    Judgment,
    Verdict,
    judge_sampled,
)
from testbed.models import DENSE
from testbed.ports import free_port

GOOD_ANSWER = {"helpfulness": 5, "accuracy": 3, "coherence": 1, "safety": 4,
               "hallucination": True, "explanation": "fine"}


def completion_body(content: str) -> bytes:
    return json.dumps({"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "finish_reason": "stop",
         "message": {"role": "assistant", "content": content}}]}).encode()


class FakeJudge:
    """A real loopback HTTP server; ``respond(handler, request) -> (status, body)``."""

    def __init__(self, respond: Callable[[dict], tuple[int, bytes]]) -> None:
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server API
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                judge.requests.append({"path": self.path, **json.loads(raw)})
                judge.headers.append(dict(self.headers))
                judge.entered.set()
                status, body = respond(judge)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client gave up (timeout test)
                    pass

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, args=(0.05,),
                         daemon=True).start()

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def fake_judge(respond) -> Iterator[FakeJudge]:
    judge = FakeJudge(respond)
    try:
        yield judge
    finally:
        judge.stop()


def answering(content: str, status: int = 200):
    return lambda judge: (status, completion_body(content))


def blocking(judge: FakeJudge) -> tuple[int, bytes]:
    """Hold the request until the test releases it (a judge slower than any timeout)."""
    judge.release.wait(30)
    return 200, completion_body(json.dumps(GOOD_ANSWER))


def judgment(i: int = 0, prompt: str = "What is a KV cache?",
             completion: str = "A cache of attention keys and values.") -> Judgment:
    return Judgment(trace_id=random.getrandbits(128), span_id=random.getrandbits(64),
                    request_id=f"req-{i}", model=DENSE, tenant="acme", version="v1",
                    prompt=prompt, completion=completion, finish_reason="stop")


class Collected:
    def __init__(self) -> None:
        self.verdicts: list[Verdict] = []
        self._cond = threading.Condition()

    def __call__(self, verdict: Verdict) -> None:
        with self._cond:
            self.verdicts.append(verdict)
            self._cond.notify_all()

    def wait(self, n: int, timeout: float = 20.0) -> list[Verdict]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.verdicts) >= n, timeout), self.verdicts
            return list(self.verdicts)


def judge_one(endpoint: str, j: Judgment | None = None, **kw) -> tuple[Verdict, JudgeWorker]:
    got = Collected()
    worker = JudgeWorker(endpoint, "judge-model", on_verdict=got, **kw)
    try:
        assert worker.submit(j or judgment())
        return got.wait(1)[0], worker
    finally:
        worker.close(2.0)


def test_good_answer_maps_scores_to_unit_interval_and_composite():
    with fake_judge(answering(json.dumps(GOOD_ANSWER))) as judge:
        j = judgment(prompt="p" * 50, completion="c" * 50)
        verdict, worker = judge_one(judge.endpoint, j, api_key="k-1", max_chars=20)
    assert verdict.error is None and verdict.judgment is j
    assert verdict.scores == {"helpfulness": 1.0, "accuracy": 0.5, "coherence": 0.0,
                              "safety": 0.75}
    assert verdict.composite == pytest.approx(2.25 / 4)
    assert verdict.hallucination is True and verdict.explanation == "fine"
    assert 0 <= verdict.latency_s < 20 and verdict.start_ns <= verdict.end_ns
    assert worker.judged == 1 and sum(worker.failures.values()) == 0
    # what the judge was asked
    sent = judge.requests[0]
    assert sent["path"] == "/v1/chat/completions" and sent["model"] == "judge-model"
    assert sent["temperature"] == 0 and sent["max_tokens"] >= 200
    assert sent["messages"][0] == {"role": "system", "content": RUBRIC}
    user = sent["messages"][1]["content"]
    assert "p" * 20 in user and "p" * 21 not in user and "c" * 21 not in user
    assert sent["response_format"]["json_schema"]["schema"] == SCHEMA
    assert sent["response_format"]["json_schema"]["strict"] is True
    assert judge.headers[0]["Authorization"] == "Bearer k-1"


def test_custom_rubric_is_the_system_prompt():
    with fake_judge(answering(json.dumps(GOOD_ANSWER))) as judge:
        judge_one(judge.endpoint, rubric="Score it.")
    assert judge.requests[0]["messages"][0]["content"] == "Score it."


def test_schema_requires_every_key_and_forbids_others():
    assert set(SCHEMA["required"]) == {*DIMENSIONS, "hallucination", "explanation"}
    assert SCHEMA["additionalProperties"] is False
    assert SCHEMA["properties"]["explanation"]["maxLength"] == EXPLANATION_MAX_CHARS
    for d in DIMENSIONS:
        assert SCHEMA["properties"][d]["enum"] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("content", [
    "not json at all",
    json.dumps({**GOOD_ANSWER, "accuracy": 7}),          # out of range
    json.dumps({**GOOD_ANSWER, "accuracy": 4.5}),        # not an integer
    json.dumps({**GOOD_ANSWER, "safety": True}),         # a boolean is not a score
    json.dumps({**GOOD_ANSWER, "extra": 1}),             # additionalProperties
    json.dumps({k: v for k, v in GOOD_ANSWER.items() if k != "coherence"}),
    json.dumps([GOOD_ANSWER]),
])
def test_malformed_content_is_a_parse_error(content):
    with fake_judge(answering(content)) as judge:
        verdict, worker = judge_one(judge.endpoint)
    assert verdict.error == "parse_error" and verdict.scores == {}
    assert verdict.composite is None and verdict.hallucination is None
    assert worker.failures["parse_error"] == 1 and worker.judged == 0


def test_garbage_body_is_a_parse_error():
    with fake_judge(lambda judge: (200, b"\x00<html>oops")) as judge:
        verdict, _ = judge_one(judge.endpoint)
    assert verdict.error == "parse_error"


def test_overlong_explanation_is_cut_not_failed():
    answer = {**GOOD_ANSWER, "explanation": "x" * 1000}
    with fake_judge(answering(json.dumps(answer))) as judge:
        verdict, _ = judge_one(judge.endpoint)
    assert verdict.error is None and verdict.explanation == "x" * EXPLANATION_MAX_CHARS


def test_control_characters_in_the_explanation_are_blanked_not_failed():
    # xgrammar's string grammar allows raw control characters; strict JSON does not
    content = ('{"helpfulness":5,"accuracy":3,"coherence":1,"safety":4,'
               '"hallucination":true,"explanation":"a\x05b\tc"}')
    with fake_judge(answering(content)) as judge:
        verdict, _ = judge_one(judge.endpoint)
    assert verdict.error is None and verdict.explanation == "a b c"


def test_a_bug_while_judging_is_an_internal_failure_not_a_dead_thread():
    with fake_judge(answering(json.dumps(GOOD_ANSWER))) as judge:
        got = Collected()
        worker = JudgeWorker(judge.endpoint, "m", on_verdict=got, concurrency=1)
        worker.submit(judgment(0, prompt=None))  # type: ignore[arg-type]
        worker.submit(judgment(1))
        first, second = got.wait(2)
        worker.close(2.0)
    assert first.error == "internal" and second.error is None
    assert worker.failures["internal"] == 1 and worker.judged == 1


def test_http_500_is_an_http_error():
    with fake_judge(answering("{}", status=500)) as judge:
        verdict, worker = judge_one(judge.endpoint)
    assert verdict.error == "http_error" and worker.failures["http_error"] == 1


def test_nothing_listening_is_unreachable():
    verdict, worker = judge_one(f"http://127.0.0.1:{free_port()}/v1")
    assert verdict.error == "unreachable" and worker.failures["unreachable"] == 1


def test_slow_judge_is_a_timeout():
    with fake_judge(blocking) as judge:
        verdict, worker = judge_one(judge.endpoint, timeout_s=0.3)
    assert verdict.error == "timeout" and worker.failures["timeout"] == 1
    assert 0.2 < verdict.latency_s < 10


def test_submit_never_waits_for_a_slow_judge_and_counts_drops():
    with fake_judge(blocking) as judge:
        worker = JudgeWorker(judge.endpoint, "m", on_verdict=Collected(), queue_size=2,
                             concurrency=1, max_rate=100, timeout_s=30)
        results: list[bool] = []
        submitter = threading.Thread(
            target=lambda: results.extend(worker.submit(judgment(i)) for i in range(20)))
        submitter.start()
        submitter.join(10)
        assert not submitter.is_alive(), "submit blocked on the judge"
        # every submit returned while the judge still holds a request unanswered
        assert judge.entered.wait(10) and not judge.release.is_set()
        accepted = sum(results)
        assert len(results) == 20 and worker.submitted == 20
        assert worker.submitted == accepted + worker.dropped
        assert 2 <= accepted <= 3 and worker.dropped >= 17
        judge.release.set()
        worker.close(5.0)


def test_rate_limit_bounds_judgments_and_close_accounts_for_every_submission():
    got = Collected()
    with fake_judge(answering(json.dumps(GOOD_ANSWER))) as judge:
        start = time.monotonic()
        worker = JudgeWorker(judge.endpoint, "m", on_verdict=got, max_rate=4, concurrency=2)
        for i in range(30):
            assert worker.submit(judgment(i))
        got.wait(2)
        time.sleep(1.0)
        judged, elapsed = worker.judged, time.monotonic() - start
        t0 = time.monotonic()
        worker.close(5.0)
        assert time.monotonic() - t0 < 5.5
    # a one-second burst (4), then 4 per second
    assert 2 <= judged <= 4 + 4 * elapsed + 1
    assert worker.judged + sum(worker.failures.values()) + worker.abandoned == 30
    assert not worker.submit(judgment()) and worker.dropped == 1


def test_close_does_not_wait_for_a_judge_that_never_answers():
    with fake_judge(blocking) as judge:
        got = Collected()
        worker = JudgeWorker(judge.endpoint, "m", on_verdict=got, timeout_s=30)
        worker.submit(judgment())
        assert judge.entered.wait(10)
        t0 = time.monotonic()
        worker.close(0.5)
        assert time.monotonic() - t0 < 2.0
        judge.release.set()
    assert got.verdicts == []  # a verdict finished after close is not delivered


def test_on_verdict_errors_are_caught_and_judging_goes_on():
    calls: list[Verdict] = []

    def flaky(verdict: Verdict) -> None:
        calls.append(verdict)
        raise RuntimeError("consumer bug")

    with fake_judge(answering(json.dumps(GOOD_ANSWER))) as judge:
        worker = JudgeWorker(judge.endpoint, "m", on_verdict=flaky, max_rate=100)
        for i in range(3):
            worker.submit(judgment(i))
        deadline = time.monotonic() + 20
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        worker.close(2.0)
    assert len(calls) == 3 and worker.callback_errors == 3 and worker.judged == 3


@pytest.mark.parametrize(("kwargs", "setting"), [
    ({"endpoint": "ftp://host/v1"}, "endpoint"),
    ({"endpoint": "localhost:8000/v1"}, "endpoint"),
    ({"max_rate": 0}, "max_rate"),
    ({"max_rate": float("nan")}, "max_rate"),
    ({"concurrency": 0}, "concurrency"),
    ({"queue_size": -1}, "queue_size"),
    ({"timeout_s": 0}, "timeout_s"),
    ({"max_chars": 0}, "max_chars"),
])
def test_invalid_settings_are_rejected_by_name(kwargs, setting):
    kw = {"endpoint": "http://127.0.0.1:1/v1", **kwargs}
    with pytest.raises(ValueError, match=setting):
        JudgeWorker(kw.pop("endpoint"), "m", on_verdict=print, **kw)


@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.3333, 0.5, 0.999, 1.0])
def test_judge_sampled_agrees_with_trace_id_ratio_sampler(ratio):
    sampler = TraceIdRatioBased(ratio)
    rng = random.Random(ratio)
    bound = round(ratio * 2**64)
    edges = [b for b in (bound - 1, bound, bound + 1) if 0 <= b < 2**64]
    for trace_id in [rng.getrandbits(128) for _ in range(3000)] + edges + [(7 << 64) | 5]:
        expected = sampler.should_sample(None, trace_id, "req").decision.is_sampled()
        assert judge_sampled(trace_id, ratio) is expected, hex(trace_id)


def test_reprs_hold_no_prompt_or_completion_text():
    j = judgment(prompt="SECRET-PROMPT", completion="SECRET-COMPLETION")
    verdict = Verdict(j, 0, 1_000_000, {d: 1.0 for d in DIMENSIONS}, False,
                      "quotes SECRET-PROMPT", None)
    for text in (repr(verdict), repr(j), str(verdict)):
        assert "SECRET" not in text
    assert j.request_id in repr(verdict)
    worker = JudgeWorker("http://127.0.0.1:1/v1", "m", on_verdict=print, api_key="KEY-1")
    worker.close(1.0)
    assert "KEY-1" not in repr(worker)


def test_error_reasons_are_a_closed_set():
    assert {"timeout", "unreachable", "http_error", "parse_error"} <= ERROR_REASONS
    worker = JudgeWorker("http://127.0.0.1:1/v1", "m", on_verdict=print)
    worker.close(1.0)
    assert set(worker.failures) == ERROR_REASONS


PAIRS = [
    ("What does the KV cache hold during decode?", "It holds the keys and values of "
     "every earlier token so attention need not recompute them."),
    ("Summarize: the scheduler batches requests and the worker runs the model.",
     "The scheduler groups requests; the worker executes them."),
    ("Translate hello world to French.", "Bonjour le monde."),
    ("Explain prefill and decode in two sentences.", "Prefill reads the whole prompt at "
     "once. Decode then writes one token per step."),
]


@pytest.mark.vllm
def test_random_weight_vllm_judge_always_returns_parseable_scores(judge_server):
    """Structured output makes even a random-weight judge answer in the schema."""
    server = judge_server
    got = Collected()
    worker = JudgeWorker(f"{server.base_url}/v1", DENSE, on_verdict=got, timeout_s=60,
                         max_rate=10, concurrency=2, max_chars=500)
    try:
        for i, (prompt, completion) in enumerate(PAIRS):
            assert worker.submit(judgment(i, prompt, completion))
        verdicts = got.wait(len(PAIRS), timeout=240)
    finally:
        worker.close(5.0)
    for v in verdicts:
        assert v.error is None, (v, server.log_tail(30))
        assert set(v.scores) == set(DIMENSIONS)
        assert all(0.0 <= s <= 1.0 for s in v.scores.values())
        assert isinstance(v.hallucination, bool)
        assert v.explanation is not None and len(v.explanation) <= EXPLANATION_MAX_CHARS
    assert worker.judged == len(PAIRS)
