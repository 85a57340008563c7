"""Record -> spans: the request span's breakdown attributes and its phase spans.

Rendered from the same :class:`~llmtrace.record.Phases` the metrics read, so a
phase span shows exactly the interval its attribute and histogram report:
preprocess, queue, prefill (split by preemptions), first-token delivery, and
each preemption with its re-queue.
"""

from __future__ import annotations

from typing import Any

from opentelemetry.trace import Span

from llmtrace import semconv as sc
from llmtrace.record import LATENCY_ATTRIBUTES, Phases, RequestRecord

_PHASE_SPANS = {
    "preprocess": sc.SPAN_LLMTRACE_PREPROCESS,
    "queue": sc.SPAN_LLMTRACE_QUEUE,
    "prefill": sc.SPAN_LLMTRACE_PREFILL,
    "first_token_delivery": sc.SPAN_LLMTRACE_FIRST_TOKEN_DELIVERY,
}
_LATENCY_ATTRIBUTES = {
    **LATENCY_ATTRIBUTES,
    sc.LLMTRACE_LATENCY_E2E: "e2e_s",
    sc.LLMTRACE_LATENCY_TIME_PER_OUTPUT_TOKEN: "tpot_s",
}


def record_attributes(record: RequestRecord) -> dict[str, Any]:
    """The request span's attributes that carry the record (read back by the pipeline)."""
    attrs: dict[str, Any] = {
        sc.GEN_AI_USAGE_OUTPUT_TOKENS: record.output_tokens,
        sc.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: record.cached_tokens,
        sc.GEN_AI_RESPONSE_FINISH_REASONS: (record.finish_reason,),
        sc.GEN_AI_RESPONSE_MODEL: record.model,
        sc.LLMTRACE_REQUEST_FINISH_REASON: record.finish_reason,
        sc.LLMTRACE_REQUEST_PREEMPTIONS: record.preemptions,
    }
    for key, field in _LATENCY_ATTRIBUTES.items():
        value = getattr(record, field)
        if value is not None:
            attrs[key] = value
    if record.usd is not None:
        attrs[sc.LLMTRACE_COST_USD] = record.usd
    if record.error_type:
        attrs[sc.ERROR_TYPE] = record.error_type
    if record.cached_external_tokens is not None:
        attrs[sc.LLMTRACE_PREFILL_EXTERNAL_CACHED_TOKENS] = record.cached_external_tokens
    if record.output_entropy is not None:
        attrs[sc.LLMTRACE_OUTPUT_ENTROPY] = record.output_entropy
    if record.regeneration:
        attrs[sc.LLMTRACE_REQUEST_REGENERATION] = True
    if record.dp_rank is not None:
        attrs[sc.LLMTRACE_ENGINE_INDEX] = record.dp_rank
        attrs[sc.LLMTRACE_DP_REASON] = record.dp_reason  # set with the rank, always
        if record.dp_load_imbalance is not None:
            attrs[sc.LLMTRACE_DP_LOAD_IMBALANCE] = record.dp_load_imbalance
    return attrs


def render_phases(telemetry, root: Span, phases: Phases,
                  prefill_attributes: dict[str, Any] | None = None) -> None:
    """Emit the phase spans of one sampled request under its root span."""
    preemptions = {(p.start_ns, p.end_ns): None for p in phases.preemptions}
    for seg in phases.tiles:
        if seg.phase == "queue" and seg.reason == "preemption" and \
                (seg.start_ns, seg.end_ns) in preemptions:
            continue  # drawn inside its preemption span below
        attrs = {sc.LLMTRACE_QUEUE_REASON: seg.reason} if seg.phase == "queue" else \
            prefill_attributes if seg.phase == "prefill" else None
        telemetry.child_span(_PHASE_SPANS[seg.phase], root, seg.start_ns,
                             attrs).end(end_time=seg.end_ns)
    for p in phases.preemptions:
        span = telemetry.child_span(sc.SPAN_LLMTRACE_PREEMPTION, root, p.start_ns,
                                    {sc.LLMTRACE_PREEMPTION_REASON: "kv_cache_full"})
        telemetry.child_span(sc.SPAN_LLMTRACE_QUEUE, span, p.start_ns,
                             {sc.LLMTRACE_QUEUE_REASON: "preemption"}).end(end_time=p.end_ns)
        span.end(end_time=p.end_ns)
