"""A hook body that fails inside a real ``vllm serve``: serving goes on, nothing leaks,
and the loss of request-level telemetry is visible.

The server is started for this module by ``tests/helpers/serve_with_failing_hook.py``:
while a fault file exists, llmtrace's ``process_outputs`` hook body raises. Before
hook groups, the hook disabled itself but ``add_request`` went on creating
per-request state that nothing freed (~10 KB per request) and the only signs were
one warning and a counter of 1.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, dense_config, instrumented_env

from llmtrace import semconv as sc
from llmtrace.doctor import running_server
from testbed.models import DENSE
from testbed.otlp_receiver import OTLPReceiver
from testbed.ports import free_port
from testbed.stream_client import run_load
from testbed.vllm_server import VLLMServer

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

#: the API server's hooks that share per-request state (hooks.GROUPS["api-server.requests"])
GROUP = ["vllm.output_processor.abort_requests", "vllm.output_processor.add_request",
         "vllm.output_processor.process_outputs", "vllm.output_processor.propagate_error"]


@pytest.fixture(scope="module")
def faulty(tiny_models, otlp_receiver: OTLPReceiver, scratch_dir: Path
           ) -> Iterator[tuple[VLLMServer, Path, Path]]:
    work = scratch_dir / "hook-fault"
    work.mkdir(parents=True, exist_ok=True)
    fault, probe = work / "fault", work / "probe.json"
    config = dense_config(
        tiny_models, max_model_len=512,
        launcher=(str(REPO / "tests" / "helpers" / "serve_with_failing_hook.py"),),
        env=instrumented_env(otlp_receiver, "llmtrace-fault",
                             LLMTRACE_METRICS_EXPORTER="otlp,prometheus",
                             OTEL_EXPORTER_PROMETHEUS_HOST="127.0.0.1",
                             OTEL_EXPORTER_PROMETHEUS_PORT=str(free_port()),
                             LLMTRACE_TEST_FAULT_FILE=str(fault),
                             LLMTRACE_TEST_PROBE_FILE=str(probe)))
    server = VLLMServer(config, work / "server").start()
    try:
        server.wait_ready(300)
        yield server, fault, probe
    finally:
        server.stop()


def _load(server: VLLMServer, tenant: str, n: int, concurrency: int) -> list[int]:
    """Stream ``n`` requests as ``tenant``; the completion tokens each one got."""
    timings = run_load(server.base_url, DENSE, [
        {"prompt": f"request {i} of {tenant}", "max_tokens": 24,
         "headers": {"x-tenant-id": tenant}} for i in range(n)], concurrency)
    assert all(t.status == 200 and not t.error for t in timings), \
        [(t.status, t.error) for t in timings]
    return [sum(t.chunk_tokens) for t in timings]


def _spans(receiver: OTLPReceiver, name: str, tenant: str) -> int:
    return sum(1 for s in receiver.spans() if s.name == name
               and s.resource.get("service.name") == "llmtrace-fault"
               and s.attributes.get(sc.LLMTRACE_TENANT) == tenant)


def test_a_failing_hook_takes_its_group_releases_its_state_and_says_so(
        faulty, otlp_receiver: OTLPReceiver):
    server, fault, probe = faulty
    assert _load(server, "before", 3, 3) == [24] * 3
    assert otlp_receiver.wait_for(
        lambda r: _spans(r, sc.SPAN_LLMTRACE_REQUEST, "before") == 3, timeout=30)

    fault.touch()
    assert _load(server, "fault", 6, 6) == [24] * 6  # served in full through the fault
    fault.unlink()
    assert _load(server, "after", 40, 4) == [24] * 40

    # the group's per-request state was released and no new state is created
    deadline = time.monotonic() + 10
    while json.loads(probe.read_text())["frontend_requests"] != 0:
        assert time.monotonic() < deadline, probe.read_text()
        time.sleep(0.2)

    # the loss is visible: on the server's own /metrics, and through the doctor
    metrics_url = f"{server.base_url}/metrics"
    assert running_server(metrics_url)["disabled_hooks"] == GROUP
    doctor = subprocess.run(
        [sys.executable, "-m", "llmtrace.cli", "doctor", "--json", "--metrics-url",
         metrics_url], capture_output=True, text=True, timeout=120)
    report = json.loads(doctor.stdout)
    assert doctor.returncode != 0 and report["server"]["disabled_hooks"] == GROUP
    assert any("hooks disabled" in p for p in report["problems"]), report["problems"]

    # request-level spans stopped (the gauge above says so). The engine core's hooks are
    # another group: its usage is still counted, under tenant "unknown" since the tenant
    # rode on the trace headers the API server's add_request hook no longer sets
    assert _spans(otlp_receiver, sc.SPAN_LLMTRACE_REQUEST, "after") == 0
    assert otlp_receiver.wait_for(lambda r: any(
        p.metric == sc.METRIC_LLMTRACE_COST_ACCELERATOR_SECONDS and (p.value or 0) > 0
        and p.resource.get("service.name") == "llmtrace-fault"
        and p.attributes.get(sc.LLMTRACE_TENANT) == "unknown" for p in r.points()), timeout=30)

    # one warning with the traceback for the failure, one per hook taken with it, and a
    # reminder while they stay disabled (every 2 s here, every 10 minutes by default)
    deadline = time.monotonic() + 15
    while "still disabled" not in server.log_path.read_text():
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.5)
    log = server.log_path.read_text()
    assert log.count("RuntimeError: injected fault") >= 1
    assert log.count("raised RuntimeError: injected fault; hook disabled") == 1
    assert log.count("it shares per-request state with "
                     "vllm.output_processor.process_outputs") == 3
    assert "4 hook(s) still disabled, their telemetry missing: " + ", ".join(GROUP) in log
