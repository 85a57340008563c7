"""The availability SLO fires from collector-derived series alone.

A deployment without the SDK gets its request counters from the collector's
Prometheus output. The series' label sets are taken from a real
``DerivedMetrics`` exposition (an ok request and a failed one), grown over two
hours in a promtool unit test against the generated availability rules: 10% of
requests failing must page. Had the collector's request counter no
``error_type`` label, the error selector would match nothing and this fails.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from llmtrace import semconv as sc
from llmtrace.pipeline.metrics import DerivedMetrics
from llmtrace.record import RequestRecord

RULES = Path(__file__).resolve().parents[1] / "dashboards" / "slo" / "rules" / \
    "availability.rules.yml"
REQUESTS = sc.PROMETHEUS_NAMES[sc.METRIC_LLMTRACE_SERVER_REQUESTS]
#: the hand-written promtool tests of the same rules: their expected alerts for a
#: 10% failure rate on model "llama" (labels and annotations)
SDK_TESTS = RULES.parents[1] / "tests" / "availability.test.yml"


def _record(error_type: str | None) -> RequestRecord:
    return RequestRecord(
        source="llmtrace", trace_id="", request_id="r", model="llama", tenant="acme",
        version="v1", finish_reason="error" if error_type else "stop", error_type=error_type,
        start_ns=0, end_ns=0, e2e_s=0.5, ttft_s=None if error_type else 0.05,
        prompt_tokens=10, output_tokens=0 if error_type else 5)


def _series_selector(labels: dict[str, str]) -> str:
    # as Prometheus stores a scrape: an empty label is no label
    inner = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if v != "")
    return f"{REQUESTS}{{{inner}}}"


def expected_alerts() -> dict:
    """The fast-burn case of the SDK-series test: page and ticket for llama at 10 m."""
    fast = yaml.safe_load(SDK_TESTS.read_text())["tests"][0]
    [alerts] = [a for a in fast["alert_rule_test"] if a["eval_time"] == "10m"]
    assert {a["exp_labels"]["sloth_severity"] for a in alerts["exp_alerts"]} == \
        {"page", "ticket"}
    return alerts


def test_availability_page_fires_from_collector_series(tmp_path: Path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: run `make system`", pytrace=False)
    metrics = DerivedMetrics()
    metrics.observe(_record(None))
    metrics.observe(_record("engine_error"))
    text = generate_latest(metrics.registry).decode()
    found = [s.labels for fam in text_string_to_metric_families(text) for s in fam.samples
             if s.name == REQUESTS]
    ok = next(lab for lab in found if not lab.get("error_type"))
    failed = next(lab for lab in found if lab.get("error_type") == "engine_error")
    test = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {"series": _series_selector(ok), "values": "0+900x120"},
                {"series": _series_selector(failed), "values": "0+100x120"},
            ],
            "alert_rule_test": [expected_alerts()],
        }],
    }
    path = tmp_path / "collector_availability.test.yml"
    path.write_text(yaml.safe_dump(test))
    proc = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
