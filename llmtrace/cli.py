"""The ``llmtrace`` command line: ``llmtrace collector [--config FILE] [flags]``, and
``llmtrace doctor [--json]`` (will llmtrace work in this environment?), and
``llmtrace assets --out DIR`` (the shipped dashboards, rules and configs), and
``llmtrace profile convert TRACE...`` (torch profiler traces -> OTLP spans joined to
llmtrace's traces), and ``llmtrace gate`` (canary versus stable from Prometheus: exit 0
pass, 1 fail, 2 inconclusive, 3 Prometheus unreachable)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from llmtrace.config import ConfigError


def _collector_args(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("collector", help="run the OTLP -> derived metrics collector service",
                       description="Receive OTLP traces, derive per-request metrics and cost, "
                       "serve them on /metrics, and forward the spans downstream.")
    p.add_argument("--config", help="YAML settings file (flags override it)")
    p.add_argument("--grpc-endpoint", help="OTLP/gRPC listen address (default 0.0.0.0:4317)")
    p.add_argument("--http-endpoint", help="OTLP/HTTP listen address (default 0.0.0.0:4318)")
    p.add_argument("--admin-endpoint", help="/metrics and /healthz (default 0.0.0.0:8889)")
    p.add_argument("--forward-endpoint", help="downstream OTLP/gRPC host:port for the spans")
    p.add_argument("--prices", help="price table YAML for USD cost")
    p.add_argument("--queue-spans", type=int, help="ingest queue bound, in spans")
    p.add_argument("--window-s", type=float, help="trace assembly window, seconds")
    p.add_argument("--max-traces", type=int, help="traces held while waiting for their root")


def _run_collector(args: argparse.Namespace) -> int:
    from llmtrace.collector import CollectorService, load_collector_config
    from llmtrace.pricing import PriceTableError

    overrides = {k: getattr(args, k) for k in (
        "grpc_endpoint", "http_endpoint", "admin_endpoint", "forward_endpoint", "prices",
        "queue_spans", "window_s", "max_traces")}
    try:
        config = load_collector_config(args.config, **overrides)
        service = CollectorService(config)
    except (ConfigError, PriceTableError) as exc:
        print(f"llmtrace collector: {exc}", file=sys.stderr)
        return 2
    try:
        service.start()
    except (OSError, RuntimeError) as exc:
        print(f"llmtrace collector: cannot listen: {exc}", file=sys.stderr)
        return 1
    print(f"llmtrace collector listening on {service.ports}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("llmtrace collector: draining", flush=True)
    service.stop()
    code, status = service.health()
    print(f"llmtrace collector: stopped ({status})", flush=True)
    return 0


def _profile_args(sub: argparse._SubParsersAction) -> None:
    from llmtrace.profiling.convert import Limits

    p = sub.add_parser("profile", help="torch profiler traces and llmtrace's traces")
    psub = p.add_subparsers(dest="profile_command", required=True)
    c = psub.add_parser(
        "convert", help="convert torch profiler Chrome traces to OTLP spans",
        description="Convert torch profiler Chrome traces (.json or .json.gz, e.g. from "
        "vLLM's /start_profile) to OTLP spans: events inside regions llmtrace tagged go "
        "into those regions' traces, the rest under one llmtrace.profile root per file, "
        "linked both ways. Exit 2 on unreadable input, 1 when the export fails.")
    c.add_argument("traces", nargs="+", type=Path, metavar="TRACE", help="Chrome trace file")
    dest = c.add_mutually_exclusive_group()
    dest.add_argument("--endpoint", help="OTLP endpoint (default: LLMTRACE_OTLP_ENDPOINT / "
                      "OTEL_EXPORTER_OTLP_* as for serving)")
    dest.add_argument("--out", type=Path, metavar="FILE",
                      help="write OTLP JSON lines (one request per trace file) instead")
    c.add_argument("--protocol", choices=("grpc", "http/protobuf"),
                   help="OTLP protocol (default: OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, grpc)")
    defaults = Limits()
    c.add_argument("--max-events", type=int, default=defaults.max_events, metavar="N",
                   help=f"at most N spans per file (default {defaults.max_events}); the "
                        "rest are counted as dropped")
    c.add_argument("--min-duration-us", type=float, default=defaults.min_duration_us,
                   metavar="X", help="leave out operators and device work shorter than X "
                   f"microseconds (default {defaults.min_duration_us})")
    c.add_argument("--all-events", action="store_true",
                   help="every event above the minimum duration, not only annotations, "
                        "outermost operators and device work")
    c.add_argument("--base-time-ns", type=int, metavar="N",
                   help="Unix epoch ns of ts=0, for traces without baseTimeNanoseconds "
                        "(torch < 2.4: 0, their ts are epoch microseconds)")


def _run_profile(args: argparse.Namespace) -> int:
    from llmtrace.profiling import chrome, convert, export

    limits = convert.Limits(args.max_events, args.min_duration_us, args.all_events)
    if limits.max_events < 0 or limits.min_duration_us < 0:
        print("llmtrace profile convert: --max-events and --min-duration-us must be >= 0",
              file=sys.stderr)
        return 2
    try:  # read every file first: a bad one stops the run before anything is sent
        done = [convert.convert(chrome.load(p, args.base_time_ns), limits) for p in args.traces]
    except chrome.ProfileError as exc:
        print(f"llmtrace profile convert: {exc}", file=sys.stderr)
        return 2
    try:
        if args.out:
            with open(args.out, "w", encoding="utf-8") as out:
                for c in done:
                    export.write_json(c.spans, out)
            where = str(args.out)
        else:
            for c in done:
                where = export.send(c.spans, args.endpoint, args.protocol)
    except ConfigError as exc:
        print(f"llmtrace profile convert: {exc}", file=sys.stderr)
        return 2
    except (OSError, export.ExportError) as exc:
        print(f"llmtrace profile convert: {exc}", file=sys.stderr)
        return 1
    for path, c in zip(args.traces, done, strict=True):
        print(f"{path}: {c.converted} spans ({c.dropped} dropped by --max-events) in "
              f"{len(c.traces)} tagged trace(s); profile root trace "
              f"{c.root.context.trace_id:032x} -> {where}")
    return 0


def _gate_args(sub: argparse._SubParsersAction) -> None:
    from llmtrace.quality.gate_queries import CHECKS, DEFAULTS

    p = sub.add_parser(
        "gate", help="canary versus stable version: pass, fail or inconclusive, from Prometheus",
        description="Compare a canary and a stable deployment version of one model over a "
        "window of Prometheus data (TTFT and ITL over their SLO thresholds, failed requests, "
        "judge scores, hallucinations, drift) and decide. Exit 0 pass, 1 fail (roll back), "
        "2 inconclusive (too little data, a required series missing, or a usage error: hold), "
        "3 Prometheus unreachable or a query refused. See docs/quality-gates.md.")
    p.add_argument("--prometheus", required=True, metavar="URL",
                   help="Prometheus (or compatible) base URL, e.g. http://prometheus:9090")
    p.add_argument("--model", required=True, help="gen_ai_request_model to compare")
    p.add_argument("--stable", required=True, metavar="VERSION",
                   help="llmtrace_deployment_version of the stable version")
    p.add_argument("--canary", required=True, metavar="VERSION",
                   help="llmtrace_deployment_version of the canary version")
    p.add_argument("--window", default="30m", help="PromQL duration to compare (default 30m)")
    p.add_argument("--tenant", help="only this llmtrace_tenant (default: all)")
    p.add_argument("--checks", metavar="LIST",
                   help=f"comma-separated subset of {','.join(CHECKS)} (default: all; a named "
                        "check whose series do not exist makes the result inconclusive)")
    p.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    p.add_argument("--min-samples", type=int, default=DEFAULTS.min_samples, metavar="N",
                   help="requests (TTFT, errors) or tokens (ITL) per side before a verdict "
                        f"(default {DEFAULTS.min_samples})")
    p.add_argument("--min-evaluations", type=int, default=DEFAULTS.min_evaluations, metavar="N",
                   help="judge evaluations per side before a quality or hallucination verdict "
                        f"(default {DEFAULTS.min_evaluations})")
    p.add_argument("--alpha", type=float, default=DEFAULTS.alpha,
                   help=f"significance level of the one-sided tests (default {DEFAULTS.alpha})")
    p.add_argument("--max-slo-regression", type=float, metavar="POINTS",
                   help="tolerated rise of the share of requests (tokens) over the TTFT (ITL) "
                        "SLO threshold, as a ratio (0.01 = 1 point; default: each SLO's error "
                        "budget, 1 - objective)")
    p.add_argument("--max-error-regression", type=float, default=DEFAULTS.max_error_regression,
                   metavar="POINTS", help="tolerated rise of the failed-request ratio "
                   f"(default {DEFAULTS.max_error_regression})")
    p.add_argument("--max-quality-drop", type=float, default=DEFAULTS.max_quality_drop,
                   metavar="SCORE", help="tolerated drop of a mean judge score in [0, 1] "
                   f"(default {DEFAULTS.max_quality_drop})")
    p.add_argument("--max-hallucination-regression", type=float,
                   default=DEFAULTS.max_hallucination_regression, metavar="POINTS",
                   help="tolerated rise of the hallucination ratio "
                        f"(default {DEFAULTS.max_hallucination_regression})")
    p.add_argument("--psi-threshold", type=float, default=DEFAULTS.max_psi, metavar="PSI",
                   help=f"largest tolerated feature PSI of the canary (default {DEFAULTS.max_psi})")
    p.add_argument("--time", metavar="WHEN",
                   help="evaluate at this instant (Unix seconds or ISO 8601) instead of now, "
                        "to reproduce an earlier decision")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per query (default 30)")
    p.add_argument("--header", action="append", default=[], metavar="NAME: VALUE",
                   help="HTTP header for Prometheus (repeatable), e.g. 'X-Scope-OrgID: team'")


def _run_gate(args: argparse.Namespace) -> int:
    import json
    import time
    from datetime import datetime

    from llmtrace.quality import gate
    from llmtrace.quality.gate_queries import Tolerances

    def usage(message: str) -> int:
        print(f"llmtrace gate: {message}", file=sys.stderr)
        return 2

    checks = tuple(c.strip() for c in args.checks.split(",") if c.strip()) if args.checks \
        else gate.CHECKS
    if unknown := [c for c in checks if c not in gate.CHECKS]:
        return usage(f"unknown check(s) {', '.join(unknown)}; choose from {', '.join(gate.CHECKS)}")
    if not gate.WINDOW.match(args.window):
        return usage(f"--window {args.window!r} is not a PromQL duration (e.g. 30m, 1h30m)")
    if not 0 < args.alpha < 1 or args.min_samples < 1 or args.min_evaluations < 1:
        return usage("--alpha must be in (0, 1) and the minimum counts >= 1")
    headers = []
    for h in args.header:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            return usage(f"--header {h!r}: expected 'Name: value'")
        headers.append((name.strip(), value.strip()))
    try:
        at = time.time() if args.time is None else float(args.time)
    except ValueError:
        try:
            at = datetime.fromisoformat(args.time).timestamp()
        except ValueError:
            return usage(f"--time {args.time!r}: expected Unix seconds or ISO 8601")
    spec = gate.GateSpec(
        args.model, args.stable, args.canary, args.window, args.tenant, checks,
        explicit=args.checks is not None, tolerances=Tolerances(
            alpha=args.alpha, min_samples=args.min_samples,
            min_evaluations=args.min_evaluations, max_slo_regression=args.max_slo_regression,
            max_error_regression=args.max_error_regression,
            max_quality_drop=args.max_quality_drop,
            max_hallucination_regression=args.max_hallucination_regression,
            max_psi=args.psi_threshold))
    prom = gate.Prometheus(args.prometheus, round(at, 3), args.timeout, headers)
    try:
        report = gate.evaluate(prom, spec)
    except gate.PrometheusError as exc:
        print(f"llmtrace gate: no verdict, Prometheus failed: {exc}", file=sys.stderr)
        if args.json:
            print(json.dumps(gate.error_json(spec, prom.url, prom.at, str(exc)), indent=2))
        return gate.EXIT_CODES[gate.ERROR]
    print(json.dumps(report.to_json(), indent=2) if args.json else report.table())
    return report.exit_code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmtrace")
    sub = parser.add_subparsers(dest="command", required=True)
    _collector_args(sub)
    doctor = sub.add_parser("doctor", help="check hooks, configuration and endpoint here",
                            description="Resolve every hook against the installed vLLM, show "
                            "the effective configuration and where each value came from, "
                            "and check the OTLP endpoint. Exit 1 if something cannot work.")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.add_argument("--metrics-url", metavar="URL",
                        help="also read a running server's /metrics (e.g. "
                             "http://localhost:8000/metrics): hooks disabled at run time, drops")
    assets = sub.add_parser("assets", help="write the shipped dashboards, SLO rules, scrape "
                            "and collector configs and example price table to a directory")
    assets.add_argument("--out", required=True, type=Path, help="directory to write into")
    _profile_args(sub)
    _gate_args(sub)
    args = parser.parse_args(argv)
    if args.command == "assets":
        from llmtrace.assets import copy_to

        for path in copy_to(args.out):
            print(path)
        return 0
    if args.command == "doctor":
        from llmtrace.doctor import main as doctor_main

        return doctor_main(args.json, args.metrics_url)
    if args.command == "profile":
        return _run_profile(args)
    if args.command == "gate":
        return _run_gate(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from prometheus_client import disable_created_metrics
    disable_created_metrics()  # _created series double the count for no dashboard use
    if args.command == "collector":
        return _run_collector(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
