"""llmtrace overhead against uninstrumented vLLM, in the same run. Prints figures; never fails.

Two figures, because wall-clock throughput on this 2-core machine is too noisy
for 1% claims (the same bare server against itself varies 0.6-1.6x per pair):

1. Attributed cost (primary). Servers run with ``LLMTRACE_MEASURE_OVERHEAD=1``:
   every hook body and every export is timed with the thread's CPU clock and
   written to a file per process. That CPU, per request and per 1,000 output
   tokens, is compared with the CPU all of the server's processes used for the
   same work (from /proc). Run at default sampling and at 100%.
2. End-to-end A/B (sanity). Servers kept up side by side, loaded one at a time
   in interleaved rounds: bare vLLM (twice, for a null control), vLLM's own
   ``--otlp-traces-endpoint`` tracing, llmtrace at default sampling, llmtrace at
   100%. Medians of per-round ratios against bare, with bootstrap 95% intervals,
   for tokens/s and ITL p50/p99; and the API server's CPU per request (every
   thread, from schedstat: it is event-driven, so its CPU follows its work) with
   the per-round difference from bare: vLLM's own tracing against llmtrace's.

    python benchmarks/overhead.py [--pairs 30] [--concurrency 16] [--skip-ab]
"""

from __future__ import annotations

import argparse
import json
import os
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
TICK = os.sysconf("SC_CLK_TCK")


def group_cpu_s(pgid: int) -> float:
    """utime+stime of every live process in a process group (the whole vLLM server)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # field 5 (pgrp) after pid and comm
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


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


def llmtrace_cpu_s(directory: Path) -> tuple[float, dict[str, float], dict[str, int]]:
    per_hook: dict[str, float] = {}
    dropped: dict[str, int] = {}
    for f in directory.glob("llmtrace-*.json"):
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for k, v in data["cpu_s"].items():
            per_hook[k] = per_hook.get(k, 0.0) + v
        for k, v in data["dropped"].items():
            dropped[k] = dropped.get(k, 0) + v
    return sum(per_hook.values()), per_hook, dropped


def workload(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    text = "Explain the scheduler "
    return [{"messages": [{"role": "user", "content": text * rng.randint(2, 20)}],
             "max_tokens": 64} for _ in range(n)]


def llmtrace_env(rx: OTLPReceiver, ratio: str | None, measure_dir: Path | None) -> tuple:
    env = {"LLMTRACE_ENABLED": "1", "LLMTRACE_OTLP_ENDPOINT": rx.grpc_endpoint}
    if ratio is not None:
        env["LLMTRACE_SAMPLE_RATIO"] = ratio
    if measure_dir is not None:
        env["LLMTRACE_MEASURE_OVERHEAD"] = "1"
        env["LLMTRACE_OVERHEAD_DIR"] = str(measure_dir)
    return tuple(sorted(env.items()))


def attributed_cost(pool: ServerPool, models, rx: OTLPReceiver, scratch: Path, n: int,
                    concurrency: int) -> None:
    print(f"\n== attributed cost: {n} requests x 64 tokens, {concurrency} concurrent streams ==")
    arms = {}
    for label, ratio in (("default sampling (0.1)", None), ("100% sampling", "1")):
        d = scratch / f"measure-{len(arms)}"
        cfg = ServerConfig(models.dense, DENSE, env=llmtrace_env(rx, ratio, d))
        arms[label] = (cfg, d)
    servers = pool.get_many([cfg for cfg, _ in arms.values()])
    for (label, (_, d)), server in zip(arms.items(), servers, strict=True):
        run_load(server.base_url, DENSE, workload(32, 1), concurrency)  # warm-up
        time.sleep(1.5)
        lt0, _, _ = llmtrace_cpu_s(d)
        cpu0 = group_cpu_s(server.proc.pid)
        timings = run_load(server.base_url, DENSE, workload(n, 2), concurrency)
        time.sleep(2.5)  # let the exporters drain and the reporters write
        cpu = group_cpu_s(server.proc.pid) - cpu0
        lt1, per_hook, dropped = llmtrace_cpu_s(d)
        lt = lt1 - lt0
        s = summarize(timings)
        print(f"{label:>24}: llmtrace {lt * 1e3:8.1f} ms CPU / server {cpu:7.2f} s CPU "
              f"= {100 * lt / cpu:5.2f}% | {lt / n * 1e6:7.1f} us per request | "
              f"{lt / s.output_tokens * 1000 * 1e3:6.2f} ms per 1,000 output tokens | "
              f"{s.tokens_per_s:6.1f} tok/s, errors {s.errors}, dropped {dropped or 0}")
        top = sorted(per_hook.items(), key=lambda kv: -kv[1])
        print(f"{'':>24}  by hook (cumulative s): "
              + ", ".join(f"{k}={v:.3f}" for k, v in top))
    for cfg, _ in arms.values():
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
    p.add_argument("--requests", type=int, default=160, help="attributed-cost requests per arm")
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
                attributed_cost(pool, models, rx, scratch, args.requests, args.concurrency)
            if not args.skip_ab:
                ab(pool, models, rx, args.pairs, args.per_round, args.concurrency)
        finally:
            pool.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
