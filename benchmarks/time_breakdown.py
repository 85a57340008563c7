"""Does the time breakdown add up? Spans and metrics against vLLM's own load client.

Starts one instrumented ``vllm serve`` (tiny-llama, 100% sampling, chunked
prefill budget 256) with traces into a local OTLP receiver and llmtrace's
metrics on vLLM's ``/metrics``, then drives it with ``vllm bench serve`` (an
independent client, per-request TTFT saved) in two scenarios: saturation
(``--request-rate inf --max-concurrency 32``, 150 requests) and 2 requests/s.
Every request carries ``x-request-id`` (bench's ``--request-id-prefix``), so
each client measurement is matched to its trace. Prints, per scenario:

- requests with a complete tree (request, preprocess, queue, prefill,
  first-token delivery, decode, engine request, prefill chunks);
- prefill spans (and prefill chunks) starting before their request reached the
  engine (``llmtrace.engine.request`` start);
- mean queue span (per request, arrival and re-queues) against the queue
  histogram's mean (``/metrics`` delta), and their ratio;
- max |sum of phase attributes - TTFT| and max |phase span - attribute|;
- TTFT: client vs span per request (p50, p99, how many spans exceed the client).

Figures, never pass/fail: timings belong here, not in tests.

    python benchmarks/time_breakdown.py [--requests 150] [--rate-requests 60]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # testbed/ is not installed

from llmtrace import semconv as sc
from testbed.models import DENSE, ensure_models
from testbed.otlp_receiver import OTLPReceiver, ReceivedSpan
from testbed.vllm_server import ServerConfig, VLLMServer

REPO = Path(__file__).resolve().parents[1]
TILES = (sc.SPAN_LLMTRACE_PREPROCESS, sc.SPAN_LLMTRACE_QUEUE, sc.SPAN_LLMTRACE_PREFILL,
         sc.SPAN_LLMTRACE_FIRST_TOKEN_DELIVERY)
PHASE_ATTRS = {sc.SPAN_LLMTRACE_PREPROCESS: sc.LLMTRACE_LATENCY_PREPROCESS,
               sc.SPAN_LLMTRACE_QUEUE: sc.LLMTRACE_LATENCY_QUEUE,
               sc.SPAN_LLMTRACE_PREFILL: sc.LLMTRACE_LATENCY_PREFILL,
               sc.SPAN_LLMTRACE_FIRST_TOKEN_DELIVERY: sc.LLMTRACE_LATENCY_FIRST_TOKEN_DELIVERY}
TREE = (sc.SPAN_LLMTRACE_REQUEST, *TILES, sc.SPAN_LLMTRACE_DECODE,
        sc.SPAN_LLMTRACE_ENGINE_REQUEST, sc.SPAN_LLMTRACE_PREFILL_CHUNK)
QUEUE_METRIC = sc.PROMETHEUS_NAMES[sc.METRIC_LLMTRACE_SERVER_QUEUE_DURATION]


def queue_histogram(base_url: str, tenant: str) -> tuple[float, float]:
    """(sum, count) of the queue-duration histogram for ``tenant`` on vLLM's /metrics."""
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    total = count = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.labels.get("llmtrace_tenant") != tenant:
                continue
            if s.name == f"{QUEUE_METRIC}_sum":
                total += s.value
            elif s.name == f"{QUEUE_METRIC}_count":
                count += s.value
    return total, count


def bench(server: VLLMServer, model_dir: Path, out: Path, prefix: str, tenant: str,
          requests: int, rate: str, concurrency: int | None) -> dict:
    cmd = [sys.executable, "-m", "testbed.vllm_cli", "bench", "serve",
           "--backend", "vllm", "--base-url", server.base_url, "--model", DENSE,
           "--tokenizer", str(model_dir), "--dataset-name", "random",
           "--random-input-len", "128", "--random-output-len", "32",
           "--num-prompts", str(requests), "--request-rate", rate,
           "--request-id-prefix", prefix, "--header", f"x-tenant-id={tenant}",
           "--save-result", "--save-detailed", "--result-dir", str(out),
           "--result-filename", f"{prefix}.json", "--seed", "7", "--ignore-eos"]
    if concurrency:
        cmd += ["--max-concurrency", str(concurrency)]
    env = server.environment()
    subprocess.run(cmd, check=True, env=env, cwd=out, stdout=subprocess.DEVNULL)
    return json.loads((out / f"{prefix}.json").read_text())


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))] if values else float("nan")


def analyse(name: str, result: dict, spans: list[ReceivedSpan], prefix: str,
            queue_delta: tuple[float, float]) -> None:
    by_trace: dict[str, list[ReceivedSpan]] = {}
    for s in spans:
        by_trace.setdefault(s.trace_id, []).append(s)
    roots = {}
    for trace in by_trace.values():
        for s in trace:
            rid = str(s.attributes.get(sc.LLMTRACE_REQUEST_ID, ""))
            if s.name == sc.SPAN_LLMTRACE_REQUEST and prefix in rid:
                roots[rid] = (s, trace)
    client_ttft = {}
    for i, (ttft, err) in enumerate(zip(result["ttfts"], result["errors"], strict=True)):
        if not err:
            client_ttft[f"{prefix}{i}"] = ttft
    complete = early_prefill = early_chunks = 0
    early_max = 0.0
    queue_spans, sum_err, span_err, diffs, exceed = [], [], [], [], 0
    span_ttfts, matched_client = [], []
    for rid, (root, trace) in roots.items():
        names = {s.name for s in trace}
        complete += set(TREE) <= names
        engine = [s for s in trace if s.name == sc.SPAN_LLMTRACE_ENGINE_REQUEST]
        if engine:
            e0 = engine[0].start_ns
            for s in trace:
                if s.name == sc.SPAN_LLMTRACE_PREFILL and s.start_ns < e0:
                    early_prefill += 1
                    early_max = max(early_max, (e0 - s.start_ns) / 1e6)
                if s.name == sc.SPAN_LLMTRACE_PREFILL_CHUNK and s.start_ns < e0:
                    early_chunks += 1
        a = root.attributes
        ttft = a.get(sc.LLMTRACE_LATENCY_TIME_TO_FIRST_TOKEN)
        queue_spans.append(sum(s.duration_s for s in trace if s.name == sc.SPAN_LLMTRACE_QUEUE))
        if ttft is not None and all(k in a for k in PHASE_ATTRS.values()):
            sum_err.append(abs(sum(a[k] for k in PHASE_ATTRS.values()) - ttft))
        for phase, key in PHASE_ATTRS.items():  # a phase's spans (split by preemptions)
            if key in a:
                span_err.append(abs(sum(s.duration_s for s in trace if s.name == phase) - a[key]))
        client = next((v for k, v in client_ttft.items() if rid.endswith(k) or k in rid
                       and rid.split(k)[1][:1] in ("", "-")), None)
        if ttft is not None and client is not None:
            diffs.append((client - ttft) * 1e3)
            exceed += ttft > client
            span_ttfts.append(ttft)
            matched_client.append(client)
    hist_sum, hist_count = queue_delta
    hist_mean = hist_sum / hist_count if hist_count else float("nan")
    span_mean = statistics.fmean(queue_spans) if queue_spans else float("nan")
    print(f"\n== {name}: {len(result['ttfts'])} requests sent, {len(roots)} traced, "
          f"{len(client_ttft)} ok at the client")
    print(f"complete trees: {complete}/{len(roots)}")
    print(f"prefill spans starting before the request reached the engine: {early_prefill} "
          f"(max {early_max:.3f} ms); prefill chunks: {early_chunks}")
    print(f"queue: mean span {span_mean * 1e3:.2f} ms, histogram mean {hist_mean * 1e3:.2f} ms "
          f"over {hist_count:.0f} requests, ratio {hist_mean / span_mean:.3f}")
    if sum_err:
        print(f"phase attributes vs TTFT: max |sum - TTFT| {max(sum_err) * 1e3:.6f} ms; "
              f"phase span vs attribute: max {max(span_err or [0]) * 1e3:.6f} ms")
    if diffs:
        print(f"TTFT p50 / p99 (ms): client {pct(matched_client, 50) * 1e3:.1f} / "
              f"{pct(matched_client, 99) * 1e3:.1f}, span {pct(span_ttfts, 50) * 1e3:.1f} / "
              f"{pct(span_ttfts, 99) * 1e3:.1f}; client - span p50 {pct(diffs, 50):.2f} ms, "
              f"min {min(diffs):.2f} ms; spans exceeding the client: {exceed}/{len(diffs)}")
    means = {n: statistics.fmean(r[0].attributes.get(PHASE_ATTRS[n], 0) for r in roots.values())
             * 1e3 for n in TILES}
    print("mean phases (ms): " + ", ".join(f"{n.split('.')[-1]} {v:.2f}"
                                           for n, v in means.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=150)
    parser.add_argument("--rate-requests", type=int, default=60)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="llmtrace-breakdown-"))
    models = ensure_models(REPO / ".cache" / "models")
    with OTLPReceiver() as receiver:
        env = {"LLMTRACE_ENABLED": "1", "LLMTRACE_OTLP_ENDPOINT": receiver.grpc_endpoint,
               "LLMTRACE_SAMPLE_RATIO": "1", "LLMTRACE_METRICS_EXPORTER": "prometheus",
               "OTEL_BSP_SCHEDULE_DELAY": "500", "OTEL_BSP_MAX_QUEUE_SIZE": "65536",
               "OTEL_SERVICE_NAME": "breakdown", "PYTHONPATH": str(REPO)}
        config = ServerConfig(model_dir=models.dense, served_name=DENSE,
                              args=("--max-num-batched-tokens", "256"), max_model_len=1024,
                              env=tuple(sorted(env.items())))
        server = VLLMServer(config, root / "server").start()
        try:
            server.wait_ready()
            print(f"vLLM ready in {server.ready_s:.0f} s")
            bench(server, models.dense, root, "warm-", "warm", 8, "inf", 4)
            for name, prefix, n, rate, conc in (
                    ("saturation (rate inf, concurrency 32)", "sat-", args.requests, "inf", 32),
                    ("2 requests/s", "rps2-", args.rate_requests, "2", None)):
                tenant = prefix.strip("-")
                before = queue_histogram(server.base_url, tenant)
                result = bench(server, models.dense, root, prefix, tenant, n, rate, conc)
                time.sleep(2.0)  # the last export batches
                after = queue_histogram(server.base_url, tenant)
                receiver.wait_for(lambda r: False, 1.0)
                analyse(name, result, receiver.spans(), prefix,
                        (after[0] - before[0], after[1] - before[1]))
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
