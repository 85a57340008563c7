"""Accelerator telemetry from a real ``vllm serve`` on CPU: the engine core and its worker.

The instrumented dense server (tests/conftest.py) runs vLLM's CPU backend,
whose model worker is a separate process. Its engine core must publish CPU,
memory and thread series for itself and the worker, agreeing with what the OS
says about those processes, carry the CPU settings the server was started with
as resource attributes, and publish no GPU series (this machine has none).
"""

from __future__ import annotations

import os
import time

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmtrace import semconv as sc
from testbed.models import DENSE
from testbed.registry import assert_in_registry
from testbed.stream_client import run_load

pytestmark = pytest.mark.vllm

PROM = sc.PROMETHEUS_NAMES
ROLE = sc.LlmtraceProcessRoleValues
HARDWARE = (sc.METRIC_PROCESS_CPU_TIME, sc.METRIC_PROCESS_CPU_UTILIZATION,
            sc.METRIC_PROCESS_MEMORY_USAGE, sc.METRIC_PROCESS_THREAD_COUNT,
            sc.METRIC_LLMTRACE_PROCESS_CPU_AVAILABLE)


def _label(attribute: str) -> str:
    return attribute.replace(".", "_")


def _samples(port: int) -> list:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def _by_role(samples: list, metric: str) -> dict[str, tuple[str, float]]:
    """role -> (process name, value) of one metric's series."""
    return {s.labels[_label(sc.LLMTRACE_PROCESS_ROLE)]:
            (s.labels[_label(sc.LLMTRACE_PROCESS_NAME)], s.value)
            for s in samples if s.name == PROM[metric]}


def _vllm_processes(server) -> dict[str, psutil.Process]:
    """The server's engine core and worker as the OS sees them, by vLLM's process title."""
    found = {}
    for proc in psutil.Process(server.proc.pid).children(recursive=True):
        title = " ".join(proc.cmdline())
        if "::EngineCore" in title:
            found[ROLE.ENGINE_CORE.value] = proc
        elif "::Worker" in title:
            found[ROLE.WORKER.value] = proc
    return found


def test_engine_core_reports_itself_and_its_worker(instrumented_servers, engine_metrics_port,
                                                   otlp_receiver):
    server = instrumented_servers["dense"]
    bodies = [{"prompt": f"hardware {i} " * 20, "max_tokens": 16} for i in range(4)]
    assert all(t.ok for t in run_load(server.base_url, DENSE, bodies, 2))

    deadline = time.monotonic() + 30
    while True:  # utilisation needs two samples a second apart
        samples = _samples(engine_metrics_port)
        util = _by_role(samples, sc.METRIC_PROCESS_CPU_UTILIZATION)
        if util.keys() == {"engine_core", "worker"} or time.monotonic() > deadline:
            break
        time.sleep(1.1)
    assert util.keys() == {"engine_core", "worker"}, sorted({s.name for s in samples})
    os_view = _vllm_processes(server)
    assert os_view.keys() == {"engine_core", "worker"}

    rss = _by_role(samples, sc.METRIC_PROCESS_MEMORY_USAGE)
    threads = _by_role(samples, sc.METRIC_PROCESS_THREAD_COUNT)
    cpus = _by_role(samples, sc.METRIC_LLMTRACE_PROCESS_CPU_AVAILABLE)
    cpu_time = _by_role(samples, sc.METRIC_PROCESS_CPU_TIME)
    for role, proc in os_view.items():
        name, value = rss[role]
        assert name == ("EngineCore" if role == "engine_core" else "Worker"), name
        # the same process: its resident memory as the OS reports it (it moves a little)
        assert value > 100 * 2**20, (role, value)
        assert abs(value - proc.memory_info().rss) < 0.25 * value, role
        assert threads[role][1] >= 1
        assert cpus[role][1] == len(proc.cpu_affinity()) <= os.cpu_count()
        assert 0.0 <= util[role][1] <= 1.0
        assert 0 < cpu_time[role][1] <= sum(proc.cpu_times()[:2]) + 1.0
    # this machine has no GPU: no hw.* series, and nothing made up in their place
    assert not [s.name for s in samples if s.name.startswith(("hw_gpu_", "hw_temperature"))]

    # vLLM's CPU settings the server was started with, on the engine core's resource
    [info] = [s for s in samples if s.name == "target_info"]
    assert info.labels[_label(sc.LLMTRACE_VLLM_CPU_KVCACHE_SPACE)] == \
        str(server.config.kv_cache_gib)
    assert info.labels[_label(sc.LLMTRACE_VLLM_CPU_OMP_THREADS_BIND)] == \
        dict(server.config.env)["VLLM_CPU_OMP_THREADS_BIND"]

    # the same series over OTLP, with the settings typed, and all of it registered
    def hardware_points(receiver) -> list:
        return [p for p in receiver.points() if p.metric in HARDWARE
                and p.resource.get("service.name") == "llmtrace-dense"]

    assert otlp_receiver.wait_for(lambda r: {p.metric for p in hardware_points(r)}
                                  == set(HARDWARE), timeout=30)
    points = hardware_points(otlp_receiver)
    assert {p.resource.get(sc.LLMTRACE_VLLM_CPU_KVCACHE_SPACE) for p in points} == \
        {server.config.kv_cache_gib}
    assert {p.attributes[sc.LLMTRACE_PROCESS_ROLE] for p in points} == {"engine_core",
                                                                        "worker"}
    assert_in_registry(points=points)
