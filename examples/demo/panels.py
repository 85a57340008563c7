"""The committed Grafana dashboards' panels, evaluated against Prometheus as Grafana would.

The demo prints and charts nothing of its own making: each figure is a panel of
``dashboards/llmtrace-*.json``, found by its title, its PromQL sent with the
dashboard variables filled in (``$__rate_interval`` becomes the window asked
for) and its series named by the panel's own legend format.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from llmtrace.dashboards.generate import iter_panels, substitute
from testbed.prometheus import PrometheusServer

DASHBOARDS = Path(__file__).resolve().parents[2] / "dashboards"
_LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")


@dataclass(frozen=True)
class Target:
    legend: str
    expr: str


@dataclass(frozen=True)
class Panel:
    dashboard: str
    title: str
    type: str  # timeseries, heatmap, stat, ...
    unit: str
    targets: tuple[Target, ...]


@dataclass
class Series:
    name: str
    labels: dict[str, str]
    times: list[float]
    values: list[float]


def load(dashboard: str) -> dict[str, Panel]:
    """Panels of ``dashboards/<dashboard>.json`` by title (the first of a repeated title)."""
    model = json.loads((DASHBOARDS / f"{dashboard}.json").read_text())
    panels: dict[str, Panel] = {}
    for p in iter_panels(model):
        targets = tuple(Target(t.get("legendFormat", ""), t["expr"])
                        for t in p.get("targets", []) if t.get("expr"))
        if targets and p["title"] not in panels:
            unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
            panels[p["title"]] = Panel(dashboard, p["title"], p["type"], unit, targets)
    return panels


def legend(fmt: str, labels: dict[str, str]) -> str:
    """Grafana's legend: ``{{label}}`` replaced by the series' label value."""
    return _LEGEND.sub(lambda m: labels.get(m.group(1), ""), fmt).strip() or \
        ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "value"


def _expr(target: Target, window_s: float, variables: dict[str, str] | None) -> str:
    window = f"{max(1, round(window_s))}s"
    return substitute(target.expr, {"__rate_interval": window, "__interval": window,
                                    "__range": window, **(variables or {})})


def instant(prom: PrometheusServer, panel: Panel, at: float, window_s: float,
            variables: dict[str, str] | None = None) -> dict[str, float]:
    """The panel's value per legend at ``at``, rates taken over the last ``window_s``."""
    out: dict[str, float] = {}
    for target in panel.targets:
        for row in prom.query(_expr(target, window_s, variables), at=at):
            out[legend(target.legend, row.get("metric", {}))] = float(row["value"][1])
    return out


def series(prom: PrometheusServer, panel: Panel, start: float, end: float, step: float,
           rate_window_s: float, variables: dict[str, str] | None = None) -> list[Series]:
    """The panel's time series over [start, end], as a Grafana time-series panel shows them."""
    out: list[Series] = []
    for target in panel.targets:
        for row in prom.query_range(_expr(target, rate_window_s, variables), start, end, step):
            labels = row.get("metric", {})
            points = [(float(t), float(v)) for t, v in row["values"]]
            out.append(Series(legend(target.legend, labels), labels,
                              [t for t, _ in points], [v for _, v in points]))
    return out
