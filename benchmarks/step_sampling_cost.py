"""What sampled engine steps and MoE expert counts cost. Prints figures; never fails.

Three servers of the tiny Qwen3-MoE (8 experts, top-2, ``--enforce-eager``), llmtrace
at 100% request sampling and ``LLMTRACE_MEASURE_OVERHEAD=1`` (each hook body and the
builder timed with the thread CPU clock, per process, engine core and worker), that
differ only in ``LLMTRACE_STEP_SAMPLE_EVERY``: 0 (no step spans, routers untouched),
128 (the default) and 1 (every step: the worst case). Rounds of the same load go
to each server in turn; per round and arm: llmtrace's CPU per request in vLLM's
processes and, of it, the worker hooks (``vllm.worker.*``) and the scheduler hooks,
and the client's mean request latency (the serving path's view). Medians over rounds.

Separately, in this process: the capture callback's cost inside a forward (one
tensor copy per MoE layer per step) and a sampled step's read (per-layer expert
histograms from the buffer), for batch sizes a CPU and a GPU server see.

    python benchmarks/step_sampling_cost.py [--rounds 4] [--requests 16] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import functools
import secrets
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # testbed/ is not installed

from benchmarks.overhead import llmtrace_cpu_s, llmtrace_env, median_line
from llmtrace.instrumentation.vllm.worker import ExpertCounts
from testbed.models import MOE, ensure_models
from testbed.otlp_receiver import OTLPReceiver
from testbed.stream_client import run_load
from testbed.vllm_server import ServerConfig, ServerPool

REPO = Path(__file__).resolve().parents[1]
ARMS = ("0", "128", "1")


def _hooks(per_hook: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in per_hook.items() if k.startswith(prefix))


def capture_micro() -> None:
    import torch

    print("\nCapture callback and sampled read, in this process (CPU tensors, 48 layers, "
          "128 experts, top-8):")
    for tokens in (1, 64, 2048):
        counts = ExpertCounts(list(range(48)), 128, 8, 8192, "cpu")
        ids = torch.randint(0, 128, (tokens, 8), dtype=torch.int32)
        captures = [functools.partial(counts.capture, s) for s in range(48)]
        n = 200
        t0 = time.perf_counter()
        for _ in range(n):
            for c in captures:
                c(ids)
        per_step = (time.perf_counter() - t0) / n * 1e6
        t0 = time.perf_counter()
        for _ in range(20):
            counts.read(tokens)
        read = (time.perf_counter() - t0) / 20 * 1e6
        print(f"  {tokens:5d} tokens/step: capture {per_step:8.1f} us per step (all layers), "
              f"read {read:8.1f} us per sampled step")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=4)
    args = p.parse_args(argv)
    capture_micro()
    models = ensure_models(REPO / ".cache" / "models")
    scratch = Path(tempfile.mkdtemp(prefix="llmtrace-step-cost-"))
    pool = ServerPool(scratch / "servers")
    with OTLPReceiver() as rx:
        dirs = {arm: scratch / f"measure-{arm}" for arm in ARMS}
        configs = [ServerConfig(model_dir=models.moe, served_name=MOE, env=llmtrace_env(
            rx, "1", dirs[arm], OTEL_SERVICE_NAME=f"steps-{arm}",
            LLMTRACE_STEP_SAMPLE_EVERY=arm)) for arm in ARMS]
        try:
            servers = dict(zip(ARMS, pool.get_many(configs, timeout=900), strict=True))
            figures: dict[str, list[float]] = {}
            for r in range(args.rounds + 1):  # round 0 warms up, uncounted
                body = [{"messages": [{"role": "user", "content": f"{secrets.token_hex(6)} "
                                       + "route the experts " * (4 + 3 * (i % 6))}],
                         "max_tokens": 32} for i in range(args.requests)]
                for arm, server in servers.items():
                    before = llmtrace_cpu_s(dirs[arm])
                    timings = run_load(server.base_url, MOE, body, args.concurrency)
                    assert all(t.ok for t in timings)
                    after = llmtrace_cpu_s(dirs[arm])
                    if r == 0:
                        continue
                    per = 1e6 / args.requests
                    label = f"every {arm}" if arm != "0" else "steps off"
                    figures.setdefault(f"{label}: llmtrace total", []).append(
                        (after[0] - before[0]) * per)
                    for prefix in ("vllm.worker.", "vllm.scheduler."):
                        figures.setdefault(f"{label}: of it {prefix}* hooks", []).append(
                            (_hooks(after[2], prefix) - _hooks(before[2], prefix)) * per)
                    figures.setdefault(f"{label}: client latency (mean)", []).append(
                        sum(t.e2e_s for t in timings) / len(timings) * 1e6)
            print(f"\nPer request, {args.rounds} rounds x {args.requests} requests (32 output "
                  f"tokens, concurrency {args.concurrency}, 100% request sampling):")
            for name, values in figures.items():
                print(median_line(name, values, "us", 46))
        finally:
            pool.stop_all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
