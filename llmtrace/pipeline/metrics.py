"""The collector's metric output: Prometheus series fed by derived records.

Which series exist, their names, buckets and labels, and which record field
feeds each come from the generated schema (``llmtrace.schema``), the table the
SDK's OpenTelemetry instruments iterate too, so a series means the same on
both paths. Names are the registry's Prometheus names (what the SDK's metrics
become after OTLP -> Prometheus translation), so the dashboards read either.
Series from vLLM's built-in spans carry ``llmtrace_record_source="vllm_builtin"``.

Cost: accelerator-seconds come from engine-core usage records (batch share),
USD from an optional price table on both bases; a model or instance type
missing from the table is counted in ``llmtrace_pipeline_unpriced_requests``.
Scrape one path per engine: an SDK-instrumented engine already exports these
series at the source.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from llmtrace import schema
from llmtrace import semconv as sc
from llmtrace.pricing import PriceTable, price_request, price_usage
from llmtrace.quality import drift
from llmtrace.quality.drift import DriftMonitor
from llmtrace.record import DisaggregatedRecord, RequestRecord, TransferRecord, UsageRecord
from llmtrace.record import Histogram as Distribution
from llmtrace.record.labels import (
    MAX_LABEL_LENGTH,
    OVERFLOW,
    Feed,
    LabelLimiter,
    label_changes,
)


def _label(name: str) -> str:
    return name.replace(".", "_")


def _observe_many(hist, dist: Distribution) -> None:
    """Merge a bucketed distribution into a prometheus_client histogram child.

    prometheus_client has no bulk observe; one ``observe`` per token would
    cost the pipeline two thirds of its throughput. This bumps the child's
    buckets and sum once each, through the same internals ``observe`` uses,
    and falls back to one ``observe`` per value at its bucket's bound if those
    internals change (exact counts, sum approximated).
    """
    buckets, bounds, total = (getattr(hist, a, None)
                              for a in ("_buckets", "_upper_bounds", "_sum"))
    if buckets is None or bounds is None or total is None or \
            len(buckets) != len(dist.counts) or list(bounds[:-1]) != list(dist.bounds):
        for edge, count in dist.edges():
            for _ in range(count):
                hist.observe(edge)
        return
    total.inc(dist.total)
    for i, c in enumerate(dist.counts):
        if c:
            buckets[i].inc(c)


class _LabelChanges:
    """``llmtrace.telemetry.label_overflows`` in the collector, as the SDK counts it: label
    values cut, cleaned or collapsed to ``__overflow__``, by reason."""

    def __init__(self, limiter: LabelLimiter) -> None:
        self._limiter = limiter

    def collect(self):
        name = sc.METRIC_LLMTRACE_TELEMETRY_LABEL_OVERFLOWS
        family = CounterMetricFamily(
            sc.PROMETHEUS_NAMES[name].removesuffix("_total"), sc.METRIC_BRIEFS[name],
            labels=[_label(sc.LLMTRACE_TELEMETRY_REASON)])
        for reason, count in sorted(label_changes(self._limiter).items()):
            family.add_metric([reason], count)
        yield family


class _DriftGauges:
    """The drift gauges of the collector's records, computed at scrape time."""

    def __init__(self, monitor: DriftMonitor) -> None:
        self._monitor = monitor

    def collect(self):
        values = drift.gauge_values(self._monitor.recent())
        for name, rows in values.items():
            spec = schema.BY_NAME[name]
            labels = [_label(a) for a in spec.labels]
            family = GaugeMetricFamily(spec.prometheus_base, spec.brief, labels=labels)
            for attrs, value in rows:
                family.add_metric([attrs.get(a, "") for a in spec.labels], value)
            yield family


class DerivedMetrics:
    """One Prometheus metric per schema metric the collector publishes, in its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None,
                 max_label_values: int = 100, prices: PriceTable | None = None,
                 max_label_length: int = MAX_LABEL_LENGTH,
                 drift: DriftMonitor | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        #: drift of the derived request records (``llmtrace.drift.*``)
        self.drift = drift
        if drift is not None:
            self.registry.register(_DriftGauges(drift))
        self.prices = prices
        self.labels = LabelLimiter(max_label_values, max_label_length)
        self.registry.register(_LabelChanges(self.labels))
        self._metrics: dict[str, Counter | Histogram] = {}
        for spec in schema.METRICS:
            if not spec.feeds or "collector" not in spec.outputs:
                continue
            names = [_label(a) for a in spec.labels]
            if spec.instrument == "histogram":
                metric = Histogram(spec.prometheus_base, spec.brief, names,
                                   buckets=spec.buckets, registry=self.registry)
            else:
                metric = Counter(spec.prometheus_base, spec.brief, names,
                                 registry=self.registry)
            self._metrics[spec.name] = metric
        #: per record kind: the metrics it feeds, each with its label values -> child cache
        self._feeds = {kind: Feed(kind, [(spec, (self._metrics[spec.name], {}))
                                         for spec in schema.fed_by(kind, "collector")])
                       for kind in schema.RECORDS}

    def observe(self, record: RequestRecord) -> None:
        """One derived request record."""
        if self.prices is not None:
            price_request(record, self.prices)
        self._observe("request", record)
        if self.drift is not None:
            self.drift.observe(record)

    def observe_usage(self, usage: UsageRecord) -> None:
        """One request's batch-share accelerator time, priced by the instance type."""
        if self.prices is not None:
            price_usage(usage, self.prices)
        self._observe("usage", usage)

    def observe_transfer(self, transfer: TransferRecord) -> None:
        """One request's KV transfer, read back from its llmtrace.kv_transfer span."""
        self._observe("transfer", transfer)

    def observe_disaggregated(self, record: DisaggregatedRecord) -> None:
        """One disaggregated request's TTFT breakdown, joined across instances."""
        self._observe("disaggregated", record)

    def _observe(self, kind: str, record) -> None:
        for spec, (metric, kids), value, labels in self._feeds[kind](record, self.labels):
            child = kids.get(labels)
            if child is None:
                child = kids[labels] = metric.labels(*("" if v is None else v for v in labels))
            if isinstance(value, Distribution):
                if value.count:
                    _observe_many(child, value)
            elif spec.instrument == "histogram":
                child.observe(value)
            else:
                child.inc(value)


__all__ = ["OVERFLOW", "DerivedMetrics"]
