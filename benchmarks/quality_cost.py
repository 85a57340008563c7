"""What the quality loop costs the serving process. Prints figures; never fails.

Three servers of the tiny dense model, llmtrace at 100% request sampling and
``LLMTRACE_MEASURE_OVERHEAD=1`` (hook bodies and the builder timed with the thread
CPU clock), that differ only in the quality settings:

- ``off``: no judge, no entropy logprobs (regenerations and drift still run: they
  cost the builder a hash and a few increments per request);
- ``entropy``: llmtrace asks vLLM for top-8 logprobs on every request
  (``LLMTRACE_ENTROPY_SAMPLE_RATIO=1``; the default is 5 %);
- ``judge``: entropy as above and every request judged by a fourth, plain vLLM
  (``LLMTRACE_JUDGE_SAMPLE_RATIO=1``; the default is 5 %).

Rounds of the same load go to each server in turn; per round and arm: llmtrace's
CPU per request in vLLM's processes and the client's mean request latency (what
logprobs cost vLLM's sampler shows here, not in llmtrace's CPU). Medians over rounds.
The judge worker's own threads (HTTP calls, JSON) are not in the attributed CPU.

Separately, in this process: the builder's per-request work (entropy over 256
positions of 9 logprobs, the regeneration digest of a 1000-token prompt) and the
serving path's judge decision.

    python benchmarks/quality_cost.py [--rounds 4] [--requests 16] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import math
import random
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # testbed/ is not installed

from benchmarks.overhead import llmtrace_cpu_s, llmtrace_env, median_line
from llmtrace.quality.entropy import mean_entropy
from llmtrace.quality.judge import judge_sampled
from llmtrace.quality.regenerations import RegenerationTracker
from testbed.models import DENSE, ensure_models
from testbed.otlp_receiver import OTLPReceiver
from testbed.stream_client import run_load
from testbed.vllm_server import ServerConfig, ServerPool

REPO = Path(__file__).resolve().parents[1]
COMPACT_JSON = ("--structured-outputs-config",
                '{"backend": "xgrammar", "disable_any_whitespace": true}')


class _Lp:
    __slots__ = ("logprob",)

    def __init__(self, lp: float) -> None:
        self.logprob = lp


def micro() -> None:
    rng = random.Random(1)
    positions = []
    for _ in range(256):
        raw = [rng.random() for _ in range(9)]
        total = sum(raw) * 1.3  # the top 9 hold ~77 % of the mass
        positions.append({i: _Lp(math.log(v / total)) for i, v in enumerate(raw)})
    n = 200
    t0 = time.thread_time()
    for _ in range(n):
        mean_entropy(positions)
    entropy_us = (time.thread_time() - t0) / n * 1e6
    tracker = RegenerationTracker(600)
    prompt = [rng.randrange(32000) for _ in range(1000)]
    t0 = time.thread_time()
    for i in range(n):
        tracker.seen(f"t{i % 7}", prompt, i)
    regen_us = (time.thread_time() - t0) / n * 1e6
    ids = [rng.getrandbits(128) for _ in range(10000)]
    t0 = time.thread_time()
    for t in ids:
        judge_sampled(t, 0.05)
    decide_us = (time.thread_time() - t0) / len(ids) * 1e6
    print("In this process (thread CPU):")
    print(f"  entropy of 256 positions x 9 logprobs (builder)     {entropy_us:9.1f} us")
    print(f"  regeneration digest + lookup, 1000 tokens (builder) {regen_us:9.1f} us")
    print(f"  judge decision by trace id (serving path)           {decide_us:9.3f} us")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=4)
    args = p.parse_args(argv)
    micro()
    models = ensure_models(REPO / ".cache" / "models")
    scratch = Path(tempfile.mkdtemp(prefix="llmtrace-quality-cost-"))
    pool = ServerPool(scratch / "servers")
    with OTLPReceiver() as rx:
        try:
            judge = pool.get(ServerConfig(model_dir=models.dense, served_name=DENSE,
                                          args=COMPACT_JSON), timeout=900)
            arms = {
                "off": {"LLMTRACE_ENTROPY_SAMPLE_RATIO": "0"},
                "entropy": {"LLMTRACE_ENTROPY_SAMPLE_RATIO": "1"},
                "judge": {"LLMTRACE_ENTROPY_SAMPLE_RATIO": "1",
                          "LLMTRACE_JUDGE_ENDPOINT": f"{judge.base_url}/v1",
                          "LLMTRACE_JUDGE_MODEL": DENSE, "LLMTRACE_JUDGE_SAMPLE_RATIO": "1",
                          "LLMTRACE_JUDGE_MAX_RATE": "50", "LLMTRACE_JUDGE_TIMEOUT_S": "60"},
            }
            dirs = {arm: scratch / f"measure-{arm}" for arm in arms}
            configs = [ServerConfig(model_dir=models.dense, served_name=DENSE, env=llmtrace_env(
                rx, "1", dirs[arm], OTEL_SERVICE_NAME=f"quality-{arm}", **env))
                for arm, env in arms.items()]
            servers = dict(zip(arms, pool.get_many(configs, timeout=900), strict=True))
            figures: dict[str, list[float]] = {}
            for r in range(args.rounds + 1):  # round 0 warms up, uncounted
                body = [{"messages": [{"role": "user", "content": f"{secrets.token_hex(6)} "
                                       + "judge this answer " * (4 + 3 * (i % 6))}],
                         "max_tokens": 32} for i in range(args.requests)]
                for arm, server in servers.items():
                    before = llmtrace_cpu_s(dirs[arm])
                    timings = run_load(server.base_url, DENSE, body, args.concurrency)
                    assert all(t.ok for t in timings)
                    after = llmtrace_cpu_s(dirs[arm])
                    if r == 0:
                        continue
                    per = 1e6 / args.requests
                    figures.setdefault(f"{arm}: llmtrace CPU", []).append(
                        (after[0] - before[0]) * per)
                    figures.setdefault(f"{arm}: client latency (mean)", []).append(
                        sum(t.e2e_s for t in timings) / len(timings) * 1e6)
            print(f"\nPer request, {args.rounds} rounds x {args.requests} requests (32 output "
                  f"tokens, concurrency {args.concurrency}, 100% request sampling):")
            for name, values in figures.items():
                print(median_line(name, values, "us", 34))
            off = figures["off: client latency (mean)"]
            for arm in ("entropy", "judge"):
                ratio = [a / b for a, b in zip(figures[f"{arm}: client latency (mean)"], off,
                                               strict=True)]
                print(f"  {arm} / off client latency: median ratio "
                      f"{statistics.median(ratio):.3f} (per-round ratios)")
        finally:
            pool.stop_all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
