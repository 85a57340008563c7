"""SLO rules: fresh, valid for Prometheus, alert as designed, Sloth's shape, our names."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmtrace import semconv
from llmtrace.dashboards import slo

REPO = Path(__file__).resolve().parents[1]
SLO_DIR = REPO / "dashboards" / "slo"
RULE_FILES = sorted((SLO_DIR / "rules").glob("*.rules.yml"))
TEST_FILES = sorted((SLO_DIR / "tests").glob("*.test.yml"))


def run(*cmd: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=REPO)


def rules(path: Path) -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]


def test_generated_rules_are_fresh() -> None:
    proc = run(sys.executable, "-m", "llmtrace.dashboards.slo", "--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [p.name for p in RULE_FILES] == sorted(f"{s.name}.rules.yml" for s in slo.load_spec())


def test_check_reports_edited_and_orphan_files(tmp_path: Path) -> None:
    assert slo.main(["--out", str(tmp_path)]) == 0
    assert slo.main(["--check", "--out", str(tmp_path)]) == 0
    edited = tmp_path / "ttft.rules.yml"
    edited.write_text(edited.read_text().replace("14.4", "1.44"))
    (tmp_path / "gone.rules.yml").write_text("groups: []\n")
    assert slo.stale(out=tmp_path) == ["gone.rules.yml", "ttft.rules.yml"]
    assert slo.main(["--check", "--out", str(tmp_path)]) == 1
    assert slo.main(["--out", str(tmp_path)]) == 0
    assert slo.stale(out=tmp_path) == [] and not (tmp_path / "gone.rules.yml").exists()


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_promtool_check_rules(promtool: str, path: Path) -> None:
    proc = run(promtool, "check", "rules", path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_slo_has_promtool_unit_tests() -> None:
    assert [p.name.removesuffix(".rules.yml") for p in RULE_FILES] == \
        [p.name.removesuffix(".test.yml") for p in TEST_FILES]


@pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: p.name)
def test_promtool_unit_tests_pass(promtool: str, path: Path) -> None:
    proc = run(promtool, "test", "rules", path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- the spec's queries use llmtrace's metric and label names -----------------------

SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?:\{([^}]*)\})?\s*\[")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
BY = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
SUFFIXES = ("", "_bucket", "_count", "_sum")


def prom_metrics() -> dict[str, set[str]]:
    """Prometheus series name -> its label names (attribute dots become underscores)."""
    out: dict[str, set[str]] = {}
    for name, prom in semconv.PROMETHEUS_NAMES.items():
        labels = {a.replace(".", "_") for a in semconv.METRIC_ATTRIBUTES[name]}
        for suffix in SUFFIXES:
            out[prom + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return out


def spec_queries() -> list[str]:
    found = []
    for s in slo.load_spec():
        found += [q for q in (s.error_query, s.total_query, s.error_ratio_query) if q]
    return found


def test_rules_reference_only_semconv_metrics() -> None:
    known = prom_metrics()
    records = {r["record"] for p in RULE_FILES for r in rules(p) if "record" in r}
    used: set[str] = set()
    for path in RULE_FILES:
        for rule in rules(path):
            used |= {m.group(1) for m in SELECTOR.finditer(rule["expr"])}
    assert used - records - set(known) == set()
    assert {"gen_ai_server_time_to_first_token_seconds_bucket",
            "llmtrace_server_inter_token_latency_seconds_count",
            "llmtrace_server_requests_total"} <= used


def test_spec_queries_use_each_metrics_own_labels() -> None:
    known = prom_metrics()
    for query in spec_queries():
        rendered = slo.WINDOW_VAR.sub("5m", query)
        grouped = {lab.strip() for m in BY.finditer(rendered) for lab in m.group(1).split(",")}
        for m in SELECTOR.finditer(rendered):
            labels = {x.group(1) for x in MATCHER.finditer(m.group(2) or "")} | grouped
            assert labels <= known[m.group(1)], (m.group(1), labels - known[m.group(1)])


def test_latency_thresholds_are_bucket_edges() -> None:
    from llmtrace import schema
    edges = {"gen_ai_server_time_to_first_token_seconds_bucket":
             schema.BY_NAME[semconv.METRIC_GEN_AI_SERVER_TIME_TO_FIRST_TOKEN].buckets,
             "llmtrace_server_inter_token_latency_seconds_bucket":
             schema.BY_NAME[semconv.METRIC_LLMTRACE_SERVER_INTER_TOKEN_LATENCY].buckets}
    for query in spec_queries():
        for name, le in re.findall(r'(\w+_bucket)\{[^}]*le="([^"]+)"', query):
            assert float(le) in edges[name], f"{name} le={le} is not a bucket edge"


# -- spec validation -------------------------------------------------------------


def good_spec() -> dict[str, Any]:
    return yaml.safe_load(slo.SPEC.read_text())


def bad(spec: dict[str, Any], tmp_path: Path) -> str:
    path = tmp_path / "bad.sloth.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(slo.SpecError) as e:
        slo.load_spec(path)
    return str(e.value)


def test_bad_objective_names_the_field(tmp_path: Path) -> None:
    spec = good_spec()
    spec["slos"][0]["objective"] = 100
    assert bad(spec, tmp_path).startswith("bad.sloth.yaml: slos[0](ttft).objective: must be > 0")
    spec["slos"][2]["objective"] = "99.9%"
    spec["slos"][0]["objective"] = 99
    assert "slos[2](availability).objective: must be a number" in bad(spec, tmp_path)


def test_missing_or_untemplated_query_names_the_field(tmp_path: Path) -> None:
    spec = good_spec()
    del spec["slos"][1]["sli"]["events"]["error_query"]
    assert "slos[1](itl).sli.events.error_query: is required" in bad(spec, tmp_path)
    spec = good_spec()
    spec["slos"][0]["sli"]["events"]["total_query"] = "sum(rate(x[5m]))"
    assert "slos[0](ttft).sli.events.total_query: must use the {{.window}}" in bad(spec, tmp_path)
    spec["slos"][0]["sli"] = {}
    assert "slos[0](ttft).sli: needs exactly one of 'events' or 'raw'" in bad(spec, tmp_path)


def test_other_spec_mistakes_are_named(tmp_path: Path) -> None:
    cases = [
        (("version",), "prometheus/v2", "version: must be 'prometheus/v1'"),
        (("slos", 0, "objetive"), 99, "slos[0](ttft).objetive: unknown field"),
        (("labels", "tier"), 2, "labels.tier: must be a string (quote it)"),
        (("slos", 1, "name"), "ttft", "slos[1](ttft).name: 'ttft' is used by"),
        (("slos", 0, "alerting", "name"), "", "slos[0](ttft).alerting.name: is required"),
        (("slos", 0, "sli", "plugin"), {"id": "x"}, "sli.plugin: Sloth plugins are not"),
    ]
    for keys, value, message in cases:
        spec = good_spec()
        node = spec
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
        assert message in bad(spec, tmp_path), keys


def test_cli_reports_spec_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = good_spec()
    spec["slos"][0]["objective"] = 0
    path = tmp_path / "bad.sloth.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert slo.main(["--spec", str(path), "--out", str(tmp_path), "--check"]) == 2
    assert "slos[0](ttft).objective" in capsys.readouterr().err


# -- Sloth's output shape ------------------------------------------------------------

# Sloth's examples/getting-started.yml and, below, excerpts of the rules Sloth v0.16.0
# generated for it (examples/_gen/getting-started.yml, slok/sloth commit 0e395d8).
SLOTH_EXAMPLE = """
version: "prometheus/v1"
service: "myservice"
labels: {owner: "myteam", repo: "myorg/myservice", tier: "2", cmd: examplesgen.sh}
slos:
  - name: "requests-availability"
    objective: 99.9
    sli:
      events:
        error_query: sum(rate(http_request_duration_seconds_count{job="myservice",code=~"(5..|429)"}[{{.window}}]))
        total_query: sum(rate(http_request_duration_seconds_count{job="myservice"}[{{.window}}]))
    alerting:
      name: MyServiceHighErrorRate
      labels: {category: "availability"}
      annotations: {summary: "High error rate on 'myservice' requests responses"}
      page_alert: {labels: {severity: pageteam, routing_key: myteam}}
      ticket_alert: {labels: {severity: "slack", slack_channel: "#alerts-myteam"}}
"""  # noqa: E501
F = '{sloth_id="myservice-requests-availability", sloth_service="myservice", sloth_slo="requests-availability"}'  # noqa: E501
SLOTH_SLI_1H = """\
(sum(rate(http_request_duration_seconds_count{job="myservice",code=~"(5..|429)"}[1h])))
/
(sum(rate(http_request_duration_seconds_count{job="myservice"}[1h])))
"""
SLOTH_SLI_30D = f"""\
sum_over_time(slo:sli_error:ratio_rate5m{F}[30d])
/ ignoring (sloth_window)
count_over_time(slo:sli_error:ratio_rate5m{F}[30d])
"""
SLOTH_PERIOD_BURN = f"""\
slo:sli_error:ratio_rate30d{F}
/ on(sloth_id, sloth_slo, sloth_service) group_left
slo:error_budget:ratio{F}
"""
SLOTH_TICKET = f"""\
(
    max(slo:sli_error:ratio_rate2h{F} > (3 * 0.0009999999999999432)) without (sloth_window)
    and
    max(slo:sli_error:ratio_rate1d{F} > (3 * 0.0009999999999999432)) without (sloth_window)
)
or
(
    max(slo:sli_error:ratio_rate6h{F} > (1 * 0.0009999999999999432)) without (sloth_window)
    and
    max(slo:sli_error:ratio_rate3d{F} > (1 * 0.0009999999999999432)) without (sloth_window)
)
"""


def test_rules_match_sloths_output_for_its_example(tmp_path: Path) -> None:
    path = tmp_path / "getting-started.yml"
    path.write_text(SLOTH_EXAMPLE)
    (only,) = slo.load_spec(path)
    sli, meta, alerts = slo.rule_groups(only)
    assert [g["name"] for g in (sli, meta, alerts)] == [
        "sloth-slo-sli-recordings-myservice-requests-availability",
        "sloth-slo-meta-recordings-myservice-requests-availability",
        "sloth-slo-alerts-myservice-requests-availability"]
    assert [r["labels"]["sloth_window"] for r in sli["rules"]] == \
        ["5m", "30m", "1h", "2h", "6h", "1d", "3d", "30d"]
    assert sli["rules"][2] == {"record": "slo:sli_error:ratio_rate1h", "expr": SLOTH_SLI_1H,
                               "labels": {"cmd": "examplesgen.sh", "owner": "myteam",
                                          "repo": "myorg/myservice",
                                          "sloth_id": "myservice-requests-availability",
                                          "sloth_service": "myservice",
                                          "sloth_slo": "requests-availability",
                                          "sloth_window": "1h", "tier": "2"}}
    assert sli["rules"][7]["expr"] == SLOTH_SLI_30D
    assert {r["record"]: r["expr"] for r in meta["rules"]} == {
        "slo:objective:ratio": "vector(0.9990000000000001)",
        "slo:error_budget:ratio": "vector(1-0.9990000000000001)",
        "slo:time_period:days": "vector(30)",
        "slo:current_burn_rate:ratio": SLOTH_PERIOD_BURN.replace("30d", "5m"),
        "slo:period_burn_rate:ratio": SLOTH_PERIOD_BURN,
        "slo:period_error_budget_remaining:ratio": f"1 - slo:period_burn_rate:ratio{F}",
        "sloth_slo_info": "vector(1)"}
    page, ticket = alerts["rules"]
    assert "(14.4 * 0.0009999999999999432)" in page["expr"]
    assert "(6 * 0.0009999999999999432)" in page["expr"]
    assert ticket == {
        "alert": "MyServiceHighErrorRate", "expr": SLOTH_TICKET,
        "labels": {"category": "availability", "severity": "slack",
                   "slack_channel": "#alerts-myteam", "sloth_severity": "ticket"},
        "annotations": {
            "summary": "High error rate on 'myservice' requests responses",
            "title": "(ticket) {{$labels.sloth_service}} {{$labels.sloth_slo}} SLO error "
                     "budget burn rate is too fast."}}


@pytest.mark.parametrize(("value", "go"), [
    (14.4, "14.4"), (6.0, "6"), (0.0009999999999999432, "0.0009999999999999432"),
    (0.9990000000000001, "0.9990000000000001"), (1e-05, "1e-05"), (1e6, "1e+06"),
    (123456.0, "123456"), (1.5e-07, "1.5e-07")])
def test_floats_print_as_go_prints_them(value: float, go: str) -> None:
    assert slo._go_float(value) == go
