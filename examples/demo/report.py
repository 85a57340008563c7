"""The demo's HTML report: L1 and L3 panels as charts, the figures, span waterfalls.

Every chart is a dashboard panel's own PromQL, sent to the demo's Prometheus as
a range query over the load (``panels.series``) and drawn with Plotly; heatmap
panels are de-cumulated per bucket as Grafana's heatmap does. The waterfalls are
the slowest requests' traces as the trace store received them. One
self-contained file: Plotly's JavaScript is inlined, nothing is fetched.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from pathlib import Path

import jinja2
import plotly.graph_objects as go
import plotly.offline

from testbed.otlp_receiver import ReceivedSpan
from testbed.prometheus import PrometheusServer

from . import panels
from .figures import L1, L3, Figure, TenantCost

L1_CHARTS = ("TTFT distribution", "TTFT p50 / p95 / p99", "ITL p50 / p95 / p99",
             "E2E latency p50 / p95 / p99", "Where TTFT goes (mean per phase)",
             "Queue depth (waiting requests)", "Running requests", "Preemption rate",
             "KV-cache usage", "Request rate by instance",
             "Routing share per replica (vllm-router)")
L3_CHARTS = ("Cost per 1K tokens by tenant", "Spend by tenant",
             "Accelerator-seconds per request by tenant",
             "Provisioned accelerators: busy vs idle")
#: Grafana units -> Plotly axis formats
_TICKS = {"percentunit": ".0%", "percent": ".0f"}
_TEMPLATE = Path(__file__).with_name("report.html.j2")


def _times(values: Sequence[float]) -> list[dt.datetime]:
    return [dt.datetime.fromtimestamp(t, tz=dt.UTC) for t in values]


def _layout(fig: go.Figure, title: str, unit: str) -> go.Figure:
    fig.update_layout(title=title, height=320, margin={"l": 60, "r": 20, "t": 40, "b": 40},
                      legend={"orientation": "h", "y": -0.2}, template="plotly_white")
    fig.update_yaxes(title=unit or None, tickformat=_TICKS.get(unit))
    return fig


def heatmap(title: str, series: list[panels.Series]) -> go.Figure:
    """Cumulative ``le`` series -> events per second in each bucket."""
    rows = sorted((s for s in series if "le" in s.labels), key=lambda s: float(s.labels["le"]))
    if not rows:
        return _layout(go.Figure(), title, "")
    times = rows[0].times
    cumulative = [dict(zip(s.times, s.values, strict=True)) for s in rows]
    z = [[c.get(t, 0.0) - (cumulative[i - 1].get(t, 0.0) if i else 0.0) for t in times]
         for i, c in enumerate(cumulative)]
    labels = [("≤ " + s.labels["le"] + " s") if s.labels["le"] != "+Inf" else "> last"
              for s in rows]
    fig = go.Figure(go.Heatmap(x=_times(times), y=labels, z=z, colorscale="Viridis",
                               colorbar={"title": "req/s"}))
    return _layout(fig, title, "")


def timeseries(title: str, unit: str, series: list[panels.Series]) -> go.Figure:
    fig = go.Figure([go.Scatter(x=_times(s.times), y=s.values, mode="lines", name=s.name)
                     for s in series])
    return _layout(fig, title, unit)


def panel_chart(prom: PrometheusServer, panel: panels.Panel, start: float, end: float,
                step: float, rate_window_s: float) -> tuple[go.Figure, int]:
    """One panel as a chart, and how many series it got."""
    series = panels.series(prom, panel, start, end, step, rate_window_s)
    series = [s for s in series if any(not math.isnan(v) for v in s.values)]
    if panel.type == "heatmap":
        return heatmap(panel.title, series), len(series)
    return timeseries(panel.title, panel.unit, series), len(series)


def waterfall(trace_id: str, spans: list[ReceivedSpan], label: str) -> go.Figure:
    """One trace as a Gantt chart: a bar per span, children under their parent."""
    ids = {s.span_id for s in spans}
    children: dict[str, list[ReceivedSpan]] = {}
    for s in spans:
        children.setdefault(s.parent_span_id if s.parent_span_id in ids else "", []).append(s)
    ordered: list[tuple[int, ReceivedSpan]] = []

    def walk(parent: str, depth: int) -> None:
        for s in sorted(children.get(parent, []), key=lambda s: (s.start_ns, s.name)):
            ordered.append((depth, s))
            walk(s.span_id, depth + 1)

    walk("", 0)
    t0 = min(s.start_ns for s in spans)
    names = [f"{i:>3} " + "· " * depth + s.name for i, (depth, s) in enumerate(ordered)]
    services = [str(s.resource.get("service.name", "")) for _, s in ordered]
    fig = go.Figure()
    for service in dict.fromkeys(services):
        rows = [i for i, svc in enumerate(services) if svc == service]
        fig.add_trace(go.Bar(
            orientation="h", name=service or "unknown",
            y=[names[i] for i in rows],
            base=[(ordered[i][1].start_ns - t0) / 1e6 for i in rows],
            x=[max((ordered[i][1].end_ns - ordered[i][1].start_ns) / 1e6, 0.05) for i in rows],
            hovertext=[f"{ordered[i][1].name}: "
                       f"{(ordered[i][1].end_ns - ordered[i][1].start_ns) / 1e6:.2f} ms"
                       for i in rows], hoverinfo="text"))
    fig.update_yaxes(autorange="reversed", categoryorder="array", categoryarray=names,
                     tickfont={"family": "monospace", "size": 10})
    fig.update_layout(title=f"{label} (trace {trace_id})", barmode="overlay",
                      height=max(240, 22 * len(names) + 90), template="plotly_white",
                      margin={"l": 320, "r": 20, "t": 40, "b": 40},
                      xaxis_title="ms since the trace's first span")
    return fig


def _div(fig: go.Figure, chart_id: str) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=chart_id,
                       config={"displaylogo": False, "responsive": True})


def write(out: Path, *, prom: PrometheusServer, start: float, end: float,
          figures: list[Figure], costs: list[TenantCost],
          traces: list[tuple[str, str, list[ReceivedSpan]]],
          stack: list[tuple[str, str]], summary: dict) -> dict[str, int]:
    """Write the report to ``out``; returns the series count per chart (for the demo's log)."""
    step = max(1.0, (end - start) / 240)
    rate_window = max(10.0, 4 * step)
    sections = []
    counts: dict[str, int] = {}
    for name, dashboard, titles in (("L1 on-call", L1, L1_CHARTS), ("L3 cost", L3, L3_CHARTS)):
        found = panels.load(dashboard)
        charts = []
        for i, title in enumerate(titles):
            fig, n = panel_chart(prom, found[title], start, end, step, rate_window)
            counts[title] = n
            charts.append({"title": title, "series": n, "kind": found[title].type,
                           "html": _div(fig, f"{dashboard}-{i}")})
        sections.append({"name": name, "dashboard": dashboard, "charts": charts})
    waterfalls = [{"title": label, "trace_id": tid, "spans": len(spans),
                   "html": _div(waterfall(tid, spans, label), f"trace-{tid}")}
                  for tid, label, spans in traces]
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    page = env.from_string(_TEMPLATE.read_text()).render(
        plotly_js=plotly.offline.get_plotlyjs(), sections=sections, waterfalls=waterfalls,
        figures=figures, costs=costs, stack=stack, summary=summary,
        rate_window=f"{rate_window:.0f} s", step=f"{step:.0f} s",
        fmt=fmt, inf=math.inf)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return counts


def fmt(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if unit == "s":
        return f"{value * 1e3:.1f} ms"
    if unit == "ratio":
        return f"{value:.1%}"
    if unit == "usd":
        return f"${value:.6f}"
    return f"{value:.3g}"
