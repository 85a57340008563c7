"""The collector's OTLP receivers: gRPC (4317) and HTTP (4318) in front of one ``accept``.

Both transports only translate: they hand the payload's bytes, content type,
encoding and ``Authorization`` to :meth:`CollectorService.accept
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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


def grpc_receiver(service: CollectorService, endpoint: str) -> tuple[grpc.Server, int]:
    """Start the OTLP/gRPC trace service on ``endpoint``; returns the server and its port.

    The method handler takes and returns raw bytes (no (de)serializer): ``accept``
    decodes once, and keeps the original bytes for the forwarder.
    """

    def export(raw: bytes, context: grpc.ServicerContext) -> bytes:
        meta = dict(context.invocation_metadata() or ())
        try:
            service.accept(raw, "application/x-protobuf", None, meta.get("authorization"))
        except Refused as exc:
            code = (grpc.StatusCode.UNAVAILABLE if exc.retryable else
                    grpc.StatusCode.UNAUTHENTICATED if exc.reason == "unauthenticated" else
                    grpc.StatusCode.INVALID_ARGUMENT)
            context.abort(code, str(exc))
        return ExportTraceServiceResponse().SerializeToString()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=[
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


class BoundedHTTPServer(ThreadingHTTPServer):
    """The standard library's threading HTTP server with the limits a receiver needs:
    a real listen backlog, and a cap on connections (one thread each) beyond which
    new ones are closed at once and counted, instead of one thread per sender."""

    def __init__(self, address, handler, *, backlog: int, max_connections: int,
                 on_refused) -> None:
        self.request_queue_size = backlog  # read by server_activate()'s listen()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._on_refused = on_refused
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self._on_refused()
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


# -- HTTP --------------------------------------------------------------------------------


def ingest_handler(service: CollectorService) -> type[BaseHTTPRequestHandler]:
    """The OTLP/HTTP request handler: ``POST /v1/traces``, protobuf or JSON.

    The body is read only with a ``Content-Length`` within ``max_payload_bytes``
    (no chunked uploads), so one request cannot make the collector buffer more.
    """

    class Ingest(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        #: socket timeout for every read: a stalled sender loses its connection
        timeout = service.config.read_timeout_s

        def log_message(self, *args) -> None:
            pass

        def _reply(self, code: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:  # noqa: N802 - http.server API
            path = self.path.split("?")[0]
            declared = self.headers.get("Content-Length")
            if declared is None:  # chunked uploads are not supported
                service.rejected.labels("malformed").inc()
                self.close_connection = True
                self._reply(411, b"Content-Length is required", "text/plain")
                return
            try:
                length = int(declared)
            except ValueError:
                length = -1
            if length < 0 or length > service.config.max_payload_bytes:
                service.rejected.labels("too_large").inc()
                self.close_connection = True
                self._reply(413, b"missing or too large Content-Length", "text/plain")
                return
            try:
                body = self.rfile.read(length)
            except TimeoutError:
                body = b""
            if len(body) < length:  # the sender stalled or went away mid-body
                service.rejected.labels("timeout").inc()
                self.close_connection = True
                self._reply(408, b"request body incomplete: timed out or connection "
                                 b"closed", "text/plain")
                return
            if path != "/v1/traces":
                self._reply(404, f"{path}: only /v1/traces is accepted".encode(), "text/plain")
                return
            ctype = self.headers.get("Content-Type") or "application/x-protobuf"
            try:
                service.accept(body, ctype, self.headers.get("Content-Encoding"),
                               self.headers.get("Authorization"))
            except Refused as exc:
                code = 503 if exc.retryable else 401 if exc.reason == "unauthenticated" \
                    else 413 if exc.reason == "too_large" else 400
                extra = {"Retry-After": "1"} if exc.retryable else None
                self._reply(code, f"{exc}\n".encode(), "text/plain", extra)
                return
            if ctype.split(";")[0].strip() == "application/json":
                self._reply(200, b"{}", "application/json")
            else:
                self._reply(200, ExportTraceServiceResponse().SerializeToString(),
                            "application/x-protobuf")

    return Ingest
