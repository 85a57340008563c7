"""The generated Grafana dashboards: fresh, decodable, complete, and querying only known names.

Runs without vLLM servers or Prometheus (tests/test_dashboards_prometheus.py
runs every query against a real one). Tests that build dashboards need the
pinned grafana-foundation-sdk (``pip install -e '.[dashboards]'``).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from llmtrace import semconv as sc
from llmtrace.dashboards.common import ROUTER_METRICS
from llmtrace.dashboards.generate import (
    DEFAULT_VARIABLES,
    annotation_queries,
    iter_panels,
    main,
    metric_names,
    panel_queries,
    substitute,
    variables_used,
)

REPO = Path(__file__).resolve().parents[1]
DASHBOARDS = REPO / "dashboards"
FILES = ("llmtrace-l1-oncall.json", "llmtrace-l2-quality.json", "llmtrace-l3-cost.json")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
MULTI = ("model", "tenant", "version", "instance")
BUILTINS = {"__rate_interval", "__interval", "__range"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
#: Sloth's recording rules (standard names), plus the 30d SLI Sloth also writes
SLOTH_RULE = re.compile(
    r"slo:(sli_error:ratio_rate(5m|30m|1h|2h|6h|1d|3d|30d)|error_budget:ratio|objective:ratio"
    r"|current_burn_rate:ratio|period_burn_rate:ratio|period_error_budget_remaining:ratio"
    r"|time_period:days)")
VLLM_LINE = re.compile(r"(?P<name>\S+)\s+#\s*(?P<type>\w+)\s+(?P<declared>\S+)\s+(?P<path>\S+)")


def load(name: str) -> dict:
    return json.loads((DASHBOARDS / name).read_text())


def panels(dashboard: dict) -> list[dict]:
    return [p for p in iter_panels(dashboard) if p["type"] != "row"]


def all_queries(dashboard: dict) -> list[tuple[str, str]]:
    return panel_queries(dashboard) + annotation_queries(dashboard)


def vllm_entries() -> list[dict[str, str]]:
    lines = (DASHBOARDS / "vllm_metrics.txt").read_text().splitlines()
    entries = []
    for line in lines:
        if line.strip() and not line.startswith("#"):
            m = VLLM_LINE.fullmatch(line.strip())
            assert m, f"vllm_metrics.txt: cannot parse {line!r}"
            entries.append(m.groupdict())
    return entries


def known_metric_names() -> set[str]:
    names = set()
    for metric, prom in sc.PROMETHEUS_NAMES.items():
        names.add(prom)
        if sc.METRIC_INSTRUMENTS[metric] == "histogram":
            names.update(prom + s for s in HISTOGRAM_SUFFIXES)
    names.update(ROUTER_METRICS)  # checked against the real router in test_vllm_router.py
    for e in vllm_entries():
        names.add(e["name"])
        if e["type"] == "histogram":
            names.update(e["name"] + s for s in HISTOGRAM_SUFFIXES)
    return names


# -- generation ----------------------------------------------------------------------------

def test_committed_dashboards_are_fresh():
    pytest.importorskip("grafana_foundation_sdk")
    assert main(["--check"]) == 0, "run: python -m llmtrace.dashboards.generate"


def test_check_fails_on_stale_or_missing_json(tmp_path: Path):
    pytest.importorskip("grafana_foundation_sdk")
    assert main(["--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)
    assert main(["--check", "--out", str(tmp_path)]) == 0
    stale = tmp_path / FILES[0]
    stale.write_text(stale.read_text().replace("TTFT", "ttft", 1))
    assert main(["--check", "--out", str(tmp_path)]) == 1
    stale.unlink()
    assert main(["--check", "--out", str(tmp_path)]) == 1


def test_generation_is_deterministic():
    pytest.importorskip("grafana_foundation_sdk")
    from llmtrace.dashboards.generate import build_all

    first, second = build_all(), build_all()
    assert first == second
    for text in first.values():
        assert json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n" == text


@pytest.mark.parametrize("name", FILES)
def test_dashboard_round_trips_through_the_sdk_decoder(name: str):
    pytest.importorskip("grafana_foundation_sdk")
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard

    from llmtrace.dashboards.generate import render

    register_default_plugins()
    text = (DASHBOARDS / name).read_text()
    decoded = Dashboard.from_json(json.loads(text))
    assert decoded.uid == name.removesuffix(".json")
    assert render(decoded) == text


# -- panels --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FILES)
def test_every_panel_has_title_description_unit_thresholds_and_a_unique_id(name: str):
    dashboard = load(name)
    ids = [p.get("id") for p in iter_panels(dashboard)]
    assert all(isinstance(i, int) for i in ids), ids
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {name}"
    for p in panels(dashboard):
        where = f"{name} / {p.get('title')!r}"
        assert p.get("title"), where
        assert len(p.get("description", "")) >= 40, f"{where}: description too thin"
        defaults = p["fieldConfig"]["defaults"]
        assert defaults.get("unit"), f"{where}: no unit"
        steps = defaults.get("thresholds", {}).get("steps", [])
        assert steps and steps[0]["value"] is None, f"{where}: no thresholds"
        assert p.get("datasource") == DATASOURCE, where
        assert p.get("targets"), f"{where}: no query"
        for t in p["targets"]:
            assert t.get("datasource") == DATASOURCE, where
            assert t.get("expr") and t.get("refId"), where


@pytest.mark.parametrize("name", FILES)
def test_no_panel_waits_for_a_later_feature(name: str):
    """Every panel's series has a producer: none says it is fed by something unbuilt."""
    for p in panels(load(name)):
        assert "later feature" not in p["description"], p["title"]


def test_l1_marks_the_200ms_ttft_slo():
    dashboard = load("llmtrace-l1-oncall.json")
    by_title = {p["title"]: p for p in panels(dashboard)}
    heatmap = by_title["TTFT distribution"]
    assert heatmap["type"] == "heatmap"
    assert heatmap["targets"][0]["format"] == "heatmap"
    assert "200 ms" in heatmap["description"]
    marks = [expr for _, expr in annotation_queries(dashboard)]
    assert any("gen_ai_server_time_to_first_token_seconds_bucket" in e and e.endswith("> 0.2")
               for e in marks), marks
    steps = by_title["TTFT p50 / p95 / p99"]["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert 0.2 in [s["value"] for s in steps]


def test_dashboards_cover_the_required_views():
    titles = {name: " | ".join(p["title"] for p in panels(load(name))) for name in FILES}
    for needle in ("Request rate by model", "Request rate by instance", "Request rate by version",
                   "error ratio by model", "error ratio by instance", "error ratio by version",
                   "TTFT distribution", "TTFT p50", "ITL p50", "E2E latency p50",
                   "Queue depth", "Running requests", "Preemption rate", "KV-cache usage",
                   "Accelerator utilisation", "TTFT p99 by version", "Error budget remaining",
                   "Burn rate"):
        assert needle in titles["llmtrace-l1-oncall.json"], needle
    for needle in ("Composite quality score (mean ± 1σ)", "Quality score by dimension",
                   "Hallucination rate", "KL divergence", "PSI", "Output entropy",
                   "Finish reasons", "Output length distribution", "User regeneration rate"):
        assert needle in titles["llmtrace-l2-quality.json"], needle
    for needle in ("Cost per 1K tokens by model", "Cost per 1K tokens by tenant",
                   "Accelerator-seconds per request", "Utilisation vs provisioned",
                   "Monthly burn rate vs budget", "Speculative decoding acceptance",
                   "Prefix / KV-cache hit rate", "KV-cache headroom per instance"):
        assert needle in titles["llmtrace-l3-cost.json"], needle


# -- variables -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", FILES)
def test_template_variables(name: str):
    dashboard = load(name)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    multi = list(MULTI) + (["slo"] if name == "llmtrace-l1-oncall.json" else [])
    for var in multi:
        v = variables[var]
        assert v["type"] == "query" and v["multi"] and v["includeAll"], var
        assert v["allValue"] == ".*", var
        assert v["datasource"] == DATASOURCE, var
        assert v["query"].startswith("label_values("), var
    if name == "llmtrace-l3-cost.json":
        assert variables["budget"]["type"] == "textbox"
        float(variables["budget"]["query"])
        assert variables["cost_basis"]["type"] == "custom"
        assert set(variables["cost_basis"]["query"].split(",")) == {
            str(v) for v in sc.LlmtraceCostBasisValues}
    used = {v for _, expr in all_queries(dashboard) for v in variables_used(expr)}
    assert used <= set(variables) | BUILTINS, used - set(variables) - BUILTINS
    assert used <= set(DEFAULT_VARIABLES), "substitute() needs a default for every variable"


@pytest.mark.parametrize("name", FILES)
def test_queries_match_multi_value_variables_with_regex(name: str):
    for title, expr in all_queries(load(name)):
        assert "$__rate_interval" in expr or "rate(" not in expr, title
        bad = re.findall(r'(\w+)\s*!?=\s*"\$\{?(model|tenant|version|instance|slo)\b', expr)
        assert not bad, f"{title}: use =~ for multi-value variables: {bad}"


# -- metric names ----------------------------------------------------------------------

def test_metric_names_parses_promql():
    expr = ('histogram_quantile(0.99, sum by (le, gen_ai_request_model) (rate('
            'gen_ai_server_time_to_first_token_seconds_bucket{le="0.2", x=~"$model"}'
            '[$__rate_interval])))\n/ on (sloth_id) group_left slo:error_budget:ratio{a="b"}'
            ' + 1e12 * vllm:kv_cache_usage_perc or vector($budget) > 0')
    assert metric_names(expr) == {"gen_ai_server_time_to_first_token_seconds_bucket",
                                  "slo:error_budget:ratio", "vllm:kv_cache_usage_perc"}
    assert metric_names("sum(rate(foo_total[5m])) / ignoring (reason) group_left bar") == {
        "foo_total", "bar"}


@pytest.mark.parametrize("name", FILES)
def test_every_queried_metric_is_known(name: str):
    known = known_metric_names()
    for title, expr in all_queries(load(name)):
        names = metric_names(expr)
        assert names or expr.startswith("vector("), f"{title}: no metric in {expr!r}"
        unknown = {n for n in names if n not in known and not SLOTH_RULE.fullmatch(n)}
        assert not unknown, f"{name} / {title}: unknown metrics {unknown}"


def test_vllm_metrics_file_lists_exactly_what_the_dashboards_query():
    listed = {e["name"] for e in vllm_entries()}
    queried = {n for name in FILES for _, expr in all_queries(load(name))
               for n in metric_names(expr) if n.startswith("vllm:")}
    assert queried == listed


def test_vllm_metrics_are_declared_by_the_installed_vllm():
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        pytest.skip("vLLM is not installed")
    site = Path(spec.origin).resolve().parents[1]
    for e in vllm_entries():
        source = site / e["path"]
        assert source.is_file(), e
        assert f'"{e["declared"]}"' in source.read_text(), e
        assert e["name"] in (e["declared"], e["declared"] + "_total"), e
        if e["type"] == "counter":
            assert e["name"].endswith("_total"), e


# -- query helpers --------------------------------------------------------------------------

def test_substitute_fills_every_variable():
    expr = ('sum(rate(x{a=~"$model", b=~"${tenant}", c=~"$version", i=~"$instance", '
            's=~"$slo", k="$cost_basis"}[$__rate_interval])) / $budget + increase(y[$__range])')
    out = substitute(expr)
    assert "$" not in out
    assert '[1m]' in out and 'a=~".*"' in out and 'k="batch_share"' in out
    assert substitute("x{m=~\"$model\"}", {"model": "tiny"}) == 'x{m=~"tiny"}'
    with pytest.raises(KeyError):
        substitute("x{m=~\"$nope\"}")


@pytest.mark.parametrize("name", FILES)
def test_panel_queries_return_every_target(name: str):
    dashboard = load(name)
    queries = panel_queries(dashboard)
    assert len(queries) == sum(len(p["targets"]) for p in panels(dashboard))
    for _, expr in queries:
        assert "$" not in substitute(expr)


# -- scrape configuration ------------------------------------------------------------------

def _relabel(rule: dict, value: str) -> str | None:
    """Prometheus ``replace`` semantics: anchored regex, ``$1`` groups."""
    m = re.fullmatch(rule["regex"], value)
    return None if m is None else re.sub(r"\$(\d+)", lambda g: m.group(int(g.group(1))),
                                         rule["replacement"])


def test_scrape_config_renames_vllm_metrics_back_to_colon_names():
    config = yaml.safe_load((DASHBOARDS / "prometheus" / "scrape-vllm.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert set(jobs) == {"vllm", "llmtrace-engine", "llmtrace-collector", "vllm-router"}
    # the router's vllm_router_* names stay as they are: its own job renames nothing
    assert "metric_relabel_configs" not in jobs["vllm-router"]
    (rename,) = [r for r in jobs["vllm"]["metric_relabel_configs"]
                 if r.get("target_label") == "__name__"]
    assert rename["source_labels"] == ["__name__"]
    assert _relabel(rename, "vllm_num_requests_running") == "vllm:num_requests_running"
    assert _relabel(rename, "vllm:num_requests_running") is None  # idempotent
    assert _relabel(rename, "llmtrace_server_requests_total") is None
    for job in ("vllm", "llmtrace-engine"):
        (strip,) = jobs[job]["relabel_configs"]
        assert strip["target_label"] == "instance"
        assert _relabel(strip, "10.0.0.7:9464") == "10.0.0.7"
    ports = {name: j["static_configs"][0]["targets"][0].rsplit(":", 1)[1]
             for name, j in jobs.items()}
    assert ports["llmtrace-engine"] == "9464" and ports["llmtrace-collector"] == "8889"
    assert ports["vllm-router"] == "29000"  # vllm-router's --prometheus-port default
    # the collector's copies of what the SDK exports at the source go; the rest stays
    (drop,) = jobs["llmtrace-collector"]["metric_relabel_configs"]
    assert drop["action"] == "drop" and drop["source_labels"] == ["__name__"]
    for name in ("gen_ai_server_time_to_first_token_seconds_bucket",
                 "llmtrace_server_requests_total", "llmtrace_cost_accelerator_seconds_total",
                 "llmtrace_cost_usd_total", "llmtrace_pipeline_unpriced_requests_total"):
        assert re.fullmatch(drop["regex"], name), name
    for name in ("llmtrace_pipeline_dropped_spans_total",
                 "llmtrace_quality_score_bucket", "llmtrace_drift_psi"):
        assert not re.fullmatch(drop["regex"], name), name


def test_scrape_config_is_valid_for_promtool(tmp_path: Path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (make system)")
    result = subprocess.run([promtool, "check", "config",
                             str(DASHBOARDS / "prometheus" / "scrape-vllm.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
