"""L2 ML quality: are the answers still good, and has the traffic or the model drifted.

Producers (``llmtrace.quality``): the judge scores a sample of traced requests
in the API server (``LLMTRACE_JUDGE_*``; its panels stay empty without a judge);
output entropy comes from the sampler's logprobs of a sample of requests;
regenerations from the API server's prompt-hash window; drift from the SDK (every
request) or the collector (``version:STABLE`` baselines), which knows no serving
instance, so drift panels ignore ``$instance`` and ``$tenant`` (drift is per model
and version). Finish reasons and output length are recorded for every request.
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
from llmtrace.quality.judge import JUDGE_QUEUE_FULL

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
CHI_P = c.prom(sc.METRIC_LLMTRACE_DRIFT_P_VALUE)
JUDGE_TIME = c.prom(sc.METRIC_LLMTRACE_JUDGE_DURATION)
JUDGE_FAILURES = c.prom(sc.METRIC_LLMTRACE_JUDGE_FAILURES)
DROPPED = c.prom(sc.METRIC_LLMTRACE_TELEMETRY_DROPPED)
DROP_SEL = c.sel(c.M_INSTANCE, f'{c.label(sc.LLMTRACE_TELEMETRY_REASON)}="{JUDGE_QUEUE_FULL}"')
#: drift series carry model, version and feature only
DRIFT_SEL = c.sel(c.M_MODEL, c.M_VERSION)
OUTPUT_LENGTH = c.prom(sc.METRIC_LLMTRACE_SERVER_REQUEST_GENERATION_TOKENS)

Dim = sc.LlmtraceQualityDimensionValues
COMPOSITE = c.req(f'{c.QUALITY_DIMENSION}="{Dim.COMPOSITE}"')
DIMENSIONS = c.req(
    f'{c.QUALITY_DIMENSION}=~"{Dim.HELPFULNESS}|{Dim.ACCURACY}|{Dim.COHERENCE}|{Dim.SAFETY}"')
SCORE_THRESHOLDS = c.lower_is_worse(0.6, 0.8)
JUDGE = ("Produced by the judge model on a sample of traced requests "
         "(LLMTRACE_JUDGE_ENDPOINT, LLMTRACE_JUDGE_SAMPLE_RATIO); empty without a judge.")
SIGMA_NOTE = ("sigma is estimated from the histogram as half the p15.9 to p84.1 spread, "
              "which equals the standard deviation for a normal distribution")


def _paren(expr: str) -> str:
    return f"(\n{expr}\n)"


def quality() -> list:
    mean = _paren(c.mean(SCORE, COMPOSITE))
    sigma = (f"(\n{c.quantile(0.8413, SCORE, COMPOSITE)}\n-\n"
             f"{c.quantile(0.1587, SCORE, COMPOSITE)}\n) / 2")
    evaluations = c.sum_rate(EVALUATIONS, c.req(), (c.MODEL,))
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
            f"{JUDGE}", "percentunit",
            c.higher_is_worse(0.02, 0.05),
            [(c.ratio(c.sum_rate(HALLUCINATIONS, c.req(), (c.MODEL,)), evaluations,
                      zero_fill=evaluations), "{{gen_ai_request_model}}")], w=8)),
        c.timeseries_panel(Spec(
            105, "Judge coverage", "Share of finished requests that a judge evaluated, per "
            "model: the sample behind every score on this dashboard. Below 1 % (orange) "
            "or 0.5 % (red) the scores are noisy. "
            f"{JUDGE}", "percentunit",
            c.lower_is_worse(0.005, 0.01),
            [(c.ratio(evaluations, c.sum_rate(REQUESTS, c.req(), (c.MODEL,))),
              "{{gen_ai_request_model}}")], w=8)),
    ]


def drift() -> list:
    by = f"{c.MODEL}, {c.VERSION}, {c.DRIFT_FEATURE}"
    legend = "{{gen_ai_request_model}} {{llmtrace_deployment_version}} {{llmtrace_drift_feature}}"
    source = ("Computed per model and version over a sliding window against the baseline "
              "(LLMTRACE_DRIFT_BASELINE: pinned first window, a reference file, or the "
              "stable version's live window in the collector), once both hold "
              "LLMTRACE_DRIFT_MIN_SAMPLES requests.")
    return [
        c.timeseries_panel(Spec(
            201, "PSI from baseline", "Population stability index of each feature (prompt "
            "and output length, output entropy, finish reason, TTFT) against its baseline "
            "(llmtrace_drift_psi). Rule of thumb: below 0.1 stable, 0.1 to 0.25 moderate "
            f"shift (orange), above 0.25 significant (red). {source}", "short",
            c.higher_is_worse(0.1, 0.25), [(f"max by ({by}) ({PSI}{DRIFT_SEL})", legend)],
            w=8)),
        c.timeseries_panel(Spec(
            202, "KL divergence from baseline", "Kullback-Leibler divergence of each "
            "feature's current distribution from its baseline, D(current || baseline) "
            f"(llmtrace_drift_kl_divergence, nats). Orange at 0.1, red at 0.5. {source}",
            "suffix: nat", c.higher_is_worse(0.1, 0.5),
            [(f"max by ({by}) ({KL}{DRIFT_SEL})", legend)], w=8)),
        c.timeseries_panel(Spec(
            203, "Drift test p-value", "p-value of the chi-squared test that the current "
            "window and the baseline share one distribution, per feature "
            "(llmtrace_drift_p_value): near zero means the difference is not chance. With "
            "thousands of requests even a harmless shift is significant: read it with PSI. "
            f"Orange below 0.05, red below 0.001. {source}", "short",
            c.lower_is_worse(0.001, 0.05), [(f"min by ({by}) ({CHI_P}{DRIFT_SEL})", legend)],
            w=8), max_val=1),
        c.timeseries_panel(Spec(
            204, "Output entropy", "Mean per-token entropy of the output distribution per "
            "model (llmtrace_output_entropy), with p5 and p95 across requests: top-k "
            "sampler logprobs of requests that asked for them and of a sample llmtrace asks "
            "for (LLMTRACE_ENTROPY_SAMPLE_RATIO), the rest of the mass as one outcome (a "
            "lower bound). A drop towards zero suggests repetitive, collapsed output; a rise "
            "suggests incoherent sampling. No fixed threshold: compare with the drift panels.",
            "suffix: nat", c.informational(),
            [(c.mean(ENTROPY, c.req(), (c.MODEL,)), "mean {{gen_ai_request_model}}"),
             (c.quantile(0.05, ENTROPY, c.req(), (c.MODEL,)), "p5 {{gen_ai_request_model}}"),
             (c.quantile(0.95, ENTROPY, c.req(), (c.MODEL,)), "p95 {{gen_ai_request_model}}")])),
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
    regenerations = ("Counted in the API server: the same tenant sending the same prompt "
                     "(a keyed hash of its tokens, never the text) within "
                     "LLMTRACE_REGENERATION_WINDOW_S; a retry routed to another replica is "
                     "not seen.")

    def regen_ratio(by: str) -> str:
        return c.ratio(c.sum_rate(REGENERATIONS, c.req(), (by,)),
                       c.sum_rate(REQUESTS, c.req(), (by,)))

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


def judge() -> list:
    sel = c.req()
    failures = c.sum_rate(JUDGE_FAILURES, sel, (c.ERROR_TYPE,))
    return [
        c.timeseries_panel(Spec(
            501, "Judge latency p50 / p95", "How long the judge takes per sampled request "
            "(llmtrace_judge_duration_seconds, the llmtrace.judge span): a slow judge fills "
            "its queue and requests go unjudged, never waited for. Orange at 5 s, red at "
            f"10 s (the default timeout). {JUDGE}", "s", c.higher_is_worse(5, 10),
            [(c.quantile(0.5, JUDGE_TIME, sel), "p50"),
             (c.quantile(0.95, JUDGE_TIME, sel), "p95")], w=8)),
        c.timeseries_panel(Spec(
            502, "Judge failures by reason", "Judge calls per second that gave no verdict, "
            "by error type: timeout, unreachable, http_error, parse_error (the answer was "
            "not the rubric's JSON), internal (llmtrace_judge_failures_total). "
            f"{JUDGE}", "reqps", c.higher_is_worse(0.01, 0.1),
            [(f"{failures}\nor on () vector(0)", "{{error_type}}")], w=8)),
        c.timeseries_panel(Spec(
            503, "Judge drops", "Requests sampled for judging but dropped because the "
            "judge's queue was full (llmtrace_telemetry_dropped_total{reason="
            "\"judge_queue_full\"}): raise LLMTRACE_JUDGE_MAX_RATE / _CONCURRENCY or lower "
            "the sample ratio. Serving never waits for the judge.", "reqps",
            c.higher_is_worse(0.01, 0.1),
            [(f"sum({c.rate(DROPPED, DROP_SEL)})\nor on () vector(0)", "dropped")], w=8)),
    ]


def build() -> db.Dashboard:
    return c.dashboard(
        UID, "llmtrace / L2 ML quality",
        "Judge scores, hallucinations, drift from baseline, output shape, user retries and "
        "the judge's own health per model, tenant and version.",
        c.standard_variables(),
        [(c.row("Quality scores", 100), quality()),
         (c.row("Drift", 200), drift()),
         (c.row("Outputs", 300), outputs()),
         (c.row("Users", 400), users()),
         (c.row("Judge health", 500), judge())])
