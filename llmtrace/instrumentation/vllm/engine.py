"""Engine-core side of the vLLM instrumentation: queue, prefill chunks, preemption.

Only the engine core knows when a request is scheduled, how its prompt is cut
into chunks and when it is preempted; partial prefill chunks produce no output
that reaches the API server. So these spans are made here, live, as children
of the request's root span, whose context arrives in ``trace_headers`` under
:data:`~llmtrace.instrumentation.vllm.frontend.CONTEXT_HEADER`.

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
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.context import Context
from opentelemetry.trace import Span, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from llmtrace import semconv as sc
from llmtrace.config import Config
from llmtrace.instrumentation.vllm.frontend import CONTEXT_HEADER, TENANT_HEADER
from llmtrace.telemetry import Telemetry
from llmtrace.telemetry.guard import HookGuard

_PROPAGATOR = TraceContextTextMapPropagator()
QUEUED, PREFILL, RUNNING, PREEMPTED = range(4)
#: vLLM's RequestStatus.FINISHED_<X> (lower-cased) -> llmtrace.request.finish_reason
_STATUS_REASONS = {"stopped": "stop", "length_capped": "length", "aborted": "abort",
                   "ignored": "error"}


@dataclass(eq=False)
class EngineRecord:
    parent: Context
    wait_start_ns: int
    state: int = QUEUED
    wait_span: Span | None = None  # preemption span while preempted
    prefill_span: Span | None = None
    chunk_index: int = 0


@dataclass(eq=False, slots=True)
class Usage:
    """One request's running batch share, kept for every request."""

    tenant: str
    added_ns: int
    seconds: float = 0.0
    steps: int = 0


@dataclass
class StepPending:
    start_ns: int
    index: int
    batch_size: int
    scheduled_tokens: int
    chunks: list[tuple[EngineRecord, int, int, bool]] = field(default_factory=list)
    #: (usage, weight) of every request scheduled in the step, and their weight sum
    shares: list[tuple[Usage, float]] = field(default_factory=list)
    weight: float = 0.0


class EngineTracer:
    """Per engine-core process state; hooks run on the engine's busy loop thread."""

    def __init__(self, config: Config, telemetry: Telemetry) -> None:
        self.config = config
        self.telemetry = telemetry
        self.records: dict[str, EngineRecord] = {}
        self.pending: dict[int, StepPending] = {}
        self.step_index = 0
        self._measure = config.measure_overhead
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
        self._step_labels: dict[str, str] = {}

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
        headers = request.trace_headers
        tenant = headers.get(TENANT_HEADER, "unknown") if headers else "unknown"
        self.usage[request.request_id] = Usage(tenant, time.time_ns())
        if not headers or CONTEXT_HEADER not in headers:
            return
        parent = _PROPAGATOR.extract({"traceparent": headers[CONTEXT_HEADER]})
        self.records[request.request_id] = EngineRecord(
            parent=parent, wait_start_ns=int(request.arrival_time * 1e9))

    def on_schedule(self, scheduler: Any, out: Any, start_ns: int) -> None:
        num_scheduled = out.num_scheduled_tokens
        if not num_scheduled:
            return  # nothing ran: the time goes to the next step or to idle
        self.step_index += 1
        if self._continuing:
            start_ns = self._last_end_ns  # the batch went on: bookkeeping is busy time
        else:
            self._idle_s += max(0.0, (start_ns - self._last_end_ns) / 1e9)
        step = StepPending(start_ns, self.step_index, len(num_scheduled),
                           out.total_num_scheduled_tokens)
        requests = scheduler.requests
        usage = self.usage
        records = self.records
        pw, dw = self._prefill_w, self._decode_w
        shares = step.shares
        for rid, n in num_scheduled.items():
            request = requests.get(rid)
            u = usage.get(rid)
            if u is not None and request is not None:
                # tokens of the prompt still uncomputed before this step are prefill
                prefill = request.num_prompt_tokens - (request.num_computed_tokens - n)
                prefill = 0 if prefill < 0 else (n if prefill > n else prefill)
                w = pw * prefill + dw * (n - prefill)
                shares.append((u, w))
                step.weight += w
            if not records:
                continue
            rec = records.get(rid)
            if rec is None:
                continue
            if rec.state in (QUEUED, PREEMPTED):
                self._end_wait(rec, start_ns)
            if rec.state != PREFILL or request is None:
                continue
            if rec.prefill_span is None:
                cached = request.num_computed_tokens - n
                attrs = {sc.GEN_AI_USAGE_INPUT_TOKENS: request.num_prompt_tokens,
                         sc.LLMTRACE_PREFILL_CACHED_TOKENS: cached}
                stats = getattr(request, "prefill_stats", None)
                if stats is not None and stats.num_external_cached_tokens:
                    attrs[sc.LLMTRACE_PREFILL_EXTERNAL_CACHED_TOKENS] = \
                        stats.num_external_cached_tokens
                rec.prefill_span = self.telemetry.child_span(
                    sc.SPAN_LLMTRACE_PREFILL, rec.parent, start_ns, attrs)
                rec.chunk_index = 0
            last = not getattr(request, "is_prefill_chunk", False)
            step.chunks.append((rec, n, request.num_computed_tokens - n, last))
        if len(self.pending) > 64:  # a step that never completed must not leak
            self.pending.pop(next(iter(self.pending)))
        self.pending[id(out)] = step

    def _end_wait(self, rec: EngineRecord, now: int) -> None:
        """Scheduled (again): the queue wait ends, and so does a preemption."""
        reason = "preemption" if rec.state == PREEMPTED else "arrival"
        parent = rec.wait_span if rec.wait_span is not None else rec.parent
        queue = self.telemetry.child_span(sc.SPAN_LLMTRACE_QUEUE, parent, rec.wait_start_ns,
                                          {sc.LLMTRACE_QUEUE_REASON: reason})
        queue.end(end_time=now)
        if rec.wait_span is not None:
            rec.wait_span.end(end_time=now)
            rec.wait_span = None
        rec.state = PREFILL

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
        elif step.shares:  # all weights zero: split evenly so the time stays conserved
            even = seconds / len(step.shares)
            for u, _ in step.shares:
                u.seconds += even
                u.steps += 1
        self.steps += 1
        for rec, n, computed_before, last in step.chunks:
            if rec.prefill_span is None:
                continue
            attrs = {
                sc.LLMTRACE_PREFILL_CHUNK_INDEX: rec.chunk_index,
                sc.LLMTRACE_PREFILL_CHUNK_COMPUTED_TOKENS: n,
                sc.LLMTRACE_STEP_BATCH_SIZE: step.batch_size,
                sc.LLMTRACE_STEP_SCHEDULED_TOKENS: step.scheduled_tokens,
                sc.LLMTRACE_STEP_INDEX: step.index,
            }
            if rec.chunk_index == 0:
                attrs[sc.LLMTRACE_PREFILL_CACHED_TOKENS] = computed_before
            chunk = self.telemetry.child_span(
                sc.SPAN_LLMTRACE_PREFILL_CHUNK, rec.prefill_span, step.start_ns, attrs)
            chunk.end(end_time=end_ns)
            rec.chunk_index += 1
            if last:
                rec.prefill_span.end(end_time=end_ns)
                rec.prefill_span = None
                rec.state = RUNNING

    def on_preempt(self, request: Any) -> None:
        rec = self.records.get(request.request_id)
        if rec is None:
            return
        now = time.time_ns()
        if rec.prefill_span is not None:
            rec.prefill_span.end(end_time=now)
            rec.prefill_span = None
        rec.wait_span = self.telemetry.child_span(
            sc.SPAN_LLMTRACE_PREEMPTION, rec.parent, now,
            {sc.LLMTRACE_PREEMPTION_REASON: "kv_cache_full"})
        rec.wait_start_ns = now
        rec.state = PREEMPTED

    def on_free(self, request: Any) -> None:
        now = time.time_ns()
        rec = self.records.pop(request.request_id, None)
        u = self.usage.pop(request.request_id, None)
        status = getattr(request, "status", None)
        if u is not None:
            self._count_usage(u, rec, status, now)
        if rec is None:
            return
        aborted = status is not None and "ABORTED" in getattr(status, "name", "")
        for span in (rec.prefill_span, rec.wait_span):
            if span is not None:
                if aborted:
                    span.set_status(Status(StatusCode.ERROR, "aborted"))
                    span.set_attribute(sc.ERROR_TYPE, "aborted")
                span.end(end_time=now)
        if rec.state == QUEUED and aborted:
            queue = self.telemetry.child_span(
                sc.SPAN_LLMTRACE_QUEUE, rec.parent, rec.wait_start_ns,
                {sc.LLMTRACE_QUEUE_REASON: "arrival", sc.ERROR_TYPE: "aborted"})
            queue.set_status(Status(StatusCode.ERROR, "aborted"))
            queue.end(end_time=now)

    def _count_usage(self, u: Usage, rec: EngineRecord | None, status: Any, now: int) -> None:
        version = self.config.deployment_version
        prices = self.telemetry.prices
        usd = None
        if prices is not None:
            instance = self.config.instance_type
            usd = prices.accelerator_cost(u.seconds, None if instance == "unknown" else instance)
        if self.config.metrics_enabled:
            instruments = self.telemetry.instruments
            instruments.record_engine_usage(self.model, u.tenant, version, u.seconds)
            if prices is not None:
                instruments.record_cost(self.model, u.tenant, version, "batch_share", usd)
        if rec is None:
            return
        attrs: dict[str, Any] = {
            sc.LLMTRACE_COST_ACCELERATOR_SECONDS: u.seconds, sc.LLMTRACE_ENGINE_STEPS: u.steps,
            sc.GEN_AI_REQUEST_MODEL: self.model, sc.LLMTRACE_TENANT: u.tenant,
            sc.LLMTRACE_DEPLOYMENT_VERSION: version}
        if usd is not None:
            attrs[sc.LLMTRACE_COST_USD] = usd
        name = getattr(status, "name", "")
        if name.startswith("FINISHED_"):
            reason = name.removeprefix("FINISHED_").lower()
            attrs[sc.LLMTRACE_REQUEST_FINISH_REASON] = _STATUS_REASONS.get(reason, reason)
        span = self.telemetry.child_span(sc.SPAN_LLMTRACE_ENGINE_REQUEST, rec.parent,
                                         u.added_ns, attrs)
        span.end(end_time=now)

    # -- wrapt wrappers ----------------------------------------------------------
    def wrap_scheduler_init(self, wrapped, instance, args, kwargs):
        result = wrapped(*args, **kwargs)
        with HookGuard("vllm.scheduler.init", self._measure):
            names = instance.vllm_config.model_config.served_model_name
            self.model = names[0] if isinstance(names, (list, tuple)) else str(names)
            self._step_labels = {sc.GEN_AI_REQUEST_MODEL: self.model,
                                 sc.LLMTRACE_DEPLOYMENT_VERSION: self.config.deployment_version}
            self._last_end_ns = time.time_ns()
            _ = self.telemetry.tracer  # exporter set up at start-up, not on a busy step
            _ = self.telemetry.prices  # a bad price table warns at start-up
            if self.config.metrics_enabled:
                self.telemetry.instruments.engine_totals = self.totals
        return result

    def wrap_add_request(self, wrapped, instance, args, kwargs):
        result = wrapped(*args, **kwargs)
        with HookGuard("vllm.scheduler.add_request", self._measure) as g:
            if g.enabled:
                self.on_add(args[0] if args else kwargs["request"])
        return result

    def wrap_schedule(self, wrapped, instance, args, kwargs):
        start = time.time_ns()
        out = wrapped(*args, **kwargs)
        if self.usage:
            with HookGuard("vllm.scheduler.schedule", self._measure) as g:
                if g.enabled:
                    self.on_schedule(instance, out, start)
        return out

    def wrap_update_from_output(self, wrapped, instance, args, kwargs):
        # The model's work for the step is done when its output is handed back; close
        # the step's chunks before vLLM frees any request that finished in it.
        if self.pending:
            with HookGuard("vllm.scheduler.update_from_output", self._measure) as g:
                if g.enabled:
                    self.on_step_done(args[0] if args else kwargs["scheduler_output"],
                                      time.time_ns())
        result = wrapped(*args, **kwargs)
        # requests left: the loop goes straight on to the next step
        self._continuing = bool(getattr(instance, "requests", None))
        return result

    def wrap_preempt(self, wrapped, instance, args, kwargs):
        result = wrapped(*args, **kwargs)
        if self.records:
            with HookGuard("vllm.scheduler.preempt_request", self._measure) as g:
                if g.enabled:
                    self.on_preempt(args[0] if args else kwargs["request"])
        return result

    def wrap_free_request(self, wrapped, instance, args, kwargs):
        if self.usage:
            with HookGuard("vllm.scheduler.free_request", self._measure) as g:
                if g.enabled:
                    self.on_free(args[0] if args else kwargs["request"])
        return wrapped(*args, **kwargs)
