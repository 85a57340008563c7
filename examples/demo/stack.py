"""The demo's serving stack on one machine, every part a real process.

    client -> vllm-router -> vLLM replica 0 (127.0.0.1) -+-> llmtrace collector -> trace store
                          -> vLLM replica 1 (127.0.0.2) -+
    Prometheus (Debian's) scrapes both replicas' API-server and engine-core ports,
    the collector and the router, with the SLO rules loaded.

The replicas bind their own loopback addresses, so Prometheus sees two hosts and
the shipped scrape config (whose ``instance`` label is the host, joining a
server's API-server and engine-core ports) is used unchanged. The trace store is
an in-process OTLP receiver standing in for Tempo or Jaeger. Everything started
is stopped by :meth:`Stack.close`, also on an exception or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from testbed.collector import CollectorProcess
from testbed.models import DENSE, TinyModels
from testbed.otlp_receiver import OTLPReceiver
from testbed.ports import free_port
from testbed.prometheus import PrometheusServer
from testbed.router import Router
from testbed.vllm_server import ServerConfig, VLLMServer

REPO = Path(__file__).resolve().parents[2]
PRICES = REPO / "examples" / "prices.yaml"
SCRAPE_CONFIG = REPO / "dashboards" / "prometheus" / "scrape-vllm.yml"
RULES = sorted((REPO / "dashboards" / "slo" / "rules").glob("*.yml"))
VERSION = "demo"
#: seconds between scrapes, every job of scrape-vllm.yml: fast, so the charts resolve a
#: load of tens of seconds and rate()'s extrapolation over the window stays small. Each
#: scrape of vLLM's API server /metrics (about 1,060 samples, 630 of them llmtrace's)
#: holds its event loop for about 60 ms here (up to 330 ms), which delays the chunks
#: being streamed: that is why the demo shows ITL p99 without comparing it
SCRAPE_S = 1.0


@dataclass
class Stack:
    workdir: Path
    replicas: list[VLLMServer] = field(default_factory=list)
    engine_ports: list[int] = field(default_factory=list)
    router: Router | None = None
    collector: CollectorProcess | None = None
    traces: OTLPReceiver | None = None
    prometheus: PrometheusServer | None = None
    judge: VLLMServer | None = None
    _exit: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @property
    def url(self) -> str:
        """Where clients send requests: the router."""
        return self.router.base_url

    def describe(self) -> list[tuple[str, str]]:
        rows = [(f"vLLM replica {i} (llmtrace on)",
                 f"{r.base_url}  engine-core metrics :{p}")
                for i, (r, p) in enumerate(zip(self.replicas, self.engine_ports, strict=True))]
        rows += [("vllm-router (round robin)", f"{self.router.base_url}  metrics "
                  f"{self.router.metrics_url}"),
                 ("llmtrace collector", f"OTLP {self.collector.otlp_grpc}  metrics "
                  f"http://{self.collector.metrics_target}/metrics"),
                 ("trace store (OTLP receiver)", self.traces.grpc_endpoint),
                 ("Prometheus + SLO rules", self.prometheus.url)]
        if self.judge is not None:
            rows.append(("judge vLLM", self.judge.base_url))
        return rows

    def endpoints(self) -> list[tuple[str, int]]:
        """Every (host, port) a process of the stack listens on."""
        out = [(r.host, r.port) for r in self.replicas]
        out += [(r.host, p) for r, p in zip(self.replicas, self.engine_ports, strict=True)]
        if self.router is not None:
            out += [("127.0.0.1", self.router.port), ("127.0.0.1", self.router.metrics_port)]
        if self.collector is not None:
            out += [("127.0.0.1", port) for port in self.collector.ports.values()]
        if self.prometheus is not None:
            out.append(("127.0.0.1", self.prometheus.port))
        if self.judge is not None:
            out.append((self.judge.host, self.judge.port))
        return out

    def close(self) -> None:
        self._exit.close()


def replica_env(index: int, host: str, engine_port: int, collector: CollectorProcess,
                judge: VLLMServer | None) -> tuple[tuple[str, str], ...]:
    """llmtrace switched on by environment only: no change to vLLM's command line."""
    env = {
        "LLMTRACE_ENABLED": "1",
        "LLMTRACE_SAMPLE_RATIO": "1",
        "LLMTRACE_OTLP_TRACES_ENDPOINT": collector.otlp_grpc,
        # latency, token, request and cost series at the source, scraped by Prometheus:
        # the API server's join vLLM's /metrics, the engine core's get their own port
        "LLMTRACE_METRICS_EXPORTER": "prometheus",
        "OTEL_EXPORTER_PROMETHEUS_HOST": host,
        "OTEL_EXPORTER_PROMETHEUS_PORT": str(engine_port),
        "LLMTRACE_PRICES": str(PRICES),
        "LLMTRACE_INSTANCE_TYPE": "cpu",
        "LLMTRACE_DEPLOYMENT_VERSION": VERSION,
        "OTEL_SERVICE_NAME": f"vllm-replica-{index}",
        "OTEL_BSP_SCHEDULE_DELAY": "500",
    }
    cores = os.cpu_count() or 1
    if cores >= 2:
        # each replica's worker its own core, as on two hosts. Measured here: unbound
        # (vLLM's "auto") workers of two replicas share both cores and prefill steps of
        # one replica then take ~1 s; both on one core halves throughput
        env["VLLM_CPU_OMP_THREADS_BIND"] = str(index % cores)
    if judge is not None:
        env.update(LLMTRACE_JUDGE_ENDPOINT=f"{judge.base_url}/v1", LLMTRACE_JUDGE_MODEL=DENSE,
                   LLMTRACE_JUDGE_SAMPLE_RATIO="0.25", LLMTRACE_JUDGE_TIMEOUT_S="60")
    return tuple(sorted(env.items()))


def scrape_configs(stack: Stack) -> list[dict]:
    """The shipped scrape config's jobs, pointed at this stack's processes."""
    shipped = yaml.safe_load(SCRAPE_CONFIG.read_text())["scrape_configs"]
    targets = {
        "vllm": [r.base_url.removeprefix("http://") for r in stack.replicas],
        "llmtrace-engine": [f"{r.host}:{p}" for r, p in
                            zip(stack.replicas, stack.engine_ports, strict=True)],
        "llmtrace-collector": [stack.collector.metrics_target],
        "vllm-router": [f"127.0.0.1:{stack.router.metrics_port}"],
    }
    return [{**job, "scrape_interval": f"{SCRAPE_S:g}s",
             "static_configs": [{"targets": targets[job["job_name"]]}]} for job in shipped]


def start_stack(workdir: Path, models: TinyModels, replicas: int = 2, judge: bool = False,
                say: Callable[[str], None] = print) -> Stack:
    """Start every process; on any failure stop what was started and re-raise."""
    stack = Stack(workdir)
    try:
        _start(stack, models, replicas, judge, say)
    except BaseException:
        stack.close()
        raise
    return stack


def _start(stack: Stack, models: TinyModels, replicas: int, judge: bool,
           say: Callable[[str], None]) -> None:
    exit_ = stack._exit
    stack.traces = OTLPReceiver().start()
    exit_.callback(stack.traces.stop)
    stack.collector = CollectorProcess(stack.workdir / "collector",
                                       forward_endpoint=stack.traces.grpc_endpoint,
                                       prices=PRICES).start()
    exit_.callback(stack.collector.stop)
    say(f"llmtrace collector up: OTLP {stack.collector.otlp_grpc}")
    if judge:
        stack.judge = VLLMServer(ServerConfig(model_dir=models.dense, served_name=DENSE, args=(
            "--structured-outputs-config",
            '{"backend": "xgrammar", "disable_any_whitespace": true}')),
            workdir=stack.workdir / "judge").start()
        exit_.callback(stack.judge.stop)
    for i in range(replicas):
        host = f"127.0.0.{i + 1}"
        port = free_port()
        stack.engine_ports.append(port)
        # a small KV cache and step budget, so concurrency shows queueing and preemption
        server = VLLMServer(ServerConfig(
            model_dir=models.dense, served_name=DENSE, max_model_len=1024,
            args=("--max-num-batched-tokens", "256", "--num-gpu-blocks-override", "24",
                  # usage.prompt_tokens_details.cached_tokens: the client prices cached input
                  "--enable-prompt-tokens-details"),
            env=replica_env(i, host, port, stack.collector, stack.judge)),
            workdir=stack.workdir / f"replica-{i}", host=host)
        stack.replicas.append(server.start())
        exit_.callback(server.stop)
    say(f"starting {replicas} vLLM replicas (CPU, --enforce-eager) ...")
    for server in [*stack.replicas, *([stack.judge] if stack.judge else [])]:
        server.wait_ready(timeout=360)
    say("vLLM ready: " + ", ".join(f"{r.base_url} in {r.ready_s:.0f} s" for r in stack.replicas))
    stack.router = Router([r.base_url for r in stack.replicas],
                          stack.workdir / "vllm-router").start()
    exit_.callback(stack.router.stop)
    stack.prometheus = PrometheusServer(stack.workdir / "prometheus", scrape_configs(stack),
                                        rule_files=RULES).start()
    exit_.callback(stack.prometheus.stop)
