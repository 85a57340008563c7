"""The quality-loop alert rules: well-formed, and firing (and holding) as designed on
promtool's synthetic series: a shifted input stream's PSI, a low judge score, a high
hallucination rate, a failing judge, a judge dropping work."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "dashboards" / "prometheus" / "quality.rules.yml"
RULES_TEST = REPO / "dashboards" / "prometheus" / "tests" / "quality.test.yml"


def test_promtool_checks_the_quality_rules(promtool: str):
    proc = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "5 rules found" in proc.stdout


def test_promtool_unit_tests_fire_and_hold_the_quality_alerts(promtool: str):
    proc = subprocess.run([promtool, "test", "rules", str(RULES_TEST)], capture_output=True,
                          text=True, timeout=60, cwd=RULES_TEST.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout
