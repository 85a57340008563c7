"""Input: vLLM's built-in ``llm_request`` span (``--otlp-traces-endpoint``).

Its definitions differ from llmtrace's, and the record says so
(``source="vllm_builtin"``, a label on every series): TTFT starts at vLLM's
arrival stamp, after the HTTP layer parsed the request, and ends at the first
token in the API server's output processor; its queue is the engine core's
waiting queue only. Pre-processing and first-token delivery are unknown.
vLLM 0.32's span names no model or finish reason: the model is read from the
resource (``OTEL_RESOURCE_ATTRIBUTES=gen_ai.request.model=<served name>``).
"""

from __future__ import annotations

from llmtrace import semconv as sc
from llmtrace.pipeline.inputs._values import count, num
from llmtrace.pipeline.view import SpanView
from llmtrace.record import SOURCE_VLLM_BUILTIN, UNKNOWN, RequestRecord

DURATIONS = {
    "ttft_s": sc.GEN_AI_LATENCY_TIME_TO_FIRST_TOKEN,
    "queue_s": sc.GEN_AI_LATENCY_TIME_IN_QUEUE,
    "prefill_s": sc.GEN_AI_LATENCY_TIME_IN_MODEL_PREFILL,
    "decode_s": sc.GEN_AI_LATENCY_TIME_IN_MODEL_DECODE,
}
COUNTS = {
    "prompt_tokens": sc.GEN_AI_USAGE_PROMPT_TOKENS,
    "output_tokens": sc.GEN_AI_USAGE_COMPLETION_TOKENS,
}
WANTED: dict[str, frozenset[str]] = {
    sc.SPAN_LLM_REQUEST: frozenset({
        sc.GEN_AI_LATENCY_E2E, sc.GEN_AI_REQUEST_ID, sc.GEN_AI_RESPONSE_MODEL,
        sc.GEN_AI_REQUEST_MODEL, sc.GEN_AI_RESPONSE_FINISH_REASONS,
        *DURATIONS.values(), *COUNTS.values(),
    }),
}
ROOT = sc.SPAN_LLM_REQUEST


def request_record(root: SpanView) -> RequestRecord:
    a, res = root.attributes, root.resource or {}
    reasons = a.get(sc.GEN_AI_RESPONSE_FINISH_REASONS) or []
    reason = str(reasons[0]) if reasons else UNKNOWN
    model = (a.get(sc.GEN_AI_RESPONSE_MODEL) or a.get(sc.GEN_AI_REQUEST_MODEL)
             or res.get(sc.GEN_AI_REQUEST_MODEL) or UNKNOWN)
    return RequestRecord(
        source=SOURCE_VLLM_BUILTIN, trace_id=root.trace_id.hex(),
        request_id=str(a.get(sc.GEN_AI_REQUEST_ID, "")), model=str(model), tenant="default",
        version=str(res.get("service.version", UNKNOWN)), finish_reason=reason,
        error_type="aborted" if reason == "abort" else None,
        start_ns=root.start_ns, end_ns=root.end_ns,
        e2e_s=num(a, sc.GEN_AI_LATENCY_E2E, (root.end_ns - root.start_ns) / 1e9),
        **{f: num(a, key) for f, key in DURATIONS.items()},
        **{f: count(a, key) for f, key in COUNTS.items()})
