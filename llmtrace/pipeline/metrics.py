"""Prometheus metrics derived from request records (the collector's output).

Names are the registry's Prometheus names, the same ones the SDK's metrics get
after OTLP -> Prometheus translation, so the dashboards read either path.
Scrape one path per engine: an engine instrumented with the SDK already
exports these series at the source.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from llmtrace import semconv as sc
from llmtrace.pipeline.derive import RequestRecord
from llmtrace.telemetry.metrics import HISTOGRAM_BUCKETS, OVERFLOW, LabelLimiter

LABELS = (sc.GEN_AI_REQUEST_MODEL, sc.LLMTRACE_TENANT, sc.LLMTRACE_DEPLOYMENT_VERSION)


def _label(name: str) -> str:
    return name.replace(".", "_")


def _base_name(metric: str) -> str:
    """prometheus_client appends ``_total`` to counters itself."""
    prom = sc.PROMETHEUS_NAMES[metric]
    return prom[: -len("_total")] if prom.endswith("_total") else prom


class DerivedMetrics:
    """Histograms and counters over derived records, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None,
                 max_label_values: int = 100) -> None:
        self.registry = registry or CollectorRegistry()
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
        self.derived = counter(sc.METRIC_LLMTRACE_PIPELINE_REQUESTS, [])

    def observe(self, r: RequestRecord) -> None:
        labels = (self.labels(sc.GEN_AI_REQUEST_MODEL, r.model),
                  self.labels(sc.LLMTRACE_TENANT, r.tenant),
                  self.labels(sc.LLMTRACE_DEPLOYMENT_VERSION, r.version))
        for value, hist in ((r.ttft_s, self.ttft), (r.tpot_s, self.tpot), (r.e2e_s, self.e2e),
                            (r.queue_s, self.queue), (r.prefill_s, self.prefill),
                            (r.decode_s, self.decode)):
            if value is not None:
                hist.labels(*labels).observe(value)
        itl = self.itl.labels(*labels)
        for gap in r.itl_samples():
            itl.observe(gap)
        self.prompt_tokens.labels(*labels).inc(r.prompt_tokens)
        self.cached_tokens.labels(*labels).inc(r.cached_tokens)
        self.generation_tokens.labels(*labels).inc(r.output_tokens)
        self.output_len.labels(*labels, r.finish_reason).observe(r.output_tokens)
        self.requests.labels(*labels, r.finish_reason).inc()
        if r.preemptions:
            self.preemptions.labels(*labels).inc(r.preemptions)
        self.derived.inc()


__all__ = ["OVERFLOW", "DerivedMetrics"]
