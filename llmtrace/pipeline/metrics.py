"""Prometheus metrics derived from request records (the collector's output).

Cost: accelerator-seconds come from engine-core usage spans (batch share);
USD from an optional price table, on both bases. A model or instance type
missing from the table is counted in ``llmtrace_pipeline_unpriced_requests``.
Idle accelerator time is only known at the engine (an SDK metric).

Names are the registry's Prometheus names, the same ones the SDK's metrics get
after OTLP -> Prometheus translation, so the dashboards read either path.
Scrape one path per engine: an engine instrumented with the SDK already
exports these series at the source.
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Histogram

from llmtrace import semconv as sc
from llmtrace.pipeline.derive import RequestRecord, UsageRecord
from llmtrace.pricing import PriceTable
from llmtrace.telemetry.metrics import HISTOGRAM_BUCKETS, OVERFLOW, LabelLimiter

LABELS = (sc.GEN_AI_REQUEST_MODEL, sc.LLMTRACE_TENANT, sc.LLMTRACE_DEPLOYMENT_VERSION)


def _label(name: str) -> str:
    return name.replace(".", "_")


def _base_name(metric: str) -> str:
    """prometheus_client appends ``_total`` to counters itself."""
    prom = sc.PROMETHEUS_NAMES[metric]
    return prom[: -len("_total")] if prom.endswith("_total") else prom


def _observe_many(hist, value: float, count: int) -> None:
    """``count`` observations of one value: a decode chunk's mean, once per token gap.

    prometheus_client has no weighted observe; one ``observe`` per token would
    cost the pipeline two thirds of its throughput. This bumps the child's
    bucket and sum once, through the same internals ``observe`` uses, and falls
    back to the loop if those internals change.
    """
    buckets, bounds, total = (getattr(hist, a, None)
                              for a in ("_buckets", "_upper_bounds", "_sum"))
    if buckets is None or bounds is None or total is None or len(buckets) != len(bounds):
        for _ in range(count):
            hist.observe(value)
        return
    total.inc(value * count)
    buckets[min(bisect_left(bounds, value), len(buckets) - 1)].inc(count)


class DerivedMetrics:
    """Histograms and counters over derived records, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None,
                 max_label_values: int = 100, prices: PriceTable | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.prices = prices
        self.labels = LabelLimiter(max_label_values)
        base = [_label(k) for k in LABELS]

        def hist(metric: str, extra: tuple[str, ...] = ()) -> Histogram:
            return Histogram(_base_name(metric), sc.METRIC_BRIEFS[metric], base + list(extra),
                             buckets=HISTOGRAM_BUCKETS[metric], registry=self.registry)

        def counter(metric: str, labels: list[str] | None = None) -> Counter:
            return Counter(_base_name(metric), sc.METRIC_BRIEFS[metric],
                           base if labels is None else labels, registry=self.registry)

        self.ttft = hist(sc.METRIC_GEN_AI_SERVER_TIME_TO_FIRST_TOKEN)
        self.tpot = hist(sc.METRIC_GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN)
        self.e2e = hist(sc.METRIC_GEN_AI_SERVER_REQUEST_DURATION)
        self.itl = hist(sc.METRIC_LLMTRACE_SERVER_INTER_TOKEN_LATENCY)
        self.queue = hist(sc.METRIC_LLMTRACE_SERVER_QUEUE_DURATION)
        self.prefill = hist(sc.METRIC_LLMTRACE_SERVER_PREFILL_DURATION)
        self.decode = hist(sc.METRIC_LLMTRACE_SERVER_DECODE_DURATION)
        self.output_len = hist(sc.METRIC_LLMTRACE_SERVER_REQUEST_GENERATION_TOKENS,
                               (_label(sc.LLMTRACE_REQUEST_FINISH_REASON),))
        self.prompt_tokens = counter(sc.METRIC_LLMTRACE_SERVER_PROMPT_TOKENS)
        self.cached_tokens = counter(sc.METRIC_LLMTRACE_SERVER_CACHED_PROMPT_TOKENS)
        self.generation_tokens = counter(sc.METRIC_LLMTRACE_SERVER_GENERATION_TOKENS)
        self.requests = counter(sc.METRIC_LLMTRACE_SERVER_REQUESTS,
                                base + [_label(sc.LLMTRACE_REQUEST_FINISH_REASON)])
        self.preemptions = counter(sc.METRIC_LLMTRACE_SERVER_PREEMPTIONS)
        self.derived = counter(sc.METRIC_LLMTRACE_PIPELINE_REQUESTS)
        costed = base + [_label(sc.LLMTRACE_COST_BASIS)]
        self.accelerator_seconds = counter(sc.METRIC_LLMTRACE_COST_ACCELERATOR_SECONDS, costed)
        self.usd = counter(sc.METRIC_LLMTRACE_COST_USD, costed)
        self.unpriced = counter(sc.METRIC_LLMTRACE_PIPELINE_UNPRICED_REQUESTS, costed)
        self._kids: dict[tuple[str, str, str], tuple] = {}

    def _labels(self, model: str, tenant: str, version: str) -> tuple[str, str, str]:
        return (self.labels(sc.GEN_AI_REQUEST_MODEL, model),
                self.labels(sc.LLMTRACE_TENANT, tenant),
                self.labels(sc.LLMTRACE_DEPLOYMENT_VERSION, version))

    def observe_usage(self, u: UsageRecord) -> None:
        """One request's batch-share accelerator time, priced by the instance type."""
        labels = self._labels(u.model, u.tenant, u.version)
        self.accelerator_seconds.labels(*labels, "batch_share").inc(u.accelerator_s)
        if self.prices is not None:
            usd = self.prices.accelerator_cost(u.accelerator_s, u.instance_type)
            if usd is None:
                self.unpriced.labels(*labels, "batch_share").inc()
            else:
                self.usd.labels(*labels, "batch_share").inc(usd)

    def _children(self, labels: tuple[str, str, str]) -> tuple:
        """The label-bound children of one model/tenant/version, looked up once."""
        kids = self._kids.get(labels)
        if kids is None:
            kids = self._kids[labels] = tuple(
                m.labels(*labels) for m in (
                    self.ttft, self.tpot, self.e2e, self.queue, self.prefill, self.decode,
                    self.itl, self.prompt_tokens, self.cached_tokens, self.generation_tokens,
                    self.derived))
        return kids

    def observe(self, r: RequestRecord) -> None:
        labels = self._labels(r.model, r.tenant, r.version)
        (ttft, tpot, e2e, queue, prefill, decode, itl, prompt_tokens, cached_tokens,
         generation_tokens, derived) = self._children(labels)
        for value, hist in ((r.ttft_s, ttft), (r.tpot_s, tpot), (r.e2e_s, e2e),
                            (r.queue_s, queue), (r.prefill_s, prefill), (r.decode_s, decode)):
            if value is not None:
                hist.observe(value)
        for value, count in r.itl_groups():
            _observe_many(itl, value, count)
        prompt_tokens.inc(r.prompt_tokens)
        cached_tokens.inc(r.cached_tokens)
        generation_tokens.inc(r.output_tokens)
        self.output_len.labels(*labels, r.finish_reason).observe(r.output_tokens)
        self.requests.labels(*labels, r.finish_reason).inc()
        if r.preemptions:
            self.preemptions.labels(*labels).inc(r.preemptions)
        derived.inc()
        if self.prices is not None:
            usd = self.prices.token_cost(r.model, r.prompt_tokens, r.cached_tokens,
                                         r.output_tokens)
            if usd is None:
                self.unpriced.labels(*labels, "price_table").inc()
            else:
                self.usd.labels(*labels, "price_table").inc(usd)


__all__ = ["OVERFLOW", "DerivedMetrics"]
