"""Engine-core side of the vLLM instrumentation: the engine's view of a request.

The request's phases (queue, prefill, preemptions) are rendered by the API
server from its request record, from the scheduler events vLLM sends with
each output, so spans and metrics share one computation. What only the
engine core knows is made here: how a prompt is cut into per-step chunks
(partial prefill chunks produce no output that reaches the API server) and
each request's batch-share cost. ``llmtrace.engine.request`` spans the
request's life in the engine core (added to freed) as a child of the request's
root span, whose context arrives in ``trace_headers`` under
:data:`~llmtrace.instrumentation.vllm.frontend.CONTEXT_HEADER`; the prefill
chunks are its children. A chunk runs from its step's schedule call (never
before the request reached the engine) to the step's output.

The hooks run on the engine's busy loop: they keep timestamps and counts only.
When vLLM frees a request its usage and (sampled) its spans are handed to the
builder thread (:mod:`llmtrace.telemetry.builder`), which makes the spans, with
the recorded timestamps, and the metric updates.

Requests without that header (not sampled, or not seen by an instrumented
API server) get no spans.

Cost attribution also lives here, for every request: each step's duration is
split among the requests scheduled in it in proportion to their weighted
scheduled tokens (prefill and decode weights from the config), so the shares
of all requests sum to the busy time exactly. While the batch continues, the
loop's bookkeeping between two steps counts to the next step; time with
nothing to run is idle, reported apart and attributed to no one. A request's
sum is counted when vLLM frees it (metrics, every request) and carried on its
``llmtrace.engine.request`` span (sampled requests).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import Link, Span, SpanContext, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from llmtrace import semconv as sc
from llmtrace.config import Config
from llmtrace.instrumentation.vllm.frontend import CONTEXT_HEADER, TENANT_HEADER
from llmtrace.instrumentation.vllm.kv_transfer import link_to
from llmtrace.instrumentation.vllm.steps import StepTracer
from llmtrace.pricing import price_usage
from llmtrace.record import UsageRecord
from llmtrace.telemetry import Telemetry

if TYPE_CHECKING:
    from llmtrace.instrumentation.vllm.kv_transfer import KVTransferTracer

_PROPAGATOR = TraceContextTextMapPropagator()
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
#: slices and waits kept per request (a request preempted more often keeps the first)
_MAX_SLICES = 256
#: recent step ends kept for the waits' starts
_STEP_ENDS_KEPT = 4096
#: vLLM's RequestStatus.FINISHED_<X> (lower-cased) -> llmtrace.request.finish_reason
_STATUS_REASONS = {"stopped": "stop", "length_capped": "length", "aborted": "abort",
                   "ignored": "error"}


@dataclass(eq=False, slots=True)
class EngineRecord:
    """A sampled request's engine-side timestamps, from added to freed; built when freed."""

    traceparent: str  # the request span's context, as the API server sent it
    added_ns: int
    chunk_index: int = 0
    #: (start_ns, end_ns, index, tokens computed, tokens computed before, tokens loaded
    #: through a KV connector, batch size, scheduled tokens, step index) per prefill chunk
    chunks: list[tuple[int, int, int, int, int, int, int, int, int]] = \
        field(default_factory=list)
    preempted_ns: list[int] = field(default_factory=list)
    request_id: str = ""
    #: KV loads that ended while the request was in the engine (children of its span)
    transfers: list = field(default_factory=list)
    #: (trace id, span id) of the sampled engine steps the request ran in (linked)
    steps: list = field(default_factory=list)
    priority: int = 0
    #: decode time slices: the slice under way (its first step's schedule call, 0 before
    #: decoding, and its steps), the last step the request was in, whether it was
    #: preempted since; the closed slices (start, end, steps) and waits (start, end, reason)
    slice_start: int = 0
    slice_steps: int = 0
    last_step: int = 0
    last_sched: int = 0
    preempted: bool = False
    slices: list = field(default_factory=list)
    waits: list = field(default_factory=list)


@dataclass(eq=False, slots=True)
class Usage:
    """One request's running batch share, kept for every request."""

    tenant: str
    added_ns: int
    seconds: float = 0.0
    steps: int = 0
    busy_at_add: float = 0.0  # the engine's busy time when the request arrived
    in_batch_s: float = 0.0  # busy time of the steps it was in
    hol_s: float = 0.0  # set when freed: busy time that ran without it


@dataclass
class StepPending:
    start_ns: int  # cost: backdated to the previous step's end while the batch continues
    sched_ns: int  # the schedule call's start: where this step's prefill chunks begin
    index: int
    batch_size: int
    scheduled_tokens: int
    #: (record, tokens computed, tokens computed before the step, tokens loaded through a
    #: KV connector) per prefill chunk
    chunks: list[tuple[EngineRecord, int, int, int]] = field(default_factory=list)
    #: (usage, weight) of every request scheduled in the step, and their weight sum
    shares: list[tuple[Usage, float]] = field(default_factory=list)
    weight: float = 0.0
    prefill_tokens: int = 0  # batch composition: prompt tokens and the requests with some
    prefill_requests: int = 0


class EngineTracer:
    """Per engine-core process state; hooks run on the engine's busy loop thread."""

    def __init__(self, config: Config, telemetry: Telemetry) -> None:
        self.config = config
        self.telemetry = telemetry
        self.records: dict[str, EngineRecord] = {}
        self.pending: dict[int, StepPending] = {}
        self.step_index = 0
        self.usage: dict[str, Usage] = {}
        self.model = "unknown"
        self._prefill_w = config.cost_prefill_weight
        self._decode_w = config.cost_decode_weight
        # busy/idle bookkeeping (engine-loop thread; read by the metric reader)
        self.busy_s = 0.0
        self.steps = 0
        self._idle_s = 0.0
        self._last_end_ns = time.time_ns()
        self._continuing = False  # requests were left when the last step ended
        #: step index -> end (ns) of recent steps, where a request's wait begins
        self._ends: dict[int, int] = {}
        self._step_labels: dict[str, str] = {}
        #: this engine core's data-parallel rank (0 without data parallelism)
        self.dp_rank: int | None = None
        #: the KV-connector tracer, which ends a request's load when vLLM frees it early
        self.kv: KVTransferTracer | None = None
        #: a KV producer's save ends after the engine span: keep sampled engine spans'
        #: contexts (builder thread; bounded) so the save span can be their child
        self.keep_span_contexts = False
        self._span_contexts: OrderedDict[str, Any] = OrderedDict()
        #: sampled engine steps (step spans, profiling regions, MoE counts)
        self.step_sampling = StepTracer(config, telemetry, self)

    def idle_seconds(self) -> float:
        """Cumulative idle time, including the idle stretch under way now."""
        idle = self._idle_s
        if not self._continuing:
            idle += max(0.0, (time.time_ns() - self._last_end_ns) / 1e9)
        return idle

    def totals(self) -> tuple[float, int, float, dict[str, str]]:
        """Busy seconds, steps, idle seconds and labels, for the observable counters."""
        return self.busy_s, self.steps, self.idle_seconds(), self._step_labels

    # -- lifecycle ---------------------------------------------------------------
    def on_add(self, request: Any) -> None:
        now = time.time_ns()
        headers = request.trace_headers
        tenant = headers.get(TENANT_HEADER, "unknown") if headers else "unknown"
        self.usage[request.request_id] = Usage(tenant, now, busy_at_add=self.busy_s)
        if not headers or CONTEXT_HEADER not in headers:
            return
        self.records[request.request_id] = EngineRecord(
            headers[CONTEXT_HEADER], now, request_id=request.request_id,
            priority=int(getattr(request, "priority", 0) or 0))

    def on_schedule(self, scheduler: Any, out: Any, start_ns: int) -> StepPending | None:
        num_scheduled = out.num_scheduled_tokens
        if not num_scheduled:
            return None  # nothing ran: the time goes to the next step or to idle
        self.step_index += 1
        sched_ns = start_ns
        if self._continuing:
            start_ns = self._last_end_ns  # the batch went on: bookkeeping is busy time
        else:
            self._idle_s += max(0.0, (start_ns - self._last_end_ns) / 1e9)
        step = StepPending(start_ns, sched_ns, self.step_index, len(num_scheduled),
                           out.total_num_scheduled_tokens)
        requests = scheduler.requests
        usage = self.usage
        records = self.records
        pw, dw = self._prefill_w, self._decode_w
        shares = step.shares
        for rid, n in num_scheduled.items():
            request = requests.get(rid)
            if request is None:
                continue
            # tokens of the prompt still uncomputed before this step are prefill
            before = request.num_computed_tokens - n
            prefill = request.num_prompt_tokens - before
            prefill = 0 if prefill < 0 else (n if prefill > n else prefill)
            if prefill:
                step.prefill_tokens += prefill
                step.prefill_requests += 1
            u = usage.get(rid)
            if u is not None:
                w = pw * prefill + dw * (n - prefill)
                shares.append((u, w))
                step.weight += w
            if records:
                rec = records.get(rid)
                if rec is None:
                    continue
                if rec.slice_start or not prefill:
                    self._time_slice(rec, step.index, sched_ns)
                if prefill:
                    external = 0
                    if rec.chunk_index == 0:  # the prompt's KV loaded through a connector
                        stats = getattr(request, "prefill_stats", None)
                        external = getattr(stats, "num_external_cached_tokens", 0) or 0
                    step.chunks.append((rec, n, before, external))
                rec.last_step, rec.last_sched = step.index, sched_ns
        if len(self.pending) > 64:  # a step that never completed must not leak
            self.pending.pop(next(iter(self.pending)))
        self.pending[id(out)] = step
        return step

    def _time_slice(self, rec: EngineRecord, index: int, sched_ns: int) -> None:
        """A decoding request is in step ``index``: extend its slice, or, if it sat out
        steps since its last one, close that slice and the wait after it."""
        if rec.slice_start == 0:  # its first decode step
            rec.slice_start, rec.slice_steps = sched_ns, 1
            return
        if rec.last_step == index - 1:
            rec.slice_steps += 1
            return
        end = self._ends.get(rec.last_step, rec.last_sched)
        if len(rec.waits) < _MAX_SLICES:
            rec.slices.append((rec.slice_start, end, rec.slice_steps))
            rec.waits.append((end, sched_ns, "preempted" if rec.preempted else "held"))
        rec.preempted = False
        rec.slice_start, rec.slice_steps = sched_ns, 1

    def on_step_done(self, out: Any, end_ns: int) -> None:
        step = self.pending.pop(id(out), None)
        if step is None:
            return
        # Pipelined steps (async scheduling) overlap: count only the new wall time.
        start = max(step.start_ns, self._last_end_ns)
        seconds = max(0, end_ns - start) / 1e9
        self._last_end_ns = max(end_ns, self._last_end_ns)
        self.busy_s += seconds
        if step.weight > 0:
            per_weight = seconds / step.weight
            for u, w in step.shares:
                u.seconds += per_weight * w
                u.steps += 1
                u.in_batch_s += seconds
        elif step.shares:  # all weights zero: split evenly so the time stays conserved
            even = seconds / len(step.shares)
            for u, _ in step.shares:
                u.seconds += even
                u.steps += 1
                u.in_batch_s += seconds
        ends = self._ends
        ends[step.index] = end_ns
        ends.pop(step.index - _STEP_ENDS_KEPT, None)
        self.steps += 1
        for rec, n, computed_before, external in step.chunks:
            rec.chunks.append((step.sched_ns, end_ns, rec.chunk_index, n, computed_before,
                               external, step.batch_size, step.scheduled_tokens, step.index))
            rec.chunk_index += 1

    def on_preempt(self, request: Any) -> None:
        rec = self.records.get(request.request_id)
        if rec is not None:
            rec.preempted_ns.append(time.time_ns())
            rec.preempted = True

    def on_free(self, request: Any) -> None:
        if self.kv is not None:
            self.kv.on_free(request.request_id)
        now = time.time_ns()
        rec = self.records.pop(request.request_id, None)
        u = self.usage.pop(request.request_id, None)
        if u is None and rec is None:
            return
        if u is not None:
            u.hol_s = max(0.0, self.busy_s - u.busy_at_add - u.in_batch_s)
        if rec is not None and rec.slice_start:  # the slice under way ends with the request
            rec.slices.append((rec.slice_start, self._ends.get(rec.last_step, now),
                               rec.slice_steps))
            rec.slice_start = 0
        status = getattr(getattr(request, "status", None), "name", "")
        self.telemetry.builder.submit(self.build, (u, rec, status, now))

    # -- building (the builder thread) ------------------------------------------
    def build(self, item: tuple[Usage | None, EngineRecord | None, str, int]) -> None:
        """One freed request -> its usage metrics and (sampled) its engine-side spans."""
        u, rec, status, now = item
        if u is not None:
            self._count_usage(u, rec, status, now)
        elif rec is not None:
            self._engine_span(rec, {}).end(end_time=now)

    def _engine_span(self, rec: EngineRecord, attrs: dict[str, Any]) -> Span:
        if self.dp_rank is not None:
            attrs[sc.LLMTRACE_ENGINE_INDEX] = self.dp_rank
        parent = _PROPAGATOR.extract({"traceparent": rec.traceparent})
        links: tuple = ()
        if rec.transfers:
            links = link_to(next((t.producer_context for t in rec.transfers
                                  if t.producer_context), None))
        if rec.steps:  # the sampled steps it ran in
            links = links + tuple(Link(SpanContext(t, s, True, _SAMPLED))
                                  for t, s in rec.steps)
        span = self.telemetry.child_span(sc.SPAN_LLMTRACE_ENGINE_REQUEST, parent,
                                         rec.added_ns, attrs, links)
        if self.keep_span_contexts:
            contexts = self._span_contexts
            contexts[rec.request_id] = span.get_span_context()
            if len(contexts) > 4096:  # a save that never ended must not leak
                contexts.popitem(last=False)
        if self.kv is not None:
            for t in rec.transfers:
                self.kv.span(t, span)
        for (start, end, index, n, computed_before, external, batch, scheduled,
             step_index) in rec.chunks:
            chunk_attrs = {
                sc.LLMTRACE_PREFILL_CHUNK_INDEX: index,
                sc.LLMTRACE_PREFILL_CHUNK_COMPUTED_TOKENS: n,
                sc.LLMTRACE_STEP_BATCH_SIZE: batch,
                sc.LLMTRACE_STEP_SCHEDULED_TOKENS: scheduled,
                sc.LLMTRACE_STEP_INDEX: step_index,
            }
            if self.dp_rank is not None:
                chunk_attrs[sc.LLMTRACE_ENGINE_INDEX] = self.dp_rank
            if index == 0:
                chunk_attrs[sc.LLMTRACE_PREFILL_CACHED_TOKENS] = computed_before - external
                if external:
                    chunk_attrs[sc.LLMTRACE_PREFILL_EXTERNAL_CACHED_TOKENS] = external
            self.telemetry.child_span(sc.SPAN_LLMTRACE_PREFILL_CHUNK, span, start,
                                      chunk_attrs).end(end_time=end)
        priority = {sc.LLMTRACE_REQUEST_PRIORITY: rec.priority}
        for i, (start, end, steps) in enumerate(rec.slices):
            self.telemetry.child_span(sc.SPAN_LLMTRACE_DECODE_SLICE, span, start, {
                sc.LLMTRACE_DECODE_SLICE_INDEX: i, sc.LLMTRACE_DECODE_SLICE_STEPS: steps,
                **priority}).end(end_time=end)
        for start, end, reason in rec.waits:
            self.telemetry.child_span(sc.SPAN_LLMTRACE_DECODE_WAIT, span, start, {
                sc.LLMTRACE_DECODE_WAIT_REASON: reason, **priority}).end(end_time=end)
        for ts in rec.preempted_ns:
            span.add_event(sc.EVENT_LLMTRACE_PREEMPTED,
                           {sc.LLMTRACE_PREEMPTION_REASON: "kv_cache_full"}, timestamp=ts)
        return span

    def span_context_of(self, request_id: str) -> Any:
        """A sampled request's engine span context, once (builder thread), or None."""
        return self._span_contexts.pop(request_id, None)

    def _count_usage(self, u: Usage, rec: EngineRecord | None, name: str, now: int) -> None:
        instance = self.config.instance_type
        usage = UsageRecord(
            trace_id="", model=self.model, tenant=u.tenant,
            version=self.config.deployment_version,
            instance_type=None if instance == "unknown" else instance,
            accelerator_s=u.seconds, steps=u.steps, hol_s=u.hol_s)
        prices = self.telemetry.prices
        if prices is not None:
            price_usage(usage, prices)
        if self.config.metrics_enabled:
            self.telemetry.instruments.record_usage(usage)
        if rec is None:
            return
        attrs: dict[str, Any] = {
            sc.LLMTRACE_COST_ACCELERATOR_SECONDS: u.seconds, sc.LLMTRACE_ENGINE_STEPS: u.steps,
            sc.LLMTRACE_REQUEST_HOL_BLOCKING: u.hol_s,
            sc.LLMTRACE_REQUEST_PRIORITY: rec.priority,
            sc.GEN_AI_REQUEST_MODEL: self.model, sc.LLMTRACE_TENANT: u.tenant,
            sc.LLMTRACE_DEPLOYMENT_VERSION: usage.version}
        if usage.usd is not None:
            attrs[sc.LLMTRACE_COST_USD] = usage.usd
        if name.startswith("FINISHED_"):
            reason = name.removeprefix("FINISHED_").lower()
            attrs[sc.LLMTRACE_REQUEST_FINISH_REASON] = _STATUS_REASONS.get(reason, reason)
        aborted = "ABORTED" in name
        if aborted:
            attrs[sc.ERROR_TYPE] = "aborted"
        span = self._engine_span(rec, attrs)
        if aborted:
            span.set_status(Status(StatusCode.ERROR, "aborted"))
        span.end(end_time=now)

    # -- hook bodies (guarded by install(), see the hook table) -----------------
    def after_scheduler_init(self, instance, args, kwargs, result, token) -> None:
        names = instance.vllm_config.model_config.served_model_name
        self.model = names[0] if isinstance(names, (list, tuple)) else str(names)
        self._step_labels = {sc.GEN_AI_REQUEST_MODEL: self.model,
                             sc.LLMTRACE_DEPLOYMENT_VERSION: self.config.deployment_version}
        # vLLM resets a dense model's data-parallel ranks to independent DP=1 engines;
        # data_parallel_index keeps the rank (vLLM's ``engine`` label) in every case
        parallel = getattr(instance.vllm_config, "parallel_config", None)
        rank = getattr(parallel, "data_parallel_index", None)
        if rank is None:
            rank = getattr(parallel, "data_parallel_rank", None)
        self.dp_rank = int(rank) if rank is not None else None
        self._last_end_ns = time.time_ns()
        _ = self.telemetry.tracer  # exporter set up at start-up, not on a busy step
        _ = self.telemetry.prices  # a bad price table warns at start-up
        if self.config.metrics_enabled:
            self.telemetry.instruments.engine_totals = self.totals

    def after_add_request(self, instance, args, kwargs, result, token) -> None:
        self.on_add(args[0] if args else kwargs["request"])

    def before_schedule(self, instance, args, kwargs) -> int:
        now = time.time_ns()
        if self.step_sampling.every:
            self.step_sampling.before_schedule(now)
        return now

    def after_schedule(self, instance, args, kwargs, out, start_ns: int | None) -> None:
        if start_ns is not None:
            step = self.on_schedule(instance, out, start_ns)
            steps = self.step_sampling
            if steps.every:
                if step is None:
                    steps.discard()
                else:
                    steps.after_schedule(out, step)

    def before_update_from_output(self, instance, args, kwargs) -> None:
        # The model's work for the step is done when its output is handed back; close
        # the step's chunks before vLLM frees any request that finished in it.
        now = time.time_ns()
        if self.pending:
            self.on_step_done(args[0] if args else kwargs["scheduler_output"], now)
        if self.step_sampling.pending:
            self.step_sampling.before_output(
                args[0] if args else kwargs["scheduler_output"],
                args[1] if len(args) > 1 else kwargs["model_runner_output"], now)
        kv = self.kv
        if kv is not None and kv.loads:
            out = args[1] if len(args) > 1 else kwargs["model_runner_output"]
            kv.on_failures(getattr(out, "kv_connector_output", None))

    def after_update_from_output(self, instance, args, kwargs, result, token) -> None:
        # requests left: the loop goes straight on to the next step
        self._continuing = bool(getattr(instance, "requests", None))
        if self.step_sampling.current is not None:
            self.step_sampling.after_output(time.time_ns())

    def after_preempt(self, instance, args, kwargs, result, token) -> None:
        self.on_preempt(args[0] if args else kwargs["request"])

    def before_free_request(self, instance, args, kwargs) -> None:
        self.on_free(args[0] if args else kwargs["request"])

    def has_records(self) -> bool:
        return bool(self.records)

    def has_usage(self) -> bool:
        return bool(self.usage)
