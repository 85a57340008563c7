"""llmtrace demo on CPU: a real vLLM server, streaming load, client-measured latency.

Generates the tiny models (cached), starts ``vllm serve`` on the dense model,
drives streaming chat requests at a few concurrency levels and prints what the
client saw. Later steps of the project add traces, derived metrics, cost and
dashboards to this same run.

    python examples/demo/run_demo.py [--requests 50] [--levels 1,4,8]
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import time
from pathlib import Path

from tqdm import tqdm

from llmtrace.testing.models import DENSE, ensure_models
from llmtrace.testing.stream_client import LoadSummary, StreamTiming, run_load, summarize
from llmtrace.testing.vllm_server import ServerConfig, VLLMServer

REPO = Path(__file__).resolve().parents[2]
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
                         "max_tokens": rng.choice([16, 32, 48, 64])})
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--levels", default="1,4,8", help="concurrency levels")
    parser.add_argument("--workdir", type=Path, default=REPO / ".cache" / "demo")
    parser.add_argument("--keep", action="store_true", help="keep the server's scratch files")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]

    t0 = time.monotonic()
    models = ensure_models(REPO / ".cache" / "models", verbose=True)
    print(f"models ready in {time.monotonic() - t0:.1f} s: {models.dense}")

    server = VLLMServer(ServerConfig(model_dir=models.dense, served_name=DENSE),
                        workdir=args.workdir / "server")
    print("starting vllm serve (CPU, --enforce-eager) ...", flush=True)
    server.start()
    try:
        server.wait_ready(timeout=300)
        print(f"vLLM ready in {server.ready_s:.1f} s at {server.base_url}")
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
        if not args.keep:
            shutil.rmtree(args.workdir / "server" / "tmp", ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
