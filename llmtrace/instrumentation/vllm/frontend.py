"""API-server side of the vLLM instrumentation: the request root span, decode
chunks and the per-request metrics.

Where the data comes from (cheapest source that keeps it true):
- HTTP arrival, incoming ``traceparent`` and tenant: an ASGI middleware added
  to vLLM's app (earliest point a request exists);
- request parameters and prompt length: ``OutputProcessor.add_request``;
- engine arrival: ``OutputProcessor.add_request`` (the request is handed to
  the engine client right after it);
- token arrival, first token, finish: ``OutputProcessor.process_outputs``
  (one dict lookup and a few integer updates per output on the hot path);
- the engine core's scheduler events (scheduled, preempted) and the output
  batch's timestamp (prompt done): what vLLM sends with each output, on the
  monotonic clock the two processes share;
- aborts and engine death: ``abort_requests`` and ``propagate_error``;
- client disconnects: the middleware sees ``http.disconnect``. vLLM aborts the
  request only once its stream generator is closed, which can be late or, if
  the generator is left to the garbage collector, never; a request that
  finishes after its client left is marked ``client_disconnected``.

At finish the request's timestamps become one
:class:`~llmtrace.record.RequestRecord` (durations computed once, by
:func:`~llmtrace.record.phases`), which feeds the request span's attributes,
its phase spans and the metrics alike.

The root span's context rides to the engine core in ``trace_headers`` under
:data:`CONTEXT_HEADER` (vLLM forwards its own ``traceparent`` only when its
tracing flag is set); the engine core hangs its own view of the request
(``llmtrace.engine.request`` and the prefill chunks) under it.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.context import get_current
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    Status,
    StatusCode,
    TraceFlags,
    set_span_in_context,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from llmtrace import semconv as sc
from llmtrace.config import Config
from llmtrace.instrumentation.vllm.dp import route_attributes
from llmtrace.instrumentation.vllm.http import CURRENT, HttpInfo, LlmtraceASGIMiddleware, http_info
from llmtrace.instrumentation.vllm.quality import QualityHooks
from llmtrace.pricing import price_request
from llmtrace.record import (
    PREEMPTED,
    SCHEDULED,
    SOURCE_LLMTRACE,
    VLLM_DUPLICATE_STATE,
    Histogram,
    RequestRecord,
    Timeline,
    phases,
)
from llmtrace.telemetry import Telemetry
from llmtrace.telemetry.phase_spans import record_attributes, render_phases

CONTEXT_HEADER = "llmtrace-traceparent"
#: trace_headers key carrying the tenant to the engine core (cost attribution)
TENANT_HEADER = "llmtrace-tenant"
_PROPAGATOR = TraceContextTextMapPropagator()
#: traces whose last request end is kept for numbering chunked generations
_GENERATIONS_KEPT = 4096
_FINISH = {"stop": "stop", "length": "length", "abort": "abort", "error": "error",
           "repetition": "repetition"}
#: vLLM's EngineCoreEventType values (an IntEnum) -> timeline event kinds; QUEUED is not used
_EVENTS = {2: SCHEDULED, 3: PREEMPTED}


@dataclass(eq=False, slots=True)
class RequestState:
    """Serving-path state of one request: ids, timestamps and counts, nothing built.

    Everything the request's spans, record and metrics need is kept here as
    plain values (or references to vLLM's objects, read once the request is
    done); the builder thread turns it into telemetry after it finishes.
    """

    request_id: str
    trace_id: int
    span_id: int
    sampled: bool
    parent: Any  # the OpenTelemetry context the request span hangs under
    model: str
    tenant: str
    prompt_tokens: int
    http: HttpInfo | None
    timeline: Timeline
    params: Any = None  # vLLM's SamplingParams, read when the span is built
    priority: int = 0
    prompt: str | None = None  # only with capture_content
    span: Span | None = None  # started on the serving path only for a non-SDK tracer
    req_state: Any = None
    last_ns: int = 0  # last output processed (the ITL clock)
    first_output_ns: int = 0  # the engine output carrying the first token arrived
    output_tokens: int = 0
    #: inter-token gaps (seconds) of the decode chunk being accumulated (sampled) or
    #: of the whole request (unsampled): a list append per token, bucketed off-path
    gaps: list[float] = field(default_factory=list)
    #: closed decode chunks (sampled): (start_ns, end_ns, tokens, gaps)
    chunks: list[tuple[int, int, int, list[float]]] = field(default_factory=list)
    chunk_start_ns: int = 0
    chunk_tokens: int = 0
    # filled at finish
    finish_reason: str = ""
    error_type: str | None = None
    message: str | None = None
    gone: bool = False
    cached_tokens: int = 0
    output_text: str | None = None
    #: prompt tokens loaded through a KV connector (vLLM's prefill stats); None: unknown
    cached_external: int | None = None
    #: the data-parallel rank choice (:class:`~llmtrace.instrumentation.vllm.dp.RankChoice`)
    dp: Any = None
    #: (chunk index, gap s) of a chunked generation's continuation (builder thread)
    generation: tuple[int, float] | None = None
    #: the prompt's token ids (vLLM's list, hashed off-path for regenerations)
    prompt_ids: Any = None
    #: judged: the prompt and completion text, held for the judge only (never exported)
    judged: bool = False
    judge_prompt: str | None = None
    completion: str | None = None
    #: entropy measured: vLLM's logprobs of the output, read off-path
    entropy: bool = False
    logprobs: Any = None


class FrontendTracer:
    """Owns the per-request records of one API-server process."""

    def __init__(self, config: Config, telemetry: Telemetry) -> None:
        self.config = config
        self.telemetry = telemetry
        self.records: dict[str, RequestState] = {}
        self.served_model = "unknown"
        #: vLLM's own tracing is on (``--otlp-traces-endpoint``): its span joins our trace
        self.vllm_tracing = False
        self._measure = config.measure_overhead
        self._tenant_header = config.tenant_header.encode()
        self._chunk_tokens = config.decode_chunk_tokens
        self._chunk_ns = int(config.decode_chunk_ms * 1e6)
        #: trace id -> (requests finished in it, the last one's end): numbers a chunked
        #: generation's continuations (builder thread; bounded)
        self._generations: OrderedDict[int, tuple[int, int]] = OrderedDict()
        self.quality = QualityHooks(config, telemetry)

    # -- HTTP ingress ---------------------------------------------------------
    # -- request lifecycle -----------------------------------------------------
    def begin(self, request: Any, prompt: str | None = None) -> RequestState | None:
        if not is_instrumentation_enabled():  # inside OpenTelemetry's suppress_instrumentation
            return None
        rid = request.request_id
        if rid in self.records:
            return None  # a streaming-input update of a request we already follow
        info = CURRENT.get()
        arrival_ns = info.arrival_ns if info else int(request.arrival_time * 1e9)
        parent = info.parent if info else None
        if parent is None and request.trace_headers:
            parent = _PROPAGATOR.extract(dict(request.trace_headers))
        prompt_ids = request.prompt_token_ids
        prompt_tokens = len(prompt_ids) if prompt_ids is not None else 0
        if parent is None:  # no remote parent: whatever span is current here
            parent = get_current()
        trace_id, span_id, sampled, span = self.telemetry.new_root(
            sc.SPAN_LLMTRACE_REQUEST, parent, arrival_ns)
        tenant = info.tenant if info else "default"
        headers = {**(request.trace_headers or {}), TENANT_HEADER: tenant}
        if sampled:
            traceparent = f"00-{trace_id:032x}-{span_id:016x}-01"
            headers[CONTEXT_HEADER] = traceparent
            if self.vllm_tracing:
                # vLLM's own llm_request span becomes a child of ours, in the same trace;
                # the tracestate entry tells the collector it duplicates our record
                headers["traceparent"] = traceparent
                state = headers.get("tracestate")
                headers["tracestate"] = f"{VLLM_DUPLICATE_STATE},{state}" if state else \
                    VLLM_DUPLICATE_STATE
        request.trace_headers = headers
        # handed to the engine client right after this hook
        timeline = Timeline(read_ns=arrival_ns, engine_arrival_ns=time.time_ns())
        rec = RequestState(rid, trace_id, span_id, sampled, parent, self.served_model, tenant,
                           prompt_tokens, info, timeline, request.sampling_params,
                           getattr(request, "priority", 0) or 0,
                           prompt if self.config.capture_content else None, span)
        rec.prompt_ids = prompt_ids
        if sampled:
            self.quality.on_begin(rec, prompt)
        self.records[rid] = rec
        return rec

    def on_outputs(self, outputs: list[Any], engine_ts: float | None = None) -> None:
        """Per engine-output batch: the only per-token path, kept to plain arithmetic."""
        now = time.time_ns()
        # wall - monotonic, for the engine's timestamps (one host, one monotonic clock)
        offset = now - time.monotonic_ns()
        records = self.records
        for out in outputs:
            rec = records.get(out.request_id)
            if rec is None:
                continue
            events = out.events
            if events:
                tl_events = rec.timeline.events
                for ev in events:
                    kind = _EVENTS.get(int(ev.type))
                    if kind is not None:
                        tl_events.append((kind, int(ev.timestamp * 1e9) + offset))
            n = len(out.new_token_ids)
            if n:
                if rec.last_ns == 0:
                    rec.timeline.prompt_done_ns = \
                        int(engine_ts * 1e9) + offset if engine_ts else now
                    # prompt tokens by source ride on the output that ends the prefill
                    stats = getattr(out, "prefill_stats", None)
                    if stats is not None:
                        rec.cached_external = stats.num_external_cached_tokens
                    rec.timeline.first_token_ns = rec.first_output_ns = now
                    rec.chunk_start_ns = now
                else:
                    gap = (now - rec.last_ns) / 1e9
                    rec.gaps.append(gap)
                rec.last_ns = now
                rec.output_tokens += n
                if rec.sampled:
                    rec.chunk_tokens += n
                    if rec.chunk_tokens >= self._chunk_tokens or \
                            now - rec.chunk_start_ns >= self._chunk_ns:
                        self._cut_chunk(rec, now)
            if out.finish_reason is not None:
                self.finish(rec, str(out.finish_reason), now)

    def abort(self, request_ids: list[str], reason: str = "aborted") -> None:
        now = time.time_ns()
        for rid in request_ids:
            rec = self.records.get(rid)
            if rec is not None:
                self.finish(rec, "abort", now, error_type=reason)

    def fail_all(self, exc: BaseException) -> None:
        now = time.time_ns()
        for rec in list(self.records.values()):
            self.finish(rec, "error", now, error_type="engine_error",
                        message=f"{type(exc).__name__}: {exc}")

    # -- decode chunks (serving path: a tuple append per chunk) ----------------
    @staticmethod
    def _cut_chunk(rec: RequestState, now: int) -> None:
        if rec.chunk_tokens == 0 or rec.timeline.first_token_ns == 0:
            return
        rec.chunks.append((rec.chunk_start_ns, now, rec.chunk_tokens, rec.gaps))
        rec.gaps = []
        rec.chunk_start_ns = now
        rec.chunk_tokens = 0

    @staticmethod
    def _first_written(rec: RequestState) -> int:
        """When the first token left the server: for a stream, with its first body chunk
        (never before the engine output that carried it); else that output."""
        first = rec.timeline.first_token_ns
        http = rec.http
        if first and http is not None and http.streaming and http.first_body_ns > first:
            return http.first_body_ns
        return first

    # -- finish (serving path: final timestamps, then hand-off) -----------------
    def finish(self, rec: RequestState, finish_reason: str, now: int,
               error_type: str | None = None, message: str | None = None) -> None:
        self.records.pop(rec.request_id, None)
        reason = _FINISH.get(finish_reason.lower(), finish_reason.lower())
        if reason in ("abort", "error") and error_type is None:
            error_type = "aborted" if reason == "abort" else "engine_error"
        gone = rec.http is not None and rec.http.disconnected_ns != 0
        if gone and error_type is None:
            error_type = "client_disconnected"  # ran to completion for nobody
        tl = rec.timeline
        tl.last_token_ns = rec.last_ns
        tl.end_ns = rec.last_ns if rec.last_ns and error_type is None else now
        tl.first_token_ns = self._first_written(rec)
        tl.end_ns = max(tl.end_ns, tl.first_token_ns)  # a request ends after its first token
        if rec.sampled:
            self._cut_chunk(rec, tl.end_ns)
        rec.finish_reason, rec.error_type, rec.message, rec.gone = \
            reason, error_type, message, gone
        # vLLM's per-request state is read now, while it is final and ours alone
        rec.cached_tokens = int(getattr(rec.req_state, "num_cached_tokens", 0) or 0)
        if rec.judged or (self.config.capture_content and rec.sampled):
            text = getattr(getattr(rec.req_state, "detokenizer", None), "output_text", None)
            if self.config.capture_content:  # opt-in only
                rec.output_text = text
            if rec.judged:  # held for the judge, never exported
                rec.completion = text
        if rec.entropy:
            rec.logprobs = getattr(getattr(rec.req_state, "logprobs_processor", None),
                                   "logprobs", None)
        rec.req_state = None
        self.telemetry.builder.submit(self.build, rec)

    # -- building (the builder thread) ------------------------------------------
    def _generation_chunk(self, rec: RequestState) -> tuple[int, float] | None:
        """(chunk index, gap s) of a continuation whose trace ended a request here before;
        every request's end is noted (the first chunk is an ordinary request)."""
        tl, gens = rec.timeline, self._generations
        seen = gens.pop(rec.trace_id, None)
        gens[rec.trace_id] = ((seen[0] if seen else 0) + 1, tl.end_ns)
        if len(gens) > _GENERATIONS_KEPT:
            gens.popitem(last=False)
        if seen is None or rec.http is None or not rec.http.continuation:
            return None
        return seen[0], max(0, tl.read_ns - seen[1]) / 1e9

    def build(self, rec: RequestState) -> None:
        """One finished request -> its record, spans and metric updates."""
        tl = rec.timeline
        itl = Histogram()
        root = None
        rec.generation = self._generation_chunk(rec)
        if rec.sampled:
            root = rec.span
            if root is None:
                root = self.telemetry.build_root(
                    sc.SPAN_LLMTRACE_REQUEST, rec.parent, rec.trace_id, rec.span_id,
                    tl.read_ns, self._request_attributes(rec))
            else:  # started on the serving path (a non-SDK tracer)
                root.set_attributes(self._request_attributes(rec))
            if rec.first_output_ns:
                root.add_event(sc.EVENT_LLMTRACE_FIRST_TOKEN, timestamp=rec.first_output_ns)
            self._build_decode(rec, root, itl)
        itl.extend(rec.gaps)
        ph = phases(tl)
        record = RequestRecord(
            source=SOURCE_LLMTRACE, trace_id=f"{rec.trace_id:032x}",
            request_id=rec.request_id, model=rec.model, tenant=rec.tenant,
            version=self.config.deployment_version, finish_reason=rec.finish_reason,
            error_type=rec.error_type, start_ns=tl.read_ns, end_ns=tl.end_ns, e2e_s=ph.e2e_s,
            prompt_tokens=rec.prompt_tokens, cached_tokens=rec.cached_tokens,
            cached_external_tokens=rec.cached_external,
            output_tokens=rec.output_tokens,
            preemptions=sum(1 for kind, _ in tl.events if kind == PREEMPTED),
            itl=itl if itl.count else None)
        record.set_phases(ph)
        if rec.generation is not None:
            record.generation_chunk, record.generation_gap_s = rec.generation
        self.quality.on_record(rec, record)
        if rec.dp is not None:
            record.dp_rank, record.dp_reason = rec.dp.rank, rec.dp.reason
            record.dp_load_imbalance = rec.dp.load_imbalance
            if root is not None:
                self.telemetry.child_span(sc.SPAN_LLMTRACE_ROUTE_DP, root, rec.dp.start_ns,
                                          route_attributes(rec.dp)).end(end_time=rec.dp.end_ns)
        prices = self.telemetry.prices
        if prices is not None:
            price_request(record, prices)
        if root is not None:
            self._end_span(rec, root, record, ph)
        if self.config.metrics_enabled:
            context = None
            if rec.sampled and self.config.exemplars:  # buckets link to this trace
                context = set_span_in_context(NonRecordingSpan(SpanContext(
                    rec.trace_id, rec.span_id, False, TraceFlags(TraceFlags.SAMPLED))))
            self.telemetry.instruments.record_request(record, context)

    def _request_attributes(self, rec: RequestState) -> dict[str, Any]:
        info = rec.http
        attrs: dict[str, Any] = {
            sc.GEN_AI_OPERATION_NAME: info.operation if info else "text_completion",
            sc.GEN_AI_PROVIDER_NAME: "vllm",
            sc.GEN_AI_REQUEST_MODEL: rec.model,
            sc.LLMTRACE_REQUEST_ID: rec.request_id,
            sc.LLMTRACE_TENANT: rec.tenant,
            sc.LLMTRACE_DEPLOYMENT_VERSION: self.config.deployment_version,
            sc.GEN_AI_USAGE_INPUT_TOKENS: rec.prompt_tokens,
        }
        params = rec.params
        if params is not None:
            for key, value in (
                (sc.GEN_AI_REQUEST_MAX_TOKENS, params.max_tokens),
                (sc.GEN_AI_REQUEST_TEMPERATURE, params.temperature),
                (sc.GEN_AI_REQUEST_TOP_P, params.top_p),
                (sc.GEN_AI_REQUEST_TOP_K, params.top_k if params.top_k and params.top_k > 0
                 else None),
                (sc.GEN_AI_REQUEST_SEED, params.seed),
                (sc.GEN_AI_REQUEST_CHOICE_COUNT, params.n if params.n != 1 else None),
                (sc.GEN_AI_REQUEST_FREQUENCY_PENALTY, params.frequency_penalty or None),
                (sc.GEN_AI_REQUEST_PRESENCE_PENALTY, params.presence_penalty or None),
            ):
                if value is not None:
                    attrs[key] = value
        if rec.priority:
            attrs[sc.LLMTRACE_REQUEST_PRIORITY] = rec.priority
        if info is not None and info.continuation:
            attrs[sc.LLMTRACE_REQUEST_CONTINUATION] = True
        if rec.generation is not None:
            attrs[sc.LLMTRACE_GENERATION_CHUNK_INDEX], attrs[sc.LLMTRACE_GENERATION_GAP] = \
                rec.generation
        if rec.prompt is not None:  # capture_content only
            attrs[sc.GEN_AI_INPUT_MESSAGES] = json.dumps(
                [{"role": "user", "parts": [{"type": "text", "content": rec.prompt}]}])
        return attrs

    def _build_decode(self, rec: RequestState, root: Span, itl: Histogram) -> None:
        """The decode span, from the first token written to the last, and its chunks.

        Each chunk's gaps join the request's ITL in chunk order, exactly as the
        collector merges the chunk spans' bucket counts.
        """
        if not rec.chunks:
            return
        start = rec.timeline.first_token_ns  # finish() set it: where TTFT ends
        decode = self.telemetry.child_span(sc.SPAN_LLMTRACE_DECODE, root, start)
        for index, (chunk_start, end, tokens, gaps) in enumerate(rec.chunks):
            if index == 0:
                chunk_start = max(chunk_start, start)
            chunk = Histogram()
            chunk.extend(gaps)
            attrs: dict[str, Any] = {
                sc.LLMTRACE_DECODE_CHUNK_INDEX: index,
                sc.LLMTRACE_DECODE_CHUNK_TOKENS: tokens,
            }
            if chunk.count:
                attrs[sc.LLMTRACE_DECODE_CHUNK_ITL_MIN] = chunk.low
                attrs[sc.LLMTRACE_DECODE_CHUNK_ITL_MEAN] = chunk.total / chunk.count
                attrs[sc.LLMTRACE_DECODE_CHUNK_ITL_MAX] = chunk.high
                attrs[sc.LLMTRACE_DECODE_CHUNK_ITL_SUM] = chunk.total
                attrs[sc.LLMTRACE_DECODE_CHUNK_ITL_BUCKET_COUNTS] = chunk.counts
                itl.merge(chunk)
            self.telemetry.child_span(sc.SPAN_LLMTRACE_DECODE_CHUNK, decode, chunk_start,
                                      attrs).end(end_time=max(end, chunk_start))
        decode.set_attribute(sc.GEN_AI_USAGE_OUTPUT_TOKENS, rec.output_tokens)
        decode.end(end_time=rec.timeline.end_ns)

    def _end_span(self, rec: RequestState, root: Span, record: RequestRecord, ph) -> None:
        external = record.cached_external_tokens
        prefill_attrs = {sc.GEN_AI_USAGE_INPUT_TOKENS: record.prompt_tokens,
                         sc.LLMTRACE_PREFILL_CACHED_TOKENS:
                             max(0, record.cached_tokens - (external or 0))}
        if external:
            prefill_attrs[sc.LLMTRACE_PREFILL_EXTERNAL_CACHED_TOKENS] = external
        render_phases(self.telemetry, root, ph, prefill_attrs)
        attrs = record_attributes(record)
        if rec.gone:
            attrs[sc.LLMTRACE_REQUEST_CLIENT_DISCONNECTED] = True
        if record.error_type:
            root.set_status(Status(StatusCode.ERROR, rec.message or record.error_type))
        if rec.output_text is not None:  # capture_content only
            attrs[sc.GEN_AI_OUTPUT_MESSAGES] = json.dumps([{
                "role": "assistant", "parts": [{"type": "text", "content": rec.output_text}],
                "finish_reason": record.finish_reason}])
        root.set_attributes(attrs)
        root.end(end_time=record.end_ns)

    # -- hook bodies (guarded by install(), see the hook table) -----------------
    def before_add_request(self, instance, args, kwargs) -> RequestState | None:
        request = args[0] if args else kwargs["request"]
        prompt = args[1] if len(args) > 1 else kwargs.get("prompt")
        return self.begin(request, prompt)

    def after_add_request(self, instance, args, kwargs, result, rec) -> None:
        if rec is not None:
            rec.req_state = instance.request_states.get(rec.request_id)

    def after_process_outputs(self, instance, args, kwargs, result, token) -> None:
        outputs = args[0] if args else kwargs["engine_core_outputs"]
        ts = args[1] if len(args) > 1 else kwargs.get("engine_core_timestamp")
        self.on_outputs(outputs, ts)

    def after_abort_requests(self, instance, args, kwargs, aborted, token) -> None:
        if aborted:
            self.abort(list(aborted))

    def before_propagate_error(self, instance, args, kwargs) -> None:
        self.fail_all(args[0] if args else kwargs["e"])

    def after_async_llm_init(self, instance, args, kwargs, result, token) -> None:
        names = instance.model_config.served_model_name
        self.served_model = names[0] if isinstance(names, (list, tuple)) else str(names)
        observability = getattr(instance, "observability_config", None)
        self.vllm_tracing = bool(getattr(observability, "otlp_traces_endpoint", None))
        # Build providers and exporters now, not on the first request's path.
        _ = self.telemetry.tracer
        # vLLM's API server serves prometheus_client's default registry on /metrics;
        # the engine core, another process, opens OTEL_EXPORTER_PROMETHEUS_PORT.
        self.telemetry.metrics_served_by_host = True
        _ = self.telemetry.prices  # a bad price table warns at start-up
        self.quality.start(instance.model_config)
        if self.config.metrics_enabled:
            _ = self.telemetry.instruments

    def after_build_app(self, instance, args, kwargs, app, token) -> None:
        if getattr(app, "middleware_stack", None) is None:
            app.add_middleware(LlmtraceASGIMiddleware, tracer=self)
        else:
            # vLLM's app builds its middleware stack before returning (SageMaker
            # bootstrap), so Starlette refuses add_middleware: wrap the stack.
            app.middleware_stack = LlmtraceASGIMiddleware(app.middleware_stack, tracer=self)

    def http_info(self, scope: dict) -> HttpInfo | None:
        return http_info(scope, self._tenant_header,
                         self.config.tenant_for_api_key if self.config.tenant_api_keys else None,
                         self.config.max_label_length)

    def has_requests(self) -> bool:
        return bool(self.records)
