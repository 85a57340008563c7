"""Input: llmtrace's own spans (the SDK's request root, decode chunks, engine usage).

The request span carries the record's durations as ``llmtrace.latency.*``
attributes (computed once, at the source, by ``llmtrace.record.timeline``),
so the record is read back, not recomputed; each decode chunk carries its
inter-token gaps as bucket counts and a sum, so the ITL histogram is rebuilt
exactly.
"""

from __future__ import annotations

from collections.abc import Iterable

from llmtrace import semconv as sc
from llmtrace.pipeline.inputs._values import count, num
from llmtrace.pipeline.view import SpanView
from llmtrace.record import (
    LATENCY_ATTRIBUTES,
    SOURCE_LLMTRACE,
    UNKNOWN,
    Histogram,
    RequestRecord,
    TransferRecord,
    UsageRecord,
)

COUNTS = {
    "prompt_tokens": sc.GEN_AI_USAGE_INPUT_TOKENS,
    "output_tokens": sc.GEN_AI_USAGE_OUTPUT_TOKENS,
    "cached_tokens": sc.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS,
    "preemptions": sc.LLMTRACE_REQUEST_PREEMPTIONS,
}
_CHUNK_KEYS = frozenset({
    sc.LLMTRACE_DECODE_CHUNK_INDEX, sc.LLMTRACE_DECODE_CHUNK_TOKENS,
    sc.LLMTRACE_DECODE_CHUNK_ITL_MIN, sc.LLMTRACE_DECODE_CHUNK_ITL_MAX,
    sc.LLMTRACE_DECODE_CHUNK_ITL_SUM, sc.LLMTRACE_DECODE_CHUNK_ITL_BUCKET_COUNTS,
})

#: span name -> attribute keys this input reads from it
WANTED: dict[str, frozenset[str]] = {
    sc.SPAN_LLMTRACE_REQUEST: frozenset({
        sc.GEN_AI_REQUEST_MODEL, sc.GEN_AI_RESPONSE_MODEL, sc.LLMTRACE_TENANT,
        sc.LLMTRACE_DEPLOYMENT_VERSION, sc.LLMTRACE_REQUEST_ID,
        sc.LLMTRACE_REQUEST_FINISH_REASON, sc.ERROR_TYPE, sc.LLMTRACE_LATENCY_E2E,
        sc.LLMTRACE_ENGINE_INDEX, sc.LLMTRACE_DP_REASON, sc.LLMTRACE_DP_LOAD_IMBALANCE,
        sc.LLMTRACE_PREFILL_EXTERNAL_CACHED_TOKENS,
        sc.LLMTRACE_GENERATION_CHUNK_INDEX, sc.LLMTRACE_GENERATION_GAP,
        sc.LLMTRACE_OUTPUT_ENTROPY, sc.LLMTRACE_REQUEST_REGENERATION,
        *LATENCY_ATTRIBUTES, *COUNTS.values(),
    }),
    sc.SPAN_LLMTRACE_DECODE_CHUNK: _CHUNK_KEYS,
    sc.SPAN_LLMTRACE_DECODE: frozenset(),  # links decode chunks to their request
    sc.SPAN_LLMTRACE_ENGINE_REQUEST: frozenset({
        sc.LLMTRACE_COST_ACCELERATOR_SECONDS, sc.LLMTRACE_ENGINE_STEPS,
        sc.LLMTRACE_REQUEST_HOL_BLOCKING,
        sc.GEN_AI_REQUEST_MODEL, sc.LLMTRACE_TENANT, sc.LLMTRACE_DEPLOYMENT_VERSION,
    }),
    sc.SPAN_LLMTRACE_KV_TRANSFER: frozenset({
        sc.LLMTRACE_KV_TRANSFER_CONNECTOR, sc.LLMTRACE_KV_TRANSFER_DIRECTION,
        sc.LLMTRACE_KV_TRANSFER_BLOCKS, sc.LLMTRACE_KV_TRANSFER_BYTES,
        sc.LLMTRACE_KV_TRANSFER_TOKENS, sc.LLMTRACE_KV_TRANSFER_PEER_REQUEST_ID,
        sc.ERROR_TYPE, sc.GEN_AI_REQUEST_MODEL, sc.LLMTRACE_DEPLOYMENT_VERSION,
    }),
}
ROOT = sc.SPAN_LLMTRACE_REQUEST
USAGE = sc.SPAN_LLMTRACE_ENGINE_REQUEST
TRANSFER = sc.SPAN_LLMTRACE_KV_TRANSFER


def _version(attrs: dict, resource: dict) -> str:
    return str(attrs.get(sc.LLMTRACE_DEPLOYMENT_VERSION) or resource.get("service.version")
               or UNKNOWN)


def request_record(root: SpanView, children: Iterable[SpanView] = ()) -> RequestRecord:
    """The request's record from its root span and its decode chunks."""
    a, res = root.attributes, root.resource or {}
    record = RequestRecord(
        source=SOURCE_LLMTRACE, trace_id=root.trace_id.hex(),
        request_id=str(a.get(sc.LLMTRACE_REQUEST_ID, "")),
        model=str(a.get(sc.GEN_AI_REQUEST_MODEL) or a.get(sc.GEN_AI_RESPONSE_MODEL) or UNKNOWN),
        tenant=str(a.get(sc.LLMTRACE_TENANT, "default")), version=_version(a, res),
        finish_reason=str(a.get(sc.LLMTRACE_REQUEST_FINISH_REASON, UNKNOWN)),
        error_type=str(a[sc.ERROR_TYPE]) if a.get(sc.ERROR_TYPE) else None,
        start_ns=root.start_ns, end_ns=root.end_ns,
        e2e_s=num(a, sc.LLMTRACE_LATENCY_E2E, (root.end_ns - root.start_ns) / 1e9),
        **{f: num(a, key) for key, f in LATENCY_ATTRIBUTES.items()},
        **{f: count(a, key) for f, key in COUNTS.items()})
    record.itl = itl_of(c for c in children if c.name == sc.SPAN_LLMTRACE_DECODE_CHUNK)
    if a.get(sc.LLMTRACE_PREFILL_EXTERNAL_CACHED_TOKENS) is not None:
        record.cached_external_tokens = count(a, sc.LLMTRACE_PREFILL_EXTERNAL_CACHED_TOKENS)
    rank = a.get(sc.LLMTRACE_ENGINE_INDEX)
    if rank is not None:  # data parallelism: the rank the API server chose, and why
        record.dp_rank = count(a, sc.LLMTRACE_ENGINE_INDEX)
        record.dp_reason = str(a.get(sc.LLMTRACE_DP_REASON) or "load_balanced")
        record.dp_load_imbalance = num(a, sc.LLMTRACE_DP_LOAD_IMBALANCE)
    if a.get(sc.LLMTRACE_GENERATION_CHUNK_INDEX) is not None:  # a chunked generation's
        record.generation_chunk = count(a, sc.LLMTRACE_GENERATION_CHUNK_INDEX)
        record.generation_gap_s = num(a, sc.LLMTRACE_GENERATION_GAP)
    record.output_entropy = num(a, sc.LLMTRACE_OUTPUT_ENTROPY)
    record.regeneration = a.get(sc.LLMTRACE_REQUEST_REGENERATION) is True
    return record


def itl_of(chunks: Iterable[SpanView]) -> Histogram | None:
    """Merge the decode chunks' ITL bucket counts in chunk order (as the SDK does)."""
    ordered = sorted(chunks, key=lambda c: num(c.attributes, sc.LLMTRACE_DECODE_CHUNK_INDEX, 0))
    hist = None
    for c in ordered:
        a = c.attributes
        counts = a.get(sc.LLMTRACE_DECODE_CHUNK_ITL_BUCKET_COUNTS)
        if not counts:
            continue
        try:
            part = Histogram.from_counts(
                list(counts), num(a, sc.LLMTRACE_DECODE_CHUNK_ITL_SUM, 0.0),
                num(a, sc.LLMTRACE_DECODE_CHUNK_ITL_MIN), num(a, sc.LLMTRACE_DECODE_CHUNK_ITL_MAX))
        except ValueError:
            continue  # a malformed chunk loses its own gaps, nothing else
        if hist is None:
            hist = part
        else:
            hist.merge(part)
    return hist


def usage_record(span: SpanView) -> UsageRecord:
    """One request's batch-share accelerator time, from its engine-core span."""
    a, res = span.attributes, span.resource or {}
    instance = res.get(sc.LLMTRACE_COST_INSTANCE_TYPE)
    return UsageRecord(
        trace_id=span.trace_id.hex(), model=str(a.get(sc.GEN_AI_REQUEST_MODEL, UNKNOWN)),
        tenant=str(a.get(sc.LLMTRACE_TENANT, "default")), version=_version(a, res),
        instance_type=str(instance) if instance else None,
        accelerator_s=float(num(a, sc.LLMTRACE_COST_ACCELERATOR_SECONDS, 0.0)),
        steps=count(a, sc.LLMTRACE_ENGINE_STEPS),
        hol_s=num(a, sc.LLMTRACE_REQUEST_HOL_BLOCKING))


def transfer_record(span: SpanView) -> TransferRecord:
    """One request's KV transfer, from its ``llmtrace.kv_transfer`` span (its duration is
    the span's: the SDK computed both from the same timestamps)."""
    a, res = span.attributes, span.resource or {}
    error = a.get(sc.ERROR_TYPE)
    peer = a.get(sc.LLMTRACE_KV_TRANSFER_PEER_REQUEST_ID)
    return TransferRecord(
        trace_id=span.trace_id.hex(), model=str(a.get(sc.GEN_AI_REQUEST_MODEL, UNKNOWN)),
        version=_version(a, res),
        connector=str(a.get(sc.LLMTRACE_KV_TRANSFER_CONNECTOR, UNKNOWN)),
        direction=str(a.get(sc.LLMTRACE_KV_TRANSFER_DIRECTION, UNKNOWN)),
        duration_s=(span.end_ns - span.start_ns) / 1e9,
        blocks=count(a, sc.LLMTRACE_KV_TRANSFER_BLOCKS),
        bytes=count(a, sc.LLMTRACE_KV_TRANSFER_BYTES),
        tokens=count(a, sc.LLMTRACE_KV_TRANSFER_TOKENS),
        error_type=str(error) if error else None,
        start_ns=span.start_ns, end_ns=span.end_ns,
        peer_request_id=str(peer) if peer else None)
