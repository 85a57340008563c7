"""The semconv registry is the single source of names, and generated code stays fresh."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmtrace import semconv
from testbed.otlp_receiver import ReceivedEvent, ReceivedPoint, ReceivedSpan
from testbed.registry import registry_violations

REPO = Path(__file__).resolve().parents[1]
GENERATOR = REPO / "semconv" / "codegen" / "generate.py"


def run_generator(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GENERATOR), *args],
                          capture_output=True, text=True, cwd=REPO)


def load_generator():
    spec = importlib.util.spec_from_file_location("semconv_generate", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def registry_copy(tmp_path: Path) -> dict[str, Path]:
    """A private copy of the registry and of its generated outputs."""
    reg = tmp_path / "registry"
    shutil.copytree(REPO / "semconv" / "registry", reg)
    py = tmp_path / "semconv.py"
    md = tmp_path / "REGISTRY.md"
    shutil.copy(REPO / "llmtrace" / "semconv.py", py)
    shutil.copy(REPO / "semconv" / "REGISTRY.md", md)
    return {"registry": reg, "python": py, "markdown": md}


def paths(c: dict[str, Path]) -> list[str]:
    return ["--registry", str(c["registry"]), "--python", str(c["python"]),
            "--markdown", str(c["markdown"])]


def test_generated_files_are_fresh():
    result = run_generator("--check")
    assert result.returncode == 0, result.stderr


def test_check_fails_when_registry_changes_without_regeneration(registry_copy):
    assert run_generator("--check", *paths(registry_copy)).returncode == 0
    yaml_file = registry_copy["registry"] / "attributes.yaml"
    yaml_file.write_text(yaml_file.read_text().replace(
        "brief: Data-parallel rank of the engine core",
        "brief: The data-parallel rank of the engine core"))
    stale = run_generator("--check", *paths(registry_copy))
    assert stale.returncode == 1
    assert "stale generated semconv files" in stale.stderr
    assert str(registry_copy["python"]) in stale.stderr
    regenerated = run_generator(*paths(registry_copy))
    assert regenerated.returncode == 0, regenerated.stderr
    assert "The data-parallel rank of the engine core" in registry_copy["python"].read_text()
    assert run_generator("--check", *paths(registry_copy)).returncode == 0


def test_unresolved_ref_is_a_clear_error(registry_copy):
    spans = registry_copy["registry"] / "spans.yaml"
    spans.write_text(spans.read_text().replace(
        "- ref: llmtrace.queue.reason", "- ref: llmtrace.queue.no_such_attribute"))
    result = run_generator("--check", *paths(registry_copy))
    assert result.returncode == 2
    assert "llmtrace.queue.no_such_attribute" in result.stderr
    assert "span.llmtrace.queue" in result.stderr


def test_prometheus_names_follow_the_otlp_translation_rules():
    gen = load_generator()
    assert gen.prometheus_name("gen_ai.server.time_to_first_token", "s", "histogram") == \
        "gen_ai_server_time_to_first_token_seconds"
    assert gen.prometheus_name("llmtrace.server.prompt_tokens", "{token}", "counter") == \
        "llmtrace_server_prompt_tokens_total"
    assert gen.prometheus_name("llmtrace.cost.accelerator_seconds", "s", "counter") == \
        "llmtrace_cost_accelerator_seconds_total"
    # unit "1": no word, as the SDK's Prometheus exporter (opentelemetry-exporter-prometheus)
    # writes it; checked against the real exporter in tests/test_hardware_vllm.py
    assert gen.prometheus_name("x.utilization", "1", "gauge") == "x_utilization"


def test_constants_and_sets_come_from_the_registry():
    assert semconv.GEN_AI_REQUEST_MODEL == "gen_ai.request.model"
    assert semconv.SPAN_LLMTRACE_PREFILL_CHUNK == "llmtrace.prefill.chunk"
    assert semconv.SPAN_KINDS[semconv.SPAN_LLMTRACE_REQUEST] == "server"
    assert semconv.METRIC_UNITS[semconv.METRIC_GEN_AI_SERVER_TIME_TO_FIRST_TOKEN] == "s"
    assert semconv.LlmtraceRequestFinishReasonValues.LENGTH.value == "length"
    # vLLM's built-in names are known for parsing but never emitted by llmtrace
    assert "gen_ai.latency.time_to_first_token" in semconv.INPUT_ONLY_ATTRIBUTES
    assert "gen_ai.latency.time_to_first_token" not in semconv.ATTRIBUTES
    assert semconv.SPAN_LLM_REQUEST in semconv.INPUT_ONLY_SPANS
    # every metric carries the fleet labels the dashboards filter on
    for metric in (semconv.METRIC_GEN_AI_SERVER_TIME_TO_FIRST_TOKEN,
                   semconv.METRIC_LLMTRACE_SERVER_REQUESTS):
        assert {semconv.GEN_AI_REQUEST_MODEL, semconv.LLMTRACE_TENANT,
                semconv.LLMTRACE_DEPLOYMENT_VERSION} <= semconv.METRIC_ATTRIBUTES[metric]


def _span(name: str, attrs: dict, scope: str = "llmtrace.vllm", events=()) -> ReceivedSpan:
    return ReceivedSpan(name=name, trace_id="1" * 32, span_id="2" * 16, parent_span_id="",
                        kind=1, start_ns=0, end_ns=1, attributes=attrs, events=tuple(events),
                        status_code=0, status_message="", resource={}, scope=scope,
                        transport="grpc")


def _point(metric: str, unit: str, attrs: dict) -> ReceivedPoint:
    return ReceivedPoint(metric=metric, unit=unit, kind="sum", attributes=attrs, value=1,
                         count=None, sum=None, bucket_counts=(), explicit_bounds=(),
                         resource={}, scope="llmtrace.vllm", time_ns=0)


def test_registry_helper_accepts_registered_and_flags_unknown_names():
    good = _span("llmtrace.queue", {"llmtrace.queue.reason": "arrival"},
                 events=[ReceivedEvent("llmtrace.preempted", 0,
                                       {"llmtrace.preemption.reason": "kv_cache_full"})])
    assert registry_violations([good], [_point("llmtrace.server.requests", "{request}",
                                                {"gen_ai.request.model": "m"})]) == []
    bad = [
        _span("llmtrace.queue", {"llmtrace.queue.reasn": "arrival"}),
        _span("llmtrace.mystery", {}),
        _span("llmtrace.queue", {}, events=[ReceivedEvent("oops", 0, {})]),
        _span("llm_request", {"anything": 1}, scope="vllm.tracing.otel"),  # not ours: ignored
    ]
    points = [_point("llmtrace.server.requestz", "{request}", {}),
              _point("llmtrace.server.requests", "s", {"tenant": "x"})]
    problems = registry_violations(bad, points)
    assert any("llmtrace.queue.reasn" in p for p in problems)
    assert any("'llmtrace.mystery'" in p for p in problems)
    assert any("event 'oops'" in p for p in problems)
    assert any("llmtrace.server.requestz" in p for p in problems)
    assert any("unit 's'" in p for p in problems)
    assert any("'tenant'" in p for p in problems)
    assert not any("llm_request" in p for p in problems)
