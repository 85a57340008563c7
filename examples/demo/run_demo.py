"""llmtrace demo: the full serving stack on one CPU machine, and what its dashboards show.

Starts (every part a real process, see ``stack.py``): two ``vllm serve`` replicas
of a tiny random-weight model with llmtrace switched on by environment only,
``vllm-router`` in front, the ``llmtrace collector`` receiving their spans and
forwarding them to a trace store, and Debian's Prometheus scraping all of it with
the SLO rules loaded. Drives streaming load from three tenants through the
router, then prints the L1 figures by sending the committed dashboards' own
PromQL to Prometheus, side by side with what the client measured, and the
per-tenant cost table from the L3 panels; writes an HTML report (L1 and L3
panels as charts, span waterfalls of the slowest requests) and a JSON summary.
Stops everything it started, also on failure or Ctrl-C.

    python examples/demo/run_demo.py [--requests 120] [--levels 2,4,8] [--judge]

Exit status 0 when every compared figure matches the client, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # testbed/ is not installed

from tqdm import tqdm

from examples.demo import figures as figs
from examples.demo import report
from examples.demo.load import TENANTS, make_requests, run_in_child, tenant, trace_id, warm_up
from examples.demo.stack import PRICES, SCRAPE_S, Stack, start_stack
from llmtrace import semconv as sc
from llmtrace.pricing import PriceTable
from testbed.models import DENSE, ensure_models
from testbed.stream_client import StreamTiming, summarize

REPO = Path(__file__).resolve().parents[2]
def print_figures(rows: list[figs.Figure]) -> None:
    print("\nL1 figures: the dashboards' PromQL on Prometheus, beside the client "
          "(through the router)")
    print(f"{'figure':<22} {'Prometheus':>12} {'client':>12}  {'client bucket':<18} match")
    for f in rows:
        bucket = (f"({report.fmt(f.bucket[0], 's')}, "
                  f"{report.fmt(f.bucket[1], 's') if f.bucket[1] != float('inf') else '+Inf'}]"
                  if f.bucket else "")
        match = "shown" if f.match is None else ("yes" if f.match else "NO")
        print(f"{f.name:<22} {report.fmt(f.dashboard, f.unit):>12} "
              f"{report.fmt(f.client, f.unit):>12}  {bucket:<18} {match}")


def print_costs(rows: list[figs.TenantCost], window_s: float) -> None:
    print(f"\ncost per tenant over the {window_s:.0f} s window (L3 panels; examples/prices.yaml, "
          "illustrative prices)")
    header = (f"{'tenant':<8} {'reqs':>4} {'tok in':>7} {'tok out':>7} {'USD price':>11} "
              f"{'USD client':>11} {'USD/1K tok':>11} {'USD acc-time':>12} {'acc-s/req':>9}")
    print(header)
    print("-" * len(header))
    for c in rows:
        print(f"{c.tenant:<8} {c.requests:>4} {c.prompt_tokens:>7} {c.output_tokens:>7} "
              f"{report.fmt(c.usd_price_table, 'usd'):>11} {report.fmt(c.usd_client, 'usd'):>11} "
              f"{report.fmt(c.usd_per_1k_tokens, 'usd'):>11} "
              f"{report.fmt(c.usd_batch_share, 'usd'):>12} "
              f"{report.fmt(c.accelerator_s_per_request, ''):>9}")


def print_quality(stack: Stack) -> None:
    """The judge's verdicts, as the trace store received them (``--judge``)."""
    judges = [s for s in stack.traces.spans() if s.name == sc.SPAN_LLMTRACE_JUDGE]
    failed = sum(1 for j in judges if sc.ERROR_TYPE in j.attributes)
    scores = [e.attributes[sc.GEN_AI_EVALUATION_SCORE_VALUE] for j in judges for e in j.events
              if e.name == sc.EVENT_GEN_AI_EVALUATION_RESULT
              and e.attributes.get(sc.GEN_AI_EVALUATION_NAME) == "composite"]
    mean = f"{sum(scores) / len(scores):.2f}" if scores else "-"
    print(f"\nquality: {len(judges)} requests judged ({failed} judge calls failed), composite "
          f"score mean {mean} (random weights: the scores are noise)")


def slowest_traces(stack: Stack, requests: list[dict], timings: list[StreamTiming],
                   n: int = 3) -> list[tuple[str, str, list]]:
    by_trace = stack.traces.traces()
    ranked = sorted(zip(requests, timings, strict=True), key=lambda rt: rt[1].e2e_s,
                    reverse=True)
    out = []
    for request, timing in ranked:
        spans = by_trace.get(trace_id(request))
        if spans and timing.ok:
            label = (f"{tenant(request)}: client E2E "
                     f"{timing.e2e_s * 1e3:.0f} ms, TTFT {timing.ttft_s * 1e3:.0f} ms, "
                     f"{timing.tokens} tokens")
            out.append((trace_id(request), label, spans))
        if len(out) == n:
            break
    return out


def wait_for_traces(stack: Stack, ids: set[str], timeout: float = 30.0) -> int:
    """The request spans leave vLLM on the exporter's next batch, then the collector's."""
    def arrived(receiver) -> bool:
        return ids <= {s.trace_id for s in receiver.spans() if s.name == sc.SPAN_LLMTRACE_REQUEST}
    stack.traces.wait_for(arrived, timeout)
    got = {s.trace_id for s in stack.traces.spans() if s.name == sc.SPAN_LLMTRACE_REQUEST}
    return len(ids & got)


def write_dashboards() -> None:
    """Regenerate the Grafana dashboards and SLO rules (deterministic: same bytes as committed)."""
    from llmtrace.dashboards import generate, slo

    generate.main([])
    slo.main([])


def _terminate(signum, _frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through the stack's clean-up


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=120)
    # beyond 4 concurrent streams two replicas saturate a 2-core machine, and the
    # router's hop (which no server-side TTFT contains) grows to tens of milliseconds
    parser.add_argument("--levels", default="1,2,4", help="concurrency levels, in turn")
    parser.add_argument("--workdir", type=Path, default=REPO / ".cache" / "demo")
    parser.add_argument("--report", type=Path, default=None,
                        help="HTML report (default WORKDIR/report.html)")
    parser.add_argument("--summary", type=Path, default=None,
                        help="JSON summary (default WORKDIR/summary.json)")
    parser.add_argument("--judge", action="store_true",
                        help="a third vLLM judges a quarter of the requests (slower)")
    parser.add_argument("--keep", action="store_true", help="keep the processes' scratch files")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    report_path = args.report or args.workdir / "report.html"
    summary_path = args.summary or args.workdir / "summary.json"
    signal.signal(signal.SIGTERM, _terminate)

    t0 = time.monotonic()
    write_dashboards()
    models = ensure_models(REPO / ".cache" / "models", verbose=True)
    shutil.rmtree(args.workdir / "stack", ignore_errors=True)  # a fresh TSDB every run
    stack = start_stack(args.workdir / "stack", models, judge=args.judge)
    try:
        print(f"stack up in {time.monotonic() - t0:.0f} s:")
        for name, where in stack.describe():
            print(f"  {name:<30} {where}")
        warm_up(stack.url, len(stack.replicas))
        settle = SCRAPE_S + 2  # a scrape of every job after the last change
        time.sleep(settle)  # every series exists, and is flat, before the window opens
        requests = make_requests(args.requests)
        # the window opens on flat counters: its first sample precedes the load, so
        # rate() sees every request (one scrape interval early)
        start = time.time() - SCRAPE_S
        with tqdm(total=len(requests), desc="streaming requests via vllm-router",
                  unit="req") as bar:
            timings = run_in_child(stack.url, requests, levels,
                                   on_level=lambda c: bar.set_postfix(concurrency=c),
                                   on_done=lambda: bar.update(1))
        traced = wait_for_traces(stack, {trace_id(r) for r, t in zip(requests, timings,
                                                                     strict=True) if t.ok})
        time.sleep(settle)  # the last increments scraped, the rules evaluated
        end = time.time()
        window = end - start
        load = summarize(timings)
        print(f"{load.requests} requests, {load.errors} errors, {load.output_tokens} tokens "
              f"in {load.wall_s:.1f} s; {traced} of {len(requests)} traces in the trace store")

        figures = figs.l1_figures(stack.prometheus, end, window, timings,
                                  scrape_s=SCRAPE_S)
        print_figures(figures)
        by_tenant: dict[str, list[StreamTiming]] = {}
        for request, timing in zip(requests, timings, strict=True):
            by_tenant.setdefault(tenant(request), []).append(timing)
        costs = figs.tenant_costs(stack.prometheus, end, window, by_tenant, DENSE,
                                  PriceTable.load(PRICES))
        print_costs(costs, window)
        if args.judge:
            print_quality(stack)

        matched = all(f.match is not False for f in figures) and not load.errors
        summary = {"requests": len(requests), "errors": load.errors, "traced": traced,
                   "tenants": sorted(TENANTS), "replicas": len(stack.replicas),
                   "window_s": window, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                time.gmtime(start)),
                   "matched": matched, "endpoints": stack.endpoints(),
                   "figures": [f.as_dict() for f in figures],
                   "costs": [c.as_dict() for c in costs]}
        counts = report.write(report_path, prom=stack.prometheus, start=start - 5, end=end,
                              figures=figures, costs=costs,
                              traces=slowest_traces(stack, requests, timings),
                              stack=stack.describe(), summary=summary)
        summary["charts"] = counts
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(json.dumps(summary, indent=1, default=str))
        empty = [title for title, n in counts.items() if not n]
        print(f"\nreport: {report_path} ({len(counts)} panels"
              f"{', without data: ' + ', '.join(empty) if empty else ''}); "
              f"summary: {summary_path}")
        print(f"every compared figure matches the client: {'yes' if matched else 'NO'}; "
              f"demo took {time.monotonic() - t0:.0f} s")
        for t in timings:
            if not t.ok:
                print(f"error: {t.status} {t.error}", file=sys.stderr)
        return 0 if matched else 1
    except BaseException:
        for server in stack.replicas:
            print(f"{server.base_url} log tail:\n{server.log_tail(20)}", file=sys.stderr)
        raise
    finally:
        stack.close()
        if not args.keep:
            for sub in ("replica-0", "replica-1", "judge"):
                shutil.rmtree(args.workdir / "stack" / sub / "tmp", ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
