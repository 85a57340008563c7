"""Soak: minutes of load on an instrumented ``vllm serve`` whose trace backend is a blackhole.

The OTLP traces endpoint is a TCP listener that accepts connections and never
answers, the worst kind of outage (exports hang until their timeout, then
retry). Under steady load (100% sampling, so every request makes spans), every
``--sample-s`` seconds it prints the RSS of each of the server's processes
(API server, engine core, workers, span export processes) and llmtrace's drop
counters from the API server's and the engine core's ``/metrics``. At the end:
RSS growth per process from the first sample after warm-up, failed requests and
drops by reason. Prints figures; never fails.

    python benchmarks/soak.py [--minutes 10] [--concurrency 8] [--span-export thread]
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # testbed/ is not installed

from llmtrace.doctor import running_server
from testbed.models import DENSE, ensure_models
from testbed.ports import free_port
from testbed.procs import descendants
from testbed.stream_client import run_load
from testbed.vllm_server import ServerConfig, ServerPool

REPO = Path(__file__).resolve().parents[1]


class Blackhole:
    """Accepts TCP connections, reads whatever arrives, never answers."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            self.connections.append(conn)
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    @staticmethod
    def _drain(conn: socket.socket) -> None:
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass


def tree(root: int) -> dict[int, str]:
    """pid -> short name of every process under ``root`` (itself included)."""
    return {pid: "api-server" if pid == root else
            "span-export" if "exporter_process" in proc.command else proc.name
            for pid, proc in descendants(root).items()}


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def drops(url: str) -> dict[str, float]:
    """llmtrace's drops by reason, as a server publishes them on ``/metrics``."""
    return running_server(url).get("dropped", {})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--sample-s", type=float, default=30.0)
    p.add_argument("--span-export", choices=("thread", "process"), default="thread")
    args = p.parse_args(argv)
    models = ensure_models(REPO / ".cache" / "models")
    scratch = Path(tempfile.mkdtemp(prefix="llmtrace-soak-"))
    hole = Blackhole()
    engine_port = free_port()
    env = {"LLMTRACE_ENABLED": "1", "LLMTRACE_SAMPLE_RATIO": "1",
           "LLMTRACE_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{hole.port}",
           "OTEL_EXPORTER_OTLP_TRACES_INSECURE": "true",
           "LLMTRACE_METRICS_EXPORTER": "prometheus",
           "OTEL_EXPORTER_PROMETHEUS_HOST": "127.0.0.1",
           "OTEL_EXPORTER_PROMETHEUS_PORT": str(engine_port),
           "LLMTRACE_SPAN_EXPORT": args.span_export}
    pool = ServerPool(scratch / "servers")
    server = pool.get(ServerConfig(models.dense, DENSE, env=tuple(sorted(env.items()))))
    stop = time.monotonic() + args.minutes * 60
    served = [0, 0]  # ok, failed

    def load() -> None:
        i = 0
        while time.monotonic() < stop:
            batch = [{"messages": [{"role": "user", "content": f"soak {i} {j}"}],
                      "max_tokens": 32} for j in range(args.concurrency * 2)]
            for t in run_load(server.base_url, DENSE, batch, args.concurrency):
                served[0 if t.ok else 1] += 1
            i += 1

    try:
        worker = threading.Thread(target=load, daemon=True)
        worker.start()
        time.sleep(min(60.0, args.minutes * 6))  # warm-up: caches, first exports, pools
        first = {pid: (name, rss_mib(pid)) for pid, name in tree(server.proc.pid).items()}
        print(f"{'t (s)':>6} {'requests':>9} {'failed':>6}  RSS MiB per process  | drops")
        t0 = time.monotonic()
        last = first
        while worker.is_alive():
            now = {pid: (name, rss_mib(pid)) for pid, name in tree(server.proc.pid).items()}
            d = drops(f"{server.base_url}/metrics")
            e = drops(f"http://127.0.0.1:{engine_port}/metrics")
            print(f"{time.monotonic() - t0:6.0f} {served[0]:9d} {served[1]:6d}  "
                  + " ".join(f"{n}={r:.0f}" for _, (n, r) in sorted(now.items()))
                  + f"  | api {d} engine {e}", flush=True)
            last = now
            worker.join(args.sample_s)
        print(f"\n== soak: {args.minutes:g} min, span export {args.span_export}, traces "
              f"to a blackhole; {served[0]} requests ok, {served[1]} failed, "
              f"{len(hole.connections)} connections held by the blackhole ==")
        for pid, (name, rss) in sorted(last.items()):
            start = first.get(pid, (name, rss))[1]
            print(f"{name:>16} pid {pid}: {start:7.0f} -> {rss:7.0f} MiB ({rss - start:+.0f})")
        print(f"drops: api server {drops(f'{server.base_url}/metrics')}, engine core "
              f"{drops(f'http://127.0.0.1:{engine_port}/metrics')}")
    finally:
        pool.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
