"""Where converted profile spans go: an OTLP endpoint, or an OTLP JSON file.

Spans are the SDK's ``ReadableSpan`` with explicit ids, so both outputs use the
OpenTelemetry exporter's own protobuf encoding: the OTLP exporters (gRPC or
HTTP/protobuf, chosen and configured exactly as for llmtrace's serving-side
spans: ``--endpoint``/``LLMTRACE_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_*``
endpoint, protocol, headers, TLS, timeout), and the same encoder's message
written as OTLP JSON (one ``ExportTraceServiceRequest`` per line, the format of
the Collector's file exporter and ``otlpjsonfile`` receiver).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import IO

from google.protobuf import json_format
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult

#: the SDK's default batch (OTEL_BSP_MAX_EXPORT_BATCH_SIZE): requests of a size every
#: receiver accepts
BATCH = 512
_ID_KEYS = ("traceId", "spanId", "parentSpanId")


class ExportError(RuntimeError):
    """The endpoint did not take the spans; the message names it."""


def otlp_json(spans: Sequence[ReadableSpan]) -> str:
    """The spans as one OTLP/JSON request: ids in hex, as the OTLP spec requires
    (protobuf's own JSON mapping would write them in base64)."""
    doc = json_format.MessageToDict(encode_spans(spans))
    for rs in doc.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for span in ss.get("spans", []):
                for item in (span, *span.get("links", [])):
                    for key in _ID_KEYS:
                        if item.get(key):
                            item[key] = _b64_to_hex(item[key])
    return json.dumps(doc, separators=(",", ":"))


def _b64_to_hex(value: str) -> str:
    return base64.b64decode(value).hex()


def write_json(spans: Sequence[ReadableSpan], out: IO[str]) -> None:
    out.write(otlp_json(spans))
    out.write("\n")


def send(spans: Sequence[ReadableSpan], endpoint: str | None = None,
         protocol: str | None = None) -> str:
    """Export ``spans`` through the SDK's OTLP exporter; return where they went.

    Raises :class:`ExportError` when a batch is refused or the endpoint does not
    answer (after the exporter's own retries), and ``ConfigError`` for an
    invalid endpoint or protocol setting.
    """
    from llmtrace.config import load_config
    from llmtrace.telemetry import _endpoint_of, _otlp_exporter

    config = load_config(endpoint=endpoint, protocol=protocol)
    if endpoint:  # given on the command line: it beats a per-signal endpoint in the env
        config = config.model_copy(update={"traces_endpoint": None})
    exporter = _otlp_exporter(config, "traces")
    where = _endpoint_of(exporter)
    try:
        for start in range(0, len(spans), BATCH):
            if exporter.export(spans[start:start + BATCH]) is not SpanExportResult.SUCCESS:
                raise ExportError(f"the OTLP endpoint {where} did not take the spans "
                                  f"({start} of {len(spans)} sent)")
    finally:
        exporter.shutdown()
    return where
