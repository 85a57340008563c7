"""What the LiteLLM route-decision span costs: CPU per routed request, with and without
llmtrace, in one process. Prints figures; never fails.

A ``litellm.Router`` over four deployments (no traffic leaves the process: ``select``
picks without calling), for each strategy llmtrace reads a figure from (least-busy,
latency-based). Rounds alternate uninstrumented and instrumented; each round times N
picks with the process CPU clock, which includes llmtrace's builder thread making
the spans (into an in-memory exporter). Medians over rounds, the difference per pick.

    python benchmarks/litellm_route_cost.py [--rounds 7] [--picks 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

import llmtrace  # noqa: E402
from llmtrace.config import load_config  # noqa: E402
from llmtrace.instrumentation.litellm import LiteLLMRouterInstrumentor  # noqa: E402
from llmtrace.telemetry import Telemetry  # noqa: E402


def _router(strategy: str):
    import litellm

    return litellm.Router(model_list=[
        {"model_name": "tiny", "model_info": {"id": f"d{i}"},
         "litellm_params": {"model": "openai/tiny", "api_base": f"http://10.0.0.{i}:8000/v1",
                            "api_key": "none"}} for i in range(4)], routing_strategy=strategy)


def _cpu_per_pick(router, picks: int) -> float:
    async def run() -> None:
        for _ in range(picks):
            await router.select("tiny", {})

    start = time.process_time()
    asyncio.run(run())
    llmtrace.flush()  # the builder's work for these picks counts to them
    return (time.process_time() - start) / picks * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--picks", type=int, default=2000)
    args = p.parse_args(argv)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = LiteLLMRouterInstrumentor()
    telemetry = Telemetry(load_config(metrics_enabled=False), tracer_provider=provider)
    print(f"CPU per route decision, {args.rounds} rounds x {args.picks} picks (median us):")
    for strategy in ("least-busy", "latency-based-routing"):
        router = _router(strategy)
        bare, traced, spans = [], [], 0
        for r in range(args.rounds + 1):  # round 0 warms up, uncounted
            b = _cpu_per_pick(router, args.picks)
            instrumentor.instrument(telemetry=telemetry)
            t = _cpu_per_pick(router, args.picks)
            telemetry.flush()
            instrumentor.uninstrument()
            spans += len(exporter.get_finished_spans())
            exporter.clear()
            if r:
                bare.append(b)
                traced.append(t)
        extra = [t - b for b, t in zip(bare, traced, strict=True)]
        print(f"  {strategy:<24} bare {statistics.median(bare):8.1f}  with llmtrace "
              f"{statistics.median(traced):8.1f}  difference {statistics.median(extra):7.1f} "
              f"[min {min(extra):.1f}, max {max(extra):.1f}]  "
              f"spans/pick {spans / ((args.rounds + 1) * args.picks):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
