"""API-server side of the vLLM instrumentation: the request root span, decode
chunks and the per-request metrics.

Where the data comes from (cheapest source that keeps it true):
- HTTP arrival, incoming ``traceparent`` and tenant: an ASGI middleware added
  to vLLM's app (earliest point a request exists);
- request parameters and prompt length: ``OutputProcessor.add_request``;
- token arrival, first token, finish: ``OutputProcessor.process_outputs``
  (one dict lookup and a few integer updates per output on the hot path);
- queue / prefill / decode times for metrics: vLLM's own per-request stats;
- aborts and engine death: ``abort_requests`` and ``propagate_error``;
- client disconnects: the middleware sees ``http.disconnect``. vLLM aborts the
  request only once its stream generator is closed, which can be late or, if
  the generator is left to the garbage collector, never; a request that
  finishes after its client left is marked ``client_disconnected``.

The root span's context rides to the engine core in ``trace_headers`` under
:data:`CONTEXT_HEADER` (vLLM forwards its own ``traceparent`` only when its
tracing flag is set); the engine core hangs queue, prefill and preemption
spans under it.
"""

from __future__ import annotations

import contextvars
import json
import time
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from llmtrace import semconv as sc
from llmtrace.config import Config
from llmtrace.telemetry import Telemetry
from llmtrace.telemetry.guard import HookGuard
from llmtrace.telemetry.metrics import RequestMetrics

CONTEXT_HEADER = "llmtrace-traceparent"
#: trace_headers key carrying the tenant to the engine core (cost attribution)
TENANT_HEADER = "llmtrace-tenant"
#: ASGI scope key holding the time the request's bytes reached the HTTP server.
ARRIVAL_KEY = "llmtrace.arrival_ns"
_PROPAGATOR = TraceContextTextMapPropagator()
_OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
    "/v1/responses": "chat",
}
_FINISH = {"stop": "stop", "length": "length", "abort": "abort", "error": "error",
           "repetition": "repetition"}


@dataclass
class HttpInfo:
    """What the ASGI middleware learned about one HTTP request."""

    arrival_ns: int
    operation: str
    parent: Context | None
    tenant: str
    streaming: bool = False
    first_body_ns: int = 0
    response_done: bool = False
    disconnected_ns: int = 0


_HTTP: contextvars.ContextVar[HttpInfo | None] = contextvars.ContextVar(
    "llmtrace_http", default=None)


@dataclass(eq=False)
class RequestRecord:
    """Hot-path state of one traced request: plain fields, no SDK calls per token."""

    request_id: str
    span: Span
    sampled: bool
    arrival_ns: int
    model: str
    tenant: str
    prompt_tokens: int
    http: HttpInfo | None
    req_state: Any = None
    first_ns: int = 0
    last_ns: int = 0
    output_tokens: int = 0
    itls: list[float] = field(default_factory=list)
    # decode chunk being accumulated
    decode_span: Span | None = None
    chunk_index: int = 0
    chunk_start_ns: int = 0
    chunk_tokens: int = 0
    chunk_itl_min: float = 0.0
    chunk_itl_max: float = 0.0
    chunk_itl_sum: float = 0.0
    chunk_gaps: int = 0


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


class FrontendTracer:
    """Owns the per-request records of one API-server process."""

    def __init__(self, config: Config, telemetry: Telemetry) -> None:
        self.config = config
        self.telemetry = telemetry
        self.records: dict[str, RequestRecord] = {}
        self.served_model = "unknown"
        self._measure = config.measure_overhead
        self._tenant_header = config.tenant_header.encode()
        self._chunk_tokens = config.decode_chunk_tokens
        self._chunk_ns = int(config.decode_chunk_ms * 1e6)

    # -- HTTP ingress ---------------------------------------------------------
    def http_info(self, scope: dict) -> HttpInfo | None:
        operation = _OPERATIONS.get(scope.get("path", ""))
        if operation is None:
            return None
        now = scope.get(ARRIVAL_KEY) or time.time_ns()
        headers = scope.get("headers") or []
        carrier = {}
        for key in (b"traceparent", b"tracestate"):
            value = _header(headers, key)
            if value:
                carrier[key.decode()] = value
        parent = _PROPAGATOR.extract(carrier) if carrier else None
        tenant = _header(headers, self._tenant_header)
        if tenant is None and self.config.tenant_api_keys:
            auth = _header(headers, b"authorization") or ""
            if auth.lower().startswith("bearer "):
                tenant = self.config.tenant_for_api_key(auth[7:].strip())
        return HttpInfo(now, operation, parent, tenant or "default")

    # -- request lifecycle -----------------------------------------------------
    def begin(self, request: Any, prompt: str | None = None) -> RequestRecord | None:
        rid = request.request_id
        if rid in self.records:
            return None  # a streaming-input update of a request we already follow
        info = _HTTP.get()
        arrival_ns = info.arrival_ns if info else int(request.arrival_time * 1e9)
        parent = info.parent if info else None
        if parent is None and request.trace_headers:
            parent = _PROPAGATOR.extract(dict(request.trace_headers))
        params = request.sampling_params
        prompt_ids = request.prompt_token_ids
        prompt_tokens = len(prompt_ids) if prompt_ids is not None else 0
        attrs: dict[str, Any] = {
            sc.GEN_AI_OPERATION_NAME: info.operation if info else "text_completion",
            sc.GEN_AI_PROVIDER_NAME: "vllm",
            sc.GEN_AI_REQUEST_MODEL: self.served_model,
            sc.LLMTRACE_REQUEST_ID: rid,
            sc.LLMTRACE_TENANT: info.tenant if info else "default",
            sc.LLMTRACE_DEPLOYMENT_VERSION: self.config.deployment_version,
            sc.GEN_AI_USAGE_INPUT_TOKENS: prompt_tokens,
        }
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
        if getattr(request, "priority", 0):
            attrs[sc.LLMTRACE_REQUEST_PRIORITY] = request.priority
        if self.config.capture_content and prompt is not None:  # opt-in only
            attrs[sc.GEN_AI_INPUT_MESSAGES] = json.dumps(
                [{"role": "user", "parts": [{"type": "text", "content": prompt}]}])
        span = self.telemetry.tracer.start_span(
            sc.SPAN_LLMTRACE_REQUEST, context=parent, kind=SpanKind.SERVER,
            attributes=attrs, start_time=arrival_ns)
        ctx = span.get_span_context()
        sampled = ctx.trace_flags.sampled
        headers = {**(request.trace_headers or {}), TENANT_HEADER: attrs[sc.LLMTRACE_TENANT]}
        if sampled:
            headers[CONTEXT_HEADER] = \
                f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"
        request.trace_headers = headers
        rec = RequestRecord(rid, span, sampled, arrival_ns, self.served_model,
                            attrs[sc.LLMTRACE_TENANT], prompt_tokens, info)
        self.records[rid] = rec
        return rec

    def on_outputs(self, outputs: list[Any]) -> None:
        """Per engine-output batch: the only per-token path, kept to plain arithmetic."""
        now = time.time_ns()
        records = self.records
        for out in outputs:
            rec = records.get(out.request_id)
            if rec is None:
                continue
            n = len(out.new_token_ids)
            if n:
                if rec.first_ns == 0:
                    rec.first_ns = now
                    if rec.sampled:
                        self._start_decode(rec, now)
                else:
                    gap = (now - rec.last_ns) / 1e9
                    rec.itls.append(gap)
                    if rec.sampled:
                        self._chunk_gap(rec, gap)
                rec.last_ns = now
                rec.output_tokens += n
                if rec.sampled:
                    rec.chunk_tokens += n
                    if rec.chunk_tokens >= self._chunk_tokens or \
                            now - rec.chunk_start_ns >= self._chunk_ns:
                        self._close_chunk(rec, now)
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

    # -- decode chunks ---------------------------------------------------------
    def _start_decode(self, rec: RequestRecord, now: int) -> None:
        rec.span.add_event(sc.EVENT_LLMTRACE_FIRST_TOKEN, timestamp=now)
        rec.decode_span = self.telemetry.child_span(sc.SPAN_LLMTRACE_DECODE, rec.span, now)
        rec.chunk_start_ns = now

    @staticmethod
    def _chunk_gap(rec: RequestRecord, gap: float) -> None:
        if rec.chunk_gaps == 0:
            rec.chunk_itl_min = rec.chunk_itl_max = gap
        elif gap < rec.chunk_itl_min:
            rec.chunk_itl_min = gap
        elif gap > rec.chunk_itl_max:
            rec.chunk_itl_max = gap
        rec.chunk_itl_sum += gap
        rec.chunk_gaps += 1

    def _close_chunk(self, rec: RequestRecord, now: int) -> None:
        if rec.decode_span is None or rec.chunk_tokens == 0:
            return
        attrs: dict[str, Any] = {
            sc.LLMTRACE_DECODE_CHUNK_INDEX: rec.chunk_index,
            sc.LLMTRACE_DECODE_CHUNK_TOKENS: rec.chunk_tokens,
        }
        if rec.chunk_gaps:
            attrs[sc.LLMTRACE_DECODE_CHUNK_ITL_MIN] = rec.chunk_itl_min
            attrs[sc.LLMTRACE_DECODE_CHUNK_ITL_MEAN] = rec.chunk_itl_sum / rec.chunk_gaps
            attrs[sc.LLMTRACE_DECODE_CHUNK_ITL_MAX] = rec.chunk_itl_max
        span = self.telemetry.child_span(sc.SPAN_LLMTRACE_DECODE_CHUNK, rec.decode_span,
                                         rec.chunk_start_ns, attrs)
        span.end(end_time=now)
        rec.chunk_index += 1
        rec.chunk_start_ns = now
        rec.chunk_tokens = rec.chunk_gaps = 0
        rec.chunk_itl_sum = 0.0

    # -- finish ----------------------------------------------------------------
    def finish(self, rec: RequestRecord, finish_reason: str, now: int,
               error_type: str | None = None, message: str | None = None) -> None:
        self.records.pop(rec.request_id, None)
        reason = _FINISH.get(finish_reason.lower(), finish_reason.lower())
        if reason in ("abort", "error") and error_type is None:
            error_type = "aborted" if reason == "abort" else "engine_error"
        gone = rec.http is not None and rec.http.disconnected_ns != 0
        if gone and error_type is None:
            error_type = "client_disconnected"  # ran to completion for nobody
        end = rec.last_ns if rec.last_ns and error_type is None else now
        first = rec.first_ns
        if first and rec.http is not None and rec.http.streaming and rec.http.first_body_ns:
            # streaming: the first token leaves the server with the first body chunk
            first = max(first, rec.http.first_body_ns)
        ttft = (first - rec.arrival_ns) / 1e9 if first else None
        stats = getattr(rec.req_state, "stats", None)
        queue = prefill = decode = None
        preemptions = 0
        if stats is not None and stats.scheduled_ts:
            queue = max(0.0, stats.scheduled_ts - stats.queued_ts)
            if stats.first_token_ts:
                prefill = max(0.0, stats.first_token_ts - stats.scheduled_ts)
                decode = max(0.0, stats.last_token_ts - stats.first_token_ts)
            preemptions = stats.num_preemptions
        cached = int(getattr(rec.req_state, "num_cached_tokens", 0) or 0)
        e2e = (end - rec.arrival_ns) / 1e9
        prices = self.telemetry.prices
        usd = prices.token_cost(rec.model, rec.prompt_tokens, cached, rec.output_tokens) \
            if prices is not None else None
        if rec.sampled:
            self._close_chunk(rec, end)
            if rec.decode_span is not None:
                rec.decode_span.set_attribute(sc.GEN_AI_USAGE_OUTPUT_TOKENS, rec.output_tokens)
                rec.decode_span.end(end_time=end)
            attrs: dict[str, Any] = {
                sc.GEN_AI_USAGE_OUTPUT_TOKENS: rec.output_tokens,
                sc.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: cached,
                sc.GEN_AI_RESPONSE_FINISH_REASONS: (reason,),
                sc.GEN_AI_RESPONSE_MODEL: rec.model,
                sc.LLMTRACE_REQUEST_FINISH_REASON: reason,
                sc.LLMTRACE_LATENCY_E2E: e2e,
                sc.LLMTRACE_REQUEST_PREEMPTIONS: preemptions,
            }
            for key, value in ((sc.LLMTRACE_LATENCY_TIME_TO_FIRST_TOKEN, ttft),
                               (sc.LLMTRACE_LATENCY_QUEUE, queue),
                               (sc.LLMTRACE_LATENCY_PREFILL, prefill),
                               (sc.LLMTRACE_LATENCY_DECODE, decode)):
                if value is not None:
                    attrs[key] = value
            if decode is not None and rec.output_tokens > 1:
                attrs[sc.LLMTRACE_LATENCY_TIME_PER_OUTPUT_TOKEN] = decode / (
                    rec.output_tokens - 1)
            if usd is not None:
                attrs[sc.LLMTRACE_COST_USD] = usd
            if gone:
                attrs[sc.LLMTRACE_REQUEST_CLIENT_DISCONNECTED] = True
            if error_type:
                attrs[sc.ERROR_TYPE] = error_type
                rec.span.set_status(Status(StatusCode.ERROR, message or error_type))
            if self.config.capture_content:  # opt-in only
                text = getattr(getattr(rec.req_state, "detokenizer", None), "output_text", None)
                if text is not None:
                    attrs[sc.GEN_AI_OUTPUT_MESSAGES] = json.dumps([{
                        "role": "assistant", "parts": [{"type": "text", "content": text}],
                        "finish_reason": reason}])
            rec.span.set_attributes(attrs)
            rec.span.end(end_time=end)
        if self.config.metrics_enabled:
            if prices is not None:
                self.telemetry.instruments.record_cost(
                    rec.model, rec.tenant, self.config.deployment_version, "price_table", usd)
            self.telemetry.instruments.record(RequestMetrics(
                model=rec.model, tenant=rec.tenant, version=self.config.deployment_version,
                finish_reason=reason, error_type=error_type, ttft=ttft, e2e=e2e, queue=queue,
                prefill=prefill, decode=decode, prompt_tokens=rec.prompt_tokens,
                cached_tokens=cached, output_tokens=rec.output_tokens,
                preemptions=preemptions, itls=rec.itls))

    # -- wrapt wrappers ----------------------------------------------------------
    def wrap_add_request(self, wrapped, instance, args, kwargs):
        rec = None
        with HookGuard("vllm.output_processor.add_request", self._measure) as g:
            if g.enabled:
                request = args[0] if args else kwargs["request"]
                prompt = args[1] if len(args) > 1 else kwargs.get("prompt")
                rec = self.begin(request, prompt)
        result = wrapped(*args, **kwargs)
        if rec is not None:
            with HookGuard("vllm.output_processor.add_request", self._measure):
                rec.req_state = instance.request_states.get(rec.request_id)
        return result

    def wrap_process_outputs(self, wrapped, instance, args, kwargs):
        result = wrapped(*args, **kwargs)
        if self.records:
            with HookGuard("vllm.output_processor.process_outputs", self._measure) as g:
                if g.enabled:
                    outputs = args[0] if args else kwargs["engine_core_outputs"]
                    self.on_outputs(outputs)
        return result

    def wrap_abort_requests(self, wrapped, instance, args, kwargs):
        aborted = wrapped(*args, **kwargs)
        if self.records and aborted:
            with HookGuard("vllm.output_processor.abort_requests", self._measure) as g:
                if g.enabled:
                    self.abort(list(aborted))
        return aborted

    def wrap_propagate_error(self, wrapped, instance, args, kwargs):
        if self.records:
            with HookGuard("vllm.output_processor.propagate_error", self._measure) as g:
                if g.enabled:
                    self.fail_all(args[0] if args else kwargs["e"])
        return wrapped(*args, **kwargs)

    def wrap_async_llm_init(self, wrapped, instance, args, kwargs):
        result = wrapped(*args, **kwargs)
        with HookGuard("vllm.async_llm.init", self._measure):
            names = instance.model_config.served_model_name
            self.served_model = names[0] if isinstance(names, (list, tuple)) else str(names)
            # Build providers and exporters now, not on the first request's path.
            _ = self.telemetry.tracer
            # vLLM's API server serves prometheus_client's default registry on /metrics;
            # the engine core, another process, opens OTEL_EXPORTER_PROMETHEUS_PORT.
            self.telemetry.metrics_served_by_host = True
            _ = self.telemetry.prices  # a bad price table warns at start-up
            if self.config.metrics_enabled:
                _ = self.telemetry.instruments
        return result

    def wrap_data_received(self, wrapped, instance, args, kwargs):
        """Stamp a new request's scope with the time its first bytes were read.

        The ASGI app only runs after the event loop gets round to it, which on a
        busy server is milliseconds after the bytes arrived; TTFT starts here.
        """
        now = time.time_ns()
        result = wrapped(*args, **kwargs)
        scope = getattr(instance, "scope", None)
        if scope is not None and ARRIVAL_KEY not in scope:
            scope[ARRIVAL_KEY] = now
        return result

    def wrap_build_app(self, wrapped, instance, args, kwargs):
        app = wrapped(*args, **kwargs)
        with HookGuard("vllm.api_server.build_app", self._measure):
            if getattr(app, "middleware_stack", None) is None:
                app.add_middleware(LlmtraceASGIMiddleware, tracer=self)
            else:
                # vLLM's app builds its middleware stack before returning (SageMaker
                # bootstrap), so Starlette refuses add_middleware: wrap the stack.
                app.middleware_stack = LlmtraceASGIMiddleware(app.middleware_stack, tracer=self)
        return app


class LlmtraceASGIMiddleware:
    """Timestamps HTTP arrival and reads ``traceparent`` and the tenant, before vLLM does."""

    def __init__(self, app, tracer: FrontendTracer) -> None:
        self.app = app
        self.tracer = tracer

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        info = None
        with HookGuard("vllm.api_server.middleware", self.tracer._measure) as g:
            if g.enabled:
                info = self.tracer.http_info(scope)
        if info is None:
            return await self.app(scope, receive, send)

        async def timed_send(message):
            kind = message.get("type")
            if kind == "http.response.body":
                if info.first_body_ns == 0 and message.get("body"):
                    info.first_body_ns = time.time_ns()
                if not message.get("more_body"):
                    info.response_done = True
            elif kind == "http.response.start":
                ctype = _header(message.get("headers") or [], b"content-type") or ""
                info.streaming = ctype.startswith("text/event-stream")
            await send(message)

        async def watched_receive():
            message = await receive()
            if message.get("type") == "http.disconnect" and not info.response_done:
                info.disconnected_ns = info.disconnected_ns or time.time_ns()
            return message

        token = _HTTP.set(info)
        try:
            return await self.app(scope, watched_receive, timed_send)
        finally:
            _HTTP.reset(token)
