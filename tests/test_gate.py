"""Canary-versus-stable gates: statistics equal scipy's, the generated Argo, Flagger and
alert files are fresh and well-formed, the alerts fire as designed (promtool), and
``llmtrace gate`` decides right against a real Prometheus scraping a real exposition."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from scipy import stats

from llmtrace import cli, schema
from llmtrace import semconv as sc
from llmtrace.quality import gate
from llmtrace.quality import gate_queries as q
from testbed.ports import free_port
from testbed.prometheus import PrometheusServer, wait_until

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / q.RULES_FILE
RULES_TEST = REPO / "dashboards" / "prometheus" / "tests" / "canary.test.yml"


# -- statistics ----------------------------------------------------------------------------

@pytest.mark.parametrize("alternative", ["greater", "less"])
@pytest.mark.parametrize(("stable", "canary"), [
    ([5, 10, 20, 3, 0, 1], [2, 6, 18, 8, 4, 2]),       # canary shifted up
    ([50, 30, 15, 5], [48, 33, 14, 5]),                 # about equal
    ([0, 0, 90, 10], [0, 40, 55, 5]),                   # canary shifted down, heavy ties
])
def test_binned_mann_whitney_equals_scipy_on_the_expanded_events(stable, canary, alternative):
    ours = gate.binned_mann_whitney(stable, canary, alternative)
    ref = stats.mannwhitneyu(np.repeat(np.arange(len(canary)), canary),
                             np.repeat(np.arange(len(stable)), stable),
                             alternative=alternative, method="asymptotic", use_continuity=True)
    assert ours.u == pytest.approx(ref.statistic)
    assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert ours.effect == pytest.approx(ref.statistic / (sum(stable) * sum(canary)))


def test_binned_mann_whitney_without_a_shift_in_one_bin_is_no_evidence():
    assert gate.binned_mann_whitney([0, 10, 0], [0, 7, 0]).p_value == 1.0
    assert math.isnan(gate.binned_mann_whitney([0, 0], [1, 2]).p_value)


@pytest.mark.parametrize(("bad_s", "n_s", "bad_c", "n_c"),
                         [(10, 1000, 25, 1000), (8, 400, 80, 400), (30, 500, 20, 800)])
def test_two_proportion_z_is_the_one_sided_uncorrected_chi_squared(bad_s, n_s, bad_c, n_c):
    ours = gate.two_proportion(bad_s, n_s, bad_c, n_c)
    chi2 = stats.chi2_contingency([[bad_s, n_s - bad_s], [bad_c, n_c - bad_c]], correction=False)
    assert ours.z ** 2 == pytest.approx(chi2.statistic)
    worse = bad_c / n_c > bad_s / n_s
    assert ours.p_value == pytest.approx(chi2.pvalue / 2 if worse else 1 - chi2.pvalue / 2)
    assert ours.difference == pytest.approx(bad_c / n_c - bad_s / n_s)
    assert ours.upper_bound > ours.difference


def test_two_proportion_with_no_bad_events_anywhere_is_no_evidence():
    t = gate.two_proportion(0, 500, 0, 300)
    assert (t.p_value, t.difference) == (1.0, 0.0)


def test_bucket_quantile_interpolates_like_histogram_quantile():
    edges, cum = (0.1, 0.2, 0.5, math.inf), [10, 20, 30, 40]
    assert gate.bucket_quantile(0.5, edges, cum) == pytest.approx(0.2)
    assert gate.bucket_quantile(0.375, edges, cum) == pytest.approx(0.15)
    assert gate.bucket_quantile(0.125, edges, cum) == pytest.approx(0.05)
    assert gate.bucket_quantile(0.99, edges, cum) == 0.5  # in +Inf: the highest finite edge
    assert math.isnan(gate.bucket_quantile(0.5, edges, [0, 0, 0, 0]))


def test_holm_adjusts_step_down():
    assert gate.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert gate.holm([0.5]) == [0.5]


def _result(name: str, verdict: str, required: bool = False) -> gate.CheckResult:
    return gate.CheckResult(name, verdict, "", required=required)


def test_overall_fail_wins_then_inconclusive_then_pass():
    P, F, I, S = gate.PASS, gate.FAIL, gate.INCONCLUSIVE, gate.SKIPPED  # noqa: E741
    assert gate.overall([_result("ttft", P), _result("errors", F), _result("itl", I)]) == F
    assert gate.overall([_result("ttft", P), _result("itl", I)]) == I
    assert gate.overall([_result("ttft", P), _result("quality", S)]) == P
    assert gate.overall([_result("ttft", P), _result("quality", S, required=True)]) == I


class FakePrometheus:
    """Judge-score series of two versions, answered by which side and series a query reads."""

    url, at = "fake", 0.0
    EDGES = ("0.25", "0.5", "0.75", "1", "+Inf")
    MIDS = (0.125, 0.375, 0.625, 0.875, 1.0)

    def __init__(self, bins: dict[str, dict[str, list[int]]]) -> None:
        self.bins = bins  # side -> dimension -> events per bucket

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        side = "canary" if f'{q.VERSION}="v2"' in expr else "stable"
        rows = []
        for dim, counts in self.bins[side].items():
            if "_bucket" in expr:
                rows += [({q.DIMENSION: dim, "le": le}, float(c))
                         for le, c in zip(self.EDGES, np.cumsum(counts), strict=True)]
            elif "_sum" in expr:
                rows.append(({q.DIMENSION: dim}, float(np.dot(counts, self.MIDS))))
        return rows


def _quality(bins) -> gate.CheckResult:
    return gate.quality_check(FakePrometheus(bins), gate.GateSpec("m", "v1", "v2"))


def test_quality_fails_on_the_dimension_that_dropped():
    same = [0, 10, 50, 40, 0]
    result = _quality({"stable": {"composite": same, "accuracy": [0, 5, 25, 20, 0]},
                       "canary": {"composite": same, "accuracy": [20, 20, 10, 0, 0]}})
    assert result.verdict == gate.FAIL and "accuracy" in result.reason
    assert result.stable["dimension"] == "composite"  # the row still shows the composite
    dims = {d["dimension"]: d for d in result.details}
    assert dims["composite"]["verdict"] == gate.PASS
    assert dims["accuracy"]["p_adjusted"] == pytest.approx(min(1, 2 * dims["accuracy"]["p_value"]))


def test_a_rarely_scored_dimension_does_not_hold_a_passing_composite():
    same = [0, 10, 50, 40, 0]
    result = _quality({"stable": {"composite": same, "safety": [0, 0, 2, 3, 0]},
                       "canary": {"composite": same, "safety": [0, 0, 3, 2, 0]}})
    assert result.verdict == gate.PASS
    assert {d["dimension"]: d["verdict"] for d in result.details} == {
        "composite": gate.PASS, "safety": gate.INCONCLUSIVE}
    few = _quality({"stable": {"composite": [0, 1, 2, 3, 0]},
                    "canary": {"composite": [0, 1, 2, 3, 0]}})
    assert few.verdict == gate.INCONCLUSIVE and "too few evaluations" in few.reason


# -- generated files ------------------------------------------------------------------------

def test_generated_files_are_fresh():
    proc = subprocess.run([sys.executable, "-m", "llmtrace.quality.gate_queries", "--check"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_check_names_an_edited_file(tmp_path: Path):
    assert q.main(["--write", "--root", str(tmp_path)]) == 0
    assert q.sync(tmp_path, check=True) == []
    edited = tmp_path / q.RULES_FILE
    edited.write_text(edited.read_text().replace("> 0.25", "> 0.5"))
    assert q.sync(tmp_path, check=True) == [q.RULES_FILE]
    assert q.main(["--check", "--root", str(tmp_path)]) == 1


def _docs(rel: Path) -> list[dict[str, Any]]:
    text = (REPO / rel).read_text()
    assert text.startswith("# Code generated by llmtrace.quality.gate_queries")
    return [d for d in yaml.safe_load_all(text) if d]


def test_argo_analysis_templates_have_the_shape_argo_reads():
    docs = _docs(q.ARGO_FILE)
    assert {d["metadata"]["name"] for d in docs} == {"llmtrace-canary", "llmtrace-gate"}
    for doc in docs:
        assert (doc["apiVersion"], doc["kind"]) == ("argoproj.io/v1alpha1", "AnalysisTemplate")
        args = {a["name"] for a in doc["spec"]["args"]}
        assert {"model", "stable-version", "canary-version", "window"} <= args
        used = set(re.findall(r"\{\{args\.([\w-]+)\}\}", json.dumps(doc)))
        assert used <= args, used - args  # every placeholder is a declared argument
    measured = next(d for d in docs if d["metadata"]["name"] == "llmtrace-canary")
    names = [m["name"] for m in measured["spec"]["metrics"]]
    assert {"ttft-over-slo-regression", "error-ratio-regression",
            "quality-composite-drop"} <= set(names)
    for metric in measured["spec"]["metrics"]:
        assert set(metric) >= {"successCondition", "failureCondition", "failureLimit", "provider"}
        prom = metric["provider"]["prometheus"]
        assert prom["address"] == "{{args.prometheus-address}}" and prom["query"].strip()
        # NaN (too little traffic) meets neither condition: Inconclusive, never Successful
        assert "result[0] <=" in metric["successCondition"]
        assert "result[0] >" in metric["failureCondition"]
    job = next(d for d in docs if d["metadata"]["name"] == "llmtrace-gate")
    command = job["spec"]["metrics"][0]["provider"]["job"]["spec"]["template"]["spec"][
        "containers"][0]["command"]
    assert command[:2] == ["llmtrace", "gate"] and "--json" in command


def test_flagger_metric_templates_have_the_shape_flagger_reads():
    docs = _docs(q.FLAGGER_FILE)
    assert len(docs) >= 4
    for doc in docs:
        assert (doc["apiVersion"], doc["kind"]) == ("flagger.app/v1beta1", "MetricTemplate")
        assert doc["spec"]["provider"]["type"] == "prometheus"
        assert doc["spec"]["provider"]["address"].startswith("http")
        float(doc["metadata"]["annotations"]["llmtrace.dev/threshold-max"])
        placeholders = set(re.findall(r"\{\{\s*([^}]*?)\s*\}\}", doc["spec"]["query"]))
        assert placeholders <= {"target", "namespace", "interval"}, placeholders
        assert "{{ interval }}" in doc["spec"]["query"]
    assert any('"{{ target }}-primary"' in d["spec"]["query"] for d in docs)


SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?:\{([^}]*)\})?\s*\[")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")


def test_every_query_uses_semconv_names_and_threshold_bucket_edges():
    known: dict[str, set[str]] = {}
    for name, prom in sc.PROMETHEUS_NAMES.items():
        labels = {q.label(a) for a in sc.METRIC_ATTRIBUTES[name]} | {q.NAMESPACE}
        for suffix in ("", "_bucket", "_count", "_sum"):
            known[prom + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    texts = [(REPO / rel).read_text() for rel in (q.ARGO_FILE, q.FLAGGER_FILE, q.RULES_FILE)]
    used = set()
    for text in texts:
        for m in SELECTOR.finditer(text):
            if m.group(1) in known:
                used.add(m.group(1))
                labels = {x.group(1) for x in MATCHER.finditer(m.group(2) or "")}
                assert labels <= known[m.group(1)], (m.group(1), labels - known[m.group(1)])
    for metric in (q.TTFT, q.ITL):
        le = re.findall(rf'{sc.PROMETHEUS_NAMES[metric]}_bucket\{{[^}}]*le="([^"]+)"', texts[2])
        assert le and {float(x) for x in le} <= set(schema.BY_NAME[metric].buckets)
    assert {sc.PROMETHEUS_NAMES[m] + "_count" for m in (q.TTFT, q.ITL)} <= used


def test_promtool_checks_the_canary_rules(promtool: str):
    proc = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_unit_tests_fire_and_hold_the_canary_alerts(promtool: str):
    proc = subprocess.run([promtool, "test", "rules", str(RULES_TEST)], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- end to end: a real Prometheus scraping a real exposition -----------------------------

QUALITY_BUCKETS = (0.2, 0.4, 0.6, 0.8, 0.9, 1.0)  # the gate must read these from `le`
NAMESPACE = "prod"


class Exposition:
    """One model's stable and canary series, as an instrumented server would expose them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def labels(metric: str) -> list[str]:
            return [q.label(a) for a in schema.BY_NAME[metric].labels]

        def hist(metric: str, buckets) -> Histogram:
            return Histogram(sc.PROMETHEUS_NAMES[metric], metric, labels(metric),
                             buckets=buckets, registry=registry)

        def counter(metric: str) -> Counter:
            return Counter(schema.BY_NAME[metric].prometheus_base, metric, labels(metric),
                           registry=registry)

        self.ttft = hist(q.TTFT, schema.BY_NAME[q.TTFT].buckets)
        self.itl = hist(q.ITL, schema.BY_NAME[q.ITL].buckets)
        self.score = hist(q.SCORE, QUALITY_BUCKETS)
        self.requests = counter(q.REQUESTS)
        self.evaluations = counter(q.EVALUATIONS)
        self.hallucinations = counter(q.HALLUCINATIONS)
        self.psi = Gauge(sc.PROMETHEUS_NAMES[q.PSI], "psi", labels(q.PSI), registry=registry)

    @staticmethod
    def child(metric_obj, metric: str, model: str, version: str, **extra: str):
        values = {q.MODEL: model, q.VERSION: version, q.TENANT: "acme",
                  q.label(sc.LLMTRACE_RECORD_SOURCE): "llmtrace", **extra}
        return metric_obj.labels(**{q.label(a): values.get(q.label(a), "")
                                    for a in schema.BY_NAME[metric].labels})


#: per model, per side (stable, canary): what each version serves in the window
SCENARIOS: dict[str, dict[str, dict[str, Any]]] = {}


def _side(ttft_over=8, n=400, errors=4, itl_over=5, tokens=1000, scores=(0.85, 0.95),
          hallucinations=2, evaluations=100, psi=None, judge=True) -> dict[str, Any]:
    return dict(ttft_over=ttft_over, n=n, errors=errors, itl_over=itl_over, tokens=tokens,
                scores=scores, hallucinations=hallucinations, evaluations=evaluations,
                psi=psi, judge=judge)


SCENARIOS["bad"] = {"stable": _side(psi={"input_tokens": 0.3}),
                    "canary": _side(ttft_over=80, scores=(0.5, 0.7), hallucinations=3,
                                    psi={"input_tokens": 0.4, "output_tokens": 0.05})}
SCENARIOS["same"] = {"stable": _side(), "canary": _side(psi={"input_tokens": 0.05})}
SCENARIOS["nojudge"] = {"stable": _side(judge=False), "canary": _side(judge=False)}
SCENARIOS["few"] = {"stable": _side(ttft_over=1, n=30, errors=0, tokens=60, evaluations=10),
                    "canary": _side(ttft_over=10, n=30, errors=3, tokens=60, evaluations=10)}


def versions(model: str) -> dict[str, str]:
    """Flagger's naming (canary in the target deployment, stable in <target>-primary),
    so the Flagger templates select each model's versions."""
    return {"stable": f"{model}-primary", "canary": model}


def _declare(exp: Exposition, model: str, version: str, s: dict[str, Any]) -> dict[str, Any]:
    """Create every series at 0 (as a server does at start), so increases start exact."""
    c = Exposition.child
    out = {"ttft": c(exp.ttft, q.TTFT, model, version), "itl": c(exp.itl, q.ITL, model, version),
           "ok": c(exp.requests, q.REQUESTS, model, version,
                   **{q.label(sc.LLMTRACE_REQUEST_FINISH_REASON): "stop"}),
           "failed": c(exp.requests, q.REQUESTS, model, version,
                       **{q.label(sc.LLMTRACE_REQUEST_FINISH_REASON): "error",
                          q.ERROR_TYPE: "engine_error"})}
    if s["judge"]:
        out["scores"] = {d.value: c(exp.score, q.SCORE, model, version, **{q.DIMENSION: d.value})
                         for d in (sc.LlmtraceQualityDimensionValues.COMPOSITE,
                                   sc.LlmtraceQualityDimensionValues.ACCURACY)}
        out["evaluations"] = c(exp.evaluations, q.EVALUATIONS, model, version)
        out["hallucinations"] = c(exp.hallucinations, q.HALLUCINATIONS, model, version)
    for feature, value in (s["psi"] or {}).items():
        c(exp.psi, q.PSI, model, version, **{q.FEATURE: feature}).set(value)
    return out


def _serve(children: dict[str, Any], s: dict[str, Any]) -> None:
    for i in range(s["n"]):
        children["ttft"].observe(0.3 if i < s["ttft_over"] else 0.05)
    for i in range(s["tokens"]):
        children["itl"].observe(0.15 if i < s["itl_over"] else 0.02)
    children["ok"].inc(s["n"] - s["errors"])
    children["failed"].inc(s["errors"])
    if "scores" in children:
        low, high = s["scores"]
        for i in range(s["evaluations"]):
            children["scores"]["composite"].observe(low if i < 0.6 * s["evaluations"] else high)
            children["scores"]["accuracy"].observe(0.7 if i % 2 else 0.9)
        children["evaluations"].inc(s["evaluations"])
        children["hallucinations"].inc(s["hallucinations"])


def _wait(predicate, timeout: float = 30.0) -> bool:
    return wait_until(predicate, timeout, every=0.25)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[PrometheusServer, float]]:
    """Prometheus scraping every scenario; yields it and an evaluation time whose 1m window
    holds each series' zeros and its final values."""
    registry = CollectorRegistry(auto_describe=True)
    exp = Exposition(registry)
    declared = {(model, side): _declare(exp, model, versions(model)[side], s)
                for model, sides in SCENARIOS.items() for side, s in sides.items()}
    port = free_port()
    httpd, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
    prom = PrometheusServer(tmp_path_factory.mktemp("prometheus"), [{
        "job_name": "llmtrace-gate-test", "scrape_interval": "1s",
        "static_configs": [{"targets": [f"127.0.0.1:{port}"],
                            "labels": {q.NAMESPACE: NAMESPACE}}]}])
    try:
        prom.start()
        count = sc.PROMETHEUS_NAMES[q.TTFT] + "_count"

        def value(expr: str) -> float:
            result = prom.query(expr)
            return float(result[0]["value"][1]) if result else math.nan

        # two scrapes of the zeros, then everything served between two scrapes
        assert _wait(lambda: value(f"max(count_over_time({count}[1m]))") >= 2), prom.log_tail()
        for (model, side), children in declared.items():
            _serve(children, SCENARIOS[model][side])
        total = sum(s["n"] for sides in SCENARIOS.values() for s in sides.values())
        assert _wait(lambda: value(f"sum({count})") == total), prom.log_tail()
        time.sleep(2.5)  # a couple more scrapes of the final values
        yield prom, round(time.time(), 3)
    finally:
        prom.stop()
        httpd.shutdown()


def run_gate(prom: PrometheusServer, at: float, model: str, *extra: str,
             url: str | None = None) -> tuple[int, dict[str, Any]]:
    """``llmtrace gate --json`` as a pipeline runs it: a separate process."""
    v = versions(model)
    proc = subprocess.run(
        [sys.executable, "-m", "llmtrace.cli", "gate", "--prometheus", url or prom.url,
         "--model", model, "--stable", v["stable"], "--canary", v["canary"], "--window", "1m",
         "--time", str(at), "--json", *extra],
        capture_output=True, text=True, cwd=REPO, timeout=60)
    return proc.returncode, json.loads(proc.stdout)


def in_process(prom: PrometheusServer, at: float, model: str, *extra: str) -> int:
    v = versions(model)
    return cli.main(["gate", "--prometheus", prom.url, "--model", model, "--stable",
                     v["stable"], "--canary", v["canary"], "--window", "1m", "--time", str(at),
                     *extra])


def by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in report["checks"]}


def test_slower_worse_judged_drifted_canary_fails(served):
    prom, at = served
    code, report = run_gate(prom, at, "bad")
    assert (code, report["result"], report["exit_code"]) == (1, "fail", 1)
    assert report["schema"] == gate.SCHEMA and report["window"] == "1m"
    checks = by_name(report)
    assert [c["name"] for c in report["checks"]] == list(gate.CHECKS)
    ttft = checks["ttft"]
    assert ttft["verdict"] == "fail" and ttft["p_value"] < 1e-6
    assert ttft["stable"]["ratio"] == pytest.approx(0.02, abs=1e-9)
    assert ttft["canary"]["ratio"] == pytest.approx(0.2, abs=1e-9)
    assert ttft["statistic"]["difference"] == pytest.approx(0.18, abs=1e-9)
    assert ttft["stable"]["events"] >= 400  # increase() extrapolates a little past 400
    assert ttft["info"]["mann_whitney"]["p_value"] < 1e-6
    assert set(ttft["queries"]) == {"stable_buckets", "canary_buckets"}
    # the p95 the gate reports is Prometheus' own histogram_quantile of the same increase
    p95 = prom.api("query", query=f"histogram_quantile(0.95, {ttft['queries']['canary_buckets']})",
                   time=str(at))["result"][0]["value"][1]
    assert ttft["canary"]["p95_s"] == pytest.approx(float(p95))
    assert checks["itl"]["verdict"] == "pass" and checks["errors"]["verdict"] == "pass"
    quality = checks["quality"]
    assert quality["verdict"] == "fail" and quality["stable"]["dimension"] == "composite"
    dims = {d["dimension"]: d for d in quality["details"]}
    assert dims["composite"]["verdict"] == "fail" and dims["accuracy"]["verdict"] == "pass"
    assert dims["composite"]["drop"] == pytest.approx(0.31, abs=1e-9)
    assert checks["hallucinations"]["verdict"] == "pass"
    assert checks["drift"]["verdict"] == "fail"
    assert checks["drift"]["canary"] == {"max_psi": pytest.approx(0.4), "feature": "input_tokens"}
    assert report["skipped"] == []


def test_equal_canary_passes(served):
    prom, at = served
    code, report = run_gate(prom, at, "same")
    assert (code, report["result"]) == (0, "pass")
    assert {c["name"]: c["verdict"] for c in report["checks"]} == dict.fromkeys(gate.CHECKS,
                                                                                "pass")


def test_too_few_samples_is_inconclusive(served):
    prom, at = served
    code, report = run_gate(prom, at, "few")
    assert (code, report["result"]) == (2, "inconclusive")
    checks = by_name(report)
    assert checks["ttft"]["verdict"] == "inconclusive"
    assert "too few events" in checks["ttft"]["reason"]
    assert checks["quality"]["verdict"] == "inconclusive"


def test_missing_judge_is_skipped_unless_asked_for(served, capsys):
    prom, at = served
    assert in_process(prom, at, "nojudge", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["skipped"] == ["quality", "hallucinations", "drift"]
    assert by_name(report)["quality"]["required"] is False
    assert by_name(report)["ttft"]["required"] is True
    # named explicitly, a check without its series cannot be passed over
    assert in_process(prom, at, "nojudge", "--checks", "ttft,quality") == 2
    out = capsys.readouterr().out
    assert "result: INCONCLUSIVE (exit 2)" in out and re.search(r"quality\s.*skipped", out)


def test_wrong_model_is_inconclusive_not_pass(served, capsys):
    prom, at = served
    assert in_process(prom, at, "no-such-model", "--json") == 2
    report = json.loads(capsys.readouterr().out)
    assert by_name(report)["ttft"]["verdict"] == "skipped" and by_name(report)["ttft"]["required"]


def test_tenant_narrows_the_checks_that_have_tenants(served, capsys):
    prom, at = served
    assert in_process(prom, at, "bad", "--tenant", "acme", "--json") == 1
    checks = by_name(json.loads(capsys.readouterr().out))
    assert 'llmtrace_tenant="acme"' in checks["ttft"]["queries"]["canary_buckets"]
    # drift series carry no tenant: still compared, not skipped
    assert checks["drift"]["verdict"] == "fail"
    assert "llmtrace_tenant" not in checks["drift"]["queries"]["canary_psi"]
    assert in_process(prom, at, "bad", "--tenant", "nobody", "--checks", "ttft") == 2


def test_human_table_names_each_check(served, capsys):
    prom, at = served
    assert in_process(prom, at, "bad") == 1
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("check"))
    assert header.split() == ["check", "stable", "canary", "statistic", "p-value", "verdict",
                              "reason"]
    assert "result: FAIL (exit 1)" in out and "composite" in out


def test_unreachable_prometheus_is_an_error_not_a_pass(served):
    prom, at = served
    code, report = run_gate(prom, at, "same", url=f"http://127.0.0.1:{free_port()}")
    assert (code, report["result"], report["exit_code"]) == (3, "error", 3)
    assert report["error"]


def test_usage_errors_exit_2(served, capsys):
    prom, at = served
    assert in_process(prom, at, "same", "--checks", "ttft,latency") == 2
    assert in_process(prom, at, "same", "--window", "thirty minutes") == 2
    assert "unknown check" in capsys.readouterr().err


def _substitute(query: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        query = query.replace(key, value)
    return query


def test_argo_and_flagger_queries_agree_with_the_gate(served):
    """The rollout tools' one-number comparisons are the gate's queries: same numbers."""
    prom, at = served
    client = gate.Prometheus(prom.url, at)
    argo = {m["name"]: m["provider"]["prometheus"]["query"] for d in _docs(q.ARGO_FILE)
            if d["metadata"]["name"] == "llmtrace-canary" for m in d["spec"]["metrics"]}
    flagger = {d["metadata"]["name"].removeprefix("llmtrace-"): d["spec"]["query"]
               for d in _docs(q.FLAGGER_FILE)}
    assert set(argo) == set(flagger)

    def values(model: str) -> list[float]:
        v = versions(model)
        out = []
        for name in sorted(argo):
            a = _substitute(argo[name], {"{{args.model}}": model, "{{args.window}}": "1m",
                                         "{{args.stable-version}}": v["stable"],
                                         "{{args.canary-version}}": v["canary"]})
            f = _substitute(flagger[name], {"{{ target }}": model, "{{ interval }}": "1m",
                                            "{{ namespace }}": NAMESPACE})
            [(_, x)], [(_, y)] = client.query(a), client.query(f)
            assert x == pytest.approx(y, nan_ok=True), name
            out.append(x)
        return out

    names = sorted(argo)
    bad = dict(zip(names, values("bad"), strict=True))
    _, report = run_gate(prom, at, "bad")
    checks = by_name(report)
    assert bad["ttft-over-slo-regression"] == pytest.approx(
        checks["ttft"]["statistic"]["difference"])
    assert bad["error-ratio-regression"] == pytest.approx(0.0, abs=1e-9)
    assert bad["quality-composite-drop"] == pytest.approx(
        checks["quality"]["statistic"]["difference"])
    assert bad["drift-psi"] == pytest.approx(0.4)
    same = dict(zip(names, values("same"), strict=True))
    assert same["ttft-over-slo-regression"] == pytest.approx(0.0, abs=1e-9)
    # too little traffic: NaN, which Argo counts Inconclusive and Flagger a halted step
    few = dict(zip(names, values("few"), strict=True))
    assert math.isnan(few["ttft-over-slo-regression"]) and math.isnan(few["drift-psi"])
