"""``llmtrace doctor`` against the real installed vLLM, a real OTLP receiver and a closed port."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from testbed.otlp_receiver import OTLPReceiver
from testbed.ports import free_port


def _doctor(env_extra: dict[str, str], prelude: str = "") -> tuple[int, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMTRACE_", "OTEL_"))}
    env.update(env_extra)
    script = (prelude + "import sys\nfrom llmtrace.cli import main\n"
              "sys.exit(main(['doctor', '--json']))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=300)
    return out.returncode, json.loads(out.stdout)


def test_doctor_reports_hooks_config_sources_and_a_dead_endpoint():
    rc, report = _doctor({"LLMTRACE_ENABLED": "1", "LLMTRACE_SAMPLE_RATIO": "0.5",
                          "LLMTRACE_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}"})
    assert rc == 1  # activation asked for an endpoint that does not answer
    assert report["vllm"]["version"]
    assert report["hooks"] and all(h["status"] == "active" for h in report["hooks"].values())
    assert report["config"]["sample_ratio"] == {"value": 0.5, "from": "LLMTRACE_SAMPLE_RATIO"}
    assert report["config"]["protocol"]["from"] == "default"
    assert report["otlp_endpoint"]["reachable"] is False
    assert any("does not answer" in p for p in report["problems"])


def test_doctor_is_happy_with_a_live_endpoint_and_names_a_moved_internal():
    with OTLPReceiver() as receiver:
        env = {"LLMTRACE_ENABLED": "1", "LLMTRACE_OTLP_ENDPOINT": receiver.grpc_endpoint}
        rc, report = _doctor(env)
        assert rc == 0, report["problems"]
        assert report["otlp_endpoint"]["reachable"] is True
        moved = ("from vllm.v1.engine.output_processor import OutputProcessor\n"
                 "del OutputProcessor.propagate_error\n")
        rc, report = _doctor(env, prelude=moved)
    assert rc == 1
    hook = report["hooks"]["vllm.output_processor.propagate_error"]
    assert hook["status"].startswith("disabled") and "not found" in hook["status"]
    others = [h for n, h in report["hooks"].items() if n != "vllm.output_processor.propagate_error"]
    assert all(h["status"] == "active" for h in others)


SERVING_PROCESS = r"""
import sys, time
from llmtrace.config import load_config
from llmtrace.telemetry import DROPPED, Telemetry
from llmtrace.telemetry.guard import hook_failed
t = Telemetry(load_config(metrics_exporter="prometheus", prometheus_host="127.0.0.1",
                          prometheus_port=int(sys.argv[1]), traces_exporter="none"))
t.instruments  # the self-telemetry instruments, served on /metrics
hook_failed("vllm.output_processor.process_outputs", RuntimeError("injected"))
DROPPED["queue_full"] += 7
print("ready", flush=True)
time.sleep(120)
"""


def test_doctor_reads_a_running_servers_disabled_hooks_and_drops():
    """The doctor runs in another process than the server: it reads what the server
    publishes on /metrics (hooks disabled at run time, drops) and exits non-zero."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVING_PROCESS, str(port)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        out = subprocess.run([sys.executable, "-m", "llmtrace.cli", "doctor", "--json",
                              "--metrics-url", f"http://127.0.0.1:{port}/metrics"],
                             capture_output=True, text=True, timeout=120)
    finally:
        server.kill()
    report = json.loads(out.stdout)
    assert out.returncode == 1
    assert report["server"]["disabled_hooks"] == ["vllm.output_processor.process_outputs"]
    assert report["server"]["dropped"] == {"queue_full": 7}
    assert any("hooks disabled" in p and "process_outputs" in p for p in report["problems"])
