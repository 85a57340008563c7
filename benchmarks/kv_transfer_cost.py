"""What recording KV transfers costs: llmtrace's CPU per disaggregated request, per
instance, and of it the KV-connector hooks. Prints figures; never fails.

One prefill and one decode instance of the dense test model with NixlConnector
(testbed/pd.py), ``vllm-router`` in PD mode in front, 100% sampling,
``LLMTRACE_MEASURE_OVERHEAD=1`` (every hook body and the builder timed with the
thread CPU clock, per process). Per round: N requests with prompts no prefix
cache holds (every block moves), llmtrace's CPU per request on each instance,
the ``vllm.kv.*`` hooks' share, the transfer spans' bytes per request, and the
router's own CPU per request (``/proc/<pid>/stat``). Medians over rounds.

    python benchmarks/kv_transfer_cost.py [--rounds 5] [--requests 24] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # testbed/ is not installed

from benchmarks.overhead import llmtrace_cpu_s, llmtrace_env, median_line
from llmtrace import semconv as sc
from llmtrace.instrumentation.vllm.kv_transfer import timed_call
from testbed.models import DENSE, ensure_models
from testbed.otlp_receiver import OTLPReceiver
from testbed.pd import CONSUMER, PRODUCER, nixl_config, pd_router_args
from testbed.procs import cpu_seconds
from testbed.router import Router
from testbed.stream_client import run_load
from testbed.vllm_server import ServerPool

REPO = Path(__file__).resolve().parents[1]


def _kv(hooks: dict[str, float]) -> float:
    return sum(v for k, v in hooks.items() if k.startswith("vllm.kv."))


def _bare_timer_us(n: int = 200_000) -> float:
    """What the default worker-call timer adds per call (kv_transfer._time_worker_calls):
    timed against the bare call, in this process."""
    def work() -> None:
        return None

    timed = timed_call(work, [0.0, 0])

    best = []
    for fn in (work, timed):
        start = time.process_time()
        for _ in range(n):
            fn()
        best.append(time.process_time() - start)
    return max(0.0, (best[1] - best[0]) / n * 1e6)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--concurrency", type=int, default=4)
    args = p.parse_args(argv)
    models = ensure_models(REPO / ".cache" / "models")
    scratch = Path(tempfile.mkdtemp(prefix="llmtrace-kv-cost-"))
    pool = ServerPool(scratch / "servers")
    with OTLPReceiver() as rx:
        dirs = {"prefill": scratch / "measure-prefill", "decode": scratch / "measure-decode"}
        configs = [nixl_config(models, PRODUCER, 0, llmtrace_env(
                       rx, "1", dirs["prefill"], OTEL_SERVICE_NAME="prefill",
                       LLMTRACE_METRIC_EXPORT_INTERVAL_MS="1000")),
                   nixl_config(models, CONSUMER, 1, llmtrace_env(
                       rx, "1", dirs["decode"], OTEL_SERVICE_NAME="decode",
                       LLMTRACE_METRIC_EXPORT_INTERVAL_MS="1000"))]
        router = None
        try:
            prefill, decode = pool.get_many(configs, timeout=600)
            router = Router([], scratch / "router",
                            args=pd_router_args(prefill.base_url, decode.base_url)).start()
            figures: dict[str, list[float]] = {}
            for r in range(args.rounds + 1):  # round 0 warms up (NIXL handshake), uncounted
                body = [{"messages": [{"role": "user", "content": f"{secrets.token_hex(8)} "
                                       + "explain the scheduler " * (8 + 4 * (i % 8))}],
                         "max_tokens": 32} for i in range(args.requests)]
                before = {k: llmtrace_cpu_s(d) for k, d in dirs.items()}
                router_before = cpu_seconds(router.proc.pid)
                spans_before = len(rx.spans())
                assert all(t.ok for t in run_load(router.base_url, DENSE, body,
                                                  args.concurrency))
                after = {k: llmtrace_cpu_s(d) for k, d in dirs.items()}
                router_after = cpu_seconds(router.proc.pid)
                if r == 0:
                    continue
                per = 1e6 / args.requests
                for k in dirs:
                    figures.setdefault(f"{k}: llmtrace total", []).append(
                        (after[k][0] - before[k][0]) * per)
                    figures.setdefault(f"{k}: of it vllm.kv.* hooks", []).append(
                        (_kv(after[k][2]) - _kv(before[k][2])) * per)
                figures.setdefault("vllm-router process (PD mode)", []).append(
                    (router_after - router_before) * per)
                moved = [s.attributes.get(sc.LLMTRACE_KV_TRANSFER_BYTES, 0)
                         for s in rx.spans()[spans_before:]
                         if s.name == sc.SPAN_LLMTRACE_KV_TRANSFER
                         and s.attributes.get(sc.LLMTRACE_KV_TRANSFER_DIRECTION) == "load"]
                figures.setdefault("KV bytes loaded per request (spans so far)", []).append(
                    sum(moved) / args.requests)
            time.sleep(3)  # the last metric export
            print(f"\nCPU per disaggregated request, {args.rounds} rounds x {args.requests} "
                  f"requests (32 output tokens, concurrency {args.concurrency}, 100% sampling):")
            for name, values in figures.items():
                print(median_line(name, values, "B " if name.startswith("KV bytes") else "us", 46))
            calls: dict[tuple[str, str], float] = {}
            for pt in rx.points():
                if pt.metric == sc.METRIC_LLMTRACE_KV_TRANSFER_WORKER_CALLS:
                    key = (str(pt.resource.get("service.name")),
                           str(pt.attributes.get(sc.LLMTRACE_KV_TRANSFER_OPERATION)))
                    calls[key] = max(calls.get(key, 0), pt.value or 0)
            sent = args.requests * (args.rounds + 1)
            bare = _bare_timer_us()
            print(f"\n  worker-side connector calls per request (every engine step calls them, "
                  f"empty ones too); outside benchmark mode each costs llmtrace a bare timer, "
                  f"{bare:.2f} us here:")
            for (service, op), n in sorted(calls.items()):
                print(f"    {service:<16} {op:<16} {n / sent:9.1f} calls  "
                      f"~{n / sent * bare:7.1f} us")
            hooks = {k: llmtrace_cpu_s(d)[2] for k, d in dirs.items()}
            print("\n  vllm.kv.* hooks, cumulative CPU seconds over the run (incl. warm-up):")
            for k, per_hook in hooks.items():
                for name, v in sorted(per_hook.items()):
                    if name.startswith("vllm.kv."):
                        print(f"    {k:<8} {name:<40} {v * 1e3:8.2f} ms")
        finally:
            if router is not None:
                router.stop()
            pool.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
