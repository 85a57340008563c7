"""What recording the routing costs: llmtrace's CPU per data-parallel request, and
vllm-router's own CPU per routed request. Prints figures; never fails.

Two servers of the dense test model, 100% sampling, ``LLMTRACE_MEASURE_OVERHEAD=1``
(every hook body and the builder timed with the thread CPU clock, per process):
one with ``--data-parallel-size 2`` (two API servers, two engine cores), and one
with DP=1 behind ``vllm-router`` (round robin over that one replica, so all the
router's per-request work is proxying and routing). Rounds of the same workload
alternate between the DP=2 server and the router. Per round and arm: llmtrace's
CPU per request (all hooks, the builder), of it the rank-choice hook
(``vllm.dp.choose_rank``), and the router process's CPU per request
(``/proc/<pid>/stat``). Medians over rounds, with min and max.

    python benchmarks/routing_cost.py [--rounds 6] [--requests 32] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # testbed/ is not installed

from benchmarks.overhead import llmtrace_cpu_s, llmtrace_env, median_line, workload
from testbed.models import DENSE, ensure_models
from testbed.otlp_receiver import OTLPReceiver
from testbed.procs import cpu_seconds
from testbed.router import Router
from testbed.stream_client import run_load
from testbed.vllm_server import ServerConfig, ServerPool

REPO = Path(__file__).resolve().parents[1]
CHOICE_HOOK = "vllm.dp.choose_rank"



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    args = p.parse_args(argv)
    models = ensure_models(REPO / ".cache" / "models")
    scratch = Path(tempfile.mkdtemp(prefix="llmtrace-routing-"))
    pool = ServerPool(scratch / "servers")
    with OTLPReceiver() as rx:
        dp_dir, one_dir = scratch / "measure-dp2", scratch / "measure-dp1"
        dp2 = ServerConfig(models.dense, DENSE, ("--data-parallel-size", "2"),
                           env=llmtrace_env(rx, "1", dp_dir), max_model_len=512)
        dp1 = ServerConfig(models.dense, DENSE, env=llmtrace_env(rx, "1", one_dir),
                           max_model_len=512)
        router = None
        try:
            dp_server, one_server = pool.get_many([dp2, dp1], timeout=600)
            router = Router([one_server.base_url], scratch / "router").start()
            hooks: dict[str, dict[str, list[float]]] = {"dp2": {}, "dp1": {}}
            figures: dict[str, list[float]] = {"dp2 llmtrace total": [],
                                               f"dp2 {CHOICE_HOOK}": [],
                                               "dp1 llmtrace total (behind router)": [],
                                               "vllm-router process": []}
            for r in range(args.rounds + 1):  # round 0 warms both up, uncounted
                body = workload(args.requests, seed=r)
                before = llmtrace_cpu_s(dp_dir)
                assert all(t.ok for t in run_load(dp_server.base_url, DENSE, body,
                                                  args.concurrency))
                after = llmtrace_cpu_s(dp_dir)
                one_before, router_before = llmtrace_cpu_s(one_dir), cpu_seconds(router.proc.pid)
                assert all(t.ok for t in run_load(router.base_url, DENSE, body,
                                                  args.concurrency))
                one_after, router_after = llmtrace_cpu_s(one_dir), cpu_seconds(router.proc.pid)
                if r == 0:
                    continue
                per = 1e6 / args.requests
                figures["dp2 llmtrace total"].append((after[0] - before[0]) * per)
                figures[f"dp2 {CHOICE_HOOK}"].append(
                    (after[2].get(CHOICE_HOOK, 0.0) - before[2].get(CHOICE_HOOK, 0.0)) * per)
                figures["dp1 llmtrace total (behind router)"].append(
                    (one_after[0] - one_before[0]) * per)
                figures["vllm-router process"].append((router_after - router_before) * per)
                for arm, (b, a) in (("dp2", (before, after)), ("dp1", (one_before, one_after))):
                    for key in set(a[2]) | set(b[2]):
                        hooks[arm].setdefault(key, []).append(
                            (a[2].get(key, 0.0) - b[2].get(key, 0.0)) * per)
            print(f"\nCPU per request, {args.rounds} rounds x {args.requests} requests "
                  f"(64 output tokens, concurrency {args.concurrency}, 100% sampling):")
            for name, values in figures.items():
                print(median_line(name, values))
            print("\n  per hook (median us per request)      dp2       dp1")
            for key in sorted(set(hooks["dp2"]) | set(hooks["dp1"])):
                cells = [f"{statistics.median(hooks[arm][key]):8.1f}" if key in hooks[arm]
                         else "       -" for arm in ("dp2", "dp1")]
                print(f"  {key:<36} {cells[0]}  {cells[1]}")
            share = [c / t for c, t in zip(figures[f"dp2 {CHOICE_HOOK}"],
                                           figures["dp2 llmtrace total"], strict=True) if t]
            print(f"  rank-choice hook share of llmtrace's CPU: "
                  f"{100 * statistics.median(share):.1f}%")
        finally:
            if router is not None:
                router.stop()
            pool.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
