"""The ``llmtrace`` command line: ``llmtrace collector [--config FILE] [flags]``, and
``llmtrace doctor [--json]`` (will llmtrace work in this environment?), and
``llmtrace assets --out DIR`` (the shipped dashboards, rules and configs)."""

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
    args = parser.parse_args(argv)
    if args.command == "assets":
        from llmtrace.assets import copy_to

        for path in copy_to(args.out):
            print(path)
        return 0
    if args.command == "doctor":
        from llmtrace.doctor import main as doctor_main

        return doctor_main(args.json, args.metrics_url)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from prometheus_client import disable_created_metrics
    disable_created_metrics()  # _created series double the count for no dashboard use
    if args.command == "collector":
        return _run_collector(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
