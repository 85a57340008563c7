"""``llmtrace gate``: is the canary version worse than the stable one? pass, fail or inconclusive.

A rollout pipeline asks one question per step, and three answers must stay distinct:
*fail* (evidence that the canary is worse by more than a tolerated margin: roll back),
*pass* (enough data, and no such evidence: promote) and *inconclusive* (too little data,
or a required series missing: hold). Prometheus being unreachable is none of them and
never reads as a pass (exit 3).

Everything is computed from the increases of Prometheus counters and histogram buckets
over one window, evaluated at one instant, with the queries of
:mod:`llmtrace.quality.gate_queries` (the ones the Argo, Flagger and alert files use).
Histograms only give counts per bucket, so the statistics are the ones that are exact
on bucket counts:

- latency (TTFT, ITL): the share of events above the SLO threshold, which is a bucket
  edge, so the share is an exact count; one-sided two-proportion z test (canary worse),
  plus a practical margin (default: the SLO's error budget). A Mann-Whitney U test on
  the binned distributions (ties within a bucket corrected) is reported too, for a
  shift that stays under the threshold.
- errors and hallucinations: one-sided two-proportion z test on failed / total.
- judge scores: mean from ``_sum / _count``; Mann-Whitney U on the score buckets (the
  edges are read from the series' ``le`` labels), Holm-corrected across dimensions.
- drift: the canary's largest feature PSI, against a fixed line (no p-value: PSI is a
  distance, not a test).

A check fails only when its test is significant at ``alpha`` *and* the estimated
regression exceeds its margin: with enough traffic a harmless difference is always
significant, and a large difference seen in a few requests is noise.
"""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from llmtrace import schema
from llmtrace import semconv as sc
from llmtrace.quality import gate_queries as q

PASS, FAIL, INCONCLUSIVE, SKIPPED, ERROR = "pass", "fail", "inconclusive", "skipped", "error"
#: the process exit status of each overall result
EXIT_CODES = {PASS: 0, FAIL: 1, INCONCLUSIVE: 2, ERROR: 3}
CHECKS = q.CHECKS
#: every instrumented server emits these: when their series are missing, the gate is
#: looking at the wrong model or version, which must not read as a pass
CORE_CHECKS = frozenset({"ttft", "errors"})
SCHEMA = "llmtrace.gate/v1"
WINDOW = re.compile(r"^(\d+(ms|[smhdwy]))+$")
SIDES = ("stable", "canary")


# -- statistics on counts ---------------------------------------------------------------

@dataclass(frozen=True)
class ProportionTest:
    z: float
    p_value: float
    #: canary's share minus stable's
    difference: float
    #: one-sided (1 - alpha) upper confidence bound of the difference (unpooled, Wald)
    upper_bound: float


def two_proportion(bad_s: float, n_s: float, bad_c: float, n_c: float,
                   alpha: float = 0.05) -> ProportionTest:
    """Pooled one-sided z test of "the canary's share of bad events is larger".

    Equals a 2x2 chi-squared test without continuity correction (z squared is the
    statistic), halved to one side. Counts may be fractional: ``increase()``
    extrapolates to the window's edges.
    """
    ps, pc = bad_s / n_s, bad_c / n_c
    diff = pc - ps
    pooled = (bad_s + bad_c) / (n_s + n_c)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_s + 1 / n_c))
    se_u = math.sqrt(max(ps * (1 - ps), 0) / n_s + max(pc * (1 - pc), 0) / n_c)
    upper = diff + float(stats.norm.ppf(1 - alpha)) * se_u
    if se == 0:  # every event on both sides good (or bad): nothing to tell them apart
        return ProportionTest(0.0, 1.0, diff, upper)
    z = diff / se
    return ProportionTest(z, float(stats.norm.sf(z)), diff, upper)


@dataclass(frozen=True)
class RankTest:
    #: Mann-Whitney U of the canary sample
    u: float
    z: float
    p_value: float
    #: U / (n_canary n_stable): P(canary > stable) + P(tie) / 2; 0.5 is "no shift"
    effect: float


def binned_mann_whitney(stable: Sequence[float], canary: Sequence[float],
                        alternative: str = "greater") -> RankTest:
    """Mann-Whitney U from counts per ordered bin: every event in a bin ties with the rest.

    The normal approximation with tie correction and continuity correction, exactly
    what ``scipy.stats.mannwhitneyu(canary, stable, method="asymptotic")`` returns for
    the data expanded to one value per event, without expanding millions of events.
    ``alternative="greater"``: the canary's values tend to be larger (slower);
    ``"less"``: smaller (lower scores).
    """
    s = np.asarray(stable, dtype=float)
    c = np.asarray(canary, dtype=float)
    n_c, n_s = c.sum(), s.sum()
    if n_c <= 0 or n_s <= 0:
        return RankTest(math.nan, math.nan, math.nan, math.nan)
    t = s + c
    total = n_c + n_s
    midranks = np.cumsum(t) - t + (t + 1) / 2
    u = float((c * midranks).sum() - n_c * (n_c + 1) / 2)
    mean = n_c * n_s / 2
    ties = float((t ** 3 - t).sum())
    var = n_c * n_s / 12 * ((total + 1) - ties / (total * (total - 1)))
    effect = u / (n_c * n_s)
    if var <= 0:  # everything in one bin
        return RankTest(u, 0.0, 1.0, effect)
    sd = math.sqrt(var)
    if alternative == "greater":
        z = (u - mean - 0.5) / sd
        return RankTest(u, z, float(stats.norm.sf(z)), effect)
    if alternative == "less":
        z = (u - mean + 0.5) / sd
        return RankTest(u, z, float(stats.norm.cdf(z)), effect)
    raise ValueError(f"alternative must be 'greater' or 'less', not {alternative!r}")


def bucket_quantile(phi: float, edges: Sequence[float], cumulative: Sequence[float]) -> float:
    """``histogram_quantile()``'s estimate: linear inside the bucket, the highest finite
    edge when the rank falls in the +Inf bucket, NaN without events."""
    total = cumulative[-1] if len(cumulative) else 0
    if total <= 0:
        return math.nan
    rank = phi * total
    i = next(k for k, v in enumerate(cumulative) if v >= rank)
    if math.isinf(edges[i]):
        return edges[i - 1] if i > 0 else math.nan
    lower, below = (0.0, 0.0) if i == 0 else (edges[i - 1], cumulative[i - 1])
    if i == 0 and edges[0] <= 0:
        return edges[0]
    inside = cumulative[i] - below
    return lower + (edges[i] - lower) * ((rank - below) / inside if inside else 1.0)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values: test several dimensions without inflating false alarms."""
    m = len(p_values)
    adjusted = [1.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda k: p_values[k])):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


# -- Prometheus -------------------------------------------------------------------------

class PrometheusError(RuntimeError):
    """Prometheus unreachable, or it refused a query: the gate has no verdict."""


Sample = tuple[dict[str, str], float]


class Prometheus:
    """Instant queries over the HTTP API, all at one evaluation time (one consistent window)."""

    def __init__(self, url: str, at: float, timeout: float = 30.0,
                 headers: Iterable[tuple[str, str]] = ()) -> None:
        self.url = url.rstrip("/")
        self.at = at
        self.timeout = timeout
        self.headers = dict(headers)

    def query(self, expr: str) -> list[Sample]:
        body = urllib.parse.urlencode({"query": expr, "time": f"{self.at:.3f}"}).encode()
        req = urllib.request.Request(f"{self.url}/api/v1/query", data=body, headers={
            "Content-Type": "application/x-www-form-urlencoded", **self.headers})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                reply = json.load(r)
        except urllib.error.HTTPError as exc:
            try:
                reply = json.loads(exc.read() or b"{}")
            except ValueError:
                reply = {}
            raise PrometheusError(f"{self.url}: HTTP {exc.code}: "
                                  f"{reply.get('error') or exc.reason}") from exc
        except (OSError, ValueError) as exc:
            raise PrometheusError(f"{self.url}: {exc}") from exc
        if reply.get("status") != "success":
            raise PrometheusError(f"{self.url}: {reply.get('errorType')}: {reply.get('error')}")
        data = reply["data"]
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        if data["resultType"] != "vector":
            raise PrometheusError(f"{self.url}: expected a vector, got {data['resultType']}")
        return [(r["metric"], float(r["value"][1])) for r in data["result"]]


# -- what to compare ----------------------------------------------------------------------

@dataclass(frozen=True)
class GateSpec:
    model: str
    stable: str
    canary: str
    window: str = "30m"
    tenant: str | None = None
    checks: tuple[str, ...] = CHECKS
    #: the user named the checks: a skipped one is then inconclusive, not ignored
    explicit: bool = False
    tolerances: q.Tolerances = q.DEFAULTS

    def matchers(self, version: str, metric: str) -> tuple[q.Matcher, ...]:
        """The selector of one side; the tenant only where the metric has that label
        (drift is per model and version), so ``--tenant`` never empties a check."""
        m = ((q.MODEL, "=", self.model), (q.VERSION, "=", version))
        if self.tenant and sc.LLMTRACE_TENANT in sc.METRIC_ATTRIBUTES[metric]:
            return (*m, (q.TENANT, "=", self.tenant))
        return m

    def sides(self, metric: str) -> dict[str, tuple[q.Matcher, ...]]:
        return {"stable": self.matchers(self.stable, metric),
                "canary": self.matchers(self.canary, metric)}


@dataclass
class CheckResult:
    name: str
    verdict: str
    reason: str
    #: a skip of this check makes the gate inconclusive (core check, or named by the user)
    required: bool = False
    stable: dict[str, Any] = field(default_factory=dict)
    canary: dict[str, Any] = field(default_factory=dict)
    #: the deciding statistic: name, value, difference (canary worse > 0), margin
    statistic: dict[str, Any] | None = None
    p_value: float | None = None
    #: further tests, reported but not deciding
    info: dict[str, Any] = field(default_factory=dict)
    #: per quality dimension / drift feature
    details: list[dict[str, Any]] = field(default_factory=list)
    #: the PromQL run, to reproduce the numbers in the Prometheus UI
    queries: dict[str, str] = field(default_factory=dict)


def _run(prom: Prometheus, queries: dict[str, str]) -> dict[str, list[Sample]]:
    return {key: prom.query(expr) for key, expr in queries.items()}


def _histograms(rows: list[Sample], group: str | None = None
                ) -> dict[str, tuple[tuple[float, ...], np.ndarray]]:
    """Cumulative bucket counts by group: (sorted edges ending in +Inf, counts).

    Each bucket's ``increase()`` is extrapolated on its own, which can break
    monotonicity by a fraction of an event; a running maximum restores it.
    """
    by: dict[str, dict[float, float]] = {}
    for labels, value in rows:
        if "le" in labels and not math.isnan(value):
            by.setdefault(labels.get(group, "") if group else "", {})[float(labels["le"])] = value
    out = {}
    for key, buckets in by.items():
        edges = tuple(sorted(buckets))
        if edges and math.isinf(edges[-1]):
            out[key] = edges, np.maximum.accumulate(np.array([buckets[e] for e in edges]))
    return out


def _align(a: tuple[tuple[float, ...], np.ndarray], b: tuple[tuple[float, ...], np.ndarray]
           ) -> tuple[tuple[float, ...], np.ndarray, np.ndarray]:
    """Both sides' counts per bin on their shared edges (cumulative counts at an edge
    both have are exact, so a bucket layout change between versions costs resolution only)."""
    edges = tuple(sorted(set(a[0]) & set(b[0])))
    pick = [np.array([dict(zip(h[0], h[1], strict=True))[e] for e in edges]) for h in (a, b)]
    return edges, *(np.diff(cum, prepend=0.0).clip(min=0) for cum in pick)


def _empty_hist() -> tuple[tuple[float, ...], np.ndarray]:
    return (math.inf,), np.zeros(1)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _pts(x: float) -> str:
    return f"{100 * x:+.2f} pts"


def _too_few(counts: dict[str, float], minimum: int, what: str) -> str | None:
    low = [f"{side} {counts[side]:.0f}" for side in SIDES if counts[side] < minimum]
    return f"too few {what} ({', '.join(low)} < {minimum} per side)" if low else None


def _proportion_verdict(test: ProportionTest, margin: float, alpha: float, what: str
                        ) -> tuple[str, str]:
    if test.p_value < alpha and test.difference > margin:
        return FAIL, (f"canary {what} {_pts(test.difference)} above stable (margin "
                      f"{_pts(margin).lstrip('+')}), significant at p={test.p_value:.3g}")
    if test.p_value < alpha:
        return PASS, f"canary worse by {_pts(test.difference)}: significant, within the margin"
    return PASS, f"no significant regression ({_pts(test.difference)}, p={test.p_value:.3g})"


def _skip(name: str, spec: GateSpec, queries: dict[str, str], what: str) -> CheckResult:
    return CheckResult(name, SKIPPED, f"no {what} series for model {spec.model!r} at either "
                       f"version in the last {spec.window}", queries=queries)


# -- the checks --------------------------------------------------------------------------

def latency_check(name: str, metric: str, prom: Prometheus, spec: GateSpec) -> CheckResult:
    t = spec.tolerances
    queries = {f"{side}_buckets": q.bucket_counts(metric, m, spec.window)
               for side, m in spec.sides(metric).items()}
    rows = _run(prom, queries)
    if not any(rows.values()):
        return _skip(name, spec, queries, sc.PROMETHEUS_NAMES[metric] + "_bucket")
    hist = {side: _histograms(rows[f"{side}_buckets"]).get("", _empty_hist()) for side in SIDES}
    threshold = schema.SLO_THRESHOLDS[metric]
    summary, counts = {}, {}
    for side in SIDES:
        edges, cum = hist[side]
        n = float(cum[-1])
        good = dict(zip(edges, cum, strict=True)).get(threshold)
        summary[side] = {"events": n, "over_threshold": None if good is None else n - good,
                         "ratio": None if good is None or n <= 0 else (n - good) / n,
                         "p50_s": bucket_quantile(0.5, edges, cum),
                         "p95_s": bucket_quantile(0.95, edges, cum)}
        counts[side] = n
    result = CheckResult(name, INCONCLUSIVE, "", stable=summary["stable"],
                         canary=summary["canary"], queries=queries)
    result.stable["threshold_s"] = result.canary["threshold_s"] = threshold
    if (low := _too_few(counts, t.min_samples, "events")) is not None:
        result.reason = low
        return result
    if any(summary[s]["over_threshold"] is None for s in SIDES):
        result.reason = f"the SLO threshold {threshold:g} s is not a bucket edge of the series"
        return result
    test = two_proportion(summary["stable"]["over_threshold"], counts["stable"],
                          summary["canary"]["over_threshold"], counts["canary"], t.alpha)
    margin = t.slo_margin(metric)
    result.verdict, result.reason = _proportion_verdict(
        test, margin, t.alpha, f"share over {threshold * 1000:g} ms")
    result.statistic = {"name": "two_proportion_z", "value": test.z,
                        "difference": test.difference, "upper_bound": test.upper_bound,
                        "margin": margin}
    result.p_value = test.p_value
    _, s_bins, c_bins = _align(hist["stable"], hist["canary"])
    mw = binned_mann_whitney(s_bins, c_bins, "greater")
    result.info["mann_whitney"] = {"u": mw.u, "z": mw.z, "p_value": mw.p_value,
                                   "prob_canary_slower": mw.effect}
    return result


def errors_check(prom: Prometheus, spec: GateSpec) -> CheckResult:
    t = spec.tolerances
    queries = {f"{side}_requests": q.requests_by_error(m, spec.window)
               for side, m in spec.sides(q.REQUESTS).items()}
    rows = _run(prom, queries)
    if not any(rows.values()):
        return _skip("errors", spec, queries, sc.PROMETHEUS_NAMES[q.REQUESTS])
    summary, counts = {}, {}
    for side in SIDES:
        by_type = {labels.get(q.ERROR_TYPE, ""): v for labels, v in rows[f"{side}_requests"]}
        n = sum(by_type.values())
        failed = sum(v for k, v in by_type.items() if k)
        summary[side] = {"requests": n, "failed": failed, "ratio": failed / n if n > 0 else None,
                         "by_error_type": {k: v for k, v in sorted(by_type.items()) if k}}
        counts[side] = n
    result = CheckResult("errors", INCONCLUSIVE, "", stable=summary["stable"],
                         canary=summary["canary"], queries=queries)
    if (low := _too_few(counts, t.min_samples, "requests")) is not None:
        result.reason = low
        return result
    test = two_proportion(summary["stable"]["failed"], counts["stable"],
                          summary["canary"]["failed"], counts["canary"], t.alpha)
    result.verdict, result.reason = _proportion_verdict(test, t.max_error_regression, t.alpha,
                                                        "error ratio")
    result.statistic = {"name": "two_proportion_z", "value": test.z,
                        "difference": test.difference, "upper_bound": test.upper_bound,
                        "margin": t.max_error_regression}
    result.p_value = test.p_value
    return result


def _dimension_order(dim: str) -> tuple[int, str]:
    known = [v.value for v in sc.LlmtraceQualityDimensionValues]
    return (known.index(dim) if dim in known else len(known), dim)


def quality_check(prom: Prometheus, spec: GateSpec) -> CheckResult:
    t = spec.tolerances
    queries = {}
    for side, m in spec.sides(q.SCORE).items():
        queries[f"{side}_buckets"] = q.score_buckets(m, spec.window)
        queries[f"{side}_sums"] = q.score_sums(m, spec.window)
    rows = _run(prom, queries)
    if not any(rows.values()):
        return _skip("quality", spec, queries, sc.PROMETHEUS_NAMES[q.SCORE] + "_bucket")
    hist = {side: _histograms(rows[f"{side}_buckets"], q.DIMENSION) for side in SIDES}
    sums = {side: {labels.get(q.DIMENSION, ""): v for labels, v in rows[f"{side}_sums"]}
            for side in SIDES}
    dims = sorted(set(hist["stable"]) | set(hist["canary"]), key=_dimension_order)
    if not dims:
        return _skip("quality", spec, queries, sc.PROMETHEUS_NAMES[q.SCORE] + "_bucket")
    details, tested = [], []
    for dim in dims:
        h = {side: hist[side].get(dim, _empty_hist()) for side in SIDES}
        n = {side: float(h[side][1][-1]) for side in SIDES}
        mean = {side: sums[side].get(dim, math.nan) / n[side] if n[side] > 0 else math.nan
                for side in SIDES}
        d = {"dimension": dim, "stable": {"evaluations": n["stable"], "mean": mean["stable"]},
             "canary": {"evaluations": n["canary"], "mean": mean["canary"]},
             "drop": mean["stable"] - mean["canary"], "verdict": INCONCLUSIVE}
        if (low := _too_few(n, t.min_evaluations, "evaluations")) is not None:
            d["reason"] = low
        else:
            _, s_bins, c_bins = _align(h["stable"], h["canary"])
            mw = binned_mann_whitney(s_bins, c_bins, "less")
            d.update(p_value=mw.p_value, u=mw.u, prob_canary_higher=mw.effect)
            tested.append(d)
        details.append(d)
    for d, adj in zip(tested, holm([d["p_value"] for d in tested]), strict=True):
        d["p_adjusted"] = adj
        if adj < t.alpha and d["drop"] > t.max_quality_drop:
            d["verdict"], d["reason"] = FAIL, (
                f"canary mean {d['canary']['mean']:.3f} vs {d['stable']['mean']:.3f}: "
                f"{d['drop']:.3f} lower (margin {t.max_quality_drop:g}), p={adj:.3g}")
        else:
            d["verdict"] = PASS
            d["reason"] = ("significantly lower, within the margin" if adj < t.alpha
                           else "no significant drop")
    # the composite decides when present; a dimension the judge scores rarely is listed
    # with too few evaluations but does not hold the gate (it can still fail it)
    composite = next((d for d in details if d["dimension"] == q.COMPOSITE), None)
    head = composite or min(details, key=lambda d: d.get("p_adjusted", 2.0))
    failing = [d for d in details if d["verdict"] == FAIL]
    verdict = FAIL if failing else INCONCLUSIVE if not tested or (
        composite is not None and composite["verdict"] == INCONCLUSIVE) else PASS
    reason = (f"lower judge scores in {', '.join(d['dimension'] for d in failing)}: "
              f"{failing[0]['reason']}" if failing else head.get("reason", ""))
    if verdict == INCONCLUSIVE and not failing:
        reason = "; ".join(f"{d['dimension']}: {d['reason']}" for d in details
                           if d["verdict"] == INCONCLUSIVE)
    return CheckResult(
        "quality", verdict, reason, stable=dict(head["stable"], dimension=head["dimension"]),
        canary=dict(head["canary"], dimension=head["dimension"]),
        statistic=None if "p_value" not in head else {
            "name": "mann_whitney_u", "value": head["u"], "difference": head["drop"],
            "margin": t.max_quality_drop, "prob_canary_higher": head["prob_canary_higher"],
            "correction": "holm"},
        p_value=head.get("p_adjusted"), details=details, queries=queries)


def hallucinations_check(prom: Prometheus, spec: GateSpec) -> CheckResult:
    t = spec.tolerances
    queries = {}
    for side, version in (("stable", spec.stable), ("canary", spec.canary)):
        queries[f"{side}_hallucinations"] = q.counter_increase(
            q.HALLUCINATIONS, spec.matchers(version, q.HALLUCINATIONS), spec.window)
        queries[f"{side}_evaluations"] = q.counter_increase(
            q.EVALUATIONS, spec.matchers(version, q.EVALUATIONS), spec.window)
    rows = _run(prom, queries)
    if not any(rows[f"{side}_evaluations"] for side in SIDES):
        return _skip("hallucinations", spec, queries, sc.PROMETHEUS_NAMES[q.EVALUATIONS])
    summary, counts = {}, {}
    for side in SIDES:
        n = sum(v for _, v in rows[f"{side}_evaluations"])
        bad = sum(v for _, v in rows[f"{side}_hallucinations"])  # absent: none flagged yet
        summary[side] = {"evaluations": n, "hallucinations": bad,
                         "ratio": bad / n if n > 0 else None}
        counts[side] = n
    result = CheckResult("hallucinations", INCONCLUSIVE, "", stable=summary["stable"],
                         canary=summary["canary"], queries=queries)
    if (low := _too_few(counts, t.min_evaluations, "evaluations")) is not None:
        result.reason = low
        return result
    test = two_proportion(summary["stable"]["hallucinations"], counts["stable"],
                          summary["canary"]["hallucinations"], counts["canary"], t.alpha)
    result.verdict, result.reason = _proportion_verdict(
        test, t.max_hallucination_regression, t.alpha, "hallucination ratio")
    result.statistic = {"name": "two_proportion_z", "value": test.z,
                        "difference": test.difference, "upper_bound": test.upper_bound,
                        "margin": t.max_hallucination_regression}
    result.p_value = test.p_value
    return result


def drift_check(prom: Prometheus, spec: GateSpec) -> CheckResult:
    t = spec.tolerances
    queries = {f"{side}_psi": q.psi_by_feature(m, spec.window)
               for side, m in spec.sides(q.PSI).items()}
    rows = _run(prom, queries)
    psi = {side: {labels.get(q.FEATURE, ""): v for labels, v in rows[f"{side}_psi"]
                  if not math.isnan(v)} for side in SIDES}
    if not psi["canary"]:
        result = _skip("drift", spec, queries, sc.PROMETHEUS_NAMES[q.PSI])
        if psi["stable"]:
            result.reason = f"no {sc.PROMETHEUS_NAMES[q.PSI]} series for the canary version"
        return result
    worst = max(psi["canary"], key=psi["canary"].get)
    top = psi["canary"][worst]
    details = [{"feature": f, "stable": psi["stable"].get(f), "canary": v,
                "verdict": FAIL if v > t.max_psi else PASS}
               for f, v in sorted(psi["canary"].items())]
    verdict = FAIL if top > t.max_psi else PASS
    reason = (f"canary's {worst} distribution shifted: PSI {top:.3f} > {t.max_psi:g}"
              if verdict == FAIL else f"largest PSI {top:.3f} ({worst}) <= {t.max_psi:g}")
    stable_top = max(psi["stable"].values(), default=None)
    return CheckResult("drift", verdict, reason, stable={"max_psi": stable_top},
                       canary={"max_psi": top, "feature": worst},
                       statistic={"name": "psi", "value": top, "margin": t.max_psi},
                       details=details, queries=queries)


CHECK_RUNNERS: dict[str, Callable[[Prometheus, GateSpec], CheckResult]] = {
    "ttft": lambda p, s: latency_check("ttft", q.TTFT, p, s),
    "itl": lambda p, s: latency_check("itl", q.ITL, p, s),
    "errors": errors_check,
    "quality": quality_check,
    "hallucinations": hallucinations_check,
    "drift": drift_check,
}


# -- the verdict ---------------------------------------------------------------------------

def overall(results: Sequence[CheckResult]) -> str:
    """Any fail -> fail; else any inconclusive, or a required check skipped -> inconclusive;
    else pass (optional checks whose series do not exist are listed, not counted)."""
    if any(r.verdict == FAIL for r in results):
        return FAIL
    if any(r.verdict == INCONCLUSIVE or (r.verdict == SKIPPED and r.required) for r in results):
        return INCONCLUSIVE
    return PASS


@dataclass
class Report:
    spec: GateSpec
    prometheus: str
    evaluated_at: float
    checks: list[CheckResult]

    @property
    def result(self) -> str:
        return overall(self.checks)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.result]

    def to_json(self) -> dict[str, Any]:
        t = self.spec.tolerances
        settings = asdict(t)
        settings["max_slo_regression"] = {"ttft": t.slo_margin(q.TTFT), "itl": t.slo_margin(q.ITL)}
        return _finite({
            "schema": SCHEMA, "result": self.result, "exit_code": self.exit_code,
            "model": self.spec.model, "stable": self.spec.stable, "canary": self.spec.canary,
            "tenant": self.spec.tenant, "window": self.spec.window,
            "prometheus": self.prometheus, "evaluated_at": self.evaluated_at,
            "settings": settings,
            "skipped": [r.name for r in self.checks if r.verdict == SKIPPED],
            "checks": [asdict(r) for r in self.checks],
        })

    def table(self) -> str:
        rows = [("check", "stable", "canary", "statistic", "p-value", "verdict", "reason")]
        for r in self.checks:
            rows.append((r.name, _cell(r, r.stable), _cell(r, r.canary), _stat(r),
                         "" if r.p_value is None else f"{r.p_value:.3g}", r.verdict, r.reason))
            for d in r.details if r.name == "quality" else ():
                rows.append((f"  {d['dimension']}", _mean(d["stable"]), _mean(d["canary"]),
                             f"drop {round(d['drop'], 3) + 0.0:+.3f}"
                             if not math.isnan(d["drop"]) else "",
                             f"{d['p_adjusted']:.3g}" if "p_adjusted" in d else "",
                             d["verdict"], d.get("reason", "")))
        widths = [max(len(row[i]) for row in rows) for i in range(6)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[6]
                 for row in rows]
        head = (f"llmtrace gate: model {self.spec.model}, stable {self.spec.stable} vs canary "
                f"{self.spec.canary}, last {self.spec.window}")
        return "\n".join([head, "", *lines, "", f"result: {self.result.upper()} "
                          f"(exit {self.exit_code})"])


def _finite(node: Any) -> Any:
    """JSON has no NaN or Infinity: unknown numbers become null."""
    if isinstance(node, dict):
        return {k: _finite(v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [_finite(v) for v in node]
    if isinstance(node, float | np.floating):
        return float(node) if math.isfinite(node) else None
    return node


def _seconds(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "-"
    return f"{x * 1000:.0f}ms" if x < 10 else f"{x:.1f}s"


def _mean(side: dict[str, Any]) -> str:
    m = side.get("mean")
    return "-" if m is None or math.isnan(m) else f"{m:.3f} (n={side['evaluations']:.0f})"


def _cell(r: CheckResult, side: dict[str, Any]) -> str:
    if r.verdict == SKIPPED:
        return "-"
    if r.name in ("ttft", "itl"):
        ratio = "-" if side.get("ratio") is None else _pct(side["ratio"])
        return (f"{ratio} over (n={side['events']:.0f}); p50 {_seconds(side['p50_s'])} "
                f"p95 {_seconds(side['p95_s'])}")
    if r.name == "errors":
        ratio = "-" if side.get("ratio") is None else _pct(side["ratio"])
        return f"{ratio} failed (n={side['requests']:.0f})"
    if r.name == "hallucinations":
        ratio = "-" if side.get("ratio") is None else _pct(side["ratio"])
        return f"{ratio} flagged (n={side['evaluations']:.0f})"
    if r.name == "quality":
        return f"{side.get('dimension', '')} {_mean(side)}"
    if r.name == "drift":
        return "-" if side.get("max_psi") is None else f"max PSI {side['max_psi']:.3f}"
    return ""


def _stat(r: CheckResult) -> str:
    s = r.statistic
    if not s:
        return ""
    if s["name"] == "two_proportion_z":
        return f"{_pts(s['difference'])} (z={s['value']:.2f})"
    if s["name"] == "mann_whitney_u":
        return f"drop {s['difference']:+.3f} (Mann-Whitney)"
    return f"PSI {s['value']:.3f}"


def evaluate(prom: Prometheus, spec: GateSpec) -> Report:
    """Run the spec's checks at ``prom.at``; raises PrometheusError (no verdict) on any
    failed query, so a half-answered gate never passes."""
    results = []
    for name in spec.checks:
        result = CHECK_RUNNERS[name](prom, spec)
        result.required = spec.explicit or name in CORE_CHECKS
        results.append(result)
    return Report(spec, prom.url, prom.at, results)


def error_json(spec: GateSpec, prometheus: str, at: float, message: str) -> dict[str, Any]:
    return {"schema": SCHEMA, "result": ERROR, "exit_code": EXIT_CODES[ERROR],
            "model": spec.model, "stable": spec.stable, "canary": spec.canary,
            "tenant": spec.tenant, "window": spec.window, "prometheus": prometheus,
            "evaluated_at": at, "error": message, "checks": []}
