"""L1 on-call: is the service up, fast and within its SLOs, and if not, where does it hurt.

Latency and errors come from llmtrace's per-request series recorded at the
source (TTFT has a 0.2 s bucket edge, so the 200 ms SLO is an exact count);
saturation comes from vLLM's own gauges; SLO panels read the Sloth recording
rules built from dashboards/slo/llmtrace.sloth.yaml.
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

UID = "llmtrace-l1-oncall"
FILENAME = "llmtrace-l1-oncall.json"

REQUESTS = c.prom(sc.METRIC_LLMTRACE_SERVER_REQUESTS)
TTFT = c.prom(sc.METRIC_GEN_AI_SERVER_TIME_TO_FIRST_TOKEN)
ITL = c.prom(sc.METRIC_LLMTRACE_SERVER_INTER_TOKEN_LATENCY)
E2E = c.prom(sc.METRIC_GEN_AI_SERVER_REQUEST_DURATION)
QUEUE = c.prom(sc.METRIC_LLMTRACE_SERVER_QUEUE_DURATION)
#: the phases that tile TTFT, in order (llmtrace.record.timeline)
TTFT_PHASES = (("pre-processing", c.prom(sc.METRIC_LLMTRACE_SERVER_PREPROCESS_DURATION)),
               ("queue", QUEUE),
               ("prefill", c.prom(sc.METRIC_LLMTRACE_SERVER_PREFILL_DURATION)),
               ("first-token delivery",
                c.prom(sc.METRIC_LLMTRACE_SERVER_FIRST_TOKEN_DELIVERY_DURATION)))
PREEMPTIONS = c.prom(sc.METRIC_LLMTRACE_SERVER_PREEMPTIONS)
DP_ROUTED = c.prom(sc.METRIC_LLMTRACE_DP_ROUTED_REQUESTS)
DP_IMBALANCE = c.prom(sc.METRIC_LLMTRACE_DP_LOAD_IMBALANCE)
RANK = c.label(sc.LLMTRACE_ENGINE_INDEX)
DP_REASON = c.label(sc.LLMTRACE_DP_REASON)
#: the data-parallel series carry no tenant: the rank choice is the server's, not a tenant's
DP_SEL = c.sel(c.M_MODEL, c.M_VERSION, c.M_INSTANCE)
KV_DURATION = c.prom(sc.METRIC_LLMTRACE_KV_TRANSFER_DURATION)
KV_FAILURES = c.prom(sc.METRIC_LLMTRACE_KV_TRANSFER_FAILURES)
KV_BYTES = c.prom(sc.METRIC_LLMTRACE_KV_TRANSFER_BYTES)
KV_DIRECTION = c.label(sc.LLMTRACE_KV_TRANSFER_DIRECTION)
KV_CONNECTOR = c.label(sc.LLMTRACE_KV_TRANSFER_CONNECTOR)
ERROR_TYPE = c.label(sc.ERROR_TYPE)
PD_TTFT = c.prom(sc.METRIC_LLMTRACE_PD_TIME_TO_FIRST_TOKEN)
PD_PARTS = ((sc.METRIC_LLMTRACE_PD_REMOTE_PREFILL_DURATION, "remote prefill"),
            (sc.METRIC_LLMTRACE_PD_HANDOFF_DURATION, "handoff"),
            (sc.METRIC_LLMTRACE_PD_LOCAL_DURATION, "decode local"))
KV_SEL = c.sel(c.M_MODEL, c.M_VERSION, c.M_INSTANCE)
PREFIX_ERROR = c.prom(sc.METRIC_LLMTRACE_ROUTER_PREFIX_CACHE_PREDICTION_ERROR)
PREFIX_PREDICTED = c.prom(sc.METRIC_LLMTRACE_ROUTER_PREFIX_CACHE_PREDICTED_TOKENS)
PREFIX_ACTUAL = c.prom(sc.METRIC_LLMTRACE_ROUTER_PREFIX_CACHE_ACTUAL_TOKENS)
STEP_PHASE = c.prom(sc.METRIC_LLMTRACE_STEP_PHASE_DURATION)
PHASE = c.label(sc.LLMTRACE_STEP_PHASE)
MOE_IMBALANCE = c.prom(sc.METRIC_LLMTRACE_MOE_LOAD_IMBALANCE)
MOE_HOT_SHARE = c.prom(sc.METRIC_LLMTRACE_MOE_HOT_EXPERT_SHARE)
MOE_LAYER = c.prom(sc.METRIC_LLMTRACE_MOE_LAYER_LOAD_IMBALANCE)
LAYER = c.label(sc.LLMTRACE_MOE_LAYER)
HOL = c.prom(sc.METRIC_LLMTRACE_REQUEST_HOL_BLOCKING)
GENERATION_GAP = c.prom(sc.METRIC_LLMTRACE_GENERATION_GAP)
#: engine-step series carry no tenant: a step is the batch's
STEP_SEL = c.sel(c.M_MODEL, c.M_VERSION, c.M_INSTANCE)
BUSY = c.prom(sc.METRIC_LLMTRACE_COST_ACCELERATOR_SECONDS)
IDLE = c.prom(sc.METRIC_LLMTRACE_COST_IDLE_ACCELERATOR_SECONDS)

SLO_VARIABLE = c.Variable(
    "slo", "SLO",
    f'label_values(slo:error_budget:ratio{{sloth_service="{c.SLO_SERVICE}"}}, sloth_slo)',
    "SLOs of dashboards/slo/llmtrace.sloth.yaml (Sloth's sloth_slo label).")
#: Sloth rule selector: the service, the chosen SLOs and models (rules are per model)
SLO = c.sel(f'sloth_service="{c.SLO_SERVICE}"', 'sloth_slo=~"$slo"', c.M_MODEL)
#: Sloth's meta rules (objective, budget) carry no per-model label
SLO_META = c.sel(f'sloth_service="{c.SLO_SERVICE}"', 'sloth_slo=~"$slo"')
SLO_JOIN = "on (sloth_id, sloth_service, sloth_slo) group_left"
SLO_LEGEND = "{{sloth_slo}} {{gen_ai_request_model}}"

BURN_UNIT = "suffix:x"  # Grafana custom unit: a multiple of the budget rate
BURN = c.thresholds("green", (1, "yellow"), (6, "orange"), (14.4, "red"))
PAGE_BURN = c.thresholds("green", (6, "orange"), (14.4, "red"))
TICKET_BURN = c.thresholds("green", (1, "yellow"), (3, "orange"))
BUDGET_LEFT = c.thresholds("red", (0, "orange"), (0.25, "green"))
SERVER_ERRORS = c.higher_is_worse(0.001, 0.01)  # availability SLO: 99.9 %
TTFT_LINE = c.thresholds("green", (c.TTFT_SLO_S, "red"))
ITL_LINE = c.thresholds("green", (c.ITL_SLO_S, "red"))

QUANTILES = ((0.5, "p50"), (0.95, "p95"), (0.99, "p99"))
SLO_SOURCE = "Recording rules from dashboards/slo/ (Sloth)"


def error_ratio(by: tuple[str, ...]) -> str:
    total = c.sum_rate(REQUESTS, c.req(), by)
    return c.ratio(c.sum_rate(REQUESTS, c.req(c.M_SERVER_ERROR), by), total, zero_fill=total)


def attainment(histogram: str, edge: float) -> str:
    """Share of events at or under a bucket edge (the SLI the SLO counts, not an estimate)."""
    good = c.sum_rate(f"{histogram}_bucket", c.req(f'le="{edge}"'))
    return f"{good}\n/\n({c.sum_rate(f'{histogram}_count', c.req())} > 0)"


def percentiles(histogram: str, by: tuple[str, ...] = ()) -> list[c.Query]:
    suffix = "".join(f" {{{{{b}}}}}" for b in by)
    return [(c.quantile(q, histogram, c.req(), by), f"{name}{suffix}") for q, name in QUANTILES]


def overview() -> list:
    return [
        c.stat_panel(Spec(
            101, "Request rate", "Finished requests per second over the selection "
            "(llmtrace_server_requests_total, every request whatever the trace sampling).",
            "reqps", c.informational(), [(c.sum_rate(REQUESTS, c.req()), "req/s")], w=4, h=5)),
        c.stat_panel(Spec(
            102, "Server error ratio", "Share of finished requests that failed on the server "
            "side (error_type set, except client aborts and disconnects): the availability "
            "SLI. Orange at 0.1 % (the 99.9 % objective's budget), red at 1 %.",
            "percentunit", SERVER_ERRORS, [(error_ratio(()), "errors")], w=4, h=5)),
        c.stat_panel(Spec(
            103, "TTFT within 200 ms", "Share of requests whose first token arrived within "
            "200 ms (the TTFT SLO, 99 %). 0.2 s is a bucket edge of "
            "gen_ai_server_time_to_first_token_seconds, so this is an exact count.",
            "percentunit", c.lower_is_worse(0.95, 0.99),
            [(attainment(TTFT, c.TTFT_SLO_S), "TTFT <= 200 ms")], w=4, h=5), max_val=1),
        c.stat_panel(Spec(
            104, "ITL within 100 ms", "Share of inter-token gaps of at most 100 ms (the ITL "
            "SLO, 99 %), from llmtrace_server_inter_token_latency_seconds (0.1 s is a bucket "
            "edge).", "percentunit", c.lower_is_worse(0.95, 0.99),
            [(attainment(ITL, c.ITL_SLO_S), "ITL <= 100 ms")], w=4, h=5), max_val=1),
        c.stat_panel(Spec(
            105, "Error budget left (worst SLO)", "Lowest remaining error budget over the "
            f"selected SLOs and models for the 30-day period. {SLO_SOURCE}: "
            "slo:period_error_budget_remaining:ratio. Red once the budget is spent.",
            "percentunit", BUDGET_LEFT,
            [(f"min(slo:period_error_budget_remaining:ratio{SLO})", "budget left")],
            w=4, h=5)),
        c.stat_panel(Spec(
            106, "Burn rate (worst SLO)", "Highest current burn rate (5-minute error ratio "
            "divided by the error budget) over the selected SLOs and models. 1 spends the "
            "budget exactly over the period; 6 and 14.4 are the ticket and page levels of "
            f"the multiwindow alerts. {SLO_SOURCE}: slo:current_burn_rate:ratio.",
            BURN_UNIT, BURN, [(f"max(slo:current_burn_rate:ratio{SLO})", "burn rate")], w=4, h=5)),
    ]


def traffic() -> list:
    by_model, by_instance = (c.MODEL,), ("instance",)
    has_error = f'{c.ERROR_TYPE}!=""'
    return [
        c.timeseries_panel(Spec(
            201, "Request rate by model", "Finished requests per second per served model "
            "(llmtrace_server_requests_total).", "reqps", c.informational(),
            [(c.sum_rate(REQUESTS, c.req(), by_model), "{{gen_ai_request_model}}")])),
        c.timeseries_panel(Spec(
            202, "Request rate by instance", "Finished requests per second per serving host. "
            "A host that drops to zero while others carry on is down or drained.", "reqps",
            c.informational(), [(c.sum_rate(REQUESTS, c.req(), by_instance), "{{instance}}")])),
        c.timeseries_panel(Spec(
            203, "Server error ratio by model", "Server-side failures / finished requests "
            "per model (client aborts and disconnects excluded, as in the availability "
            "SLO). Dashed lines: 0.1 % (the SLO budget) and 1 %.", "percentunit",
            SERVER_ERRORS, [(error_ratio(by_model), "{{gen_ai_request_model}}")])),
        c.timeseries_panel(Spec(
            204, "Server error ratio by instance", "Server-side failures / finished requests "
            "per serving host: one bad host stands out here.", "percentunit", SERVER_ERRORS,
            [(error_ratio(by_instance), "{{instance}}")])),
        c.timeseries_panel(Spec(
            205, "Failed and aborted requests by error type", "Requests per second that "
            "ended with an error.type: engine_error, timeout or an exception name (server "
            "side) and aborted / client_disconnected (client side). Zero when none failed.",
            "reqps", c.informational(),
            [(f"{c.sum_rate(REQUESTS, c.req(has_error), (c.ERROR_TYPE,))}\nor on ()\n"
              f"0 * {c.sum_rate(REQUESTS, c.req())}", "{{error_type}}")], w=24), stack=True),
    ]


def latency() -> list:
    return [
        c.heatmap_panel(Spec(
            301, "TTFT distribution", "Time to first token: requests per second in each "
            "bucket of gen_ai_server_time_to_first_token_seconds (darker = more). The 200 ms "
            "SLO is the 0.2 bucket edge; the red 'TTFT p99 over 200 ms' annotation marks "
            "where the p99 crossed it.", "s", TTFT_LINE,
            [(c.sum_rate(f"{TTFT}_bucket", c.req(), ("le",)), "{{le}}")], h=9)),
        c.timeseries_panel(Spec(
            302, "TTFT p50 / p95 / p99", "Time to first token percentiles per model, "
            "interpolated inside histogram buckets. Red dashed line: the 200 ms SLO.", "s",
            TTFT_LINE, percentiles(TTFT, (c.MODEL,)), h=9)),
        c.timeseries_panel(Spec(
            303, "ITL p50 / p95 / p99", "Inter-token latency percentiles per model "
            "(llmtrace_server_inter_token_latency_seconds, one observation per token gap). "
            "Red dashed line: the 100 ms ITL SLO.", "s", ITL_LINE,
            percentiles(ITL, (c.MODEL,)))),
        c.timeseries_panel(Spec(
            304, "E2E latency p50 / p95 / p99", "Arrival to last token per model "
            "(gen_ai_server_request_duration_seconds). Grows with output length, so it has "
            "no SLO; lines at 10 s and 30 s flag outliers for a chat workload.", "s",
            c.higher_is_worse(10, 30), percentiles(E2E, (c.MODEL,)))),
        c.timeseries_panel(Spec(
            305, "Where TTFT goes (mean per phase)", "Mean time per phase of the requests "
            "that finished, stacked: pre-processing (HTTP read to engine arrival), queue "
            "(to first scheduled, plus re-queues after preemption), prefill and first-token "
            "delivery tile TTFT, so the stack is the mean TTFT of llmtrace-recorded "
            "requests. vLLM built-in records (llmtrace_record_source=vllm_builtin) have no "
            "pre-processing or delivery phase.", "s", TTFT_LINE,
            [(c.mean(hist, c.req()), name) for name, hist in TTFT_PHASES], w=24),
            stack=True),
    ]


def saturation() -> list:
    return [
        c.timeseries_panel(Spec(
            401, "Running requests", "Requests in the engine's running batch per host "
            "(vLLM gauge vllm:num_requests_running).", "short", c.informational(),
            [(f"sum by (instance) ({c.VLLM_RUNNING}{c.vllm()})", "{{instance}}")], w=8)),
        c.timeseries_panel(Spec(
            402, "Queue depth (waiting requests)", "Requests waiting to be scheduled per "
            "host (vLLM gauge vllm:num_requests_waiting). A queue that keeps growing means "
            "demand exceeds capacity; TTFT follows.", "short", c.higher_is_worse(5, 20),
            [(f"sum by (instance) ({c.VLLM_WAITING}{c.vllm()})", "{{instance}}")], w=8)),
        c.timeseries_panel(Spec(
            403, "Waiting requests by reason", "Why requests wait (vLLM gauge "
            "vllm:num_requests_waiting_by_reason): 'capacity' is waiting for batch or KV "
            "space, 'deferred' is blocked by LoRA budget or KV transfer.", "short",
            c.higher_is_worse(5, 20),
            [(f"sum by (reason) ({c.VLLM_WAITING_BY_REASON}{c.vllm()})", "{{reason}}")],
            w=8), stack=True),
        c.timeseries_panel(Spec(
            404, "Queue time p95", "95th percentile of time spent waiting to be scheduled, "
            "including after preemptions (llmtrace_server_queue_duration_seconds). It is "
            "part of TTFT: orange at 100 ms, red at the 200 ms TTFT SLO.", "s",
            c.higher_is_worse(0.1, c.TTFT_SLO_S),
            [(c.quantile(0.95, QUEUE, c.req(), (c.MODEL,)), "{{gen_ai_request_model}}")],
            w=8)),
        c.timeseries_panel(Spec(
            405, "Preemption rate", "Preemptions per second: vLLM's engine counter "
            "(vllm:num_preemptions_total) per host and llmtrace's per model. Preempted "
            "requests are re-queued and recomputed, which costs TTFT and ITL; sustained "
            "preemption means the KV cache is too small for the load.", "ops",
            c.higher_is_worse(0.1, 1),
            [(f"sum by (instance) (rate({c.VLLM_PREEMPTIONS}{c.vllm()}[$__rate_interval]))",
              "vLLM {{instance}}"),
             (f"{c.sum_rate(PREEMPTIONS, c.req(), (c.MODEL,))}\nor\n"
              f"0 * {c.sum_rate(REQUESTS, c.req(), (c.MODEL,))}",
              "llmtrace {{gen_ai_request_model}}")], w=8)),
        c.timeseries_panel(Spec(
            406, "KV-cache usage", "Fraction of KV-cache blocks in use per host and engine "
            "(vLLM gauge vllm:kv_cache_usage_perc, 1 = full). Near full, new requests wait "
            "and running ones get preempted.", "percentunit", c.higher_is_worse(0.8, 0.95),
            [(f"max by (instance, engine) ({c.VLLM_KV_USAGE}{c.vllm()})",
              "{{instance}} engine {{engine}}")], w=8), max_val=1),
    ]


def accelerators() -> list:
    return [
        c.timeseries_panel(Spec(
            501, "Accelerator utilisation", "Busy share of accelerator time per host: "
            "llmtrace_cost_accelerator_seconds_total / (that + "
            "llmtrace_cost_idle_accelerator_seconds_total), both measured in the engine "
            "core from engine-step time. Orange at 85 %, red at 95 %: no headroom for "
            "bursts.", "percentunit", c.higher_is_worse(0.85, 0.95),
            [(c.busy_share(("instance",)), "{{instance}}")], w=8), max_val=1),
        c.timeseries_panel(Spec(
            502, "Busy vs idle accelerators", "Accelerator-seconds per second per host, "
            "split into busy (a batch was scheduled) and idle (nothing to run). Stacked, "
            "the total is the number of accelerators the engines hold.", "short",
            c.informational(),
            [(c.sum_rate(BUSY, c.sel(c.M_INSTANCE), ("instance",)), "busy {{instance}}"),
             (c.sum_rate(IDLE, c.sel(c.M_INSTANCE), ("instance",)), "idle {{instance}}")],
            w=8), stack=True),
        c.timeseries_panel(Spec(
            503, "vLLM estimated FLOP/s per GPU", "vLLM's analytic estimate of floating-point "
            "work per GPU (vllm:estimated_flops_per_gpu_total). Counted only when vLLM runs "
            "with --enable-mfu-metrics (flat zero otherwise); divide by the accelerator's "
            "peak for model FLOPs utilisation.", "flops", c.informational(),
            [(f"sum by (instance, engine) (rate({c.VLLM_FLOPS}{c.vllm()}[$__rate_interval]))",
              "{{instance}} engine {{engine}}")], w=8)),
        *hardware(),
    ]


def hardware() -> list:
    """The hardware's side of utilisation (llmtrace/telemetry/hardware.py, engine core)."""
    low, high = c.UTILISATION_BAND
    role, name = c.label(sc.LLMTRACE_PROCESS_ROLE), c.label(sc.LLMTRACE_PROCESS_NAME)
    gpu_by = ("instance", c.label(sc.HW_ID))
    return [
        c.gauge_panel(Spec(
            504, "Utilisation vs target band", "Accelerator utilisation per host against "
            f"the {low:.0%}-{high:.0%} target band (green). GPU hosts: NVML's GPU "
            "utilisation (hw_gpu_utilization, mean over the host's GPUs; needs "
            "nvidia-ml-py). Hosts without it (CPU): the engine's busy share, busy / (busy + "
            "idle) accelerator-seconds. Blue: paid-for capacity sits idle; orange: no "
            "headroom for bursts; red from 90 %: queues build.", "percentunit",
            c.utilisation_band(), [(c.accelerator_utilisation(("instance",)), "{{instance}}")],
            w=8), max_val=1),
        c.timeseries_panel(Spec(
            505, "Engine and worker CPU", "CPU seconds per second of the engine core and of "
            "each model worker, over the CPUs each may run on (process_cpu_time_seconds_total"
            " / llmtrace_process_cpu_available: its affinity, e.g. the cores "
            "VLLM_CPU_OMP_THREADS_BIND gave it). On CPU hosts the workers' line is the "
            "accelerator's utilisation; an engine core near 100 % starves the batch.",
            "percentunit", c.utilisation_band(),
            [(c.process_cpu_share(("instance", role, name)),
              f"{{{{instance}}}} {{{{{name}}}}}")], w=8), max_val=1),
        c.timeseries_panel(Spec(
            506, "GPU utilisation and memory per device", "Per GPU (hw_id, the NVML UUID): "
            "share of time a kernel ran (hw_gpu_utilization) and memory in use over "
            "its size (hw_gpu_memory_utilization). vLLM reserves its KV cache at "
            "start, so memory stays high while idle. Needs NVML (nvidia-ml-py) on a GPU "
            "host; empty on CPU hosts.", "percentunit", c.utilisation_band(),
            [(f"max by (instance, {gpu_by[1]}) "
              f"({c.prom(sc.METRIC_HW_GPU_UTILIZATION)}{c.sel(c.M_INSTANCE)})",
              f"compute {{{{instance}}}} {{{{{gpu_by[1]}}}}}"),
             (f"max by (instance, {gpu_by[1]}) "
              f"({c.prom(sc.METRIC_HW_GPU_MEMORY_UTILIZATION)}{c.sel(c.M_INSTANCE)})",
              f"memory {{{{instance}}}} {{{{{gpu_by[1]}}}}}")], w=8), max_val=1),
    ]


def data_parallel() -> list:
    routed = c.sum_rate(DP_ROUTED, DP_SEL, ("instance", RANK))
    return [
        c.timeseries_panel(Spec(
            801, "Routing share per data-parallel rank", "Share of each server's requests "
            "that its API servers sent to each data-parallel engine rank "
            "(llmtrace_dp_routed_requests_total, recorded at the choice). An even split is "
            "1/N per rank; a rank far above it is where queues and TTFT grow first.",
            "percentunit", c.informational(),
            [(f"{routed}\n/ on (instance) group_left\n"
              f"{c.sum_rate(DP_ROUTED, DP_SEL, ('instance',))}",
              f"{{{{instance}}}} rank {{{{{RANK}}}}}")], w=8), max_val=1),
        c.timeseries_panel(Spec(
            802, "Rank choice reasons", "Requests per second by why they went to their rank: "
            "load_balanced (vLLM's balancer), requested_rank (a router named the rank), "
            "session_affinity, external_lb (one rank per API server). Mostly requested or "
            "external means the router in front decides placement.", "reqps",
            c.informational(),
            [(c.sum_rate(DP_ROUTED, DP_SEL, (DP_REASON,)), f"{{{{{DP_REASON}}}}}")], w=8),
            stack=True),
        c.timeseries_panel(Spec(
            803, "Load imbalance at the rank choice", "Busiest rank's waiting plus running "
            "requests over the mean across ranks, as vLLM's balancer saw them at each "
            "balanced choice (llmtrace_dp_load_imbalance; 1 = even). Sustained p90 above "
            "1.5 means load lands unevenly: one rank queues while others idle.", "none",
            c.higher_is_worse(1.5, 2.0),
            [(c.quantile(0.5, DP_IMBALANCE, DP_SEL, ("instance",)), "p50 {{instance}}"),
             (c.quantile(0.9, DP_IMBALANCE, DP_SEL, ("instance",)), "p90 {{instance}}")],
            w=8)),
    ]


def kv_transfer() -> list:
    load = f'{KV_DIRECTION}="load"'
    parts = [(c.quantile(0.5, c.prom(m), c.sel(c.M_MODEL, c.M_VERSION)), f"p50 {name}")
             for m, name in PD_PARTS]
    parts.append((c.quantile(0.5, KV_DURATION, c.sel(c.M_MODEL, c.M_VERSION, load)),
                  "p50 KV transfer"))
    return [
        c.timeseries_panel(Spec(
            1001, "KV transfer latency", "p50 and p99 of each request's KV transfer per "
            "connector and direction (llmtrace_kv_transfer_duration_seconds, the "
            "llmtrace.kv_transfer span). Load: the decode instance waiting for the prefill's "
            "KV, part of its TTFT. Save: how long a prefill instance holds blocks for the "
            "peer; long holds shrink its KV cache.", "s", c.higher_is_worse(0.1, 0.5),
            [(c.quantile(q, KV_DURATION, KV_SEL, (KV_CONNECTOR, KV_DIRECTION)),
              f"p{int(q * 100)} {{{{{KV_DIRECTION}}}}} {{{{{KV_CONNECTOR}}}}}")
             for q in (0.5, 0.99)], w=8)),
        c.timeseries_panel(Spec(
            1002, "KV transfer failures", "Failed transfers per second by reason "
            "(llmtrace_kv_transfer_failures_total{error_type}): load_failed (handshake "
            "timeout, producer gone, transfer error), invalid_blocks, aborted. With "
            "kv_load_failure_policy=fail each is a failed request; with recompute, a "
            "local prefill the decode instance did not plan for.", "reqps",
            c.higher_is_worse(0.01, 0.1),
            [(c.sum_rate(KV_FAILURES, KV_SEL, (KV_DIRECTION, ERROR_TYPE)),
              f"{{{{{KV_DIRECTION}}}}} {{{{{ERROR_TYPE}}}}}")], w=8), stack=True),
        c.timeseries_panel(Spec(
            1003, "Disaggregated TTFT, by part", "Median of each part of a disaggregated "
            "request's time to first token, joined by the collector from both instances' "
            "spans (derived: llmtrace_pd_*): the prefill instance's request, the proxy's "
            "handoff, the KV transfer and the decode instance's own work. The biggest band "
            "is where to look first.", "s", c.informational(), parts, w=8), stack=True),
        c.timeseries_panel(Spec(
            1004, "KV bytes moved", "Bytes per second moved by successful KV transfers, per "
            "connector and direction (llmtrace_kv_transfer_bytes_total).", "Bps",
            c.informational(),
            [(c.sum_rate(KV_BYTES, KV_SEL, (KV_CONNECTOR, KV_DIRECTION)),
              f"{{{{{KV_DIRECTION}}}}} {{{{{KV_CONNECTOR}}}}}")], w=12)),
        c.timeseries_panel(Spec(
            1005, "Disaggregated TTFT p99", "p99 time to first token of disaggregated "
            "requests from the prefill request's start to the decode instance's first token "
            "(llmtrace_pd_time_to_first_token_seconds, derived by the collector). The proxy's "
            "own time before the prefill call is not in it.", "s",
            c.higher_is_worse(c.TTFT_SLO_S, 2 * c.TTFT_SLO_S),
            [(c.quantile(0.99, PD_TTFT, c.sel(c.M_MODEL, c.M_VERSION)), "p99")], w=12)),
    ]


def router_prediction() -> list:
    sel = c.sel(c.M_MODEL, c.M_VERSION)
    model = c.label(sc.GEN_AI_REQUEST_MODEL)
    return [
        c.timeseries_panel(Spec(
            1101, "Router prefix-cache prediction error", "How far llm-d's router's "
            "predicted prefix-cache hit (its prefix-cache scorer on the chosen endpoint) was "
            "from what the engine found (cached / prompt tokens), per routed request; derived "
            "by the collector from both spans of one trace "
            "(llmtrace_router_prefix_cache_prediction_error). A rising p90 means "
            "cache-aware routing steers by a stale picture of the engines' caches.", "percentunit",
            c.higher_is_worse(0.2, 0.4),
            [(c.quantile(q, PREFIX_ERROR, sel, (model,)), f"p{int(q * 100)} {{{{{model}}}}}")
             for q in (0.5, 0.9)], w=12), max_val=1),
        c.timeseries_panel(Spec(
            1102, "Predicted over actual cached tokens", "Prompt tokens the router expected "
            "cached over those the engine found cached, on the same requests "
            "(llmtrace_router_prefix_cache_predicted_tokens_total / _actual_tokens_total). "
            "Above 1: the router over-predicts hits (evictions it does not see); below 1: "
            "it misses hits it could route for.", "none", c.informational(),
            [(c.ratio(c.sum_rate(PREFIX_PREDICTED, sel, (model,)),
                      c.sum_rate(PREFIX_ACTUAL, sel, (model,))), f"{{{{{model}}}}}")], w=12)),
    ]


def engine_step() -> list:
    tenant = c.label(sc.LLMTRACE_TENANT)
    return [
        c.timeseries_panel(Spec(
            1201, "Engine step phases (sampled steps)", "p90 of each phase of the sampled "
            "engine steps (one in LLMTRACE_STEP_SAMPLE_EVERY): the scheduler, the worker's "
            "forward (execute) and deferred sampling, and output processing "
            "(llmtrace_step_phase_duration_seconds, the same intervals as the "
            "llmtrace.step.phase spans). Schedule or output growing next to execute is "
            "CPU-side overhead the accelerator waits on.", "s", c.informational(),
            [(c.quantile(0.9, STEP_PHASE, STEP_SEL, (PHASE,)), f"{{{{{PHASE}}}}}")], w=8),
            stack=True),
        c.timeseries_panel(Spec(
            1202, "MoE expert load imbalance", "Per MoE layer and sampled step, the busiest "
            "expert's tokens over the mean (llmtrace_moe_load_imbalance; 1 = even): p50 and "
            "p90, and the busiest expert's share of a layer's assignments. Sustained high "
            "values at full batches mean tokens pile on few experts: the expert-parallel "
            "ranks holding them set the step time. A one-token step reads experts/top_k "
            "whatever the router does.", "none", c.informational(),
            [(c.quantile(0.5, MOE_IMBALANCE, STEP_SEL), "imbalance p50"),
             (c.quantile(0.9, MOE_IMBALANCE, STEP_SEL), "imbalance p90"),
             (c.quantile(0.9, MOE_HOT_SHARE, STEP_SEL), "hot-expert share p90")], w=8)),
        c.timeseries_panel(Spec(
            1203, "MoE imbalance per layer (last sampled step)", "Each MoE layer's imbalance "
            "in the last sampled step (llmtrace_moe_layer_load_imbalance), the worst instance "
            "per layer: the layers whose routing collapses onto few experts.", "none",
            c.informational(),
            [(f"max by ({LAYER}) ({MOE_LAYER}{STEP_SEL})", f"layer {{{{{LAYER}}}}}")], w=8)),
        c.timeseries_panel(Spec(
            1204, "Head-of-line blocking by tenant", "p90 per request of the engine time "
            "that ran without it while it waited (queued, held or preempted: "
            "llmtrace_request_hol_blocking_seconds). Under priority scheduling the "
            "low-priority tenants carry it; a tenant whose blocking grows while others' "
            "stays flat is being starved.", "s", c.informational(),
            [(c.quantile(0.9, HOL, c.req(), (tenant,)), f"{{{{{tenant}}}}}")], w=12)),
        c.timeseries_panel(Spec(
            1205, "Chunked generations: gap between chunks", "p50 and p90 of the time between "
            "one chunk request's end and the next one's arrival, for generations split "
            "into chunk requests (continue_final_message; llmtrace_generation_gap_seconds): "
            "time the generation spends outside the server, in the sidecar or client.",
            "s", c.informational(),
            [(c.quantile(q, GENERATION_GAP, c.req()), f"p{int(q * 100)}")
             for q in (0.5, 0.9)], w=12)),
    ]


def router() -> list:
    processed = f"rate({c.ROUTER_PROCESSED}[$__rate_interval])"
    requests = f"sum by (route) (rate({c.ROUTER_REQUESTS}[$__rate_interval]))"
    return [
        c.timeseries_panel(Spec(
            901, "Routing share per replica (vllm-router)", "Share of the requests "
            "vllm-router sent to each replica, by its own count "
            "(vllm_router_processed_requests_total{worker}). A replica far above its share "
            "is where queues grow first; one at zero is out of rotation.", "percentunit",
            c.informational(),
            [(f"sum by (worker) ({processed})\n/ ignoring (worker) group_left\n"
              f"sum ({processed})", "{{worker}}")], w=8), max_val=1),
        c.timeseries_panel(Spec(
            902, "Router errors and retries", "Requests per second vllm-router answered "
            "with an error (vllm_router_request_errors_total, by route and error type) and "
            "retried on another replica (vllm_router_retries_total). Retries hide replica "
            "failures from clients; the TTFT they cost shows in the client's latency only.",
            "reqps", c.higher_is_worse(0.01, 0.1),
            [(f"sum by (route, error_type) (rate({c.ROUTER_ERRORS}[$__rate_interval]))\n"
              f"or\n0 * {requests}", "errors {{route}} {{error_type}}"),
             (f"sum by (route) (rate({c.ROUTER_RETRIES}[$__rate_interval]))\nor\n"
              f"0 * {requests}", "retries {{route}}")], w=8)),
        c.timeseries_panel(Spec(
            903, "Replicas the router sees healthy", "vllm-router's health check per replica "
            "(vllm_router_worker_health: 1 healthy, 0 taken out of rotation).", "short",
            c.thresholds("red", (1, "green")),
            [(f"min by (worker) ({c.ROUTER_WORKER_HEALTH})", "{{worker}}")], w=8),
            max_val=1),
    ]


def canary() -> list:
    by_version = (c.VERSION,)
    return [
        c.timeseries_panel(Spec(
            601, "Request rate by version", "Finished requests per second per deployment "
            "version (llmtrace_deployment_version): the traffic split between canary and "
            "stable.", "reqps", c.informational(),
            [(c.sum_rate(REQUESTS, c.req(), by_version), "{{llmtrace_deployment_version}}")]),
            stack=True),
        c.timeseries_panel(Spec(
            602, "Server error ratio by version", "Server-side failure ratio per deployment "
            "version. A canary above stable is the rollback signal.", "percentunit",
            SERVER_ERRORS, [(error_ratio(by_version), "{{llmtrace_deployment_version}}")])),
        c.timeseries_panel(Spec(
            603, "TTFT p99 by version", "Time-to-first-token p99 per deployment version. "
            "Red dashed line: the 200 ms SLO.", "s", TTFT_LINE,
            [(c.quantile(0.99, TTFT, c.req(), by_version), "{{llmtrace_deployment_version}}")])),
        c.timeseries_panel(Spec(
            604, "ITL p99 by version", "Inter-token latency p99 per deployment version. Red "
            "dashed line: the 100 ms SLO.", "s", ITL_LINE,
            [(c.quantile(0.99, ITL, c.req(), by_version), "{{llmtrace_deployment_version}}")])),
    ]


def slo_budget() -> list:
    def windowed(window: str) -> c.Query:
        return (f"slo:sli_error:ratio_rate{window}{SLO}\n/ {SLO_JOIN}\n"
                f"slo:error_budget:ratio{SLO_META}", f"{window} {SLO_LEGEND}")

    return [
        c.timeseries_panel(Spec(
            701, "Error budget remaining", "Share of the 30-day error budget left per SLO "
            f"and model. {SLO_SOURCE}: slo:period_error_budget_remaining:ratio. Below zero "
            "the objective is already missed for this period.", "percentunit", BUDGET_LEFT,
            [(f"slo:period_error_budget_remaining:ratio{SLO}", SLO_LEGEND)]), min_val=None),
        c.timeseries_panel(Spec(
            702, "Burn rate (5 m)", "How fast each SLO spends its budget now: the 5-minute "
            "error ratio over the error budget. 1 spends it exactly over 30 days. "
            f"{SLO_SOURCE}: slo:current_burn_rate:ratio.", BURN_UNIT, BURN,
            [(f"slo:current_burn_rate:ratio{SLO}", SLO_LEGEND)])),
        c.timeseries_panel(Spec(
            703, "Burn rate, page windows (1 h, 6 h)", "Burn rate over the long windows of "
            "the page alerts: 14.4 over 1 h (with 5 m) or 6 over 6 h (with 30 m) pages. "
            f"{SLO_SOURCE}: slo:sli_error:ratio_rate1h and _rate6h over "
            "slo:error_budget:ratio.", BURN_UNIT, PAGE_BURN,
            [windowed("1h"), windowed("6h")])),
        c.timeseries_panel(Spec(
            704, "Burn rate, ticket windows (1 d, 3 d)", "Burn rate over the long windows of "
            "the ticket alerts: 3 over 1 d (with 2 h) or 1 over 3 d (with 6 h) opens a "
            f"ticket. {SLO_SOURCE}: slo:sli_error:ratio_rate1d and _rate3d over "
            "slo:error_budget:ratio.", BURN_UNIT, TICKET_BURN,
            [windowed("1d"), windowed("3d")])),
    ]


def build() -> db.Dashboard:
    ttft_p99 = c.quantile(0.99, TTFT, c.req())
    return c.dashboard(
        UID, "llmtrace / L1 on-call",
        "Is the LLM service up, fast and within its SLOs; if not, which model, host or "
        "version, and is it saturation.",
        [*c.standard_variables(), c.multi_variable(SLO_VARIABLE)],
        [(c.row("Overview", 100), overview()),
         (c.row("Traffic and errors", 200), traffic()),
         (c.row("Latency", 300), latency()),
         (c.row("Saturation", 400), saturation()),
         (c.row("Accelerators", 500), accelerators()),
         (c.row("Canary vs stable", 600), canary()),
         (c.row("SLO error budget", 700), slo_budget()),
         (c.row("Data parallelism", 800), data_parallel()),
         (c.row("Router (vllm-router)", 900), router()),
         (c.row("Disaggregated serving (KV transfer)", 1000), kv_transfer()),
         (c.row("Router prefix-cache prediction (llm-d)", 1100), router_prediction()),
         (c.row("Inside the engine step", 1200), engine_step())],
        annotations=[c.annotation("TTFT p99 over 200 ms", f"{ttft_p99} > {c.TTFT_SLO_S}",
                                  "red")])
