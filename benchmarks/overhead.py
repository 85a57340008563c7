"""llmtrace overhead against uninstrumented vLLM, in the same run. Prints figures; never fails.

Two figures, because wall-clock throughput on this 2-core machine is too noisy
for 1% claims (the same bare server against itself varies 0.6-1.6x per pair):

1. Attributed cost (primary). Servers run with ``LLMTRACE_MEASURE_OVERHEAD=1``:
   every hook body, the builder and every export is timed with the thread's CPU
   clock and written to a file per process; a span export process
   (``LLMTRACE_SPAN_EXPORT=process``) reports its whole CPU. Four arms (default
   sampling and 100%, spans exported in-process or through span export
   processes), loaded in interleaved, shuffled rounds: per arm, llmtrace's CPU
   per request in vLLM's processes and in its span export processes (medians,
   bootstrap 95% intervals) and spans received per request.
2. End-to-end A/B (sanity). Servers kept up side by side, loaded one at a time
   in interleaved rounds: bare vLLM (twice, for a null control), vLLM's own
   ``--otlp-traces-endpoint`` tracing, llmtrace at default sampling, llmtrace at
   100%. Medians of per-round ratios against bare, with bootstrap 95% intervals,
   for tokens/s and ITL p50/p99; and the API server's CPU per request (every
   thread, from schedstat: it is event-driven, so its CPU follows its work) with
   the per-round difference from bare: vLLM's own tracing against llmtrace's.

    python benchmarks/overhead.py [--rounds 10] [--requests 32] [--pairs 30]
        [--concurrency 16] [--skip-ab] [--skip-attributed]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # testbed/ is not installed

from testbed.models import DENSE, ensure_models
from testbed.otlp_receiver import OTLPReceiver
from testbed.stream_client import percentile, run_load, summarize
from testbed.vllm_server import ServerConfig, ServerPool, VLLMServer

REPO = Path(__file__).resolve().parents[1]


def process_cpu_s(pid: int) -> float:
    """CPU time of every thread of one process, in ns resolution (schedstat), as seconds.

    For the API server, which is event-driven: its CPU follows the work it does,
    unlike the engine core's, which busy-polls and follows wall time.
    """
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


def llmtrace_cpu_s(directory: Path) -> tuple[float, float, dict[str, float], dict[str, int]]:
    """llmtrace's CPU seconds so far: (in vLLM's processes, in span export processes,
    per hook, drops by reason). A span export process is all llmtrace's: its whole CPU."""
    per_hook: dict[str, float] = {}
    dropped: dict[str, int] = {}
    in_vllm = exporter = 0.0
    for f in directory.glob("llmtrace-*.json"):
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for k, v in data["cpu_s"].items():
            per_hook[k] = per_hook.get(k, 0.0) + v
        total = sum(data["cpu_s"].values())
        if data.get("role") == "exporter_process":
            exporter += total
        else:
            in_vllm += total
            for k, v in data["dropped"].items():
                dropped[k] = dropped.get(k, 0) + v
    return in_vllm, exporter, per_hook, dropped


def median_line(name: str, values: list[float], unit: str = "us", width: int = 44) -> str:
    """One printed figure: the median over rounds, with min and max."""
    return (f"  {name:<{width}} median {statistics.median(values):9.1f} {unit}  "
            f"[min {min(values):.1f}, max {max(values):.1f}]")


def workload(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    text = "Explain the scheduler "
    return [{"messages": [{"role": "user", "content": text * rng.randint(2, 20)}],
             "max_tokens": 64} for _ in range(n)]


def llmtrace_env(rx: OTLPReceiver, ratio: str | None, measure_dir: Path | None,
                 **extra: str) -> tuple:
    env = {"LLMTRACE_ENABLED": "1", "LLMTRACE_OTLP_ENDPOINT": rx.grpc_endpoint, **extra}
    if ratio is not None:
        env["LLMTRACE_SAMPLE_RATIO"] = ratio
    if measure_dir is not None:
        env["LLMTRACE_MEASURE_OVERHEAD"] = "1"
        env["LLMTRACE_OVERHEAD_DIR"] = str(measure_dir)
    return tuple(sorted(env.items()))


def attributed_cost(pool: ServerPool, models, rx: OTLPReceiver, scratch: Path, rounds: int,
                    per_round: int, concurrency: int) -> None:
    """llmtrace's own CPU per request, per arm, from interleaved rounds.

    Arms: default sampling and 100%, each with spans exported in-process (``thread``)
    and through span export processes (``process``). Each round loads every server
    once, in shuffled order; per round and arm, llmtrace's CPU in vLLM's processes
    (hooks, builder, exports) and in its span export processes, per request. Medians
    over rounds with bootstrap 95% intervals; spans received per request.
    """
    print(f"\n== attributed cost: {rounds} interleaved rounds x {per_round} requests x 64 "
          f"tokens per arm, {concurrency} concurrent streams ==")
    arms: dict[str, tuple[ServerConfig, Path, str]] = {}
    for ratio_label, ratio in (("default (0.1)", None), ("100%", "1")):
        for mode in ("thread", "process"):
            n = len(arms)
            service = f"overhead-arm-{n}"
            env = llmtrace_env(rx, ratio, scratch / f"measure-{n}", LLMTRACE_SPAN_EXPORT=mode,
                               OTEL_SERVICE_NAME=service,
                               # exports within a round's pause, so each round pays its own
                               OTEL_BSP_SCHEDULE_DELAY="1000")
            arms[f"{ratio_label}, {mode}"] = (ServerConfig(models.dense, DENSE, env=env),
                                              scratch / f"measure-{n}", service)
    servers = dict(zip(arms, pool.get_many([cfg for cfg, _, _ in arms.values()]),
                       strict=True))
    for server in servers.values():
        run_load(server.base_url, DENSE, workload(32, 1), concurrency)  # warm-up
    time.sleep(2.0)

    def spans_of(service: str) -> int:
        return sum(1 for sp in rx.spans() if sp.resource.get("service.name") == service)

    in_vllm: dict[str, list[float]] = {k: [] for k in arms}
    exporter: dict[str, list[float]] = {k: [] for k in arms}
    spans: dict[str, list[float]] = {k: [] for k in arms}
    errors: dict[str, int] = dict.fromkeys(arms, 0)
    for rnd in range(rounds):
        order = list(arms)
        random.Random(100 + rnd).shuffle(order)
        for label in order:
            _, d, service = arms[label]
            v0, e0, _, _ = llmtrace_cpu_s(d)
            s0 = spans_of(service)
            timings = run_load(servers[label].base_url, DENSE, workload(per_round, rnd),
                               concurrency)
            time.sleep(1.5)  # the builder's batch, the span export, the reporters' write
            v1, e1, _, _ = llmtrace_cpu_s(d)
            in_vllm[label].append((v1 - v0) / per_round * 1e6)
            exporter[label].append((e1 - e0) / per_round * 1e6)
            spans[label].append((spans_of(service) - s0) / per_round)
            errors[label] += summarize(timings).errors
        print(f"round {rnd + 1}/{rounds} done", file=sys.stderr)
    print(f"{'arm':>24} {'in vLLM processes, us/req':>30} {'span export process':>28} "
          f"{'total':>8} {'spans/req':>9}")
    for label in arms:
        cells = []
        for values in (in_vllm[label], exporter[label]):
            lo, hi = bootstrap_ci(values)
            cells.append(f"{statistics.median(values):8.1f} [{lo:7.1f}, {hi:7.1f}]")
        total = statistics.median(v + e for v, e in zip(in_vllm[label], exporter[label],
                                                          strict=True))
        print(f"{label:>24} {cells[0]:>30} {cells[1]:>28} {total:8.1f} "
              f"{statistics.median(spans[label]):9.2f}")
    for label, (_, d, _) in arms.items():
        _, _, per_hook, dropped = llmtrace_cpu_s(d)
        top = sorted(per_hook.items(), key=lambda kv: -kv[1])[:6]
        print(f"{label:>24}: cumulative s " + ", ".join(f"{k}={v:.3f}" for k, v in top)
              + f" | errors {errors[label]} | dropped {dropped or 0}")
    for cfg, _, _ in arms.values():
        pool.stop(cfg)


def bootstrap_ci(values: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n) - 1]


def ab(pool: ServerPool, models, rx: OTLPReceiver, pairs: int, per_round: int,
       concurrency: int) -> None:
    print(f"\n== end-to-end A/B: {pairs} interleaved rounds, {per_round} requests x 64 tokens "
          f"per server per round, {concurrency} concurrent ==")
    arms = {
        "bare": ServerConfig(models.dense, DENSE),
        "bare (null control)": ServerConfig(models.dense, DENSE, args=("--seed", "1")),
        "vLLM --otlp-traces-endpoint": ServerConfig(
            models.dense, DENSE, args=("--otlp-traces-endpoint", rx.grpc_endpoint)),
        "llmtrace default": ServerConfig(models.dense, DENSE,
                                         env=llmtrace_env(rx, None, None)),
        "llmtrace 100%": ServerConfig(models.dense, DENSE, env=llmtrace_env(rx, "1", None)),
    }
    servers: dict[str, VLLMServer] = dict(zip(arms, pool.get_many(list(arms.values())),
                                              strict=True))
    for server in servers.values():
        run_load(server.base_url, DENSE, workload(16, 9), concurrency)  # warm-up
    rows: dict[str, list[tuple[float, float, float]]] = {k: [] for k in arms}
    api_cpu: dict[str, list[float]] = {k: [] for k in arms}  # API server, s per request
    for rnd in range(pairs):
        order = list(arms)
        random.Random(rnd).shuffle(order)
        for name in order:
            pid = servers[name].proc.pid
            cpu0 = process_cpu_s(pid)
            timings = run_load(servers[name].base_url, DENSE, workload(per_round, rnd),
                               concurrency)
            time.sleep(0.3)  # the builder's batch and the span export of this round
            api_cpu[name].append((process_cpu_s(pid) - cpu0) / per_round)
            s = summarize(timings)
            itls = [g for t in timings for g in t.itl_s]
            rows[name].append((s.tokens_per_s, percentile(itls, 50), percentile(itls, 99)))
        print(f"round {rnd + 1}/{pairs} done", file=sys.stderr)
    print(f"{'arm':>28} {'tok/s':>9} {'ratio tok/s [95% CI]':>26} "
          f"{'ratio ITL p50 [CI]':>24} {'ratio ITL p99 [CI]':>24}")
    base = rows["bare"]
    for name, vals in rows.items():
        cells = []
        for i in range(3):
            ratios = [v[i] / b[i] for v, b in zip(vals, base, strict=True)]
            lo, hi = bootstrap_ci(ratios)
            cells.append(f"{statistics.median(ratios):6.3f} [{lo:5.3f}, {hi:5.3f}]")
        tps = statistics.median(v[0] for v in vals)
        print(f"{name:>28} {tps:9.1f} {cells[0]:>26} {cells[1]:>24} {cells[2]:>24}")
    print("\nAPI-server process CPU per request (all its threads, schedstat), against bare:")
    for name, vals in api_cpu.items():
        diffs = [(v - b) * 1e6 for v, b in zip(vals, api_cpu["bare"], strict=True)]
        lo, hi = bootstrap_ci(diffs)
        print(f"{name:>28} {statistics.median(vals) * 1e6:9.1f} us | "
              f"{statistics.median(diffs):+8.1f} us [{lo:+8.1f}, {hi:+8.1f}] over bare")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10, help="attributed-cost rounds")
    p.add_argument("--requests", type=int, default=32,
                   help="attributed-cost requests per arm per round")
    p.add_argument("--pairs", type=int, default=30)
    p.add_argument("--per-round", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--skip-ab", action="store_true")
    p.add_argument("--skip-attributed", action="store_true")
    args = p.parse_args(argv)
    models = ensure_models(REPO / ".cache" / "models")
    scratch = Path(tempfile.mkdtemp(prefix="llmtrace-bench-"))
    pool = ServerPool(scratch / "servers")
    with OTLPReceiver() as rx:
        try:
            if not args.skip_attributed:
                attributed_cost(pool, models, rx, scratch, args.rounds, args.requests,
                                args.concurrency)
            if not args.skip_ab:
                ab(pool, models, rx, args.pairs, args.per_round, args.concurrency)
        finally:
            pool.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
