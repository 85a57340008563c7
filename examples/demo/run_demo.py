"""llmtrace demo on CPU: a real instrumented vLLM server, streaming load, derived records.

Generates the tiny models (cached), starts an in-process llmtrace collector
(the derivation pipeline) and ``vllm serve`` on the dense model with llmtrace
switched on by environment only. Drives streaming chat requests from three
tenants at a few concurrency levels, then prints what the client saw, the
pipeline's per-tenant table (TTFT, ITL, tokens, accelerator-seconds by batch
share, cost from the example price table), the quality loop's view (a second
vLLM serving the tiny model judges a sample of requests through structured
output; output entropy from sampler logprobs) and one request's span waterfall.

    python examples/demo/run_demo.py [--requests 50] [--levels 1,4,8]
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # testbed/ is not installed

from tqdm import tqdm

from llmtrace import semconv as sc
from llmtrace.collector import CollectorConfig, CollectorService
from llmtrace.pricing import PriceTable
from llmtrace.record import Histogram, RequestRecord, UsageRecord
from testbed.models import DENSE, ensure_models
from testbed.otlp_receiver import OTLPReceiver
from testbed.stream_client import (
    LoadSummary,
    StreamTiming,
    percentile,
    run_load,
    summarize,
)
from testbed.vllm_server import ServerConfig, VLLMServer

REPO = Path(__file__).resolve().parents[2]
TENANTS = ("acme", "globex", "initech")
TOPICS = ["the prefix cache", "chunked prefill", "the decode loop", "expert routing",
          "request queues", "KV transfer", "batch scheduling", "token latency"]


def make_requests(n: int, seed: int = 0) -> list[dict]:
    """Varied chat prompts (short to medium) with a fixed output length per request."""
    rng = random.Random(seed)
    requests = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        padding = " ".join(rng.choice(TOPICS) for _ in range(rng.randint(0, 40)))
        content = f"Request {i}: please explain {topic}. Context: {padding}"
        requests.append({"messages": [{"role": "user", "content": content}],
                         "max_tokens": rng.choice([16, 32, 48, 64]),
                         "headers": {"x-tenant-id": TENANTS[i % len(TENANTS)]}})
    return requests


def split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def ms(value: float) -> str:
    return f"{value * 1000:8.1f}"


def print_table(rows: list[tuple[int, LoadSummary]]) -> None:
    header = (f"{'conc':>4} {'reqs':>5} {'errs':>4} {'TTFT p50':>9} {'TTFT p99':>9} "
              f"{'ITL p50':>9} {'ITL p99':>9} {'tokens':>7} {'tok/s':>8}")
    print("\nclient-measured latency (ms) on tiny-llama, vLLM CPU")
    print(header)
    print("-" * len(header))
    for conc, s in rows:
        print(f"{conc:>4} {s.requests:>5} {s.errors:>4} {ms(s.ttft_p50_s):>9} "
              f"{ms(s.ttft_p99_s):>9} {ms(s.itl_p50_s):>9} {ms(s.itl_p99_s):>9} "
              f"{s.output_tokens:>7} {s.tokens_per_s:>8.1f}")


def print_tenant_table(records: list[RequestRecord], usage: list[UsageRecord],
                       prices: PriceTable | None) -> None:
    """The pipeline's view: one row per tenant and model, from derived records."""
    rows: dict[tuple[str, str], dict] = {}
    for r in records:
        row = rows.setdefault((r.tenant, r.model), {"ttft": [], "itl": Histogram(), "in": 0,
                                                     "out": 0, "acc": 0.0, "usd": 0.0, "n": 0})
        row["n"] += 1
        if r.ttft_s is not None:
            row["ttft"].append(r.ttft_s)
        if r.itl is not None:
            row["itl"].merge(r.itl)
        row["in"] += r.prompt_tokens
        row["out"] += r.output_tokens
        usd = prices.token_cost(r.model, r.prompt_tokens, r.cached_tokens, r.output_tokens) \
            if prices else None
        row["usd"] += usd or 0.0
    for u in usage:
        if (u.tenant, u.model) in rows:
            rows[(u.tenant, u.model)]["acc"] += u.accelerator_s
    header = (f"{'tenant':<9} {'model':<11} {'reqs':>4} {'TTFT p50':>8} {'TTFT p99':>8} "
              f"{'ITL p50':>7} {'ITL p99':>7} {'tok in':>6} {'tok out':>7} {'acc-s':>6} "
              f"{'USD/1K tok':>10} {'USD':>9}")
    print("\nderived by the llmtrace pipeline from spans (ms; cost: examples/prices.yaml)")
    print(header)
    print("-" * len(header))
    for (tenant, model), row in sorted(rows.items()):
        tokens = row["in"] + row["out"]
        per_1k = row["usd"] / tokens * 1000 if tokens else 0.0
        ttft = [percentile(row["ttft"], q) * 1e3 for q in (50, 99)]
        itl = [(row["itl"].quantile(q) or 0.0) * 1e3 for q in (0.5, 0.99)]
        print(f"{tenant:<9} {model:<11} {row['n']:>4} {ttft[0]:>8.1f} {ttft[1]:>8.1f} "
              f"{itl[0]:>7.1f} {itl[1]:>7.1f} "
              f"{row['in']:>6} {row['out']:>7} {row['acc']:>6.2f} {per_1k:>10.6f} "
              f"{row['usd']:>9.6f}")
    busy = sum(u.accelerator_s for u in usage)
    print(f"accelerator-seconds attributed by batch share: {busy:.2f} s over "
          f"{len(usage)} requests")


def print_waterfall(receiver: OTLPReceiver, trace_id: str, width: int = 48,
                    max_lines: int = 24) -> None:
    """One request's spans as a terminal waterfall (the trace store's view)."""
    spans = [s for s in receiver.spans() if s.trace_id == trace_id]
    if not spans:
        print(f"\n(no spans received for trace {trace_id})")
        return
    t0 = min(s.start_ns for s in spans)
    total = max(s.end_ns for s in spans) - t0 or 1
    children: dict[str, list] = {}
    for s in spans:
        children.setdefault(s.parent_span_id, []).append(s)
    ids = {s.span_id for s in spans}
    lines: list[str] = []

    def walk(span, depth: int) -> None:
        start = (span.start_ns - t0) / total
        length = max(1, round((span.end_ns - span.start_ns) / total * width))
        bar = " " * min(width - 1, round(start * width)) + "#" * length
        label = ("  " * depth + span.name)[:34]
        lines.append(f"{label:<34} {(span.start_ns - t0) / 1e6:>8.1f} "
                     f"{(span.end_ns - span.start_ns) / 1e6:>8.1f}  |{bar[:width]:<{width}}|")
        for child in sorted(children.get(span.span_id, []), key=lambda c: c.start_ns):
            walk(child, depth + 1)

    for root in sorted((s for s in spans if s.parent_span_id not in ids),
                       key=lambda s: s.start_ns):
        walk(root, 0)
    print(f"\nspan waterfall of trace {trace_id} ({total / 1e6:.1f} ms)")
    print(f"{'span':<34} {'start ms':>8} {'dur ms':>8}")
    for line in lines[:max_lines]:
        print(line)
    if len(lines) > max_lines:
        print(f"... {len(lines) - max_lines} more spans")


def print_quality(receiver: OTLPReceiver) -> None:
    """The judge's verdicts and the output entropy, as the trace store received them."""
    spans = receiver.spans()
    judges = [s for s in spans if s.name == sc.SPAN_LLMTRACE_JUDGE]
    scores: dict[str, list[float]] = {}
    failed = hallucinated = 0
    for j in judges:
        if sc.ERROR_TYPE in j.attributes:
            failed += 1
            continue
        for e in j.events:
            if e.name == sc.EVENT_GEN_AI_EVALUATION_RESULT:
                scores.setdefault(e.attributes[sc.GEN_AI_EVALUATION_NAME], []).append(
                    e.attributes[sc.GEN_AI_EVALUATION_SCORE_VALUE])
        hallucinated += bool(j.attributes.get(sc.LLMTRACE_JUDGE_HALLUCINATION))
    key = sc.LLMTRACE_OUTPUT_ENTROPY
    entropy = [s.attributes[key] for s in spans
               if s.name == sc.SPAN_LLMTRACE_REQUEST and key in s.attributes]
    print(f"\nquality: {len(judges)} requests judged ({failed} judge calls failed), "
          f"{hallucinated} flagged as hallucinated (random weights: scores are noise)")
    for name in ("helpfulness", "accuracy", "coherence", "safety", "composite"):
        values = scores.get(name)
        if values:
            print(f"  {name:<12} mean {sum(values) / len(values):.2f} over {len(values)}")
    if entropy:
        print(f"  output entropy: mean {sum(entropy) / len(entropy):.2f} nats over "
              f"{len(entropy)} requests (top-8 logprobs, the rest as one outcome)")


def write_dashboards() -> None:
    """Regenerate the Grafana dashboards and SLO rules (deterministic: same bytes as committed)."""
    from llmtrace.dashboards import generate, slo

    generate.main([])
    slo.main([])
    rules = sorted((REPO / "dashboards" / "slo" / "rules").glob("*.yml"))
    print("Grafana dashboards (import the JSON):  dashboards/llmtrace-*.json")
    print(f"SLO burn-rate rules (Prometheus rule_files): {len(rules)} files in "
          "dashboards/slo/rules/")
    print("Prometheus scrape config for vLLM, engine core and collector: "
          "dashboards/prometheus/scrape-vllm.yml")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--levels", default="1,4,8", help="concurrency levels")
    parser.add_argument("--workdir", type=Path, default=REPO / ".cache" / "demo")
    parser.add_argument("--keep", action="store_true", help="keep the server's scratch files")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]

    t0 = time.monotonic()
    write_dashboards()
    models = ensure_models(REPO / ".cache" / "models", verbose=True)
    print(f"models ready in {time.monotonic() - t0:.1f} s: {models.dense}")

    records: list[RequestRecord] = []
    usage: list[UsageRecord] = []
    receiver = OTLPReceiver().start()  # stands in for the trace store (Tempo, Jaeger)
    collector = CollectorService(CollectorConfig(
        grpc_endpoint="127.0.0.1:0", http_endpoint="", admin_endpoint="127.0.0.1:0",
        forward_endpoint=receiver.grpc_endpoint, prices=REPO / "examples" / "prices.yaml"),
        on_record=records.append, on_usage=usage.append)
    collector.start()
    print(f"llmtrace collector in this process: OTLP gRPC :{collector.ports['grpc']}, "
          f"metrics http://127.0.0.1:{collector.ports['admin']}/metrics")
    # the judge: a second vLLM of the tiny model; structured output (compact JSON) makes
    # even random weights answer in the judge's schema
    judge = VLLMServer(ServerConfig(model_dir=models.dense, served_name=DENSE, args=(
        "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}'
    )), workdir=args.workdir / "judge")
    judge.start()
    env = (("LLMTRACE_ENABLED", "1"), ("LLMTRACE_SAMPLE_RATIO", "1"),
           ("LLMTRACE_JUDGE_ENDPOINT", f"{judge.base_url}/v1"), ("LLMTRACE_JUDGE_MODEL", DENSE),
           ("LLMTRACE_JUDGE_SAMPLE_RATIO", "0.25"), ("LLMTRACE_JUDGE_TIMEOUT_S", "60"),
           ("LLMTRACE_ENTROPY_SAMPLE_RATIO", "0.5"),
           ("LLMTRACE_OTLP_TRACES_ENDPOINT", f"http://127.0.0.1:{collector.ports['grpc']}"),
           ("LLMTRACE_METRICS_EXPORTER", "none"), ("LLMTRACE_DEPLOYMENT_VERSION", "demo"),
           ("LLMTRACE_INSTANCE_TYPE", "cpu"), ("OTEL_BSP_SCHEDULE_DELAY", "500"),
           ("OTEL_SERVICE_NAME", "vllm-demo"))
    server = VLLMServer(ServerConfig(model_dir=models.dense, served_name=DENSE, env=env),
                        workdir=args.workdir / "server")
    print("starting vllm serve with llmtrace (CPU, --enforce-eager) ...", flush=True)
    server.start()
    try:
        server.wait_ready(timeout=300)
        print(f"vLLM ready in {server.ready_s:.1f} s at {server.base_url}")
        judge.wait_ready(timeout=300)
        print(f"judge vLLM ready at {judge.base_url}")
        requests = make_requests(args.requests)
        rows: list[tuple[int, LoadSummary]] = []
        every: list[StreamTiming] = []
        with tqdm(total=len(requests), desc="streaming requests", unit="req") as bar:
            start = 0
            for conc, count in zip(levels, split(len(requests), len(levels)), strict=True):
                batch = requests[start:start + count]
                start += count
                bar.set_postfix(concurrency=conc)
                timings = run_load(server.base_url, DENSE, batch, conc,
                                               on_done=lambda _t: bar.update(1))
                rows.append((conc, summarize(timings)))
                every.extend(timings)
        print_table(rows)
        expected = len(every)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (len(records) < expected
                                               or len(usage) < expected):
            time.sleep(0.2)  # the last spans leave vLLM on the exporters' next batch
        print_tenant_table(records, usage, collector.metrics.prices)
        traced = {s.trace_id for s in receiver.spans() if s.name == sc.SPAN_LLMTRACE_REQUEST}
        deadline = time.monotonic() + 60  # the judge works after the requests, off-path
        while time.monotonic() < deadline and sum(
                1 for s in receiver.spans() if s.name == sc.SPAN_LLMTRACE_JUDGE) < \
                max(1, len(traced) // 8):
            time.sleep(0.5)
        print_quality(receiver)
        slowest = max((r for r in records if r.ttft_s is not None),
                      key=lambda r: r.e2e_s, default=None)
        if slowest is not None:
            print_waterfall(receiver, slowest.trace_id)
        total = summarize(every)
        print(f"\n{total.requests} requests, {total.errors} errors, "
              f"{total.output_tokens} tokens in {total.wall_s:.1f} s; "
              f"demo took {time.monotonic() - t0:.0f} s")
        for t in every:
            if not t.ok:
                print(f"error: {t.error}", file=sys.stderr)
        return 1 if total.errors else 0
    except Exception:
        print(f"vLLM log tail:\n{server.log_tail()}", file=sys.stderr)
        raise
    finally:
        server.stop()
        judge.stop()
        collector.stop(2.0)
        receiver.stop()
        if not args.keep:
            shutil.rmtree(args.workdir / "server" / "tmp", ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
