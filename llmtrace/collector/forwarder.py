"""Forwarding accepted spans, unchanged, to the downstream OTLP endpoint.

The collector derives metrics from spans but is not their store: the original
bytes go on to a trace backend (Tempo, Jaeger, another collector) over OTLP/gRPC.
That leg must never slow ingest or derivation, so it has its own queue, bounded
in spans, and its own thread. A payload that does not fit, or that the
downstream still refuses after the retries, is dropped for the downstream only
and counted (``forward_queue_full``, ``forward_failed``); derivation has it
already.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import grpc
from prometheus_client import Counter

from llmtrace.collector.config import CollectorConfig
from llmtrace.collector.otlp import EXPORT_PATH

#: downstream answers worth another attempt (backpressure, restarts, slowness)
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                       grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED})


class Forwarder:
    """A bounded queue of serialized payloads and the thread that exports them.

    ``dropped`` is the collector's dropped-spans counter (labelled by reason);
    ``draining`` says the collector is stopping, so a failed export is dropped at
    once instead of retried.
    """

    def __init__(self, config: CollectorConfig, dropped: Counter,
                 draining: Callable[[], bool]) -> None:
        self.config = config
        self._dropped = dropped
        self._draining = draining
        self._queue: queue.Queue[tuple[bytes, int] | None] = queue.Queue()
        self._lock = threading.Lock()  # guards queued_spans
        self.queued_spans = 0

    def offer(self, raw: bytes, spans: int) -> bool:
        """Queue one payload of ``spans`` spans without blocking; False (counted) if full."""
        with self._lock:
            if self.queued_spans + spans > self.config.forward_queue_spans:
                self._dropped.labels("forward_queue_full").inc(spans)
                return False
            self.queued_spans += spans
            self._queue.put((raw, spans))
        return True

    def close(self) -> None:
        """Let the thread export what is queued, then end."""
        self._queue.put(None)

    def run(self) -> None:
        """Thread body: export each payload, with retries for retryable failures."""
        cfg = self.config
        scheme, _, target = cfg.forward_endpoint.rpartition("://")
        secure = scheme == "https" or (not scheme and not cfg.forward_insecure)
        channel = (grpc.secure_channel(target, grpc.ssl_channel_credentials()) if secure
                   else grpc.insecure_channel(target))
        export = channel.unary_unary(EXPORT_PATH, request_serializer=None,
                                     response_deserializer=None)
        metadata = tuple((k.lower(), v) for k, v in cfg.forward_headers.items())
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                raw, n = item
                try:
                    self._export(export, raw, n, metadata)
                finally:
                    with self._lock:
                        self.queued_spans -= n
        finally:
            channel.close()

    def _export(self, export, raw: bytes, n: int, metadata) -> None:
        cfg = self.config
        for attempt in range(cfg.forward_retries + 1):
            try:
                export(raw, timeout=cfg.forward_timeout_s, metadata=metadata)
                return
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                if code not in RETRYABLE or attempt == cfg.forward_retries or self._draining():
                    self._dropped.labels("forward_failed").inc(n)
                    return
                time.sleep(min(0.2 * 2 ** attempt, 2.0))
