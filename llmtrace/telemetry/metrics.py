"""The SDK's metric output: OpenTelemetry instruments fed by records, at the source.

Which instruments exist, their units, buckets and labels, and which record
field feeds each, all come from the generated schema (``llmtrace.schema``),
the same table the collector's Prometheus output iterates. Metrics are
recorded for every request whatever the trace sampling decision, off the
serving thread (the builder), and batched: counters are summed in plain dicts
and observed at collection; histograms are summed per series in a batch and
merged into the SDK's state in one step (one API call per series per batch,
none per token).
Labels are capped per label (``LabelLimiter``) so a misbehaving tenant header
cannot explode cardinality.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence

from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import (
    AlwaysOffExemplarFilter,
    MeterProvider,
    TraceBasedExemplarFilter,
)
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource

from llmtrace import __version__, schema
from llmtrace import semconv as sc
from llmtrace.config import Config
from llmtrace.quality import drift
from llmtrace.record import Histogram
from llmtrace.record.labels import OVERFLOW, Feed, LabelLimiter, label_changes
from llmtrace.telemetry import hardware

# Passing an explicit empty context skips a context-variable lookup per record.
_NO_CONTEXT = NO_CONTEXT = Context()
_BULK_FIELDS = ("_lock", "_value", "_sum", "_min", "_max", "_get_empty_bucket_counts")


class BulkHistogramAggregation(ExplicitBucketHistogramAggregation):
    """Explicit-bucket aggregation that keeps a handle on each attribute set's state.

    A request's inter-token gaps arrive already bucketed (:class:`Histogram`,
    one count per bucket) and are merged into the SDK's histogram state in one
    step, instead of one ``Histogram.record`` per token (about 11-23 us each on
    this machine). The OpenTelemetry SDK has no public bulk record; the state
    handle is SDK-internal, and if its fields are missing the caller falls back
    to recording through the API (exact counts, sum approximated per bucket).
    """

    def __init__(self, boundaries: Sequence[float]) -> None:
        super().__init__(boundaries)
        self.boundaries = tuple(boundaries)
        #: attribute set -> its state in every metric reader (OTLP and Prometheus each
        #: hold their own)
        self.states: dict[frozenset, list] = {}

    def _create_aggregation(self, instrument, attributes, reservoir_factory,
                            start_time_unix_nano):
        state = super()._create_aggregation(instrument, attributes, reservoir_factory,
                                            start_time_unix_nano)
        self.states.setdefault(frozenset((attributes or {}).items()), []).append(state)
        return state

    def merge(self, attributes: dict, hist: Histogram, skip: float | None = None) -> bool:
        """Add ``hist`` (less one ``skip`` value already recorded through the API) to every
        reader's state of ``attributes``; False if not possible."""
        states = self.states.get(frozenset(attributes.items()))
        if not states or not all(hasattr(st, f) for st in states for f in _BULK_FIELDS):
            return False
        counts = list(hist.counts)
        total = hist.total
        if skip is not None:
            counts[_bucket(self.boundaries, skip)] -= 1
            total -= skip
        for state in states:
            with state._lock:
                if state._value is None:
                    state._value = state._get_empty_bucket_counts()
                bucket = state._value
                for i, c in enumerate(counts):
                    if c:
                        bucket[i] += c
                state._sum += total
                state._min = min(state._min, hist.low)
                state._max = max(state._max, hist.high)
        return True


def _bucket(bounds: Sequence[float], value: float) -> int:
    return bisect_left(bounds, value)


class _Sums:
    """A counter's running totals per label tuple, read by an observable counter.

    Counters cost no SDK call per request: a record adds to a plain dict on the
    serving thread, and the SDK reads the totals when a reader collects (the
    public observable-instrument API). ``list(dict.items())`` copies under the GIL.
    """

    __slots__ = ("totals", "attrs")

    def __init__(self, attrs: dict[tuple, dict]) -> None:
        self.totals: dict[tuple, float] = {}
        #: label tuple -> attribute dict: the metric's series cache, filled by the feeds
        self.attrs = attrs

    def __call__(self, _: CallbackOptions) -> list[Observation]:
        attrs = self.attrs
        return [Observation(v, attrs[k]) for k, v in list(self.totals.items())]


class Instruments:
    """One instrument per schema metric the SDK publishes; ``record_*`` feed them.

    Counters are summed here and observed at collection. Histograms with a bulk
    aggregation (llmtrace's own meter provider) are summed here too, per series,
    into a :class:`Histogram`, and handed to the SDK by :meth:`flush_pending` (the
    builder calls it after each batch of records): one API call and one merge
    per series per batch, however many requests the batch held. Without one (a
    meter provider the user owns) each value goes through the API as it comes.
    """

    def __init__(self, meter, config: Config,
                 bulks: dict[str, BulkHistogramAggregation] | None = None) -> None:
        self._bulks = bulks or {}
        #: (metric, label tuple) -> [instrument, attributes, bulk, running histogram]
        self._pending: dict[tuple[str, tuple], list] = {}
        self._pending_lock = threading.Lock()
        self.labels = LabelLimiter(config.max_label_values, config.max_label_length)
        #: metric -> (instrument: histogram or sums, its series: label tuple -> attribute
        #: dict, one dict per series, shared by every record kind that feeds the metric)
        self._instruments: dict[str, tuple[object, dict[tuple, dict]]] = {}
        for spec in schema.METRICS:
            if not spec.feeds or "sdk" not in spec.outputs:
                continue
            series: dict[tuple, dict] = {}
            if spec.instrument == "histogram":
                inst = meter.create_histogram(
                    spec.name, unit=spec.unit, description=spec.brief,
                    explicit_bucket_boundaries_advisory=spec.buckets)
            else:
                inst = _Sums(series)
                meter.create_observable_counter(spec.name, [inst], unit=spec.unit,
                                                description=spec.brief)
            self._instruments[spec.name] = (inst, series)
        self._feeds = {kind: Feed(kind, [(spec, self._instruments[spec.name])
                                         for spec in schema.fed_by(kind, "sdk")])
                       for kind in schema.RECORDS}
        #: the engine-core tracer's running totals, read at collection (no per-step
        #: SDK call): () -> (busy seconds, steps, idle seconds, model/version labels)
        self.engine_totals: Callable[[], tuple[float, int, float, dict]] | None = None
        #: the worker-side KV connector calls' running totals, read at collection:
        #: () -> {(connector, operation): [seconds, calls]}
        self.kv_worker_totals: Callable[[], dict[tuple[str, str], list]] | None = None
        #: the engine core's hardware sampler (llmtrace.telemetry.hardware), read at
        #: collection; None where no hardware is watched (the API server)
        self.hardware = None
        self.meter = meter
        #: drift of this process's finished requests (API server), read at collection
        self.drift = drift.monitor_for(config)

    def record_request(self, record, context: Context | None = None) -> None:
        """One finished request (:class:`~llmtrace.record.RequestRecord`).

        ``context``: the sampled request's span context, for exemplars; its values
        then go through the API at once (the exemplar filter sees the trace)
        instead of into the batch.
        """
        self._record("request", record, context)
        self.drift.observe(record)

    def record_usage(self, record) -> None:
        """One request's engine usage (:class:`~llmtrace.record.UsageRecord`)."""
        self._record("usage", record)

    def record_evaluation(self, record) -> None:
        """One judge score or failed judge call (:class:`~llmtrace.record.EvaluationRecord`)."""
        self._record("evaluation", record)

    def record_transfer(self, record) -> None:
        """One request's KV transfer (:class:`~llmtrace.record.TransferRecord`)."""
        self._record("transfer", record)

    def _record(self, kind: str, record, context: Context | None = None) -> None:
        bulks = self._bulks
        for spec, (inst, cache), value, labels in self._feeds[kind](record, self.labels):
            attrs = cache.get(labels)
            if attrs is None:
                attrs = cache[labels] = {a: v for a, v in zip(spec.labels, labels, strict=True)
                                         if v is not None}
            if type(inst) is _Sums:
                totals = inst.totals
                totals[labels] = totals.get(labels, 0) + value
                continue
            bulk = bulks.get(spec.name)
            if bulk is None or (context is not None and not isinstance(value, Histogram)):
                # a meter provider the user owns, or an exemplar: through the API now
                if isinstance(value, Histogram):
                    self._record_histogram(inst, value, attrs, None)
                else:
                    inst.record(value, attrs, context or _NO_CONTEXT)
                continue
            with self._pending_lock:  # flush_pending may swap the dict from another thread
                pending = self._pending
                entry = pending.get((spec.name, labels))
                if entry is None:
                    entry = pending[(spec.name, labels)] = \
                        [inst, attrs, bulk, Histogram(bulk.boundaries)]
                if isinstance(value, Histogram):
                    entry[3].merge(value)
                else:
                    entry[3].add(value)

    def flush_pending(self) -> None:
        """Hand every series' histogram summed since the last call to the SDK."""
        with self._pending_lock:
            if not self._pending:
                return
            batch, self._pending = self._pending, {}
        for inst, attrs, bulk, hist in batch.values():
            self._record_histogram(inst, hist, attrs, bulk)

    def _record_histogram(self, inst, hist: Histogram, attrs: dict,
                          bulk: BulkHistogramAggregation | None) -> None:
        if not hist.count:
            return
        # One value goes through the API: it creates the attribute set's state.
        inst.record(hist.low, attrs, _NO_CONTEXT)
        if hist.count == 1:
            return
        if bulk is not None and bulk.merge(attrs, hist, skip=hist.low):
            return
        # fallback: exact counts, each bucket at its bound, less the value recorded above
        i = _bucket(hist.bounds, hist.low)
        recorded = hist.bounds[i] if i < len(hist.bounds) else hist.high
        for edge, count in hist.edges():
            for _ in range(count - (edge == recorded)):
                inst.record(edge, attrs, _NO_CONTEXT)


def _observe(counts: dict[str, int] | Iterable[tuple[str, int]], key: str):
    items = counts.items() if isinstance(counts, dict) else counts
    return [Observation(v, {key: k}) for k, v in items]


def build_instruments(config: Config, resource: Resource, scope: str, readers: list):
    """A private MeterProvider with the request instruments and self-telemetry counters."""
    # every histogram of the schema gets a bulk aggregation with its own buckets: a
    # batch of records reaches the SDK as one call and one merge per series
    bulks = {spec.name: BulkHistogramAggregation(spec.buckets or ())
             for spec in schema.METRICS
             if spec.instrument == "histogram" and spec.feeds and "sdk" in spec.outputs
             and spec.buckets}
    provider = MeterProvider(
        resource=resource, metric_readers=readers,
        # exemplars cost a trace-context check per measurement: only when asked for
        exemplar_filter=TraceBasedExemplarFilter() if config.exemplars
        else AlwaysOffExemplarFilter(),
        views=[View(instrument_name=name, aggregation=bulk) for name, bulk in bulks.items()],
    )
    instruments = instruments_on(provider.get_meter(scope, __version__), config, bulks)
    return provider, instruments


def instruments_on(meter, config: Config,
                   bulks: dict[str, BulkHistogramAggregation] | None = None) -> Instruments:
    """The request instruments and self-telemetry counters on ``meter``.

    On a user's meter provider no View can be added, so histograms have no bulk
    merge: each value is recorded through the API, and the ITL histogram's gaps
    per bucket (exact counts, each gap at its bucket's upper bound in the sum).
    """
    from llmtrace.telemetry import DROPPED
    from llmtrace.telemetry.guard import DISABLED_HOOKS, HOOK_ERRORS, remind_disabled

    instruments = Instruments(meter, config, bulks)

    def hook_errors(_: CallbackOptions):
        return _observe(dict(HOOK_ERRORS), sc.LLMTRACE_TELEMETRY_HOOK)

    def disabled_hooks(_: CallbackOptions):
        remind_disabled()  # collection runs periodically: the reminder costs nothing more
        return [Observation(1, {sc.LLMTRACE_TELEMETRY_HOOK: name})
                for name in sorted(DISABLED_HOOKS)]

    def dropped(_: CallbackOptions):
        return _observe(dict(DROPPED), sc.LLMTRACE_TELEMETRY_REASON)

    def overflows(_: CallbackOptions):
        return _observe(label_changes(instruments.labels), sc.LLMTRACE_TELEMETRY_REASON)

    def busy(_: CallbackOptions):
        totals = instruments.engine_totals
        if totals is None:
            return []
        seconds, _steps, _idle, labels = totals()
        return [Observation(seconds, labels)]

    def steps(_: CallbackOptions):
        totals = instruments.engine_totals
        if totals is None:
            return []
        _busy, count, _idle, labels = totals()
        return [Observation(count, labels)]

    def idle(_: CallbackOptions):
        totals = instruments.engine_totals
        if totals is None:
            return []
        _busy, _steps, seconds, _labels = totals()
        return [Observation(seconds, {sc.LLMTRACE_COST_INSTANCE_TYPE: config.instance_type})]

    def kv_worker(index: int):
        def observe(_: CallbackOptions):
            totals = instruments.kv_worker_totals
            if totals is None:
                return []
            return [Observation(values[index],
                                {sc.LLMTRACE_KV_TRANSFER_CONNECTOR: connector,
                                 sc.LLMTRACE_KV_TRANSFER_OPERATION: operation})
                    for (connector, operation), values in list(totals().items())]
        return observe

    for name, callback in ((sc.METRIC_LLMTRACE_ENGINE_BUSY, busy),
                           (sc.METRIC_LLMTRACE_KV_TRANSFER_WORKER_TIME, kv_worker(0)),
                           (sc.METRIC_LLMTRACE_KV_TRANSFER_WORKER_CALLS, kv_worker(1)),
                           (sc.METRIC_LLMTRACE_ENGINE_STEPS, steps),
                           (sc.METRIC_LLMTRACE_COST_IDLE_ACCELERATOR_SECONDS, idle),
                           (sc.METRIC_LLMTRACE_TELEMETRY_HOOK_ERRORS, hook_errors),
                           (sc.METRIC_LLMTRACE_TELEMETRY_DROPPED, dropped),
                           (sc.METRIC_LLMTRACE_TELEMETRY_LABEL_OVERFLOWS, overflows)):
        spec = schema.BY_NAME[name]
        meter.create_observable_counter(name, [callback], unit=spec.unit,
                                        description=spec.brief)
    spec = schema.BY_NAME[sc.METRIC_LLMTRACE_TELEMETRY_DISABLED_HOOKS]
    meter.create_observable_gauge(spec.name, [disabled_hooks], unit=spec.unit,
                                  description=spec.brief)

    def drift_gauge(name: str):
        def observe(_: CallbackOptions):
            return [Observation(v, labels) for labels, v in
                    drift.gauge_values(instruments.drift.recent())[name]]
        return observe

    for name in (*drift.GAUGES, sc.METRIC_LLMTRACE_DRIFT_SAMPLES):
        spec = schema.BY_NAME[name]
        meter.create_observable_gauge(name, [drift_gauge(name)], unit=spec.unit,
                                      description=spec.brief)
    hardware.register(meter, lambda: instruments.hardware)
    return instruments


__all__ = ["OVERFLOW", "BulkHistogramAggregation", "Instruments", "LabelLimiter",
           "build_instruments", "instruments_on"]
