"""The collector's OTLP receivers' shared rules, and the gRPC (4317) receiver.

Both transports (HTTP, 4318, is in :mod:`.asgi`) only translate: they hand the
payload's bytes, content type, encoding and ``Authorization`` to :meth:`CollectorService.accept
<llmtrace.collector.service.CollectorService.accept>`, which decodes, checks and
enqueues it, and map its :class:`Refused` to the transport's answer. A retryable
refusal (backpressure, shutdown) becomes gRPC ``UNAVAILABLE`` or HTTP 503 with
``Retry-After`` so OTLP exporters retry; the sender's own faults become
``UNAUTHENTICATED`` / ``INVALID_ARGUMENT`` or 401 / 413 / 400.
"""

from __future__ import annotations

import hmac
import threading
from concurrent import futures
from typing import TYPE_CHECKING

import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from llmtrace.collector.otlp import TRACE_SERVICE

if TYPE_CHECKING:
    from llmtrace.collector.service import CollectorService


class Refused(Exception):
    """An ingest refusal: ``retryable`` ones are backpressure, the rest the sender's fault."""

    def __init__(self, reason: str, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.retryable = retryable


def check_bearer(token: str | None, header: str | None) -> None:
    """Refuse unless ``header`` is ``Bearer <token>`` (constant-time); no token: all pass.

    The scheme is matched case-insensitively, as HTTP authentication schemes are
    (RFC 9110); the token itself exactly."""
    if not token:
        return
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
        raise Refused("unauthenticated", "missing or wrong bearer token")


# -- gRPC --------------------------------------------------------------------------------

_handler = threading.local()  # ``reached`` is set once a call's message got to ``export``


class _CallPool(futures.ThreadPoolExecutor):
    """The pool gRPC runs each call on, counting calls that never reach the handler.

    gRPC refuses a message over ``grpc.max_receive_message_length`` before any
    Python code sees it, and offers no hook for that; but the call's job still
    runs on this pool and ends without calling the handler. Such calls (a
    message over ``max_payload_bytes``, in practice; or a sender that gave up
    before its message arrived) are counted as ``grpc_refused``, as HTTP counts
    its 413s and 408s."""

    def __init__(self, max_workers: int, on_refused) -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix="llmtrace-grpc")
        self._on_refused = on_refused

    def submit(self, fn, /, *args, **kwargs):
        def call():
            _handler.reached = False
            try:
                return fn(*args, **kwargs)
            finally:
                if not _handler.reached:
                    self._on_refused()

        return super().submit(call)



def grpc_receiver(service: CollectorService, endpoint: str) -> tuple[grpc.Server, int]:
    """Start the OTLP/gRPC trace service on ``endpoint``; returns the server and its port.

    The method handler takes and returns raw bytes (no (de)serializer): ``accept``
    decodes once, and keeps the original bytes for the forwarder.
    """

    def export(raw: bytes, context: grpc.ServicerContext) -> bytes:
        _handler.reached = True
        meta = dict(context.invocation_metadata() or ())
        try:
            service.accept(raw, "application/x-protobuf", None, meta.get("authorization"))
        except Refused as exc:
            code = (grpc.StatusCode.UNAVAILABLE if exc.retryable else
                    grpc.StatusCode.UNAUTHENTICATED if exc.reason == "unauthenticated" else
                    grpc.StatusCode.INVALID_ARGUMENT)
            context.abort(code, str(exc))
        return ExportTraceServiceResponse().SerializeToString()

    pool = _CallPool(8, lambda: service.rejected.labels("grpc_refused").inc())
    server = grpc.server(pool, options=[
        ("grpc.max_receive_message_length", service.config.max_payload_bytes),
        # gRPC sets SO_REUSEPORT by default: a second collector on the same port would
        # silently take half the traffic and break trace assembly. Refuse instead.
        ("grpc.so_reuseport", 0)])
    handler = grpc.unary_unary_rpc_method_handler(
        export, request_deserializer=None, response_serializer=None)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        TRACE_SERVICE, {"Export": handler}),))
    try:
        port = server.add_insecure_port(endpoint)
    except RuntimeError as exc:  # grpc's way of saying the bind failed
        raise OSError(f"cannot listen for OTLP/gRPC on {endpoint}: {exc} (is another "
                      "collector or process using that port?)") from exc
    if port == 0:  # older grpc returns 0 instead of raising
        raise OSError(f"cannot listen for OTLP/gRPC on {endpoint} (is another collector "
                      "or process using that port?)")
    server.start()
    return server, port
