"""The collector's HTTP side on uvicorn: the OTLP/HTTP ingest app, the admin app, the server.

The standard library's ``http.server`` gave one thread per connection, a
listen backlog of 5 and no timeouts; uvicorn gives an event loop (a stalled
sender costs a coroutine, not a thread), a real backlog, keep-alive timeouts
and bounded header sizes. What stays here is what only the collector knows:
the payload limit is enforced while the body streams in (chunked uploads
included), a body that does not arrive within ``read_timeout_s`` is answered
408, and requests beyond ``max_connections`` at once get 503 with
``Retry-After`` so OTLP exporters retry; each of those is counted in
``llmtrace_pipeline_rejected_payloads_total`` by reason. uvicorn's own
``limit_concurrency`` sits above that as a backstop on open connections
(idle keep-alive ones included); it answers 503 too, and logs it.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import TYPE_CHECKING

import uvicorn
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from llmtrace.collector.receivers import Refused

if TYPE_CHECKING:
    from llmtrace.collector.service import CollectorService

_OK_PROTOBUF = ExportTraceServiceResponse().SerializeToString()


async def _reply(send, code: int, body: bytes, ctype: str = "text/plain",
                 close: bool = False, retry_after: bool = False) -> None:
    headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode())]
    if close:  # the body was not (fully) read: this connection cannot carry another request
        headers.append((b"connection", b"close"))
    if retry_after:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    pass


async def _read_body(receive, limit: int) -> bytes | None:
    """The whole body, or ``None`` if the sender went away first; raises past ``limit``."""
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


def ingest_app(service: CollectorService):
    """``POST /v1/traces`` (OTLP/HTTP, protobuf or JSON) in front of ``service.accept``."""
    cfg = service.config
    rejected = service.rejected
    in_flight = 0

    async def app(scope, receive, send) -> None:
        nonlocal in_flight
        if scope["type"] != "http":
            return
        if in_flight >= cfg.max_connections:
            rejected.labels("too_many_connections").inc()
            await _reply(send, 503, b"too many concurrent requests; retry later\n",
                         close=True, retry_after=True)
            return
        in_flight += 1
        try:
            await _ingest(scope, receive, send)
        finally:
            in_flight -= 1

    async def _ingest(scope, receive, send) -> None:
        if scope["path"] != "/v1/traces" or scope["method"] != "POST":
            await _reply(send, 404 if scope["path"] != "/v1/traces" else 405,
                         f"{scope['method']} {scope['path']}: only POST /v1/traces is "
                         "accepted\n".encode(), close=True)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or
                                     int(declared) > cfg.max_payload_bytes):
            rejected.labels("too_large").inc()
            await _reply(send, 413, f"payload too large: Content-Length {declared[:32]} "
                         f"exceeds max_payload_bytes={cfg.max_payload_bytes}\n".encode(),
                         close=True)
            return
        try:
            async with asyncio.timeout(cfg.read_timeout_s):
                body = await _read_body(receive, cfg.max_payload_bytes)
        except _BodyTooLarge:
            rejected.labels("too_large").inc()
            await _reply(send, 413, "payload too large: body exceeds max_payload_bytes="
                         f"{cfg.max_payload_bytes}\n".encode(), close=True)
            return
        except TimeoutError:
            body = None
        if body is None:  # the sender stalled or went away mid-body
            rejected.labels("timeout").inc()
            await _reply(send, 408, b"request body incomplete: timed out or connection "
                         b"closed\n", close=True)
            return
        ctype = headers.get("content-type") or "application/x-protobuf"
        try:
            service.accept(body, ctype, headers.get("content-encoding"),
                           headers.get("authorization"))
        except Refused as exc:
            code = 503 if exc.retryable else 401 if exc.reason == "unauthenticated" \
                else 413 if exc.reason == "too_large" else 400
            await _reply(send, code, f"{exc}\n".encode(), retry_after=exc.retryable)
            return
        if ctype.split(";")[0].strip() == "application/json":
            await _reply(send, 200, b"{}", "application/json")
        else:
            await _reply(send, 200, _OK_PROTOBUF, "application/x-protobuf")

    return app


def admin_app(service: CollectorService):
    """``GET /metrics`` (the derived series and the collector's own) and ``/healthz``."""

    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/metrics":
            await _reply(send, 200, generate_latest(service.metrics.registry),
                         CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            code, status = service.health()
            await _reply(send, code, json.dumps(status).encode(), "application/json")
        else:
            await _reply(send, 404, b"try /metrics or /healthz\n")

    return app


class HTTPServer:
    """One uvicorn server on its own thread and event loop, bound before it starts.

    The socket is bound here, not by uvicorn, so a port in use is an ``OSError``
    naming the endpoint (uvicorn would log and exit the process) and port 0
    resolves to the real port at once."""

    def __init__(self, app, endpoint: str, kind: str, *, backlog: int,
                 max_connections: int, keep_alive_s: float = 5.0) -> None:
        host, _, port = endpoint.rpartition(":")
        host = (host or "0.0.0.0").strip("[]")
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # not SO_REUSEPORT
        try:
            sock.bind((host, int(port)))
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot listen for {kind} on {endpoint}: "
                          f"{exc.strerror or exc} (is another collector or process "
                          "using that port?)") from exc
        self.port = sock.getsockname()[1]
        self.kind = kind
        self._server = uvicorn.Server(uvicorn.Config(
            app, lifespan="off", access_log=False, log_config=None, log_level="warning",
            backlog=backlog, limit_concurrency=4 * max_connections,
            timeout_keep_alive=keep_alive_s, server_header=False))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name=f"llmtrace-{kind}", daemon=True)

    def start(self, timeout_s: float = 10.0) -> HTTPServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the {self.kind} HTTP server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout_s)
