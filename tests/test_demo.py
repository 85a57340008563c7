"""``make demo``'s job end to end, then its report opened in headless Chromium.

The demo starts its own full stack (two vLLM replicas, vllm-router, the llmtrace
collector process, Prometheus with the SLO rules) and compares the dashboards'
PromQL with its own client. It runs last (conftest orders it), after the
session's other servers are stopped, so its replicas have the machine's two cores
as ``make demo`` would.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from bs4 import BeautifulSoup

from testbed.browser import chromium, render_dom, screenshot

pytestmark = [pytest.mark.vllm, pytest.mark.demo]

REPO = Path(__file__).resolve().parents[1]
#: make demo's default: fewer requests make the p99s a handful of samples each
REQUESTS = 120


@pytest.fixture(scope="module")
def demo(tmp_path_factory, server_pool) -> dict:
    server_pool.stop_all()  # the demo's two replicas get the cores, as under `make demo`
    workdir = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "demo" / "run_demo.py"),
                           "--requests", str(REQUESTS), "--workdir", str(workdir)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    summary_path = workdir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return {"proc": proc, "summary": summary, "report": workdir / "report.html",
            "workdir": workdir}


def _output(demo: dict) -> str:
    return demo["proc"].stdout[-6000:] + "\n" + demo["proc"].stderr[-6000:]


def test_demo_figures_from_promql_match_the_client(demo):
    summary = demo["summary"]
    assert demo["proc"].returncode == 0, _output(demo)
    assert summary["matched"] and summary["errors"] == 0, _output(demo)
    assert summary["traced"] == REQUESTS, "every request's trace reached the trace store"
    compared = [f for f in summary["figures"] if f["match"] is not None]
    names = {f["name"] for f in compared}
    assert {"TTFT p50", "TTFT p95", "TTFT p99", "ITL p50", "E2E p99", "request rate"} <= names
    for f in compared:
        assert f["dashboard"] is not None and f["client"] is not None, f
    # the printed figures are those of the summary
    assert "L1 figures: the dashboards' PromQL" in demo["proc"].stdout
    for f in compared:
        assert f["name"] in demo["proc"].stdout


def test_demo_cost_table_agrees_with_the_client_tokens(demo):
    costs = demo["summary"]["costs"]
    assert {c["tenant"] for c in costs} == {"acme", "globex", "initech"}
    assert sum(c["requests"] for c in costs) == REQUESTS
    for c in costs:
        # price-table USD from Prometheus (rate extrapolated over the window) against the
        # client's own usage counts priced by the same table
        assert c["usd_price_table"] == pytest.approx(c["usd_client"], rel=0.1), c
        assert c["usd_batch_share"] > 0 and c["accelerator_s_per_request"] > 0, c
    # globex's prompts share a cached document: cheaper input per token than initech's
    by = {c["tenant"]: c for c in costs}
    assert by["globex"]["usd_per_1k_tokens"] < by["initech"]["usd_per_1k_tokens"]


def test_demo_stopped_every_process_it_started(demo):
    endpoints = demo["summary"]["endpoints"]
    assert len(endpoints) >= 8  # 2 x (API server, engine metrics), router x 2, collector, ...
    listening = []
    for host, port in endpoints:
        with socket.socket() as s:
            s.settimeout(1)
            if s.connect_ex((host, port)) == 0:
                listening.append((host, port))
    assert not listening, f"still listening after the demo exited: {listening}"


@pytest.mark.skipif(chromium() is None, reason="chromium not installed (make system)")
def test_report_charts_render_with_data_in_chromium(demo, tmp_path):
    report = demo["report"]
    assert report.exists(), _output(demo)
    dom = BeautifulSoup(render_dom(report), "html.parser")
    charts = dom.select("div.chart[data-panel]")
    expected = demo["summary"]["charts"]
    assert [c["data-panel"] for c in charts] == list(expected)
    assert len(charts) >= 15
    empty = []
    for chart in charts:
        title = chart["data-panel"]
        assert chart.select_one("div.js-plotly-plot"), f"{title}: Plotly did not draw"
        if chart["data-kind"] == "heatmap":
            drawn = [i for i in chart.select("image")  # the heatmap's cells, as one bitmap
                     if (i.get("xlink:href") or i.get("href") or "").startswith("data:image")]
        else:  # a drawn line has at least two points: "M x,y L x,y ..."
            drawn = [p for p in chart.select("path.js-line") if "L" in p.get("d", "")]
        if not drawn:
            empty.append(title)
    assert not empty, f"charts drawn without data: {empty}"
    # the L1 charts the issue names carry data in the browser, not only in the summary
    for title in ("TTFT distribution", "TTFT p50 / p95 / p99", "Queue depth (waiting requests)",
                  "Preemption rate", "Cost per 1K tokens by tenant"):
        assert title not in empty and expected[title] > 0, title
    waterfalls = dom.select("div.chart.waterfall")
    assert len(waterfalls) == 3
    for w in waterfalls:
        bars = [p for p in w.select("g.point path") if p.get("d")]
        assert len(bars) == int(w["data-spans"]) >= 5, w["data-trace"]
    rows = dom.select("#l1-figures tr")[1:]
    assert rows and all(r.select("td")[-1].get_text(strip=True) != "no" for r in rows)
    assert len(dom.select("#tenant-costs tr")) == 4
    # for a person: what the browser drew
    png = screenshot(report, tmp_path / "report.png")
    assert png.stat().st_size > 50_000
