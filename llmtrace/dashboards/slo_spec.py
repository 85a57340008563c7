"""The Sloth spec, rendered with the SLO thresholds and objectives of the metric schema.

A latency SLO's threshold is defined once, in ``semconv/registry/metrics.yaml``
(``annotations.llmtrace.slo``), where the generator checks it is a bucket edge
of its histogram; the histogram buckets, the dashboards (``common.TTFT_SLO_S``)
and this spec all read it from ``llmtrace.schema``.
"""

from __future__ import annotations

from pathlib import Path

from llmtrace import schema
from llmtrace import semconv as sc

TEMPLATE = Path(__file__).with_name("sloth_spec.yaml.tmpl")
TTFT = sc.METRIC_GEN_AI_SERVER_TIME_TO_FIRST_TOKEN
ITL = sc.METRIC_LLMTRACE_SERVER_INTER_TOKEN_LATENCY


def _number(x: float) -> str:
    return f"{x:g}"


def placeholders() -> dict[str, str]:
    out = {}
    for key, metric in (("TTFT", TTFT), ("ITL", ITL)):
        threshold = schema.SLO_THRESHOLDS[metric]
        objective = schema.SLO_OBJECTIVES[metric] * 100
        out[f"@{key}_LE@"] = _number(threshold)
        out[f"@{key}_MS@"] = _number(threshold * 1000)
        out[f"@{key}_OBJECTIVE@"] = _number(round(objective, 6))
        out[f"@{key}_BUDGET@"] = _number(round(100 - objective, 6))
    return out


def render(template: Path = TEMPLATE) -> str:
    text = template.read_text()
    for key, value in placeholders().items():
        text = text.replace(key, value)
    return text


def sync(spec: Path, check: bool) -> bool:
    """True if ``spec`` is (check) or was (write) out of date with the schema."""
    want = render()
    stale = not spec.exists() or spec.read_text() != want
    if stale and not check:
        spec.parent.mkdir(parents=True, exist_ok=True)
        spec.write_text(want)
    return stale
