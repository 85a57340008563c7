"""OTLP/HTTP ingest throughput of ``llmtrace collector``: this checkout against another revision.

Each arm runs the real collector as a subprocess (``python -m llmtrace.cli
collector``) with ``PYTHONPATH`` pointing at a checkout: this one, and, with
``--against REV``, a temporary ``git worktree`` of ``REV``. Sender processes
post the same OTLP/protobuf payload over keep-alive connections for a fixed
time. The arms alternate round by round in one run, so machine noise falls on both.

Per arm it prints accepted payloads/s and spans/s, the collector's CPU
seconds per 1,000 spans accepted (``/proc/<pid>/stat``: the figure that does
not depend on how much CPU the senders left over), request latency p50/p99,
and every answer that was not a 200 (503 backpressure counts there, not as
throughput). Then the ratio new/old of each figure.

    python benchmarks/ingest_throughput.py --against f8caa7d [--rounds 3] [--seconds 8]
        [--senders 8] [--requests-per-payload 1,50]
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # testbed/ is not installed

from testbed.ports import free_port
from testbed.procs import cpu_seconds
from testbed.synthetic import make_payload

REPO = Path(__file__).resolve().parents[1]



class Collector:
    """One collector subprocess importing llmtrace from ``root``; HTTP ingest only."""

    def __init__(self, root: Path, scratch: Path) -> None:
        self.http, self.admin = free_port(), free_port()
        cfg = scratch / f"collector-{self.http}.yaml"
        cfg.write_text(f"grpc_endpoint: ''\nhttp_endpoint: 127.0.0.1:{self.http}\n"
                       f"admin_endpoint: 127.0.0.1:{self.admin}\n")
        env = {**os.environ, "PYTHONPATH": str(root)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmtrace.cli", "collector", "--config", str(cfg)],
            env=env, cwd=scratch, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = self.proc.stdout.readline()
        if "listening" not in line:
            raise RuntimeError(f"collector from {root} did not start: {line}"
                               f"{self.proc.stdout.read()}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def _send(port: int, payload: bytes, seconds: float, out: mp.Queue) -> None:
    codes: Counter[int] = Counter()
    latencies: list[float] = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/x-protobuf"}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/v1/traces", payload, headers)
            resp = conn.getresponse()
            resp.read()
            codes[resp.status] += 1
            if resp.status == 200:
                latencies.append(time.perf_counter() - t0)
            if resp.getheader("Connection", "").lower() == "close":
                conn.close()
        except OSError as exc:
            codes[type(exc).__name__] += 1
            conn.close()
    conn.close()
    out.put((dict(codes), latencies))


def one_round(collector: Collector, payload: bytes, spans: int, senders: int,
              seconds: float) -> dict:
    out: mp.Queue = mp.Queue()
    procs = [mp.Process(target=_send, args=(collector.http, payload, seconds, out))
             for _ in range(senders)]
    cpu0 = cpu_seconds(collector.proc.pid)
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    cpu = cpu_seconds(collector.proc.pid) - cpu0
    codes: Counter = Counter()
    latencies: list[float] = []
    for c, lat in results:
        codes.update(c)
        latencies += lat
    ok = codes.pop(200, 0)
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {"payloads_s": ok / seconds, "spans_s": ok * spans / seconds,
            "cpu_ms_per_1k_spans": 1e6 * cpu / max(1, ok * spans),
            "p50_ms": 1e3 * q[49], "p99_ms": 1e3 * q[98], "other": dict(codes)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--against", help="git revision to compare with (a temporary worktree)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--senders", type=int, default=8)
    p.add_argument("--requests-per-payload", default="1,50",
                   help="comma-separated payload sizes, in requests (~10 spans each)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        arms = {"this checkout": REPO}
        if args.against:
            tree = scratch / "against"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q",
                            str(tree), args.against], check=True)
            arms = {args.against: tree, "this checkout": REPO}
        try:
            for size in (int(s) for s in args.requests_per_payload.split(",")):
                payload, spans = make_payload(size)
                print(f"\npayload: {size} requests, {spans} spans, {len(payload)} bytes; "
                      f"{args.senders} senders x {args.seconds:.0f} s x {args.rounds} rounds")
                rows: dict[str, list[dict]] = {name: [] for name in arms}
                collectors = {name: Collector(root, scratch) for name, root in arms.items()}
                try:
                    for _ in range(args.rounds):
                        for name, c in collectors.items():
                            rows[name].append(one_round(c, payload, spans, args.senders,
                                                        args.seconds))
                finally:
                    for c in collectors.values():
                        c.stop()
                summary = {name: _summarise(r) for name, r in rows.items()}
                for name, s in summary.items():
                    print(f"  {name:>14}: {s['payloads_s']:8.0f} payloads/s "
                          f"{s['spans_s']:9.0f} spans/s  {s['cpu_ms_per_1k_spans']:6.2f} CPU "
                          f"ms/1k spans  p50 {s['p50_ms']:6.1f} ms  p99 {s['p99_ms']:6.1f} ms"
                          f"  other answers {s['other'] or '-'}")
                if len(summary) == 2:
                    old, new = summary.values()
                    print("  ratio new/old: " + "  ".join(
                        f"{k} {new[k] / old[k]:.2f}" for k in
                        ("payloads_s", "cpu_ms_per_1k_spans", "p50_ms", "p99_ms") if old[k]))
        finally:
            if args.against:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                                str(scratch / "against")], check=False)
    return 0


def _summarise(rounds: list[dict]) -> dict:
    """Medians over rounds; non-200 answers summed."""
    other: Counter = Counter()
    for r in rounds:
        other.update(r["other"])
    keys = ("payloads_s", "spans_s", "cpu_ms_per_1k_spans", "p50_ms", "p99_ms")
    return {**{k: statistics.median(r[k] for r in rounds) for k in keys}, "other": dict(other)}


if __name__ == "__main__":
    sys.exit(main())
