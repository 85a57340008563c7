"""L3 cost and efficiency: what the service costs, per unit of work, and how much is wasted.

Dollars (``llmtrace_cost_usd_total``) come from the llmtrace collector on one
of two bases, chosen with ``$cost_basis``: ``batch_share`` prices each
request's share of engine-step time at the instance type's hourly rate,
``price_table`` applies per-token list prices. Both price the same requests, so
they are never summed. The collector knows no serving instance, so dollar
panels ignore ``$instance``; accelerator-seconds come from the engine core.
"""

from __future__ import annotations

try:
    from grafana_foundation_sdk.builders import dashboard as db
    from grafana_foundation_sdk.models import dashboard as dm
except ImportError as exc:  # the optional extra is missing: say which one
    from llmtrace.dashboards import DASHBOARDS_EXTRA

    raise ImportError(f"{__name__} needs grafana-foundation-sdk: {DASHBOARDS_EXTRA}") from exc

from llmtrace import semconv as sc
from llmtrace.dashboards import common as c
from llmtrace.dashboards.common import Spec

UID = "llmtrace-l3-cost"
FILENAME = "llmtrace-l3-cost.json"

USD = c.prom(sc.METRIC_LLMTRACE_COST_USD)
UNPRICED = c.prom(sc.METRIC_LLMTRACE_PIPELINE_UNPRICED_REQUESTS)
PROMPT = c.prom(sc.METRIC_LLMTRACE_SERVER_PROMPT_TOKENS)
GENERATION = c.prom(sc.METRIC_LLMTRACE_SERVER_GENERATION_TOKENS)
CACHED = c.prom(sc.METRIC_LLMTRACE_SERVER_CACHED_PROMPT_TOKENS)
REQUESTS = c.prom(sc.METRIC_LLMTRACE_SERVER_REQUESTS)
BUSY = c.prom(sc.METRIC_LLMTRACE_COST_ACCELERATOR_SECONDS)
IDLE = c.prom(sc.METRIC_LLMTRACE_COST_IDLE_ACCELERATOR_SECONDS)

DEFAULT_BUDGET_USD = "10000"
SECONDS_PER_MONTH = 30 * 24 * 3600  # the 30-day month of the SLO period
DOLLARS = c.pipeline(f'{c.COST_BASIS}="$cost_basis"')
BASIS_NOTE = "Basis: $cost_basis."
Basis = sc.LlmtraceCostBasisValues


def cost_basis_variable() -> db.CustomVariable:
    current = dm.VariableOption(selected=True, text=Basis.BATCH_SHARE, value=Basis.BATCH_SHARE)
    return (db.CustomVariable("cost_basis").label("Cost basis")
            .description("batch_share: accelerator time split by batch share, priced per "
                         "instance type; price_table: per-token list prices. One at a time: "
                         "both price the same requests.")
            .values(f"{Basis.BATCH_SHARE},{Basis.PRICE_TABLE}").current(current)
            .options([current, dm.VariableOption(selected=False, text=Basis.PRICE_TABLE,
                                                 value=Basis.PRICE_TABLE)]))


def budget_variable() -> db.TextBoxVariable:
    return (db.TextBoxVariable("budget").label("Monthly budget (USD)")
            .description("Monthly spend budget in US dollars, compared with the projected "
                         "burn rate.")
            .default_value(DEFAULT_BUDGET_USD)
            .current(dm.VariableOption(text=DEFAULT_BUDGET_USD, value=DEFAULT_BUDGET_USD)))


def monthly_burn() -> str:
    return f"{c.sum_rate(USD, DOLLARS)} * {SECONDS_PER_MONTH}"


def per_1k_tokens(by: str) -> str:
    tokens = (f"{c.sum_rate(PROMPT, c.pipeline(), (by,))}\n+\n"
              f"{c.sum_rate(GENERATION, c.pipeline(), (by,))}")
    return f"1000 * {c.sum_rate(USD, DOLLARS, (by,))}\n/\n(({tokens}) > 0)"


def accelerator_seconds_per_request(by: str) -> str:
    return c.ratio(c.sum_rate(BUSY, c.req(), (by,)), c.sum_rate(REQUESTS, c.req(), (by,)))


def spend() -> list:
    return [
        c.stat_panel(Spec(
            101, "Projected monthly spend", "Spend rate projected to a 30-day month, "
            "averaged over the dashboard's time range (llmtrace_cost_usd_total). "
            f"{BASIS_NOTE}", "currencyUSD", c.informational(),
            [(monthly_burn(), "USD / month")], w=6, h=5), calc="mean"),
        c.stat_panel(Spec(
            102, "Projected spend vs budget", "Projected monthly spend as a share of the "
            "$budget variable, averaged over the time range. Orange at 80 %, red above "
            f"100 %. {BASIS_NOTE}", "percentunit", c.higher_is_worse(0.8, 1.0),
            [(f"{monthly_burn()}\n/ $budget", "of budget")], w=6, h=5), calc="mean"),
        c.stat_panel(Spec(
            103, "Spend in time range", "Dollars attributed over the dashboard's time range. "
            f"{BASIS_NOTE}", "currencyUSD", c.informational(),
            [(f"sum(increase({USD}{DOLLARS}[$__range]))", "USD")], w=6, h=5)),
        c.stat_panel(Spec(
            104, "Unpriced requests", "Requests in the time range whose model or instance "
            "type is missing from the price table (llmtrace_pipeline_unpriced_requests_total):"
            " their cost is not in any dollar figure here. Add them to the price table.",
            "short", c.thresholds("green", (1, "orange")),
            [(f"sum(increase({UNPRICED}{c.pipeline()}[$__range]))\nor on ()\nvector(0)",
              "unpriced")], w=6, h=5)),
        c.timeseries_panel(Spec(
            105, "Monthly burn rate vs budget", "Spend rate projected to a 30-day month "
            "against the $budget variable (flat line). A projection above the budget line "
            f"overspends the month at this rate. {BASIS_NOTE}", "currencyUSD",
            c.informational(),
            [(monthly_burn(), "projected USD / month"), ("vector($budget)", "budget")], w=24)),
    ]


def breakdown() -> list:
    return [
        c.timeseries_panel(Spec(
            201, "Spend by model", "Dollars per hour per served model. "
            f"{BASIS_NOTE}", "currencyUSD", c.informational(),
            [(f"{c.sum_rate(USD, DOLLARS, (c.MODEL,))} * 3600", "{{gen_ai_request_model}}")]),
            stack=True),
        c.timeseries_panel(Spec(
            202, "Spend by tenant", "Dollars per hour per tenant (llmtrace_tenant): what "
            f"each tenant would be charged back. {BASIS_NOTE}", "currencyUSD",
            c.informational(),
            [(f"{c.sum_rate(USD, DOLLARS, (c.TENANT,))} * 3600", "{{llmtrace_tenant}}")]),
            stack=True),
    ]


def unit_cost() -> list:
    return [
        c.timeseries_panel(Spec(
            301, "Cost per 1K tokens by model", "Dollars per 1,000 prompt + generated tokens "
            "per model (llmtrace_cost_usd_total over llmtrace_server_prompt_tokens_total + "
            f"llmtrace_server_generation_tokens_total). {BASIS_NOTE}", "currencyUSD",
            c.informational(), [(per_1k_tokens(c.MODEL), "{{gen_ai_request_model}}")])),
        c.timeseries_panel(Spec(
            302, "Cost per 1K tokens by tenant", "Dollars per 1,000 prompt + generated tokens "
            "per tenant. On the batch_share basis, tenants with long prompts, poor cache "
            f"reuse or small batches pay more per token. {BASIS_NOTE}", "currencyUSD",
            c.informational(), [(per_1k_tokens(c.TENANT), "{{llmtrace_tenant}}")])),
        c.timeseries_panel(Spec(
            303, "Accelerator-seconds per request by model", "Engine-step time attributed "
            "per finished request, per model (llmtrace_cost_accelerator_seconds_total, split "
            "by batch share in the engine core, over llmtrace_server_requests_total).", "s",
            c.informational(),
            [(accelerator_seconds_per_request(c.MODEL), "{{gen_ai_request_model}}")])),
        c.timeseries_panel(Spec(
            304, "Accelerator-seconds per request by tenant", "Engine-step time attributed "
            "per finished request, per tenant: the accelerator cost of one request.", "s",
            c.informational(),
            [(accelerator_seconds_per_request(c.TENANT), "{{llmtrace_tenant}}")])),
    ]


def efficiency() -> list:
    prompt = c.sum_rate(PROMPT, c.req(), (c.MODEL,))
    return [
        c.timeseries_panel(Spec(
            401, "Utilisation vs provisioned", "Busy accelerator-seconds / provisioned "
            "(busy + idle) per host and for the fleet, from the engine core's "
            "llmtrace_cost_accelerator_seconds_total and "
            "llmtrace_cost_idle_accelerator_seconds_total. Idle time is paid for but "
            "attributed to no tenant: orange below 60 %, red below 30 %.", "percentunit",
            c.lower_is_worse(0.3, 0.6),
            [(c.busy_share(("instance",)), "{{instance}}"), (c.busy_share(()), "fleet")]),
            max_val=1),
        c.timeseries_panel(Spec(
            402, "Provisioned accelerators: busy vs idle", "Accelerator-seconds per second "
            "over the fleet, busy vs idle, stacked: the total is the accelerators the engines "
            "hold, the idle part is what over-provisioning costs.", "short", c.informational(),
            [(c.sum_rate(BUSY, c.sel(c.M_INSTANCE)), "busy"),
             (c.sum_rate(IDLE, c.sel(c.M_INSTANCE)), "idle")]), stack=True),
        hardware_vs_provisioned(),
        c.timeseries_panel(Spec(
            403, "Prefix / KV-cache hit rate", "Share of prompt tokens served from cache: "
            "llmtrace's cached prompt tokens / prompt tokens per model (local prefix cache "
            "and KV connectors), and vLLM's prefix-cache hits / queries per host "
            "(vllm:prefix_cache_hits_total, vllm:prefix_cache_queries_total). Cached tokens "
            "skip prefill: higher is cheaper.", "percentunit", c.informational(),
            [(c.ratio(c.sum_rate(CACHED, c.req(), (c.MODEL,)), prompt, zero_fill=prompt),
              "llmtrace {{gen_ai_request_model}}"),
             (c.ratio(f"sum by (instance) (rate({c.VLLM_PREFIX_HITS}{c.vllm()}"
                      "[$__rate_interval]))",
                      f"sum by (instance) (rate({c.VLLM_PREFIX_QUERIES}{c.vllm()}"
                      "[$__rate_interval]))"), "vLLM {{instance}}")], w=8), max_val=1),
        c.timeseries_panel(Spec(
            404, "Speculative decoding acceptance", "Accepted draft tokens / proposed draft "
            "tokens per host (vllm:spec_decode_num_accepted_tokens_total over "
            "vllm:spec_decode_num_draft_tokens_total). Fed by vLLM only when speculative "
            "decoding is configured (--speculative-config); empty otherwise. Orange below "
            "60 %, red below 40 %: the draft model costs more than it saves.", "percentunit",
            c.lower_is_worse(0.4, 0.6),
            [(c.ratio(f"sum by (instance) (rate({c.VLLM_SPEC_ACCEPTED}{c.vllm()}"
                      "[$__rate_interval]))",
                      f"sum by (instance) (rate({c.VLLM_SPEC_DRAFT_TOKENS}{c.vllm()}"
                      "[$__rate_interval]))"), "{{instance}}")], w=8), max_val=1),
        c.timeseries_panel(Spec(
            405, "Speculative decoding: tokens per draft", "Mean tokens produced per "
            "speculative step, 1 + accepted tokens / drafts (vLLM's mean acceptance length; "
            "vllm:spec_decode_num_drafts_total). Fed by vLLM only with speculative decoding "
            "configured. Below 1.5 (orange) speculation barely pays off.", "short",
            c.lower_is_worse(1.2, 1.5),
            [("1 + " + c.ratio(f"sum by (instance) (rate({c.VLLM_SPEC_ACCEPTED}{c.vllm()}"
                               "[$__rate_interval]))",
                               f"sum by (instance) (rate({c.VLLM_SPEC_DRAFTS}{c.vllm()}"
                               "[$__rate_interval]))"), "{{instance}}")], w=8)),
    ]


def hardware_vs_provisioned():
    """What the hardware did with what it was given: CPU cores used over cores available
    per process role, GPU compute, GPU memory used over its size."""
    role = c.label(sc.LLMTRACE_PROCESS_ROLE)
    gpu = c.sel(c.M_INSTANCE)
    memory = (f"sum by (instance) ({c.prom(sc.METRIC_HW_GPU_MEMORY_USAGE)}{gpu})\n/\n"
              f"(sum by (instance) ({c.prom(sc.METRIC_HW_GPU_MEMORY_LIMIT)}{gpu}) > 0)")
    return c.timeseries_panel(Spec(
        406, "Hardware utilisation vs provisioned", "The hardware's own view, per host: "
        "CPU cores the engine core and its workers keep busy over the cores they may run "
        "on (process_cpu_time_seconds_total / llmtrace_process_cpu_available, by "
        "llmtrace_process_role); on GPU hosts (NVML, nvidia-ml-py) the mean GPU "
        "utilisation and GPU memory in use over its size (hw_gpu_*; empty on CPU hosts). "
        f"The green band is the L1 target ({c.UTILISATION_BAND[0]:.0%}-"
        f"{c.UTILISATION_BAND[1]:.0%}); sustained blue is capacity to give back.",
        "percentunit", c.utilisation_band(),
        [(c.process_cpu_share(("instance", role)), f"CPU {{{{instance}}}} {{{{{role}}}}}"),
         (f"avg by (instance) ({c.prom(sc.METRIC_HW_GPU_UTILIZATION)}{gpu})",
          "GPU compute {{instance}}"),
         (memory, "GPU memory {{instance}}")], w=24), max_val=1)


def headroom() -> list:
    return [
        c.bargauge_panel(Spec(
            501, "KV-cache headroom per instance", "Free share of KV-cache blocks per host, "
            "1 - max over engines of vllm:kv_cache_usage_perc. Red below 5 %, orange below "
            "20 %: new requests will queue and running ones get preempted.", "percentunit",
            c.lower_is_worse(0.05, 0.2),
            [(f"1 - max by (instance) ({c.VLLM_KV_USAGE}{c.vllm()})", "{{instance}}")],
            w=8), max_val=1),
        c.bargauge_panel(Spec(
            502, "Waiting requests per instance", "Requests queued per host (vLLM gauge "
            "vllm:num_requests_waiting). Orange from 1, red from 10: the host has no spare "
            "capacity.", "short", c.higher_is_worse(1, 10),
            [(f"sum by (instance) ({c.VLLM_WAITING}{c.vllm()})", "{{instance}}")], w=8)),
        c.bargauge_panel(Spec(
            503, "Accelerator headroom per instance", "Idle share of accelerator time per "
            "host, 1 - busy / (busy + idle), from the engine core's accelerator-seconds "
            "counters. Red below 5 %, orange below 15 %.", "percentunit",
            c.lower_is_worse(0.05, 0.15), [(f"1 - (\n{c.busy_share(('instance',))}\n)",
                                            "{{instance}}")], w=8), max_val=1),
    ]


def build() -> db.Dashboard:
    return c.dashboard(
        UID, "llmtrace / L3 cost & efficiency",
        "Spend against budget, cost per token and per request by model and tenant, "
        "utilisation of provisioned accelerators, cache and speculative-decoding efficiency, "
        "capacity headroom.",
        [*c.standard_variables(), cost_basis_variable(), budget_variable()],
        [(c.row("Spend", 100), spend()),
         (c.row("Spend breakdown", 200), breakdown()),
         (c.row("Unit cost", 300), unit_cost()),
         (c.row("Efficiency", 400), efficiency()),
         (c.row("Capacity headroom", 500), headroom())])
