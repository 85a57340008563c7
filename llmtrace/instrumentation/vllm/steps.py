"""Sampled engine steps, engine-core side: the mark, the timestamps, the span and metrics.

One non-empty step in ``step_sample_every`` is sampled. Before the scheduler runs,
the step gets its span's ids (and the tracer's sampling decision) and the engine
core's profiling scopes start recording; the scheduler output carries the mark to
the worker (:mod:`.worker`), whose record of the step comes back on the model's
output. When vLLM has turned that output into per-request outputs, the step is
handed to the builder thread, which makes the ``llmtrace.engine.step`` span, its
phase and region children and MoE events, and the metrics: the phase durations
are computed once (:func:`phases`) and feed both the spans and the histograms.

Every step (sampled or not) adds its routed assignments (scheduled tokens x top_k x
MoE layers, known once the worker reported the model's MoE shape) to a running
total read by an observable counter: no SDK call on the serving path.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanContext
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from llmtrace import semconv as sc
from llmtrace.instrumentation.vllm.worker import OUTPUT_KEY, STEP_MARK
from llmtrace.profiling.regions import RECORDER
from llmtrace.telemetry import DROPPED, Telemetry

logger = logging.getLogger("llmtrace")
_PROPAGATOR = TraceContextTextMapPropagator()

#: sampled steps an engine span links back to, at most
MAX_STEP_LINKS = 32


@dataclass(slots=True)
class SampledStep:
    """One sampled step's engine-side timestamps and batch, plus the worker's record."""

    trace_id: int
    span_id: int
    traced: bool  # the tracer's sampler kept the step span
    sched_start: int
    sched_end: int = 0
    output_start: int = 0
    output_end: int = 0
    #: the engine's record of the step: index and batch composition (read, not copied)
    batch: Any = None
    #: traceparents of the sampled requests in the batch (their request spans)
    requests: list[str] = field(default_factory=list)
    worker: dict[str, Any] | None = None
    regions: list = field(default_factory=list)
    regions_dropped: int = 0


def phases(step: SampledStep) -> list[tuple[str, int, int]]:
    """(phase, start ns, end ns) of a step, in order; the one definition of the phase
    intervals that both the phase spans and the duration histogram report."""
    out = [("schedule", step.sched_start, step.sched_end)]
    worker = step.worker or {}
    execute = worker.get("execute")
    if execute and execute[1]:
        out.append(("execute", execute[0], execute[1]))
    sample = worker.get("sample")
    if sample and sample[1]:
        out.append(("sample", sample[0], sample[1]))
    out.append(("output", step.output_start, step.output_end))
    return [p for p in out if p[2] >= p[1] > 0]


def moe_layer_stats(counts: list[int]) -> tuple[int, float, int, float]:
    """(assignments, imbalance = max/mean, hot expert, hot share) of one layer's counts."""
    total = sum(counts)
    if not counts or total == 0:
        return total, 1.0, 0, 0.0
    hot = max(range(len(counts)), key=counts.__getitem__)  # lowest id on a tie
    mean = total / len(counts)
    return total, counts[hot] / mean, hot, counts[hot] / total


class StepTracer:
    """Engine-core state of step sampling (busy-loop thread) and the builder's metrics."""

    def __init__(self, config, telemetry: Telemetry, engine) -> None:
        self.config = config
        self.telemetry = telemetry
        self.engine = engine
        self.every = config.step_sample_every
        self._seen = 0  # non-empty steps scheduled
        #: sampled steps scheduled and not yet processed, by id of their scheduler output
        #: (with async scheduling the next step is scheduled before this one's output)
        self.pending: dict[int, SampledStep] = {}
        self.current: SampledStep | None = None  # its output being processed now
        self.wanted: SampledStep | None = None  # ids drawn before the scheduler runs
        #: MoE shape the worker reported: assignments per scheduled token (top_k x layers)
        self.per_token = 0
        self.dispatched = 0  # running total of assignments (observable counter)
        self.layer_imbalance: dict[int, float] = {}  # last sampled step's, per layer
        self.expert_totals: dict[tuple[int, int], int] = {}
        self._metrics = None

    # -- serving path ---------------------------------------------------------
    def before_schedule(self, now: int) -> None:
        if RECORDER.thread and not self.pending and self.current is None:
            RECORDER.end()  # a sampled step whose output never came: stop recording
        # the first non-empty step is sampled: the worker's first record gives the MoE
        # shape that every later step's dispatched count needs
        if not self.every or self._seen % self.every:
            self.wanted = None
            return
        trace_id, span_id, traced, _span = self.telemetry.new_root(
            sc.SPAN_LLMTRACE_ENGINE_STEP, Context(), now)
        self.wanted = SampledStep(trace_id, span_id, traced, now)
        if not RECORDER.thread:  # else a sampled step under way records (async scheduling)
            RECORDER.begin(trace_id)

    def after_schedule(self, out: Any, step_pending: Any) -> None:
        """The schedule returned ``out``; ``step_pending``: the engine's StepPending, or
        None for an empty schedule."""
        if step_pending is None:
            return
        self._seen += 1
        if self.per_token:
            self.dispatched += step_pending.scheduled_tokens * self.per_token
        step, self.wanted = self.wanted, None
        if step is None:
            return
        step.batch = step_pending
        step.sched_end = time.time_ns()
        records = self.engine.records
        if records:
            for rid in out.num_scheduled_tokens:
                rec = records.get(rid)
                if rec is not None:
                    step.requests.append(rec.traceparent)
                    if len(rec.steps) < MAX_STEP_LINKS:
                        rec.steps.append((step.trace_id, step.span_id))
        setattr(out, STEP_MARK, (step.trace_id, step_pending.index))
        pending = self.pending
        if len(pending) >= 8:  # a step whose output never came must not leak
            pending.pop(next(iter(pending)))
        pending[id(out)] = step

    def before_output(self, out: Any, model_output: Any, now: int) -> None:
        step = self.current = self.pending.pop(id(out), None)
        if step is None:
            return
        step.output_start = now
        step.worker = getattr(model_output, OUTPUT_KEY, None)

    def after_output(self, now: int) -> None:
        step, self.current = self.current, None
        if step is None:
            return
        step.output_end = now
        if RECORDER.thread:
            step.regions, step.regions_dropped = RECORDER.end()
        moe = (step.worker or {}).get("moe")
        if moe and not self.per_token:
            self.per_token = moe["top_k"] * len(moe["layers"])
            self.dispatched += step.batch.scheduled_tokens * self.per_token
        self.telemetry.builder.submit(self.build, step)

    def discard(self) -> None:
        """An empty schedule or a failed step: stop recording, keep nothing."""
        self.wanted = None
        if RECORDER.thread:
            RECORDER.end()

    # -- builder thread -------------------------------------------------------------
    def build(self, step: SampledStep) -> None:
        engine = self.engine
        labels = {sc.GEN_AI_REQUEST_MODEL: engine.model,
                  sc.LLMTRACE_DEPLOYMENT_VERSION: self.config.deployment_version}
        ph = phases(step)
        worker = step.worker or {}
        moe = worker.get("moe")
        layer_stats = []
        if moe:
            for layer, counts in zip(moe["layers"], moe["counts"], strict=False):
                layer_stats.append((layer, counts, *moe_layer_stats(counts)))
        if self.config.metrics_enabled:
            self._record_metrics(labels, step, ph, moe, layer_stats)
        if step.traced:
            self._span(step, ph, moe, layer_stats, worker)

    def _span(self, step: SampledStep, ph, moe, layer_stats, worker) -> None:
        tel, batch = self.telemetry, step.batch
        attrs: dict[str, Any] = {
            sc.LLMTRACE_STEP_INDEX: batch.index,
            sc.LLMTRACE_STEP_BATCH_SIZE: batch.batch_size,
            sc.LLMTRACE_STEP_SCHEDULED_TOKENS: batch.scheduled_tokens,
            sc.LLMTRACE_STEP_PREFILL_TOKENS: batch.prefill_tokens,
            sc.LLMTRACE_STEP_DECODE_TOKENS: batch.scheduled_tokens - batch.prefill_tokens,
            sc.LLMTRACE_STEP_PREFILL_REQUESTS: batch.prefill_requests,
            sc.LLMTRACE_STEP_SAMPLE_EVERY: self.every,
            sc.GEN_AI_REQUEST_MODEL: self.engine.model,
        }
        if self.engine.dp_rank is not None:
            attrs[sc.LLMTRACE_ENGINE_INDEX] = self.engine.dp_rank
        links = []
        for traceparent in step.requests:
            ctx = _context_of(traceparent)
            if ctx is not None:
                links.append(Link(ctx))
        span = tel.build_root(sc.SPAN_LLMTRACE_ENGINE_STEP, Context(), step.trace_id,
                              step.span_id, step.sched_start, attrs, tuple(links))
        for name, start, end in ph:
            tel.child_span(sc.SPAN_LLMTRACE_STEP_PHASE, span, start,
                           {sc.LLMTRACE_STEP_PHASE: name}).end(end_time=end)
        regions = list(worker.get("regions") or ()) + list(step.regions)
        by_id = {}
        for name, source, start, end, span_id, parent in sorted(regions, key=lambda r: r[2]):
            parent_span = by_id.get(parent, span)
            child = tel.child_span(sc.SPAN_LLMTRACE_REGION, parent_span, start,
                                   {sc.LLMTRACE_REGION_NAME: name,
                                    sc.LLMTRACE_REGION_SOURCE: source}, span_id=span_id)
            by_id[span_id] = child
            child.end(end_time=end)
        if moe:
            for layer, counts, total, imbalance, hot, share in layer_stats:
                span.add_event(sc.EVENT_LLMTRACE_MOE_DISPATCH, {
                    sc.LLMTRACE_MOE_LAYER: layer,
                    sc.LLMTRACE_MOE_NUM_EXPERTS: moe["experts"],
                    sc.LLMTRACE_MOE_TOP_K: moe["top_k"],
                    sc.LLMTRACE_MOE_TOKENS: total // max(1, moe["top_k"]),
                    sc.LLMTRACE_MOE_EXPERT_TOKENS: counts,
                    sc.LLMTRACE_MOE_LOAD_IMBALANCE: imbalance,
                    sc.LLMTRACE_MOE_HOT_EXPERT: hot,
                    sc.LLMTRACE_MOE_HOT_EXPERT_SHARE: share,
                }, timestamp=ph[1][1] if len(ph) > 1 else step.sched_start)
        span.end(end_time=max(step.output_end, step.sched_end))

    def _record_metrics(self, labels, step, ph, moe, layer_stats) -> None:
        m = self._instruments()
        if m is None:
            return
        hist_phase, hist_step, hist_imb, hist_share = m
        for name, start, end in ph:
            hist_phase.record((end - start) / 1e9, {**labels, sc.LLMTRACE_STEP_PHASE: name})
        if step.output_end > step.sched_start:
            hist_step.record((step.output_end - step.sched_start) / 1e9, labels)
        if not moe:
            return
        cap = self.config.moe_expert_series
        for layer, counts, total, imbalance, _hot, share in layer_stats:
            if total == 0:
                continue
            hist_imb.record(imbalance, labels)
            hist_share.record(share, labels)
            self.layer_imbalance[layer] = imbalance
            if self.config.moe_expert_metrics:
                totals = self.expert_totals
                for expert, n in enumerate(counts):
                    key = (layer, expert)
                    if key in totals:
                        totals[key] += n
                    elif len(totals) < cap:
                        totals[key] = n
                    else:  # counted as dropped telemetry, never a new series
                        DROPPED["moe_expert_series_cap"] += 1

    def _instruments(self):
        if self._metrics is None:
            inst = self.telemetry.instruments
            meter = getattr(inst, "meter", None)
            if meter is None:
                self._metrics = False
                return None
            self._metrics = _create_instruments(meter, self)
        return self._metrics or None


def _context_of(traceparent: str) -> SpanContext | None:
    from opentelemetry.trace import get_current_span

    ctx = get_current_span(_PROPAGATOR.extract({"traceparent": traceparent})) \
        .get_span_context()
    return ctx if ctx.is_valid else None


def _create_instruments(meter, steps: StepTracer):
    from opentelemetry.metrics import Observation

    from llmtrace import schema

    def hist(name: str):
        spec = schema.BY_NAME[name]
        return meter.create_histogram(name, unit=spec.unit, description=spec.brief,
                                      explicit_bucket_boundaries_advisory=list(spec.buckets))

    engine = steps.engine

    def labels() -> dict[str, str]:
        return {sc.GEN_AI_REQUEST_MODEL: engine.model,
                sc.LLMTRACE_DEPLOYMENT_VERSION: steps.config.deployment_version}

    def layer_gauge(_):
        base = labels()
        return [Observation(v, {**base, sc.LLMTRACE_MOE_LAYER: layer})
                for layer, v in list(steps.layer_imbalance.items())]

    def dispatched(_):
        return [Observation(steps.dispatched, labels())] if steps.per_token else []

    def per_expert(_):
        base = labels()
        return [Observation(n, {**base, sc.LLMTRACE_MOE_LAYER: layer,
                                sc.LLMTRACE_MOE_EXPERT: expert})
                for (layer, expert), n in list(steps.expert_totals.items())]

    for name, callback, kind in (
            (sc.METRIC_LLMTRACE_MOE_LAYER_LOAD_IMBALANCE, layer_gauge, "gauge"),
            (sc.METRIC_LLMTRACE_MOE_DISPATCHED, dispatched, "counter"),
            (sc.METRIC_LLMTRACE_MOE_EXPERT_ASSIGNMENTS, per_expert, "counter")):
        spec = schema.BY_NAME[name]
        create = meter.create_observable_gauge if kind == "gauge" else \
            meter.create_observable_counter
        create(name, [callback], unit=spec.unit, description=spec.brief)
    return (hist(sc.METRIC_LLMTRACE_STEP_PHASE_DURATION),
            hist(sc.METRIC_LLMTRACE_STEP_DURATION),
            hist(sc.METRIC_LLMTRACE_MOE_LOAD_IMBALANCE),
            hist(sc.METRIC_LLMTRACE_MOE_HOT_EXPERT_SHARE))


__all__ = ["SampledStep", "StepTracer", "moe_layer_stats", "phases"]
