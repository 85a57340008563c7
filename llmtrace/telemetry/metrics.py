"""Metric instruments recorded at the source, once per finished request.

Metrics are recorded for every request whatever the trace sampling decision.
Each request costs a fixed handful of SDK calls plus one histogram record per
inter-token gap, batched at the end of the request rather than on the token
path. Labels are model, tenant and deployment version, with a cap on distinct
values per label so a misbehaving tenant header cannot explode cardinality.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource

from llmtrace import __version__
from llmtrace import semconv as sc
from llmtrace.config import Config

OVERFLOW = "__overflow__"

# GenAI semconv advice for TTFT, plus 0.2 s: the common 200 ms TTFT SLO must be a bucket edge.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.2, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0)
# GenAI advice for time per output token, with finer low edges for fast decoders.
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                0.5, 0.75, 1.0, 2.5)
# GenAI advice for request duration (x2 steps), with 0.2 s added.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.2, 0.32, 0.64, 1.28, 2.56,
                    5.12, 10.24, 20.48, 40.96, 81.92)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)

#: Bucket boundaries per histogram, shared by the SDK's instruments and the pipeline's.
HISTOGRAM_BUCKETS: dict[str, tuple[float, ...]] = {
    sc.METRIC_GEN_AI_SERVER_TIME_TO_FIRST_TOKEN: TTFT_BUCKETS,
    sc.METRIC_GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN: TPOT_BUCKETS,
    sc.METRIC_GEN_AI_SERVER_REQUEST_DURATION: DURATION_BUCKETS,
    sc.METRIC_LLMTRACE_SERVER_INTER_TOKEN_LATENCY: TPOT_BUCKETS,
    sc.METRIC_LLMTRACE_SERVER_QUEUE_DURATION: DURATION_BUCKETS,
    sc.METRIC_LLMTRACE_SERVER_PREFILL_DURATION: DURATION_BUCKETS,
    sc.METRIC_LLMTRACE_SERVER_DECODE_DURATION: DURATION_BUCKETS,
    sc.METRIC_LLMTRACE_SERVER_REQUEST_PROMPT_TOKENS: TOKEN_BUCKETS,
    sc.METRIC_LLMTRACE_SERVER_REQUEST_GENERATION_TOKENS: TOKEN_BUCKETS,
}


# Passing an explicit empty context skips a context-variable lookup per record.
_NO_CONTEXT = NO_CONTEXT = Context()
_BULK_FIELDS = ("_lock", "_value", "_sum", "_min", "_max", "_get_empty_bucket_counts")


class BulkHistogramAggregation(ExplicitBucketHistogramAggregation):
    """Explicit-bucket aggregation that keeps a handle on each attribute set's state.

    A request's inter-token gaps (one per output token) are bucketed in plain
    Python and merged into the SDK's histogram state in one step, instead of one
    ``Histogram.record`` per token (about 11-23 us each on this machine). The
    handle is SDK-internal; if its fields are missing the caller falls back to
    recording each value.
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

    def merge(self, attributes: dict, values: Sequence[float]) -> bool:
        """Add ``values`` to every reader's state of ``attributes``; False if not possible.

        Called after one value went through the API, which created the states.
        """
        states = self.states.get(frozenset(attributes.items()))
        if not states or not all(hasattr(st, f) for st in states for f in _BULK_FIELDS):
            return False
        counts = [0] * (len(self.boundaries) + 1)
        for v in values:
            counts[bisect_left(self.boundaries, v)] += 1
        total, low, high = sum(values), min(values), max(values)
        for state in states:
            with state._lock:
                if state._value is None:
                    state._value = state._get_empty_bucket_counts()
                bucket = state._value
                for i, c in enumerate(counts):
                    if c:
                        bucket[i] += c
                state._sum += total
                state._min = min(state._min, low)
                state._max = max(state._max, high)
        return True


class LabelLimiter:
    """Keeps at most ``limit`` distinct values per label; the rest become ``__overflow__``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: dict[str, set[str]] = {}
        self.overflows: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, label: str, value: str) -> str:
        seen = self._seen.get(label)
        if seen is not None and value in seen:
            return value
        with self._lock:
            seen = self._seen.setdefault(label, set())
            if value in seen:
                return value
            if len(seen) < self.limit:
                seen.add(value)
                return value
            self.overflows[label] = self.overflows.get(label, 0) + 1
            return OVERFLOW


@dataclass(frozen=True)
class RequestMetrics:
    """What one finished request contributes to the metrics (seconds, token counts)."""

    model: str
    tenant: str
    version: str
    finish_reason: str
    error_type: str | None
    ttft: float | None
    e2e: float
    queue: float | None
    prefill: float | None
    decode: float | None
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    preemptions: int
    itls: Sequence[float]


class Instruments:
    def __init__(self, meter, config: Config,
                 itl_aggregation: BulkHistogramAggregation | None = None) -> None:
        self._itl_bulk = itl_aggregation
        self.labels = LabelLimiter(config.max_label_values)

        def hist(name: str):
            return meter.create_histogram(
                name, unit=sc.METRIC_UNITS[name], description=sc.METRIC_BRIEFS[name],
                explicit_bucket_boundaries_advisory=HISTOGRAM_BUCKETS[name])

        def counter(name: str):
            return meter.create_counter(name, unit=sc.METRIC_UNITS[name],
                                        description=sc.METRIC_BRIEFS[name])

        # units and descriptions come from the registry, so they cannot drift from it
        self.ttft = hist(sc.METRIC_GEN_AI_SERVER_TIME_TO_FIRST_TOKEN)
        self.tpot = hist(sc.METRIC_GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN)
        self.e2e = hist(sc.METRIC_GEN_AI_SERVER_REQUEST_DURATION)
        self.itl = hist(sc.METRIC_LLMTRACE_SERVER_INTER_TOKEN_LATENCY)
        self.queue = hist(sc.METRIC_LLMTRACE_SERVER_QUEUE_DURATION)
        self.prefill = hist(sc.METRIC_LLMTRACE_SERVER_PREFILL_DURATION)
        self.decode = hist(sc.METRIC_LLMTRACE_SERVER_DECODE_DURATION)
        self.prompt_len = hist(sc.METRIC_LLMTRACE_SERVER_REQUEST_PROMPT_TOKENS)
        self.output_len = hist(sc.METRIC_LLMTRACE_SERVER_REQUEST_GENERATION_TOKENS)
        self.prompt_tokens = counter(sc.METRIC_LLMTRACE_SERVER_PROMPT_TOKENS)
        self.cached_tokens = counter(sc.METRIC_LLMTRACE_SERVER_CACHED_PROMPT_TOKENS)
        self.generation_tokens = counter(sc.METRIC_LLMTRACE_SERVER_GENERATION_TOKENS)
        self.requests = counter(sc.METRIC_LLMTRACE_SERVER_REQUESTS)
        self.preemptions = counter(sc.METRIC_LLMTRACE_SERVER_PREEMPTIONS)
        # engine core: batch-share cost attribution
        self.accelerator_seconds = counter(sc.METRIC_LLMTRACE_COST_ACCELERATOR_SECONDS)
        self.cost_usd = counter(sc.METRIC_LLMTRACE_COST_USD)
        self.unpriced = counter(sc.METRIC_LLMTRACE_PIPELINE_UNPRICED_REQUESTS)
        #: the engine-core tracer's running totals, read at collection (no per-step
        #: SDK call): () -> (busy seconds, steps, idle seconds, model/version labels)
        self.engine_totals: Callable[[], tuple[float, int, float, dict]] | None = None

    def _cost_labels(self, model: str, tenant: str, version: str, basis: str) -> dict:
        return {
            sc.GEN_AI_REQUEST_MODEL: self.labels(sc.GEN_AI_REQUEST_MODEL, model),
            sc.LLMTRACE_TENANT: self.labels(sc.LLMTRACE_TENANT, tenant),
            sc.LLMTRACE_DEPLOYMENT_VERSION: self.labels(sc.LLMTRACE_DEPLOYMENT_VERSION, version),
            sc.LLMTRACE_COST_BASIS: basis}

    def record_engine_usage(self, model: str, tenant: str, version: str,
                            seconds: float) -> None:
        """One finished request's batch share, at the engine core (every request)."""
        self.accelerator_seconds.add(
            seconds, self._cost_labels(model, tenant, version, "batch_share"), _NO_CONTEXT)

    def record_cost(self, model: str, tenant: str, version: str, basis: str,
                    usd: float | None) -> None:
        """One request's USD on ``basis``; None (no price) is counted as unpriced."""
        labels = self._cost_labels(model, tenant, version, basis)
        if usd is None:
            self.unpriced.add(1, labels, _NO_CONTEXT)
        else:
            self.cost_usd.add(usd, labels, _NO_CONTEXT)

    def record(self, m: RequestMetrics) -> None:
        base = {
            sc.GEN_AI_REQUEST_MODEL: self.labels(sc.GEN_AI_REQUEST_MODEL, m.model),
            sc.LLMTRACE_TENANT: self.labels(sc.LLMTRACE_TENANT, m.tenant),
            sc.LLMTRACE_DEPLOYMENT_VERSION: self.labels(sc.LLMTRACE_DEPLOYMENT_VERSION,
                                                        m.version),
        }
        ctx = _NO_CONTEXT
        if m.ttft is not None:
            self.ttft.record(m.ttft, base, ctx)
        if m.decode is not None and m.output_tokens > 1:
            self.tpot.record(m.decode / (m.output_tokens - 1), base, ctx)
        e2e_attrs = {**base, sc.ERROR_TYPE: m.error_type} if m.error_type else base
        self.e2e.record(m.e2e, e2e_attrs, ctx)
        for value, hist in ((m.queue, self.queue), (m.prefill, self.prefill),
                            (m.decode, self.decode)):
            if value is not None:
                hist.record(value, base, ctx)
        self._record_itls(m.itls, base)
        self.prompt_tokens.add(m.prompt_tokens, base, ctx)
        if m.cached_tokens:
            self.cached_tokens.add(m.cached_tokens, base, ctx)
        self.generation_tokens.add(m.output_tokens, base, ctx)
        self.prompt_len.record(m.prompt_tokens, base, ctx)
        finish = {**base, sc.LLMTRACE_REQUEST_FINISH_REASON: m.finish_reason}
        self.output_len.record(m.output_tokens, finish, ctx)
        if m.error_type:
            finish[sc.ERROR_TYPE] = m.error_type
        self.requests.add(1, finish, ctx)
        if m.preemptions:
            self.preemptions.add(m.preemptions, base, ctx)

    def _record_itls(self, itls: Sequence[float], attrs: dict) -> None:
        if not itls:
            return
        record = self.itl.record
        # The first value goes through the API: it creates the attribute set's state.
        record(itls[0], attrs, _NO_CONTEXT)
        rest = itls[1:]
        if rest and not (self._itl_bulk is not None and self._itl_bulk.merge(attrs, rest)):
            for gap in rest:
                record(gap, attrs, _NO_CONTEXT)


def _observe(counts: dict[str, int] | Iterable[tuple[str, int]], key: str):
    items = counts.items() if isinstance(counts, dict) else counts
    return [Observation(v, {key: k}) for k, v in items]


def build_instruments(config: Config, resource: Resource, scope: str, readers: list):
    """A private MeterProvider with the request instruments and self-telemetry counters."""
    from llmtrace.telemetry import DROPPED
    from llmtrace.telemetry.guard import HOOK_ERRORS

    itl_bulk = BulkHistogramAggregation(
        HISTOGRAM_BUCKETS[sc.METRIC_LLMTRACE_SERVER_INTER_TOKEN_LATENCY])
    provider = MeterProvider(
        resource=resource, metric_readers=readers,
        # exemplars would cost a trace-context check per measurement
        exemplar_filter=AlwaysOffExemplarFilter(),
        views=[View(instrument_name=sc.METRIC_LLMTRACE_SERVER_INTER_TOKEN_LATENCY,
                    aggregation=itl_bulk)],  # other instruments keep their defaults
    )
    meter = provider.get_meter(scope, __version__)
    instruments = Instruments(meter, config, itl_bulk)

    def hook_errors(_: CallbackOptions):
        return _observe(dict(HOOK_ERRORS), sc.LLMTRACE_TELEMETRY_HOOK)

    def dropped(_: CallbackOptions):
        return _observe(dict(DROPPED), sc.LLMTRACE_TELEMETRY_REASON)

    def overflows(_: CallbackOptions):
        total = sum(instruments.labels.overflows.values())
        return [Observation(total, {sc.LLMTRACE_TELEMETRY_REASON: "cardinality_cap"})] \
            if total else []

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

    for name, callback in ((sc.METRIC_LLMTRACE_ENGINE_BUSY, busy),
                           (sc.METRIC_LLMTRACE_ENGINE_STEPS, steps),
                           (sc.METRIC_LLMTRACE_COST_IDLE_ACCELERATOR_SECONDS, idle),
                           (sc.METRIC_LLMTRACE_TELEMETRY_HOOK_ERRORS, hook_errors),
                           (sc.METRIC_LLMTRACE_TELEMETRY_DROPPED, dropped),
                           (sc.METRIC_LLMTRACE_TELEMETRY_LABEL_OVERFLOWS, overflows)):
        meter.create_observable_counter(name, [callback], unit=sc.METRIC_UNITS[name],
                                        description=sc.METRIC_BRIEFS[name])
    return provider, instruments
