"""The quality loop end to end, on real processes.

Three instrumented vLLM servers of the tiny dense model, labelled by deployment
version, and a fourth, plain vLLM as the judge (structured output, see
``conftest.judge_config``):

- ``stable`` and ``canary-ok``: the same settings; every request judged, every
  request's entropy measured, drift against a reference file of short chats;
- ``canary``: made slower (``--max-num-seqs 1``: requests queue behind each other)
  and given a judge that first answers too slowly (a real local HTTP server that
  sleeps past the judge timeout) and then goes away (connection refused).

A real Prometheus scrapes the three servers' ``/metrics`` (vLLM's registry, which
llmtrace's API-server metrics join). ``llmtrace gate`` runs as a subprocess, the
way a rollout pipeline runs it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from conftest import dense_config, instrumented_env, judge_env
from prometheus_client.parser import text_string_to_metric_families

from llmtrace import schema
from llmtrace import semconv as sc
from testbed.models import DENSE, VOCAB_SIZE
from testbed.ports import free_port
from testbed.prometheus import PrometheusServer
from testbed.stream_client import run_load

pytestmark = pytest.mark.vllm

MARKER = "quokkamarker"  # a word no completion or attribute may carry out of the process
SHORT = [f"say something about item {i} please" for i in range(8)]


class SlowJudge:
    """A judge endpoint that answers after ``delay_s`` (past the judge's timeout)."""

    def __init__(self, delay_s: float) -> None:
        delay = delay_s
        self.calls = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server API
                outer.calls += 1
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                time.sleep(delay)
                self.send_response(500)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _config(tiny_models, otlp_receiver, version: str, *args: str, **env: str):
    return dense_config(tiny_models, *args, max_model_len=1024, env=instrumented_env(
        otlp_receiver, f"llmtrace-quality-{version}", LLMTRACE_DEPLOYMENT_VERSION=version,
        LLMTRACE_METRICS_EXPORTER="prometheus",
        OTEL_EXPORTER_PROMETHEUS_HOST="127.0.0.1",
        OTEL_EXPORTER_PROMETHEUS_PORT=str(free_port()),
        LLMTRACE_ENTROPY_SAMPLE_RATIO="1", LLMTRACE_DRIFT_MIN_SAMPLES="20", **env))


@pytest.fixture(scope="module")
def bed(server_pool, tiny_models, otlp_receiver, judge_server, drift_baseline,
        tmp_path_factory):
    slow = SlowJudge(delay_s=5.0)
    judged = {**judge_env(judge_server, LLMTRACE_JUDGE_SAMPLE_RATIO="1",
                          LLMTRACE_JUDGE_MAX_RATE="4"),
              "LLMTRACE_DRIFT_BASELINE": f"file:{drift_baseline}"}
    configs = {
        "stable": _config(tiny_models, otlp_receiver, "stable", **judged),
        "canary-ok": _config(tiny_models, otlp_receiver, "canary-ok", **judged),
        "canary": _config(tiny_models, otlp_receiver, "canary", "--max-num-seqs", "1",
                          LLMTRACE_JUDGE_ENDPOINT=slow.url, LLMTRACE_JUDGE_MODEL=DENSE,
                          LLMTRACE_JUDGE_SAMPLE_RATIO="1", LLMTRACE_JUDGE_TIMEOUT_S="1",
                          LLMTRACE_JUDGE_CONCURRENCY="1", LLMTRACE_JUDGE_QUEUE_SIZE="2"),
    }
    servers = dict(zip(configs, server_pool.get_many(list(configs.values())), strict=True))
    prom = PrometheusServer(tmp_path_factory.mktemp("prometheus-quality"), [
        {"job_name": "vllm", "scrape_interval": "1s", "static_configs": [
            {"targets": [s.base_url.removeprefix("http://") for s in servers.values()]}]}])
    prom.start()
    try:
        yield {"servers": servers, "prometheus": prom, "slow": slow}
    finally:
        prom.stop()
        slow.stop()
        for config in configs.values():
            server_pool.stop(config)


def _chat(server, content: str, tenant: str = "quality", max_tokens: int = 12,
          **extra) -> dict:
    resp = httpx.post(f"{server.base_url}/v1/chat/completions", headers={"x-tenant-id": tenant},
                      json={"model": DENSE, "messages": [{"role": "user", "content": content}],
                            "max_tokens": max_tokens, **extra}, timeout=120)
    resp.raise_for_status()
    return resp.json()


def _metrics(server) -> dict[str, list]:
    """The server's /metrics samples by name."""
    text = httpx.get(f"{server.base_url}/metrics", timeout=30).text
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def _total(server, name: str, **labels: str) -> float:
    return sum(s.value for s in _metrics(server).get(name, [])
               if all(s.labels.get(k) == v for k, v in labels.items()))


def _wait(predicate, timeout: float = 180.0, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(every)
    return predicate()


def _settle(server, timeout: float = 240.0) -> None:
    """Wait until the server's judge has nothing left in flight: its verdict counters
    stop moving."""
    def seen() -> float:
        return _total(server, "llmtrace_quality_evaluations_total") + \
            _total(server, "llmtrace_judge_failures_total")
    last, deadline = -1.0, time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = seen()
        if now == last:
            return
        last = now
        time.sleep(2.5)


def _spans(otlp_receiver, version: str) -> list:
    return [s for s in otlp_receiver.spans()
            if s.resource.get("service.name") == f"llmtrace-quality-{version}"]


def _load(server, n: int = 40, tenant: str | None = None) -> list:
    """The gate's load: 4 at a time, 48 tokens each, greedy (the same answers on equal
    servers), one tenant: a canary that runs one request at a time queues the rest."""
    bodies = [{"messages": [{"role": "user", "content": SHORT[i % len(SHORT)]}],
               "max_tokens": 48, "extra": {"temperature": 0},
               **({"headers": {"x-tenant-id": tenant}} if tenant else {})} for i in range(n)]
    timings = run_load(server.base_url, DENSE, bodies, 4)
    assert all(t.ok and t.tokens == 48 for t in timings), [t for t in timings if not t.ok][:2]
    return timings


def _summary(report: dict, prom: PrometheusServer) -> str:
    """What a failed assertion needs: each check's verdict and numbers, and scrape health."""
    lines = [f"{report['result']} ({report['exit_code']})"]
    for c in report["checks"]:
        lines.append(f"{c['name']}: {c['verdict']}: {c['reason']}; stable {c['stable']}; "
                     f"canary {c['canary']}")
    for q in ("up", "scrape_duration_seconds"):
        lines.append(f"{q}: " + ", ".join(f"{r['metric'].get('instance')}={r['value'][1]}"
                                          for r in prom.query(q)))
    return "\n".join(lines)


def _gate(prom: PrometheusServer, canary: str, *extra: str) -> tuple[int, dict]:
    out = subprocess.run(
        [sys.executable, "-m", "llmtrace.cli", "gate", "--prometheus", prom.url, "--model",
         DENSE, "--stable", "stable", "--canary", canary, "--window", "10m",
         "--min-samples", "30", "--min-evaluations", "10", "--max-slo-regression", "0.2",
         "--checks", "ttft,itl,errors,quality", "--tenant", "default", "--json", *extra],
        capture_output=True, text=True, timeout=120)
    assert out.stdout, out.stderr
    return out.returncode, json.loads(out.stdout)


def test_gate_fails_the_slow_canary_and_passes_an_equal_one(bed):
    servers, prom, slow = bed["servers"], bed["prometheus"], bed["slow"]
    # every series exists in Prometheus before the measured load: increase() over the
    # window counts from a series' first sample, as it would in production
    for version, server in servers.items():
        # a cold server's first batches are slow: warm each up as another tenant, whose
        # requests the gate leaves out (--tenant), then create the measured tenant's series
        _load(server, 8, tenant="warm-up")
        _load(server, 1)
        wanted = ["gen_ai_server_time_to_first_token_seconds_count",
                  "llmtrace_server_requests_total"]
        if version != "canary":
            wanted.append('llmtrace_quality_score_count{llmtrace_quality_dimension="composite"}')
        for name in wanted:
            sel = f'llmtrace_deployment_version="{version}"'
            q = name.replace("}", f", {sel}}}") if "{" in name else f"{name}{{{sel}}}"
            assert _wait(lambda q=q: prom.query(q), timeout=120), (q, prom.query("up"))
    # stable and the equal canary in alternating rounds of the same load, each round on a
    # quiet machine: the judge (a vLLM on the same 2 cores) works through a round's
    # verdicts after it, not during the next server's round (its backlog once made
    # one server's TTFTs seconds long)
    _settle(servers["stable"])
    _settle(servers["canary-ok"])
    for _ in range(5):
        for version in ("stable", "canary-ok"):
            _load(servers[version], 8)
            _settle(servers[version])
    # the slow canary: its judge first answers past the timeout, then goes away
    client = _load(servers["canary"], 20)
    slow.stop()
    client += _load(servers["canary"], 20)
    canary = servers["canary"]
    # serving went on: every request above finished in full (asserted in _load); the
    # judge's failures and the queue's drops are counted
    assert _wait(lambda: _total(canary, "llmtrace_judge_failures_total",
                                error_type="unreachable") > 0, timeout=60)
    assert _total(canary, "llmtrace_judge_failures_total", error_type="timeout") > 0
    assert slow.calls > 0
    assert _total(canary, "llmtrace_telemetry_dropped_total",
                  llmtrace_telemetry_reason="judge_queue_full") > 0
    for version in ("stable", "canary-ok", "canary"):
        q = (f'sum(llmtrace_server_requests_total{{llmtrace_deployment_version="{version}"}})')
        assert _wait(lambda q=q: (r := prom.query(q)) and float(r[0]["value"][1]) >= 40,
                     timeout=60), (version, prom.query(q))
    time.sleep(3)  # one more scrape of every counter

    code, report = _gate(prom, "canary")
    checks = {c["name"]: c for c in report["checks"]}
    print(f"\ngate, slow canary: {_summary(report, prom)}")  # figures, shown with -s
    assert code == 1, _summary(report, prom)
    assert checks["ttft"]["verdict"] == "fail", checks["ttft"]
    # an independent client's view of the same requests: the server's TTFT ends before
    # the client's, so the gate's share over the threshold is at most the client's; and
    # not by much: at least the client's share over the bucket edge two above (the
    # client's clock also holds its own threads' waits on this loaded machine: 3 to 15
    # points of share between the two views in earlier runs); one request in the gate's
    # window is the warm-up's
    threshold = checks["ttft"]["canary"]["threshold_s"]
    edges = schema.BY_NAME[sc.METRIC_GEN_AI_SERVER_TIME_TO_FIRST_TOKEN].buckets
    above = edges[edges.index(threshold) + 2]
    over, over_next = (sum(t.ttft_s > e for t in client) / len(client) for e in (threshold, above))
    gate = checks["ttft"]["canary"]["ratio"]
    print(f"canary TTFT: client over {threshold} s {over:.3f}, over {above} s "
          f"{over_next:.3f}; gate over {threshold} s {gate:.3f}")
    slack = 1 / len(client)
    assert over_next - slack <= gate <= over + slack
    code, report = _gate(prom, "canary-ok")
    checks = {c["name"]: c for c in report["checks"]}
    print(f"\ngate, equal canary: {_summary(report, prom)}")
    assert code == 0, _summary(report, prom)
    assert checks["quality"]["verdict"] == "pass", checks["quality"]
    # the pipeline's view and a person's view come from one run
    table = subprocess.run([sys.executable, "-m", "llmtrace.cli", "gate", "--prometheus",
                            prom.url, "--model", DENSE, "--stable", "stable", "--canary",
                            "canary", "--window", "10m", "--min-samples", "30",
                            "--checks", "ttft"], capture_output=True, text=True, timeout=120)
    assert table.returncode == 1 and "ttft" in table.stdout, table.stdout + table.stderr


def test_judge_results_are_linked_to_request_spans_and_no_text_leaves(bed, otlp_receiver):
    stable = bed["servers"]["stable"]
    answers = [_chat(stable, f"{MARKER} question number {i}", max_tokens=16,
                     temperature=0) for i in range(4)]
    completions = [a["choices"][0]["message"]["content"] for a in answers]

    def judged():
        spans = _spans(otlp_receiver, "stable")
        judges = [s for s in spans if s.name == sc.SPAN_LLMTRACE_JUDGE]
        return (spans, judges) if len(judges) >= 4 else None
    got = _wait(judged)
    assert got, "no llmtrace.judge spans arrived"
    spans, judges = got
    requests = {(s.trace_id, s.span_id): s for s in spans if s.name == sc.SPAN_LLMTRACE_REQUEST}
    for judge in judges:
        # the judge span hangs under the request span it scored, in the same trace
        assert (judge.trace_id, judge.parent_span_id) in requests, judge
        assert judge.start_ns >= requests[(judge.trace_id, judge.parent_span_id)].end_ns
        assert judge.attributes[sc.LLMTRACE_JUDGE_MODEL] == DENSE
        assert sc.ERROR_TYPE not in judge.attributes, judge.attributes
        results = {e.attributes[sc.GEN_AI_EVALUATION_NAME]: e.attributes
                   for e in judge.events if e.name == sc.EVENT_GEN_AI_EVALUATION_RESULT}
        assert set(results) == {"helpfulness", "accuracy", "coherence", "safety", "composite",
                                "hallucination"}, results
        for attrs in results.values():
            assert 0.0 <= attrs[sc.GEN_AI_EVALUATION_SCORE_VALUE] <= 1.0
            assert attrs[sc.GEN_AI_EVALUATION_SCORE_LABEL]
            # content capture is off: not even the judge's explanation is exported
            assert sc.GEN_AI_EVALUATION_EXPLANATION not in attrs
        dims = [results[d][sc.GEN_AI_EVALUATION_SCORE_VALUE]
                for d in ("helpfulness", "accuracy", "coherence", "safety")]
        assert math.isclose(results["composite"][sc.GEN_AI_EVALUATION_SCORE_VALUE],
                            sum(dims) / 4)
    # the metric agrees with the spans: one evaluation per judge span so far, at least
    assert _total(stable, "llmtrace_quality_evaluations_total") >= len(judges)
    assert _total(stable, "llmtrace_quality_score_count", llmtrace_quality_dimension="composite") \
        >= len(judges)
    # no prompt or completion text left the process: not on any span, event or metric
    texts = [MARKER] + [c for c in completions if len(c.strip()) >= 12]
    for span in spans:
        blobs = [json.dumps(span.attributes, default=str)] + \
            [json.dumps(e.attributes, default=str) for e in span.events]
        for blob in blobs:
            for text in texts:
                assert text not in blob, (span.name, text)
        assert sc.GEN_AI_INPUT_MESSAGES not in span.attributes
        assert sc.GEN_AI_OUTPUT_MESSAGES not in span.attributes
    metrics_text = httpx.get(f"{stable.base_url}/metrics", timeout=30).text
    assert all(text not in metrics_text for text in texts)


def test_entropy_from_logprobs_asked_or_not(bed, otlp_receiver):
    stable = bed["servers"]["stable"]

    def entropies():
        key = sc.LLMTRACE_OUTPUT_ENTROPY
        return [s.attributes[key] for s in _spans(otlp_receiver, "stable")
                if s.name == sc.SPAN_LLMTRACE_REQUEST and key in s.attributes]
    before = len(entropies())
    asked = _chat(stable, "entropy asked", logprobs=True, top_logprobs=5)
    plain = _chat(stable, "entropy not asked")
    assert asked["choices"][0]["logprobs"]["content"], "the client asked: it gets logprobs"
    # llmtrace asked vLLM for logprobs on this one too; the client did not, and sees none
    assert plain["choices"][0].get("logprobs") is None
    got = _wait(lambda: (e := entropies()) and len(e) >= before + 2 and e, timeout=60)
    assert got, "the request spans carry no entropy"
    # at most ln(vocabulary): the reported top-k plus the rest as one outcome
    assert all(0.0 < v <= math.log(VOCAB_SIZE) for v in got), got
    assert _total(stable, "llmtrace_output_entropy_count") >= 2


def test_the_same_prompt_again_from_the_same_tenant_is_a_regeneration(bed):
    canary_ok = bed["servers"]["canary-ok"]
    before = _total(canary_ok, "llmtrace_user_regenerations_total", llmtrace_tenant="retry-a")
    prompt = "regenerate this answer please"
    _chat(canary_ok, prompt, tenant="retry-a")
    _chat(canary_ok, prompt, tenant="retry-a")
    _chat(canary_ok, prompt, tenant="retry-b")  # another tenant: not a retry
    _chat(canary_ok, prompt + " differently", tenant="retry-a")  # another prompt

    def counted():
        return _total(canary_ok, "llmtrace_user_regenerations_total",
                      llmtrace_tenant="retry-a") - before == 1
    assert _wait(counted, timeout=30)
    assert _total(canary_ok, "llmtrace_user_regenerations_total", llmtrace_tenant="retry-b") == 0


def test_a_shifted_input_stream_raises_psi_past_the_alert_threshold(bed):
    """The reference file holds short chats (8-64 prompt tokens); long prompts shift
    the prompt-length distribution, and Prometheus sees PSI cross 0.25."""
    stable, prom = bed["servers"]["stable"], bed["prometheus"]
    long_prompt = " ".join(f"word{i}" for i in range(90))
    bodies = [{"messages": [{"role": "user", "content": f"{i} {long_prompt}"}],
               "max_tokens": 4} for i in range(24)]
    assert all(t.ok for t in run_load(stable.base_url, DENSE, bodies, 4))
    query = ('llmtrace_drift_psi{llmtrace_deployment_version="stable", '
             'llmtrace_drift_feature="prompt_length"}')
    result = _wait(lambda: [r for r in prom.query(query) if float(r["value"][1]) > 0.25],
                   timeout=60)
    assert result, prom.query(query)
    p = prom.query(query.replace("llmtrace_drift_psi", "llmtrace_drift_p_value"))
    assert p and float(p[0]["value"][1]) < 0.001, p


