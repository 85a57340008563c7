"""Decoding and checking OTLP trace payloads, shared by the collector and the test receiver.

OTLP/HTTP carries protobuf or JSON (with hex ids), optionally gzip- or
deflate-compressed; gRPC carries protobuf. Either way a payload that cannot
be decoded, or whose spans have ids of the wrong length, is refused as a
whole with a message naming the problem: the sender gets a 4xx (or
INVALID_ARGUMENT) and every other payload is unaffected.
"""

from __future__ import annotations

import base64
import gzip
import json
import zlib
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

M = TypeVar("M", bound=Message)
#: the OTLP trace service: what the collector serves and what it forwards to
TRACE_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
EXPORT_PATH = f"/{TRACE_SERVICE}/Export"
_ID_FIELDS = ("traceId", "spanId", "parentSpanId")
#: largest decompressed payload accepted (a zip bomb must not exhaust memory)
MAX_DECODED_BYTES = 64 * 1024 * 1024


class OTLPError(ValueError):
    """A payload that cannot be accepted; the message names the problem."""


def _hex_ids_to_base64(node: Any) -> Any:
    """OTLP/JSON writes trace and span ids as hex; protobuf's JSON mapping expects base64."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k in _ID_FIELDS and isinstance(v, str):
                try:
                    out[k] = base64.b64encode(bytes.fromhex(v)).decode()
                except ValueError as exc:
                    raise OTLPError(f"{k} {v[:40]!r} is not hex") from exc
            else:
                out[k] = _hex_ids_to_base64(v)
        return out
    if isinstance(node, list):
        return [_hex_ids_to_base64(v) for v in node]
    return node


def decompress(body: bytes, encoding: str | None) -> bytes:
    encoding = (encoding or "").strip().lower()
    try:
        if encoding == "gzip":
            d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            d = zlib.decompressobj()
        elif encoding in ("", "identity"):
            return body
        else:
            raise OTLPError(f"unsupported Content-Encoding {encoding!r} (use gzip or deflate)")
        parts: list[bytes] = []
        size = 0
        while True:  # gzip allows several members back to back
            # one byte past the bound: never 0, which zlib reads as "no limit"
            out = d.decompress(body, MAX_DECODED_BYTES - size + 1)
            size += len(out)
            parts.append(out)
            if size > MAX_DECODED_BYTES or d.unconsumed_tail:
                raise OTLPError(f"payload decompresses to more than {MAX_DECODED_BYTES} bytes")
            if not d.eof:  # a cut-off stream must not pass as a shorter payload
                raise OTLPError(f"bad {encoding} body: compressed stream is truncated")
            body = d.unused_data
            if not body:
                return b"".join(parts)
            if encoding != "gzip":
                raise OTLPError(f"bad {encoding} body: {len(body)} bytes after the end of "
                                "the compressed stream")
            d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    except (zlib.error, gzip.BadGzipFile, EOFError) as exc:
        raise OTLPError(f"bad {encoding} body: {exc}") from exc


def decode(message: type[M], body: bytes, content_type: str | None = None,
           encoding: str | None = None) -> M:
    """Decode an OTLP/HTTP body (protobuf or JSON, maybe compressed) into ``message``."""
    raw = decompress(body, encoding)
    ctype = (content_type or "application/x-protobuf").split(";")[0].strip().lower()
    msg = message()
    try:
        if ctype == "application/json":
            # OTLP/JSON receivers must ignore fields they do not know (newer senders)
            json_format.ParseDict(_hex_ids_to_base64(json.loads(raw)), msg,
                                  ignore_unknown_fields=True)
        elif ctype in ("application/x-protobuf", "application/protobuf"):
            msg.ParseFromString(raw)
        else:
            raise OTLPError(f"unsupported Content-Type {ctype!r} "
                            "(use application/x-protobuf or application/json)")
    except OTLPError:
        raise
    except (DecodeError, json_format.ParseError, ValueError, TypeError, RecursionError) as exc:
        kind = "JSON" if ctype == "application/json" else "protobuf"
        raise OTLPError(f"malformed OTLP {kind}: {exc}") from exc
    return msg


def check_traces(request: ExportTraceServiceRequest) -> int:
    """Validate span ids; return the number of spans. Raises OTLPError naming the span."""
    count = 0
    for r, rs in enumerate(request.resource_spans):
        for s, ss in enumerate(rs.scope_spans):
            for i, span in enumerate(ss.spans):
                where = f"resource_spans[{r}].scope_spans[{s}].spans[{i}]"
                if len(span.trace_id) != 16 or span.trace_id == b"\0" * 16:
                    raise OTLPError(f"{where}: trace_id must be 16 non-zero bytes, "
                                    f"got {len(span.trace_id)}")
                if len(span.span_id) != 8 or span.span_id == b"\0" * 8:
                    raise OTLPError(f"{where}: span_id must be 8 non-zero bytes, "
                                    f"got {len(span.span_id)}")
                if span.parent_span_id and len(span.parent_span_id) != 8:
                    raise OTLPError(f"{where}: parent_span_id must be empty or 8 bytes, "
                                    f"got {len(span.parent_span_id)}")
                count += 1
    return count


def decode_traces(body: bytes, content_type: str | None = None,
                  encoding: str | None = None) -> tuple[ExportTraceServiceRequest, int]:
    """Decode and validate a trace export; returns the request and its span count."""
    request = decode(ExportTraceServiceRequest, body, content_type, encoding)
    return request, check_traces(request)
