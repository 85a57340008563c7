"""HTTP ingress of the API server: when a request's bytes were read, its trace context
and its tenant, before vLLM parses anything.

- ``data_received`` hooks on uvicorn's protocols stamp the ASGI scope with the
  time the request's first bytes were read (TTFT and the phase breakdown start
  there);
- an ASGI middleware added to vLLM's app reads ``traceparent``/``tracestate``
  and the tenant header (or an API-key mapping), times the first response body
  chunk (the first token, for a stream) and watches for client disconnects:
  vLLM aborts the request only once its stream generator is closed, which can
  be late or, if the generator is left to the garbage collector, never.
"""

from __future__ import annotations

import contextvars
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from llmtrace.record.labels import MAX_LABEL_LENGTH, clean_label
from llmtrace.telemetry.guard import HookGuard

#: ASGI scope key holding the time the request's bytes reached the HTTP server.
ARRIVAL_KEY = "llmtrace.arrival_ns"
_PROPAGATOR = TraceContextTextMapPropagator()
_OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
    "/v1/responses": "chat",
}


#: ``"continue_final_message": true`` in a JSON body
_CONTINUE = re.compile(rb'"continue_final_message"\s*:\s*true')


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
    #: the body asked to continue the final assistant message (a chunked generation)
    continuation: bool = False


#: the HTTP request being served (set by the middleware, read by the output hooks)
CURRENT: contextvars.ContextVar[HttpInfo | None] = contextvars.ContextVar(
    "llmtrace_http", default=None)


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    """A header's value; UTF-8 (what clients send for non-ASCII tenant names), with
    undecodable bytes replaced rather than read as latin-1 mojibake."""
    for key, value in headers:
        if key == name:
            return value.decode("utf-8", "replace")
    return None


def http_info(scope: dict, tenant_header: bytes,
              tenant_for_api_key: Callable[[str], str | None] | None,
              max_length: int = MAX_LABEL_LENGTH) -> HttpInfo | None:
    """What the middleware learns of one HTTP request; None for paths llmtrace skips."""
    operation = _OPERATIONS.get(scope.get("path", ""))
    if operation is None:
        return None
    now = scope.get(ARRIVAL_KEY) or time.time_ns()
    headers = scope.get("headers") or []
    carrier = {}
    for key in (b"traceparent", b"tracestate"):
        value = header(headers, key)
        if value:
            carrier[key.decode()] = value
    parent = _PROPAGATOR.extract(carrier) if carrier else None
    tenant = header(headers, tenant_header)
    if tenant is None and tenant_for_api_key is not None:
        auth = header(headers, b"authorization") or ""
        if auth.lower().startswith("bearer "):
            tenant = tenant_for_api_key(auth[7:].strip())
    # the tenant becomes a span attribute and a metric label: one cleaning rule for both
    return HttpInfo(now, operation, parent,
                    clean_label(tenant, max_length) if tenant else "default")


def before_data_received(instance, args, kwargs) -> int:
    """The time a request's bytes were read: the ASGI app only runs after the event
    loop gets round to it, on a busy server milliseconds later; TTFT starts here."""
    return time.time_ns()


def after_data_received(instance, args, kwargs, result, read_ns: int) -> None:
    scope = getattr(instance, "scope", None)
    if scope is not None and ARRIVAL_KEY not in scope:
        scope[ARRIVAL_KEY] = read_ns


class LlmtraceASGIMiddleware:
    """Timestamps HTTP arrival and reads ``traceparent`` and the tenant, before vLLM does."""

    def __init__(self, app, tracer) -> None:
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
                ctype = header(message.get("headers") or [], b"content-type") or ""
                info.streaming = ctype.startswith("text/event-stream")
            try:
                await send(message)
            except Exception:
                # the client is gone: the server may notice here first, not through
                # receive() (then the stream runs on for nobody until collected)
                info.disconnected_ns = info.disconnected_ns or time.time_ns()
                raise

        async def watched_receive():
            message = await receive()
            kind = message.get("type")
            if kind == "http.request":
                body = message.get("body")
                # a substring test in C first; a regex only where the key occurs
                if body and b"continue_final_message" in body and _CONTINUE.search(body):
                    info.continuation = True
            elif kind == "http.disconnect" and not info.response_done:
                info.disconnected_ns = info.disconnected_ns or time.time_ns()
            return message

        token = CURRENT.set(info)
        try:
            return await self.app(scope, watched_receive, timed_send)
        finally:
            CURRENT.reset(token)
