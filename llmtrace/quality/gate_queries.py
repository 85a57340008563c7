"""The PromQL of canary-versus-stable gates, written once, and the files made from it.

Four things decide about a rollout: ``llmtrace gate`` (the statistical gate), an Argo
Rollouts ``AnalysisTemplate``, Flagger ``MetricTemplate``\\ s and the canary alert rules.
They must mean the same thing by "the canary's TTFT regressed", so every query they
run is built here, from the semantic-convention names and the SLO thresholds of the
metric schema; the gate fills in label values, Argo and Flagger their placeholders,
the alert rules group by version instead. The three YAML files are generated:
``python -m llmtrace.quality.gate_queries --write`` rewrites them, ``--check`` exits 1
when a shipped file differs (``tests/test_gate.py`` runs it).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llmtrace import schema
from llmtrace import semconv as sc


def label(attribute: str) -> str:
    """The Prometheus label of an attribute (the exporters turn dots into underscores)."""
    return attribute.replace(".", "_")


MODEL = label(sc.GEN_AI_REQUEST_MODEL)
VERSION = label(sc.LLMTRACE_DEPLOYMENT_VERSION)
TENANT = label(sc.LLMTRACE_TENANT)
ERROR_TYPE = label(sc.ERROR_TYPE)
DIMENSION = label(sc.LLMTRACE_QUALITY_DIMENSION)
FEATURE = label(sc.LLMTRACE_DRIFT_FEATURE)
#: not an llmtrace attribute: the target label Kubernetes service discovery (and the
#: Prometheus Operator's monitors) attach to every scraped series; Flagger's queries use it
NAMESPACE = "namespace"

TTFT = sc.METRIC_GEN_AI_SERVER_TIME_TO_FIRST_TOKEN
ITL = sc.METRIC_LLMTRACE_SERVER_INTER_TOKEN_LATENCY
REQUESTS = sc.METRIC_LLMTRACE_SERVER_REQUESTS
SCORE = sc.METRIC_LLMTRACE_QUALITY_SCORE
EVALUATIONS = sc.METRIC_LLMTRACE_QUALITY_EVALUATIONS
HALLUCINATIONS = sc.METRIC_LLMTRACE_QUALITY_HALLUCINATIONS
PSI = sc.METRIC_LLMTRACE_DRIFT_PSI
COMPOSITE = sc.LlmtraceQualityDimensionValues.COMPOSITE.value

#: the gate's checks, in report order (here, not in the gate, so the CLI can list them
#: without importing scipy)
CHECKS = ("ttft", "itl", "errors", "quality", "hallucinations", "drift")

#: a label matcher: (label, operator, value); values may be a tool's placeholder
Matcher = tuple[str, str, str]

REPO = Path(__file__).resolve().parents[2]
ARGO_FILE = Path("examples/rollouts/argo-analysistemplate.yaml")
FLAGGER_FILE = Path("examples/rollouts/flagger-metrictemplates.yaml")
RULES_FILE = Path("dashboards/prometheus/canary.rules.yml")


def slo_budget(metric: str) -> float:
    """The SLO's error budget (1 - objective): the default regression margin of a latency SLI."""
    return round(1 - schema.SLO_OBJECTIVES[metric], 9)


@dataclass(frozen=True)
class Tolerances:
    """How much worse a canary may be, and how much evidence a verdict needs.

    The gate's flags default to these; the generated Argo, Flagger and alert files bake
    them in, so a tolerance changed here changes every consumer at once.
    """

    alpha: float = 0.05
    #: requests (TTFT, errors) / tokens (ITL) per side before a latency or error verdict
    min_samples: int = 200
    #: judge evaluations per side before a quality or hallucination verdict
    min_evaluations: int = 50
    #: ratio points; None: each latency SLO's own error budget (1% at a 99% objective)
    max_slo_regression: float | None = None
    max_error_regression: float = 0.01
    #: mean judge score, on its [0, 1] scale
    max_quality_drop: float = 0.05
    max_hallucination_regression: float = 0.02
    #: population stability index; 0.25 is the usual "significant shift" line
    max_psi: float = 0.25

    def slo_margin(self, metric: str) -> float:
        return slo_budget(metric) if self.max_slo_regression is None else self.max_slo_regression


DEFAULTS = Tolerances()


# -- building blocks ------------------------------------------------------------------

def _number(x: float) -> str:
    return f"{x:g}"


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def selector(name: str, matchers: tuple[Matcher, ...], *extra: Matcher) -> str:
    body = ", ".join(f'{lab}{op}"{_quote(val)}"' for lab, op, val in (*matchers, *extra))
    return f"{name}{{{body}}}" if body else name


def _sum(expr: str, by: tuple[str, ...]) -> str:
    return f"sum by ({', '.join(by)}) ({expr})" if by else f"sum({expr})"


def _increase(name: str, m: tuple[Matcher, ...], window: str, *extra: Matcher) -> str:
    return f"increase({selector(name, m, *extra)}[{window}])"


def _histogram(metric: str, suffix: str) -> str:
    return sc.PROMETHEUS_NAMES[metric] + suffix


def threshold_le(metric: str) -> str:
    """The ``le`` value of a latency SLO's threshold bucket (a bucket edge by schema)."""
    return _number(schema.SLO_THRESHOLDS[metric])


# -- the queries ----------------------------------------------------------------------

def bucket_counts(metric: str, m: tuple[Matcher, ...], window: str,
                  by: tuple[str, ...] = ()) -> str:
    """Cumulative bucket counts gained over the window, by ``le``: the whole distribution."""
    return _sum(_increase(_histogram(metric, "_bucket"), m, window), (*by, "le"))


def histogram_sums(metric: str, m: tuple[Matcher, ...], window: str,
                   by: tuple[str, ...] = ()) -> str:
    return _sum(_increase(_histogram(metric, "_sum"), m, window), by)


def event_count(metric: str, m: tuple[Matcher, ...], window: str,
                by: tuple[str, ...] = ()) -> str:
    return _sum(_increase(_histogram(metric, "_count"), m, window), by)


def over_slo_ratio(metric: str, m: tuple[Matcher, ...], window: str,
                   by: tuple[str, ...] = ()) -> str:
    """Share of events above the SLO threshold: exact, because the threshold is a bucket edge."""
    good = _sum(_increase(_histogram(metric, "_bucket"), m, window,
                          ("le", "=", threshold_le(metric))), by)
    total = event_count(metric, m, window, by)
    return f"({total} - {good}) / {total}"


def requests_by_error(m: tuple[Matcher, ...], window: str) -> str:
    """Finished requests by ``error_type``; an empty (absent) error type is a success."""
    return _sum(_increase(sc.PROMETHEUS_NAMES[REQUESTS], m, window), (ERROR_TYPE,))


def request_count(m: tuple[Matcher, ...], window: str, by: tuple[str, ...] = ()) -> str:
    return _sum(_increase(sc.PROMETHEUS_NAMES[REQUESTS], m, window), by)


def _or_zero(part: str, total: str) -> str:
    """``part``, or 0 where it has no series but ``total`` has: a counter labelled by its
    outcome only exists once that outcome happened, and no errors is a ratio of 0, not NaN."""
    return f"({part} or 0 * {total})"


def error_ratio(m: tuple[Matcher, ...], window: str, by: tuple[str, ...] = ()) -> str:
    total = request_count(m, window, by)
    failed = _sum(_increase(sc.PROMETHEUS_NAMES[REQUESTS], m, window, (ERROR_TYPE, "!=", "")),
                  by)
    return f"{_or_zero(failed, total)} / {total}"


def score_buckets(m: tuple[Matcher, ...], window: str) -> str:
    return bucket_counts(SCORE, m, window, (DIMENSION,))


def score_sums(m: tuple[Matcher, ...], window: str) -> str:
    return histogram_sums(SCORE, m, window, (DIMENSION,))


def composite_mean(m: tuple[Matcher, ...], window: str, by: tuple[str, ...] = ()) -> str:
    comp = (*m, (DIMENSION, "=", COMPOSITE))
    return f"{histogram_sums(SCORE, comp, window, by)} / {event_count(SCORE, comp, window, by)}"


def composite_count(m: tuple[Matcher, ...], window: str, by: tuple[str, ...] = ()) -> str:
    return event_count(SCORE, (*m, (DIMENSION, "=", COMPOSITE)), window, by)


def counter_increase(metric: str, m: tuple[Matcher, ...], window: str,
                     by: tuple[str, ...] = ()) -> str:
    return _sum(_increase(sc.PROMETHEUS_NAMES[metric], m, window), by)


def hallucination_ratio(m: tuple[Matcher, ...], window: str) -> str:
    total = counter_increase(EVALUATIONS, m, window)
    return f"{_or_zero(counter_increase(HALLUCINATIONS, m, window), total)} / {total}"


def psi_by_feature(m: tuple[Matcher, ...], window: str) -> str:
    """Each feature's PSI averaged over the window (one noisy reading does not decide)."""
    return f"max by ({FEATURE}) (avg_over_time({selector(sc.PROMETHEUS_NAMES[PSI], m)}[{window}]))"


def max_psi(m: tuple[Matcher, ...], window: str) -> str:
    return f"max({psi_by_feature(m, window)})"


# -- canary minus stable, for tools that compare one number with a threshold ----------

def _guarded(expr: str, counts: tuple[str, ...], minimum: int) -> str:
    """``expr`` while every count reaches ``minimum``, else NaN: too little traffic is
    neither a pass nor a fail (Argo: Inconclusive; Flagger: "no values", a halted step)."""
    guards = "".join(f"\nand on() ({c} >= {minimum})" for c in counts)
    return f"(\n({expr}){guards}\n)\nor on() vector(NaN)"


def slo_regression(metric: str, canary: tuple[Matcher, ...], stable: tuple[Matcher, ...],
                   window: str, minimum: int = DEFAULTS.min_samples) -> str:
    """Canary's over-SLO share minus stable's, in ratio points (> 0: canary worse)."""
    diff = (f"({over_slo_ratio(metric, canary, window)})\n"
            f"- ({over_slo_ratio(metric, stable, window)})")
    return _guarded(diff, (event_count(metric, canary, window),
                           event_count(metric, stable, window)), minimum)


def error_regression(canary: tuple[Matcher, ...], stable: tuple[Matcher, ...], window: str,
                     minimum: int = DEFAULTS.min_samples) -> str:
    diff = f"({error_ratio(canary, window)})\n- ({error_ratio(stable, window)})"
    return _guarded(diff, (request_count(canary, window), request_count(stable, window)),
                    minimum)


def quality_drop(canary: tuple[Matcher, ...], stable: tuple[Matcher, ...], window: str,
                 minimum: int = DEFAULTS.min_evaluations) -> str:
    """Stable's mean composite judge score minus canary's (> 0: canary worse)."""
    diff = f"({composite_mean(stable, window)})\n- ({composite_mean(canary, window)})"
    return _guarded(diff, (composite_count(canary, window), composite_count(stable, window)),
                    minimum)


def drift(canary: tuple[Matcher, ...], window: str) -> str:
    return f"({max_psi(canary, window)})\nor on() vector(NaN)"


# -- generated files ------------------------------------------------------------------

class _Literal(str):
    """A multi-line string, dumped as a YAML literal block."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Literal, lambda d, s: d.represent_scalar(
    "tag:yaml.org,2002:str", str(s), style="|"))


def _dump(header: str, docs: list[dict[str, Any]]) -> str:
    def lit(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: lit(v) for k, v in node.items()}
        if isinstance(node, list):
            return [lit(v) for v in node]
        return _Literal(node + "\n") if isinstance(node, str) and "\n" in node else node
    body = yaml.dump_all([lit(d) for d in docs], Dumper=_Dumper, sort_keys=False, width=100,
                         explicit_start=len(docs) > 1)
    return header + body


def _header(what: str) -> str:
    return (f"# Code generated by llmtrace.quality.gate_queries: {what}.\n"
            "# DO NOT EDIT; run `python -m llmtrace.quality.gate_queries --write`.\n"
            "# docs/quality-gates.md explains the queries and how to adapt them.\n")


#: (metric name in Argo/Flagger, query builder, threshold): the one-number comparisons
def _comparisons(canary: tuple[Matcher, ...], stable: tuple[Matcher, ...], window: str,
                 t: Tolerances = DEFAULTS) -> list[tuple[str, str, float, str]]:
    return [
        ("ttft-over-slo-regression", slo_regression(TTFT, canary, stable, window),
         t.slo_margin(TTFT), "canary's share of requests over the TTFT SLO threshold "
         f"({threshold_le(TTFT)} s) minus stable's, ratio points"),
        ("itl-over-slo-regression", slo_regression(ITL, canary, stable, window),
         t.slo_margin(ITL), "canary's share of token gaps over the ITL SLO threshold "
         f"({threshold_le(ITL)} s) minus stable's, ratio points"),
        ("error-ratio-regression", error_regression(canary, stable, window),
         t.max_error_regression, "canary's failed-request ratio minus stable's"),
        ("quality-composite-drop", quality_drop(canary, stable, window), t.max_quality_drop,
         "stable's mean composite judge score minus canary's"),
        ("drift-psi", drift(canary, window), t.max_psi,
         "canary's largest feature PSI against the stable version's live window"),
    ]


def argo_template(t: Tolerances = DEFAULTS) -> str:
    canary = ((MODEL, "=", "{{args.model}}"), (VERSION, "=", "{{args.canary-version}}"))
    stable = ((MODEL, "=", "{{args.model}}"), (VERSION, "=", "{{args.stable-version}}"))
    metrics = []
    for name, query, limit, what in _comparisons(canary, stable, "{{args.window}}", t):
        metrics.append({
            "name": name,
            "interval": "5m",
            "count": 3,
            # NaN (too little traffic, or no such series) meets neither condition: the
            # measurement is Inconclusive, never a pass
            "successCondition": f"result[0] <= {_number(limit)}",
            "failureCondition": f"result[0] > {_number(limit)}",
            "failureLimit": 1,
            "inconclusiveLimit": 1,
            "consecutiveErrorLimit": 2,
            "provider": {"prometheus": {"address": "{{args.prometheus-address}}",
                                        "query": f"# {what}\n{query}"}},
        })
    measured = {
        "apiVersion": "argoproj.io/v1alpha1", "kind": "AnalysisTemplate",
        "metadata": {"name": "llmtrace-canary"},
        "spec": {"args": [{"name": "model"}, {"name": "stable-version"},
                          {"name": "canary-version"}, {"name": "window", "value": "10m"},
                          {"name": "prometheus-address",
                           "value": "http://prometheus.monitoring.svc:9090"}],
                 "metrics": metrics}}
    job = {
        "apiVersion": "argoproj.io/v1alpha1", "kind": "AnalysisTemplate",
        "metadata": {"name": "llmtrace-gate"},
        "spec": {
            "args": [{"name": "model"}, {"name": "stable-version"},
                     {"name": "canary-version"}, {"name": "window", "value": "30m"},
                     {"name": "prometheus-address",
                      "value": "http://prometheus.monitoring.svc:9090"},
                     {"name": "image", "value": "ghcr.io/example/llmtrace:latest"}],
            "metrics": [{
                "name": "llmtrace-gate",
                # the Job's exit status decides: 0 pass; 1 fail, 2 inconclusive and 3
                # (Prometheus unreachable) all fail the Job, so nothing but 0 promotes
                "failureLimit": 0,
                "provider": {"job": {"spec": {"backoffLimit": 0, "template": {"spec": {
                    "restartPolicy": "Never",
                    "containers": [{
                        "name": "gate", "image": "{{args.image}}",
                        "command": ["llmtrace", "gate",
                                    "--prometheus", "{{args.prometheus-address}}",
                                    "--model", "{{args.model}}",
                                    "--stable", "{{args.stable-version}}",
                                    "--canary", "{{args.canary-version}}",
                                    "--window", "{{args.window}}", "--json"]}]}}}}},
            }]}}
    return _dump(_header("Argo Rollouts AnalysisTemplates (PromQL comparisons, and the "
                         "full statistical gate as a Job)"), [measured, job])


def flagger_templates(t: Tolerances = DEFAULTS) -> str:
    # Flagger runs the new version in the target deployment and the old one in
    # <target>-primary; the docs show how pods report that name as their version
    common = ((NAMESPACE, "=", "{{ namespace }}"),)
    canary = (*common, (VERSION, "=", "{{ target }}"))
    stable = (*common, (VERSION, "=", "{{ target }}-primary"))
    docs = []
    for name, query, limit, what in _comparisons(canary, stable, "{{ interval }}", t):
        docs.append({
            "apiVersion": "flagger.app/v1beta1", "kind": "MetricTemplate",
            "metadata": {"name": f"llmtrace-{name}",
                         "annotations": {"llmtrace.dev/threshold-max": _number(limit),
                                         "llmtrace.dev/measures": what}},
            "spec": {"provider": {"type": "prometheus",
                                  "address": "http://prometheus.monitoring.svc:9090"},
                     "query": query}})
    return _dump(_header("Flagger MetricTemplates; use each with thresholdRange.max set to "
                         "its llmtrace.dev/threshold-max annotation"), docs)


# -- alert rules: canary = every version of a model but the one serving most requests --

BY = (MODEL, VERSION)
ON = f"on ({MODEL}, {VERSION})"
STABLE = "model_version:llmtrace_stable_version:bool"


def _rec(name: str, expr: str) -> dict[str, str]:
    return {"record": name, "expr": expr}


def _against_stable(record: str, margin: float, sign: str = "+") -> str:
    """Each non-stable version's value minus its model's stable version's (or the reverse
    for ``sign='-'``, where lower is worse), kept where it exceeds ``margin``."""
    canary = f"({record} unless {ON} {STABLE})"
    stable = f"max by ({MODEL}) ({record} and {ON} {STABLE})"
    if sign == "+":
        return f"(\n  {canary}\n  - on ({MODEL}) group_left ()\n  {stable}\n) > {_number(margin)}"
    return f"(\n  {stable}\n  - on ({MODEL}) group_right ()\n  {canary}\n) > {_number(margin)}"


def _alert(name: str, expr: str, for_: str, summary: str, description: str) -> dict[str, Any]:
    return {"alert": name, "expr": expr, "for": for_,
            "labels": {"severity": "warning", "category": "canary"},
            "annotations": {"summary": f"{{{{ $labels.{MODEL} }}}} version "
                            f"{{{{ $labels.{VERSION} }}}}: {summary}",
                            "description": description}}


def alert_rules(t: Tolerances = DEFAULTS) -> str:
    n, q = t.min_samples, t.min_evaluations
    records = [
        _rec("model_version:llmtrace_requests:increase1h", request_count((), "1h", BY)),
        # 1 for the version of each model that served the most requests in the last hour
        _rec(STABLE, f"(\n  model_version:llmtrace_requests:increase1h\n  == on ({MODEL}) "
             f"group_left ()\n  max by ({MODEL}) (model_version:llmtrace_requests:increase1h)\n"
             ") * 0 + 1"),
        _rec("model_version:llmtrace_ttft_over_slo:ratio10m", over_slo_ratio(TTFT, (), "10m", BY)),
        _rec("model_version:llmtrace_ttft_events:increase10m", event_count(TTFT, (), "10m", BY)),
        _rec("model_version:llmtrace_itl_over_slo:ratio10m", over_slo_ratio(ITL, (), "10m", BY)),
        _rec("model_version:llmtrace_itl_events:increase10m", event_count(ITL, (), "10m", BY)),
        _rec("model_version:llmtrace_request_errors:ratio10m", error_ratio((), "10m", BY)),
        _rec("model_version:llmtrace_requests:increase10m", request_count((), "10m", BY)),
        _rec("model_version:llmtrace_quality_composite:mean30m", composite_mean((), "30m", BY)),
        _rec("model_version:llmtrace_quality_composite_evaluations:increase30m",
             composite_count((), "30m", BY)),
    ]

    def enough(record: str, minimum: int) -> str:
        return f"\nand {ON} ({record} >= {minimum})"

    ttft_ms, itl_ms = (_number(schema.SLO_THRESHOLDS[m] * 1000) for m in (TTFT, ITL))
    alerts = [
        _alert("LLMTraceCanaryTTFTRegression",
               _against_stable("model_version:llmtrace_ttft_over_slo:ratio10m",
                               t.slo_margin(TTFT))
               + enough("model_version:llmtrace_ttft_events:increase10m", n), "10m",
               f"more requests over the {ttft_ms} ms TTFT threshold than the stable version",
               "The canary's share of requests waiting longer than the TTFT SLO threshold "
               "is {{ $value | humanizePercentage }} above the stable version's (the version "
               "of this model serving the most requests), over 10 minutes. Run `llmtrace "
               "gate` for the statistical verdict before promoting."),
        _alert("LLMTraceCanaryITLRegression",
               _against_stable("model_version:llmtrace_itl_over_slo:ratio10m",
                               t.slo_margin(ITL))
               + enough("model_version:llmtrace_itl_events:increase10m", n), "10m",
               f"more token gaps over the {itl_ms} ms ITL threshold than the stable version",
               "The canary's share of inter-token gaps above the ITL SLO threshold is "
               "{{ $value | humanizePercentage }} above the stable version's, over 10 minutes."),
        _alert("LLMTraceCanaryErrorRegression",
               _against_stable("model_version:llmtrace_request_errors:ratio10m",
                               t.max_error_regression)
               + enough("model_version:llmtrace_requests:increase10m", n), "10m",
               "more failed requests than the stable version",
               "The canary's failed-request ratio is {{ $value | humanizePercentage }} above "
               "the stable version's, over 10 minutes (llmtrace_server_requests_total by "
               "error_type shows which errors)."),
        _alert("LLMTraceCanaryQualityDrop",
               _against_stable("model_version:llmtrace_quality_composite:mean30m",
                               t.max_quality_drop, sign="-")
               + enough("model_version:llmtrace_quality_composite_evaluations:increase30m", q),
               "15m", "lower judge scores than the stable version",
               "The canary's mean composite judge score over 30 minutes is "
               "{{ $value | printf \"%.3f\" }} below "
               "the stable version's."),
        _alert("LLMTraceCanaryDrift",
               f"max by ({MODEL}, {VERSION}) ({sc.PROMETHEUS_NAMES[PSI]}) > "
               f"{_number(t.max_psi)}\nunless {ON} {STABLE}", "15m",
               "request features drifted from the stable version",
               "The canary's largest feature PSI is {{ $value | printf \"%.3f\" }} (above "
               f"{_number(t.max_psi)}: a significant shift); "
               f"{sc.PROMETHEUS_NAMES[PSI]} by {FEATURE} shows which feature."),
    ]
    # one group: its rules are evaluated in order, so each alert reads the recordings of
    # the same evaluation (groups run concurrently: an alert in another group could see
    # the previous one, and its `for` would start a minute late, now and then)
    doc = {"groups": [{"name": "llmtrace-canary", "rules": records + alerts}]}
    return _dump(_header("canary-versus-stable recording and alert rules (the canary is "
                         "any version of a model but the one serving the most requests)"),
                 [doc])


def rendered() -> dict[Path, str]:
    """Every generated file, by path relative to the repository root."""
    return {ARGO_FILE: argo_template(), FLAGGER_FILE: flagger_templates(),
            RULES_FILE: alert_rules()}


def sync(root: Path, check: bool) -> list[Path]:
    """The files under ``root`` that are (check) or were (write) out of date."""
    stale = []
    for rel, text in rendered().items():
        path = root / rel
        if not path.exists() or path.read_text() != text:
            stale.append(rel)
            if not check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmtrace.quality.gate_queries",
                                     description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite the generated files")
    mode.add_argument("--check", action="store_true", help="exit 1 if one is out of date")
    parser.add_argument("--root", type=Path, default=REPO,
                        help="directory the files' relative paths start from (default: "
                             "this checkout)")
    args = parser.parse_args(argv)
    stale = sync(args.root, args.check)
    for rel in stale:
        print(f"{'stale' if args.check else 'wrote'}: {rel}")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
