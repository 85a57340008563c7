"""Derivation pipeline throughput: spans/s per core from OTLP bytes to records.

Beside a parse-only baseline in the same run (``ParseFromString`` alone). The
workload is realistic llmtrace traffic (:mod:`testbed.synthetic`): per
request a root span, a decode span, four decode chunks and, from the engine
core, a usage span plus queue, prefill and two prefill-chunk spans that the
derivation skips after a name lookup.

    python benchmarks/collector_throughput.py [--requests 2000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # testbed/ is not installed

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from llmtrace.pipeline import TraceAssembler, spans_from_request
from llmtrace.pipeline.metrics import DerivedMetrics
from llmtrace.pricing import PriceTable
from testbed.synthetic import make_payload

REPO = Path(__file__).resolve().parents[1]


def best_of(repeat: int, fn) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    payload, n_spans = make_payload(args.requests)

    def parse_only() -> None:
        ExportTraceServiceRequest().ParseFromString(payload)

    def derive() -> None:
        req = ExportTraceServiceRequest()
        req.ParseFromString(payload)
        records = []
        TraceAssembler(records.append).add(spans_from_request(req))
        assert len(records) == args.requests

    metrics = DerivedMetrics(prices=PriceTable.load(REPO / "examples" / "prices.yaml"))

    def derive_and_count() -> None:
        req = ExportTraceServiceRequest()
        req.ParseFromString(payload)
        TraceAssembler(metrics.observe, on_usage=metrics.observe_usage).add(
            spans_from_request(req))

    t_parse = best_of(args.repeat, parse_only)
    t_derive = best_of(args.repeat, derive)
    t_metrics = best_of(args.repeat, derive_and_count)
    print(f"{n_spans} spans ({args.requests} requests, {len(payload) / 1e6:.1f} MB OTLP)")
    print(f"parse only:                  {n_spans / t_parse:>10,.0f} spans/s per core")
    print(f"parse + view + assemble +    {n_spans / t_derive:>10,.0f} spans/s per core "
          f"({t_derive / t_parse:.1f}x the parse time)")
    print(f"  derive (records)           {args.requests / t_derive:>10,.0f} requests/s per core")
    print(f"... + Prometheus metrics     {n_spans / t_metrics:>10,.0f} spans/s per core "
          f"({t_metrics / t_parse:.1f}x the parse time; "
          f"{args.requests / t_metrics:,.0f} requests/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
