"""Session-scoped test bed: tiny models, real vLLM servers, a real OTLP receiver.

Expensive things start once per pytest session and are always stopped. Every
server's caches and temporary files live under one scratch directory.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmtrace.collector import CollectorConfig, CollectorService
from llmtrace.record import RequestRecord
from testbed.models import DENSE, MOE, TinyModels, ensure_models
from testbed.otlp_receiver import OTLPReceiver
from testbed.ports import free_port
from testbed.router import Router
from testbed.vllm_server import ServerConfig, ServerPool, VLLMServer, chat

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The full-stack demo runs last: it stops the session's servers to have the cores."""
    items.sort(key=lambda item: item.get_closest_marker("demo") is not None)


@pytest.fixture(scope="session")
def scratch_dir() -> Iterator[Path]:
    """One scratch root for the session; vLLM's caches and temp files go here."""
    root = Path(tempfile.mkdtemp(prefix="llmtrace-tests-"))
    yield root
    if not os.environ.get("LLMTRACE_KEEP_SCRATCH"):
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_models() -> TinyModels:
    cache = Path(os.environ.get("LLMTRACE_MODEL_DIR", REPO / ".cache" / "models"))
    return ensure_models(cache)


@pytest.fixture(scope="session")
def promtool() -> str:
    """Prometheus's rule checker and unit-test runner (Debian's prometheus package)."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: run `make system` (installs Debian's "
                    "prometheus package, which has promtool)", pytrace=False)
    return path


@pytest.fixture(scope="session")
def server_pool(scratch_dir: Path) -> Iterator[ServerPool]:
    pool = ServerPool(scratch_dir / "servers")
    yield pool
    pool.stop_all()


def dense_config(models: TinyModels, *args: str, **kw) -> ServerConfig:
    return ServerConfig(model_dir=models.dense, served_name=DENSE, args=tuple(args), **kw)


def moe_config(models: TinyModels, *args: str, **kw) -> ServerConfig:
    return ServerConfig(model_dir=models.moe, served_name=MOE, args=tuple(args), **kw)


#: the judge server's one flag: by default xgrammar allows unbounded whitespace between
#: JSON tokens, and a random-weight model at temperature 0 can loop on it until
#: max_tokens (about a third of answers, measured); compact JSON is bounded
COMPACT_JSON = ("--structured-outputs-config",
                '{"backend": "xgrammar", "disable_any_whitespace": true}')


def judge_config(models: TinyModels) -> ServerConfig:
    """A plain vLLM (no llmtrace) serving the tiny dense model as the judge: structured
    output makes even random weights answer in the judge's JSON schema."""
    return dense_config(models, *COMPACT_JSON)


@pytest.fixture(scope="session")
def judge_server(server_pool: ServerPool, tiny_models: TinyModels) -> VLLMServer:
    return server_pool.get(judge_config(tiny_models))


def judge_env(judge: VLLMServer, **extra: str) -> dict[str, str]:
    """Settings that point an instrumented server at the judge."""
    return {"LLMTRACE_JUDGE_ENDPOINT": f"{judge.base_url}/v1", "LLMTRACE_JUDGE_MODEL": DENSE,
            "LLMTRACE_JUDGE_TIMEOUT_S": "60", **extra}


@pytest.fixture(scope="session")
def otlp_receiver() -> Iterator[OTLPReceiver]:
    with OTLPReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="session")
def collector(otlp_receiver: OTLPReceiver) -> Iterator[CollectorService]:
    """The standalone collector on free ports, forwarding every span to ``otlp_receiver``.

    Instrumented servers send their traces here (metrics go straight to the
    receiver), so every trace test also exercises ingest and forwarding.
    ``collector.records`` / ``collector.usage`` keep what it derived.
    """
    config = CollectorConfig(grpc_endpoint="127.0.0.1:0", http_endpoint="127.0.0.1:0",
                             admin_endpoint="127.0.0.1:0",
                             forward_endpoint=otlp_receiver.grpc_endpoint,
                             prices=REPO / "examples" / "prices.yaml")
    records: list = []
    usage: list = []
    service = CollectorService(config, on_record=records.append, on_usage=usage.append)
    service.records, service.usage = records, usage
    service.start()
    yield service
    service.stop(2.0)


#: service name of the MoE server that runs under opentelemetry-instrument switched off
SWITCHED_OFF_SERVICE = "llmtrace-switched-off"


@pytest.fixture(scope="session")
def vllm_servers(server_pool: ServerPool, tiny_models: TinyModels,
                 collector: CollectorService,
                 otlp_receiver: OTLPReceiver) -> dict[str, VLLMServer]:
    """Dense and MoE servers without llmtrace, started together so their start-ups overlap.

    The dense one has vLLM's own tracing on (``--otlp-traces-endpoint``) into the
    collector: the path for users without the SDK. The MoE one runs under
    ``opentelemetry-instrument`` with an OTLP endpoint, which would activate
    llmtrace, and ``LLMTRACE_ENABLED=0``, which must win in every vLLM process.
    """
    builtin = dense_config(
        tiny_models, "--otlp-traces-endpoint", f"http://127.0.0.1:{collector.ports['grpc']}",
        env=(("OTEL_EXPORTER_OTLP_TRACES_INSECURE", "true"),
             ("OTEL_SERVICE_NAME", "vllm-builtin"),
             # vLLM's span names no model; the pipeline reads it from the resource
             ("OTEL_RESOURCE_ATTRIBUTES", f"gen_ai.request.model={DENSE}")))
    switched_off = moe_config(
        tiny_models,
        launcher=(str(Path(sys.executable).parent / "opentelemetry-instrument"),
                  sys.executable, "-m", "testbed.vllm_cli"),
        env=(("LLMTRACE_ENABLED", "0"), ("LLMTRACE_LOG_LEVEL", "INFO"),
             # were the switch ignored, these would send every span and metric
             ("LLMTRACE_SAMPLE_RATIO", "1"), ("LLMTRACE_TRACES_EXPORTER", "otlp"),
             ("LLMTRACE_METRICS_EXPORTER", "otlp"),
             ("LLMTRACE_METRIC_EXPORT_INTERVAL_MS", "1000"),
             ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_receiver.grpc_endpoint),
             ("OTEL_SERVICE_NAME", SWITCHED_OFF_SERVICE),
             # no distro here; the SDK's own exporters must not try either
             ("OTEL_TRACES_EXPORTER", "none"), ("OTEL_METRICS_EXPORTER", "none"),
             ("OTEL_LOGS_EXPORTER", "none")))
    # the judge starts with them (start-ups overlap); judge_server finds it running
    dense, moe, _judge = server_pool.get_many([builtin, switched_off, judge_config(tiny_models)])
    return {DENSE: dense, MOE: moe}


def instrumented_env(receiver: OTLPReceiver, service: str, traces_to: str | None = None,
                     **extra: str) -> tuple:
    """Zero-code activation: only environment variables, no code change in vLLM."""
    env = {
        "LLMTRACE_ENABLED": "1",
        "LLMTRACE_OTLP_ENDPOINT": receiver.grpc_endpoint,
        **({"LLMTRACE_OTLP_TRACES_ENDPOINT": traces_to} if traces_to else {}),
        "LLMTRACE_SAMPLE_RATIO": "1",
        "LLMTRACE_METRIC_EXPORT_INTERVAL_MS": "1000",
        "LLMTRACE_DECODE_CHUNK_TOKENS": "8",
        "LLMTRACE_DEPLOYMENT_VERSION": "v-test",
        "OTEL_BSP_SCHEDULE_DELAY": "1000",
        "OTEL_SERVICE_NAME": service,
        **extra,
    }
    return tuple(sorted(env.items()))


@pytest.fixture(scope="session")
def vllm_router(vllm_servers, instrumented_servers, scratch_dir: Path) -> Iterator[Router]:
    """vllm-router (PyPI) round-robin in front of two replicas of the dense model: the
    built-in-tracing one and the llmtrace-instrumented one."""
    router = Router([vllm_servers[DENSE].base_url, instrumented_servers["dense"].base_url],
                    scratch_dir / "vllm-router").start()
    yield router
    router.stop()


@pytest.fixture(scope="session")
def engine_metrics_port() -> int:
    """Where the instrumented dense engine core serves its Prometheus metrics."""
    return free_port()


@pytest.fixture(scope="session")
def instrumented_servers(server_pool: ServerPool, tiny_models: TinyModels,
                         otlp_receiver: OTLPReceiver,
                         collector: CollectorService,
                         engine_metrics_port: int, judge_server: VLLMServer,
                         drift_baseline: Path) -> dict[str, VLLMServer]:
    """Instrumented servers, activated through the vllm.general_plugins entry point.

    ``dense``: chunked prefill (256-token step budget) and a 12-block KV cache
    (1,536 tokens) so concurrency forces preemptions. ``broken``: the MoE model
    under a launcher that removes one hooked vLLM internal and changes another, its
    spans exported through span export processes (``LLMTRACE_SPAN_EXPORT=process``)
    and one invalid optional setting (``LLMTRACE_DECODE_CHUNK_MS``).
    """
    dense = dense_config(
        tiny_models, "--max-num-batched-tokens", "256", "--num-gpu-blocks-override", "12",
        # vLLM's own tracing on as well: both spans in one trace, counted once
        "--otlp-traces-endpoint", f"http://127.0.0.1:{collector.ports['grpc']}",
        max_model_len=1024, env=instrumented_env(
            otlp_receiver, "llmtrace-dense",
            traces_to=f"http://127.0.0.1:{collector.ports['grpc']}",
            # metrics also for Prometheus: the API server's join vLLM's /metrics,
            # the engine core's get their own port
            LLMTRACE_PRICES=str(REPO / "examples" / "prices.yaml"),
            LLMTRACE_INSTANCE_TYPE="cpu",
            LLMTRACE_METRICS_EXPORTER="otlp,prometheus",
            OTEL_EXPORTER_PROMETHEUS_HOST="127.0.0.1",
            OTEL_EXPORTER_PROMETHEUS_PORT=str(engine_metrics_port),
            OTEL_EXPORTER_OTLP_TRACES_INSECURE="true",
            # vLLM's default, set explicitly: a CPU setting the resource must name
            # (tests/test_hardware_vllm.py; the KV space is set for every server)
            VLLM_CPU_OMP_THREADS_BIND="auto",
            # the quality loop: half the requests judged, every one's entropy measured,
            # drift against a reference file after a few requests
            **judge_env(judge_server, LLMTRACE_JUDGE_SAMPLE_RATIO="0.5"),
            LLMTRACE_ENTROPY_SAMPLE_RATIO="1",
            LLMTRACE_DRIFT_BASELINE=f"file:{drift_baseline}",
            LLMTRACE_DRIFT_MIN_SAMPLES="5"))
    broken = moe_config(
        tiny_models, launcher=(str(REPO / "tests" / "helpers" / "serve_without_internal.py"),),
        # spans leave through a span export process per vLLM process (not the default)
        env=instrumented_env(otlp_receiver, "llmtrace-broken", LLMTRACE_SPAN_EXPORT="process",
                             # one invalid optional setting: it alone falls back
                             LLMTRACE_DECODE_CHUNK_MS="soon"))
    started = server_pool.get_many([dense, broken])
    for server, model in zip(started, (DENSE, MOE), strict=True):
        # one request each so one-time start-up work (telemetry providers, exporter
        # channels, first-request imports) is not what the tests measure
        chat(server.base_url, model, "warm up", max_tokens=2)
    return {"dense": started[0], "broken": started[1]}


def baseline_records(n: int = 400, prompt_tokens: tuple[int, int] = (8, 64),
                     seed: int = 7) -> list[RequestRecord]:
    """Synthetic finished requests of short chats: a drift reference to compare with."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ttft = rng.uniform(0.01, 0.15)
        out.append(RequestRecord(
            source="llmtrace", trace_id=f"{i:032x}", request_id=str(i), model=DENSE,
            tenant="default", version="reference", finish_reason=rng.choice(("stop", "length")),
            error_type=None, start_ns=0, end_ns=time.time_ns(), e2e_s=ttft * 4, ttft_s=ttft,
            prompt_tokens=rng.randint(*prompt_tokens), output_tokens=rng.randint(4, 32),
            output_entropy=rng.uniform(0.5, 4.0)))
    return out


@pytest.fixture(scope="session")
def drift_baseline(scratch_dir: Path) -> Path:
    """A drift reference file (the ``file:`` baseline) saved from short synthetic chats."""
    from llmtrace.quality.drift import DriftMonitor

    monitor = DriftMonitor("pinned", window_s=86400)
    for record in baseline_records():
        monitor.observe(record)
    path = scratch_dir / "drift-baseline.json"
    monitor.save_baseline(path)
    text = path.read_text().replace(f'"{DENSE}"', '"*"')  # every model compares with it
    path.write_text(text)
    return path


def metric_points(reader) -> dict[str, list]:
    """An in-memory metric reader's data points, by metric name (one collection)."""
    out: dict[str, list] = {}
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                out.setdefault(metric.name, []).extend(metric.data.data_points)
    return out
