"""L2 ML quality: are the answers still good, and has the traffic or the model drifted.

Judge scores, drift, entropy and regenerations have registry entries but no
producer yet; their panels say which later feature feeds them and stay empty
until then. Finish reasons and output length are recorded for every request.
Judge and drift series come from the pipeline, which knows no serving
instance, so those panels ignore ``$instance``.
"""

from __future__ import annotations

try:
    from grafana_foundation_sdk.builders import dashboard as db
except ImportError as exc:  # the optional extra is missing: say which one
    from llmtrace.dashboards import DASHBOARDS_EXTRA

    raise ImportError(f"{__name__} needs grafana-foundation-sdk: {DASHBOARDS_EXTRA}") from exc

from llmtrace import semconv as sc
from llmtrace.dashboards import common as c
from llmtrace.dashboards.common import Spec

UID = "llmtrace-l2-quality"
FILENAME = "llmtrace-l2-quality.json"

SCORE = c.prom(sc.METRIC_LLMTRACE_QUALITY_SCORE)
HALLUCINATIONS = c.prom(sc.METRIC_LLMTRACE_QUALITY_HALLUCINATIONS)
EVALUATIONS = c.prom(sc.METRIC_LLMTRACE_QUALITY_EVALUATIONS)
KL = c.prom(sc.METRIC_LLMTRACE_DRIFT_KL_DIVERGENCE)
PSI = c.prom(sc.METRIC_LLMTRACE_DRIFT_PSI)
ENTROPY = c.prom(sc.METRIC_LLMTRACE_OUTPUT_ENTROPY)
REGENERATIONS = c.prom(sc.METRIC_LLMTRACE_USER_REGENERATIONS)
REQUESTS = c.prom(sc.METRIC_LLMTRACE_SERVER_REQUESTS)
OUTPUT_LENGTH = c.prom(sc.METRIC_LLMTRACE_SERVER_REQUEST_GENERATION_TOKENS)

Dim = sc.LlmtraceQualityDimensionValues
COMPOSITE = c.pipeline(f'{c.QUALITY_DIMENSION}="{Dim.COMPOSITE}"')
DIMENSIONS = c.pipeline(
    f'{c.QUALITY_DIMENSION}=~"{Dim.HELPFULNESS}|{Dim.ACCURACY}|{Dim.COHERENCE}|{Dim.SAFETY}"')
SCORE_THRESHOLDS = c.lower_is_worse(0.6, 0.8)
JUDGE = c.fed_by(sc.METRIC_LLMTRACE_QUALITY_SCORE)
SIGMA_NOTE = ("sigma is estimated from the histogram as half the p15.9 to p84.1 spread, "
              "which equals the standard deviation for a normal distribution")


def _paren(expr: str) -> str:
    return f"(\n{expr}\n)"


def quality() -> list:
    mean = _paren(c.mean(SCORE, COMPOSITE))
    sigma = (f"(\n{c.quantile(0.8413, SCORE, COMPOSITE)}\n-\n"
             f"{c.quantile(0.1587, SCORE, COMPOSITE)}\n) / 2")
    evaluations = c.sum_rate(EVALUATIONS, c.pipeline(), (c.MODEL,))
    return [
        c.timeseries_panel(Spec(
            101, "Composite quality score (mean ± 1σ)", "Mean judge score in [0, 1] for the "
            "composite dimension with a ±1σ band (llmtrace_quality_score); "
            f"{SIGMA_NOTE}. Orange below 0.8, red below 0.6. {JUDGE}", "none",
            SCORE_THRESHOLDS,
            [(mean, "mean"), (f"{mean}\n+\n{sigma}", "mean + 1σ"),
             (f"{mean}\n-\n{sigma}", "mean - 1σ")]), max_val=1),
        c.timeseries_panel(Spec(
            102, "Quality score by dimension", "Mean judge score per dimension: "
            "helpfulness, accuracy, coherence and safety (llmtrace_quality_score by "
            f"llmtrace_quality_dimension). {JUDGE}", "none", SCORE_THRESHOLDS,
            [(c.mean(SCORE, DIMENSIONS, (c.QUALITY_DIMENSION,)),
              "{{llmtrace_quality_dimension}}")]), max_val=1),
        c.timeseries_panel(Spec(
            103, "Composite quality by version", "Mean composite judge score per deployment "
            f"version: a canary that answers worse than stable shows here. {JUDGE}",
            "none", SCORE_THRESHOLDS,
            [(c.mean(SCORE, COMPOSITE, (c.VERSION,)), "{{llmtrace_deployment_version}}")],
            w=8), max_val=1),
        c.timeseries_panel(Spec(
            104, "Hallucination rate", "Responses a judge flagged as hallucinated / responses "
            "evaluated, per model (llmtrace_quality_hallucinations_total over "
            "llmtrace_quality_evaluations_total). Orange at 2 %, red at 5 %. "
            f"{c.fed_by(sc.METRIC_LLMTRACE_QUALITY_HALLUCINATIONS)}", "percentunit",
            c.higher_is_worse(0.02, 0.05),
            [(c.ratio(c.sum_rate(HALLUCINATIONS, c.pipeline(), (c.MODEL,)), evaluations,
                      zero_fill=evaluations), "{{gen_ai_request_model}}")], w=8)),
        c.timeseries_panel(Spec(
            105, "Judge coverage", "Share of finished requests that a judge evaluated, per "
            "model: the sample behind every score on this dashboard. Below 1 % (orange) "
            "or 0.5 % (red) the scores are noisy. "
            f"{c.fed_by(sc.METRIC_LLMTRACE_QUALITY_EVALUATIONS)}", "percentunit",
            c.lower_is_worse(0.005, 0.01),
            [(c.ratio(evaluations, c.sum_rate(REQUESTS, c.pipeline(), (c.MODEL,))),
              "{{gen_ai_request_model}}")], w=8)),
    ]


def drift() -> list:
    by = f"{c.MODEL}, {c.DRIFT_FEATURE}"
    legend = "{{gen_ai_request_model}} {{llmtrace_drift_feature}}"
    return [
        c.timeseries_panel(Spec(
            201, "KL divergence from baseline", "Kullback-Leibler divergence of each "
            "feature's current distribution from its baseline, per model "
            "(llmtrace_drift_kl_divergence, nats). Orange at 0.1, red at 0.5. "
            f"{c.fed_by(sc.METRIC_LLMTRACE_DRIFT_KL_DIVERGENCE)}", "suffix: nat",
            c.higher_is_worse(0.1, 0.5), [(f"max by ({by}) ({KL}{c.pipeline()})", legend)],
            w=8)),
        c.timeseries_panel(Spec(
            202, "PSI from baseline", "Population stability index of each feature against "
            "its baseline, per model (llmtrace_drift_psi). Rule of thumb: below 0.1 stable, "
            "0.1 to 0.25 moderate shift (orange), above 0.25 significant (red). "
            f"{c.fed_by(sc.METRIC_LLMTRACE_DRIFT_PSI)}", "short",
            c.higher_is_worse(0.1, 0.25), [(f"max by ({by}) ({PSI}{c.pipeline()})", legend)],
            w=8)),
        c.timeseries_panel(Spec(
            203, "Output entropy", "Mean per-token entropy of the output distribution per "
            "model (llmtrace_output_entropy), with p5 and p95 across requests. A drop "
            "towards zero suggests repetitive, collapsed output; a rise suggests incoherent "
            "sampling. No fixed threshold: compare with the drift panels. "
            f"{c.fed_by(sc.METRIC_LLMTRACE_OUTPUT_ENTROPY)}", "suffix: nat", c.informational(),
            [(c.mean(ENTROPY, c.req(), (c.MODEL,)), "mean {{gen_ai_request_model}}"),
             (c.quantile(0.05, ENTROPY, c.req(), (c.MODEL,)), "p5 {{gen_ai_request_model}}"),
             (c.quantile(0.95, ENTROPY, c.req(), (c.MODEL,)), "p95 {{gen_ai_request_model}}")],
            w=8)),
    ]


def outputs() -> list:
    total = c.sum_rate(REQUESTS, c.req(), (c.MODEL,))
    return [
        c.timeseries_panel(Spec(
            301, "Finish reasons", "Share of finished requests by finish reason (stop, "
            "length, abort, error, repetition) over the selection "
            "(llmtrace_server_requests_total).", "percentunit", c.informational(),
            [(f"{c.sum_rate(REQUESTS, c.req(), (c.FINISH_REASON,))}\n/ ignoring "
              f"({c.FINISH_REASON}) group_left ()\n({c.sum_rate(REQUESTS, c.req())} > 0)",
              "{{llmtrace_request_finish_reason}}")]), stack=True, max_val=1),
        c.timeseries_panel(Spec(
            302, "Truncated responses", "Share of requests that stopped at max_tokens "
            "(finish reason 'length') per model: answers cut off mid-way. Orange at 10 %, "
            "red at 25 %.", "percentunit", c.higher_is_worse(0.1, 0.25),
            [(c.ratio(c.sum_rate(REQUESTS, c.req(f'{c.FINISH_REASON}="length"'), (c.MODEL,)),
                      total, zero_fill=total), "{{gen_ai_request_model}}")]), max_val=1),
        c.heatmap_panel(Spec(
            303, "Output length distribution", "Requests per second by output length in "
            "tokens (llmtrace_server_request_generation_tokens buckets, powers of 4). A "
            "shift shows a change in what users ask for or how the model answers.", "short",
            c.informational(),
            [(c.sum_rate(f"{OUTPUT_LENGTH}_bucket", c.req(), ("le",)), "{{le}}")])),
        c.timeseries_panel(Spec(
            304, "Output length p50 / p95", "Output tokens per request at the median and "
            "95th percentile per model (llmtrace_server_request_generation_tokens). "
            "Interpolated inside wide buckets: read trends, not exact values.", "short",
            c.informational(),
            [(c.quantile(0.5, OUTPUT_LENGTH, c.req(), (c.MODEL,)),
              "p50 {{gen_ai_request_model}}"),
             (c.quantile(0.95, OUTPUT_LENGTH, c.req(), (c.MODEL,)),
              "p95 {{gen_ai_request_model}}")])),
    ]


def users() -> list:
    regenerations = c.fed_by(sc.METRIC_LLMTRACE_USER_REGENERATIONS)

    def regen_ratio(by: str) -> str:
        return c.ratio(c.sum_rate(REGENERATIONS, c.pipeline(), (by,)),
                       c.sum_rate(REQUESTS, c.pipeline(), (by,)))

    return [
        c.timeseries_panel(Spec(
            401, "User regeneration rate by model", "Requests that regenerate an earlier "
            "answer / finished requests, per model (llmtrace_user_regenerations_total): "
            "users retrying is a quality signal no judge sees. Orange at 5 %, red at 10 %. "
            f"{regenerations}", "percentunit", c.higher_is_worse(0.05, 0.1),
            [(regen_ratio(c.MODEL), "{{gen_ai_request_model}}")])),
        c.timeseries_panel(Spec(
            402, "User regeneration rate by version", "Regeneration share per deployment "
            "version: more retries on the canary than on stable means worse answers. "
            f"{regenerations}", "percentunit", c.higher_is_worse(0.05, 0.1),
            [(regen_ratio(c.VERSION), "{{llmtrace_deployment_version}}")])),
    ]


def build() -> db.Dashboard:
    return c.dashboard(
        UID, "llmtrace / L2 ML quality",
        "Judge scores, hallucinations, drift from baseline, output shape and user retries "
        "per model, tenant and version.",
        c.standard_variables(),
        [(c.row("Quality scores", 100), quality()),
         (c.row("Drift", 200), drift()),
         (c.row("Outputs", 300), outputs()),
         (c.row("Users", 400), users())])
