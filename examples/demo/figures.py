"""L1 figures and the per-tenant cost table: the dashboards' PromQL beside the client's view.

The client (``testbed.stream_client``) timestamps every token it receives, through
the router: it is the independent reference. A latency percentile from
Prometheus is an interpolation inside one bucket of the registry's histogram, so
it *matches* when it falls in the client's bucket or a neighbouring one (the
router's hop and interpolation move it, never further). The request rate
matches within 2 % plus two scrape intervals over the window: ``rate()``
extrapolates from its first and last sample to the window's edges, and a late or
missed scrape at either end (a scrape of vLLM's /metrics can take 330 ms here)
moves where those samples fall, by up to an interval each way. The error ratio matches within one
request.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import asdict, dataclass

from llmtrace import schema
from llmtrace import semconv as sc
from llmtrace.pricing import PriceTable
from testbed.prometheus import PrometheusServer
from testbed.stream_client import StreamTiming, percentile

from . import panels

L1 = "llmtrace-l1-oncall"
L3 = "llmtrace-l3-cost"
#: (panel title, the registry metric its histogram is, what the client measured)
LATENCY = (("TTFT p50 / p95 / p99", sc.METRIC_GEN_AI_SERVER_TIME_TO_FIRST_TOKEN, "ttft"),
           ("ITL p50 / p95 / p99", sc.METRIC_LLMTRACE_SERVER_INTER_TOKEN_LATENCY, "itl"),
           ("E2E latency p50 / p95 / p99", sc.METRIC_GEN_AI_SERVER_REQUEST_DURATION, "e2e"))
QUANTILES = (50, 95, 99)
#: shown, not compared: the server takes inter-token gaps as the engine hands tokens to
#: the API server, the client after the API server's event loop, the router and the
#: socket. At p99 the client's gaps are those stalls (a scrape of vLLM's /metrics holds
#: the loop ~60 ms here), which no server-side ITL contains.
NOT_COMPARED = {("itl", 99)}


@dataclass
class Figure:
    name: str
    panel: str
    dashboard: float | None
    client: float | None
    unit: str  # s, req/s, ratio
    match: bool | None = None  # None: shown, not compared
    bucket: tuple[float, float] | None = None  # the client's bucket, for latencies

    def as_dict(self) -> dict:
        return asdict(self)


def bucket_index(value: float, edges: tuple[float, ...]) -> int:
    """Index of the bucket ``(edges[i-1], edges[i]]`` holding ``value``; len(edges) is +Inf."""
    return bisect.bisect_left(edges, value)


def bucket_of(value: float, edges: tuple[float, ...]) -> tuple[float, float]:
    i = bucket_index(value, edges)
    return (edges[i - 1] if i else 0.0, edges[i] if i < len(edges) else math.inf)


def within_one_bucket(estimate: float, client: float, edges: tuple[float, ...]) -> bool:
    """``estimate`` in ``client``'s bucket or a neighbour, or within that bucket's
    width (beyond the last edge histogram_quantile answers the edge: a neighbour)."""
    if abs(bucket_index(estimate, edges) - bucket_index(client, edges)) <= 1:
        return True
    low, high = bucket_of(client, edges)
    return not math.isinf(high) and abs(estimate - client) <= high - low


def client_values(timings: list[StreamTiming]) -> dict[str, list[float]]:
    ok = [t for t in timings if t.ok]
    return {"ttft": [t.ttft_s for t in ok if t.ttft_s is not None],
            "itl": [gap for t in ok for gap in t.itl_s],
            "e2e": [t.e2e_s for t in ok]}


def l1_figures(prom: PrometheusServer, at: float, window_s: float,
               timings: list[StreamTiming], scrape_s: float = 1.0) -> list[Figure]:
    l1 = panels.load(L1)
    measured = client_values(timings)
    figures: list[Figure] = []
    for title, metric, key in LATENCY:
        shown = panels.instant(prom, l1[title], at, window_s)
        edges = schema.BY_NAME[metric].buckets
        for q in QUANTILES:
            value = next((v for k, v in shown.items() if k.split(" ")[0] == f"p{q}"), None)
            client = percentile(measured[key], q) if measured[key] else None
            match = None
            if (key, q) in NOT_COMPARED:
                pass
            elif value is not None and client is not None and not math.isnan(value):
                match = within_one_bucket(value, client, edges)
            elif client is not None:
                match = False
            figures.append(Figure(f"{key.upper()} p{q}", title, value, client, "s", match,
                                  bucket_of(client, edges) if client is not None else None))
    n, errors = len(timings), sum(1 for t in timings if not t.ok)
    rate = panels.instant(prom, l1["Request rate"], at, window_s)
    rate_value = next(iter(rate.values()), None)
    client_rate = n / window_s
    tolerance = 0.02 + 2 * scrape_s / window_s
    figures.append(Figure("request rate", "Request rate", rate_value, client_rate, "req/s",
                          rate_value is not None
                          and abs(rate_value - client_rate) <= tolerance * client_rate))
    ratio = panels.instant(prom, l1["Server error ratio"], at, window_s)
    ratio_value = next(iter(ratio.values()), 0.0)  # no error series: no errors
    figures.append(Figure("server error ratio", "Server error ratio", ratio_value,
                          errors / n if n else 0.0, "ratio",
                          abs(ratio_value - errors / max(n, 1)) <= 1 / max(n, 1)))
    within = panels.instant(prom, l1["TTFT within 200 ms"], at, window_s)
    threshold = 0.2
    share = sum(1 for v in measured["ttft"] if v <= threshold) / max(len(measured["ttft"]), 1)
    figures.append(Figure("TTFT within 200 ms", "TTFT within 200 ms",
                          next(iter(within.values()), None), share, "ratio"))
    for title, name in (("Queue time p95", "queue time p95"),
                        ("Error budget left (worst SLO)", "error budget left"),
                        ("Burn rate (worst SLO)", "burn rate (5 m)")):
        shown = panels.instant(prom, l1[title], at, window_s)
        figures.append(Figure(name, title, next(iter(shown.values()), None), None,
                              "s" if "time" in name else "ratio"))
    preempt = panels.instant(prom, l1["Preemption rate"], at, window_s)
    for who in ("vLLM", "llmtrace"):
        total = sum(v for k, v in preempt.items() if k.startswith(who)) * window_s
        figures.append(Figure(f"preemptions ({who})", "Preemption rate", total, None, "count"))
    return figures


@dataclass
class TenantCost:
    tenant: str
    requests: int
    prompt_tokens: int
    output_tokens: int
    usd_price_table: float | None  # Prometheus, L3 "Spend by tenant" (price_table basis)
    usd_batch_share: float | None  # Prometheus, L3 "Spend by tenant" (batch_share basis)
    usd_per_1k_tokens: float | None  # Prometheus, L3 "Cost per 1K tokens by tenant"
    accelerator_s_per_request: float | None  # Prometheus, L3
    usd_client: float  # the client's usage counts x the price table

    def as_dict(self) -> dict:
        return asdict(self)


def tenant_costs(prom: PrometheusServer, at: float, window_s: float,
                 by_tenant: dict[str, list[StreamTiming]], model: str,
                 prices: PriceTable) -> list[TenantCost]:
    l3 = panels.load(L3)

    def per_tenant(title: str, **variables: str) -> dict[str, float]:
        return panels.instant(prom, l3[title], at, window_s, variables)

    spend = {basis: per_tenant("Spend by tenant", cost_basis=basis)
             for basis in ("price_table", "batch_share")}  # USD per hour over the window
    per_1k = per_tenant("Cost per 1K tokens by tenant", cost_basis="price_table")
    acc = per_tenant("Accelerator-seconds per request by tenant")
    rows = []
    for tenant, timings in sorted(by_tenant.items()):
        mine = [t for t in timings if t.ok]
        prompt = sum(t.prompt_tokens or 0 for t in mine)
        output = sum(t.completion_tokens or 0 for t in mine)
        client_usd = sum(prices.token_cost(model, t.prompt_tokens or 0, t.cached_tokens or 0,
                                           t.completion_tokens or 0) or 0.0 for t in mine)

        def usd(basis: str, tenant: str = tenant) -> float | None:
            hourly = spend[basis].get(tenant)
            return None if hourly is None else hourly / 3600 * window_s

        rows.append(TenantCost(tenant, len(mine), prompt, output, usd("price_table"),
                               usd("batch_share"), per_1k.get(tenant), acc.get(tenant),
                               client_usd))
    return rows
