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
