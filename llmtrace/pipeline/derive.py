"""One record per request, from llmtrace's spans or from vLLM's built-in span.

llmtrace's root span already carries the latency breakdown and usage (the SDK
computes them where the data is); decode-chunk spans add inter-token latency
per chunk. vLLM's built-in ``llm_request`` span (``--otlp-traces-endpoint``)
carries the same breakdown under its ``gen_ai.latency.*`` names, so users
without the SDK get the same records.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from llmtrace import semconv as sc
from llmtrace.pipeline.spans import SpanView

UNKNOWN = "unknown"


@dataclass(slots=True)
class DecodeChunk:
    tokens: int
    itl_min: float | None
    itl_mean: float | None
    itl_max: float | None


@dataclass(slots=True)
class RequestRecord:
    """Everything the metrics and cost attribution need about one request."""

    trace_id: str
    request_id: str
    source: str  # "llmtrace" | "vllm"
    model: str
    tenant: str
    version: str
    finish_reason: str
    error_type: str | None
    start_ns: int
    end_ns: int
    ttft_s: float | None
    e2e_s: float
    queue_s: float | None
    prefill_s: float | None
    decode_s: float | None
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int
    preemptions: int
    accelerator_s: float | None = None
    decode_chunks: list[DecodeChunk] = field(default_factory=list)
    #: llm-d router decision (``llmtrace.router.*``), when its spans came first
    routing: dict[str, Any] = field(default_factory=dict)

    @property
    def tpot_s(self) -> float | None:
        if self.decode_s is None or self.output_tokens < 2:
            return None
        return self.decode_s / (self.output_tokens - 1)

    def itl_groups(self) -> list[tuple[float, int]]:
        """Inter-token latencies as (chunk mean, gaps it summarises), one per decode chunk."""
        out: list[tuple[float, int]] = []
        for i, c in enumerate(self.decode_chunks):
            gaps = c.tokens - 1 if i == 0 else c.tokens
            if c.itl_mean is not None and gaps > 0:
                out.append((c.itl_mean, gaps))
        return out

    def itl_samples(self) -> list[float]:
        """Inter-token latencies: each chunk's mean, once per gap it summarises."""
        return [mean for mean, gaps in self.itl_groups() for _ in range(gaps)]


@dataclass(slots=True)
class UsageRecord:
    """One request's batch-share accelerator time, from its engine-core span."""

    trace_id: str
    model: str
    tenant: str
    version: str
    instance_type: str | None
    accelerator_s: float
    steps: int


def derive_usage(span: SpanView) -> UsageRecord:
    a, res = span.attributes, span.resource or {}
    instance = res.get(sc.LLMTRACE_COST_INSTANCE_TYPE)
    return UsageRecord(
        trace_id=span.trace_id.hex(), model=str(a.get(sc.GEN_AI_REQUEST_MODEL, UNKNOWN)),
        tenant=str(a.get(sc.LLMTRACE_TENANT, "default")),
        version=str(a.get(sc.LLMTRACE_DEPLOYMENT_VERSION) or res.get("service.version")
                    or UNKNOWN),
        instance_type=str(instance) if instance else None,
        accelerator_s=max(0.0, float(_num(a, sc.LLMTRACE_COST_ACCELERATOR_SECONDS, 0.0))),
        steps=int(_num(a, sc.LLMTRACE_ENGINE_STEPS, 0)))


_NUMBER = (int, float)


def _num(attrs: dict, key: str | None, default=None):
    value = attrs.get(key, default) if key else default
    return value if type(value) in _NUMBER else default  # bool is not a number here


# record field -> attribute key, for llmtrace's root span and for vLLM's llm_request
_TIMES = {
    "ttft_s": (sc.LLMTRACE_LATENCY_TIME_TO_FIRST_TOKEN, sc.GEN_AI_LATENCY_TIME_TO_FIRST_TOKEN),
    "queue_s": (sc.LLMTRACE_LATENCY_QUEUE, sc.GEN_AI_LATENCY_TIME_IN_QUEUE),
    "prefill_s": (sc.LLMTRACE_LATENCY_PREFILL, sc.GEN_AI_LATENCY_TIME_IN_MODEL_PREFILL),
    "decode_s": (sc.LLMTRACE_LATENCY_DECODE, sc.GEN_AI_LATENCY_TIME_IN_MODEL_DECODE),
    "accelerator_s": (sc.LLMTRACE_COST_ACCELERATOR_SECONDS, None),
}
_COUNTS = {
    "prompt_tokens": (sc.GEN_AI_USAGE_INPUT_TOKENS, sc.GEN_AI_USAGE_PROMPT_TOKENS),
    "output_tokens": (sc.GEN_AI_USAGE_OUTPUT_TOKENS, sc.GEN_AI_USAGE_COMPLETION_TOKENS),
    "cached_tokens": (sc.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS, None),
    "preemptions": (sc.LLMTRACE_REQUEST_PREEMPTIONS, None),
}
_E2E = (sc.LLMTRACE_LATENCY_E2E, sc.GEN_AI_LATENCY_E2E)


def _identity(root: SpanView) -> dict:
    """Model, tenant, version, finish reason and ids: named differently by each source."""
    a, res = root.attributes, root.resource or {}
    if root.name == sc.SPAN_LLM_REQUEST:
        reasons = a.get(sc.GEN_AI_RESPONSE_FINISH_REASONS) or []
        reason = str(reasons[0]) if reasons else UNKNOWN
        # vLLM 0.32's span names no model: take it from the resource when the user set
        # OTEL_RESOURCE_ATTRIBUTES=gen_ai.request.model=<served name>
        model = (a.get(sc.GEN_AI_RESPONSE_MODEL) or a.get(sc.GEN_AI_REQUEST_MODEL)
                 or res.get(sc.GEN_AI_REQUEST_MODEL) or UNKNOWN)
        return dict(source="vllm", request_id=str(a.get(sc.GEN_AI_REQUEST_ID, "")),
                    model=str(model), tenant="default",
                    version=str(res.get("service.version", UNKNOWN)), finish_reason=reason,
                    error_type="aborted" if reason == "abort" else None)
    return dict(
        source="llmtrace", request_id=str(a.get(sc.LLMTRACE_REQUEST_ID, "")),
        model=str(a.get(sc.GEN_AI_REQUEST_MODEL) or a.get(sc.GEN_AI_RESPONSE_MODEL) or UNKNOWN),
        tenant=str(a.get(sc.LLMTRACE_TENANT, "default")),
        version=str(a.get(sc.LLMTRACE_DEPLOYMENT_VERSION) or res.get("service.version")
                    or UNKNOWN),
        finish_reason=str(a.get(sc.LLMTRACE_REQUEST_FINISH_REASON, UNKNOWN)),
        error_type=a.get(sc.ERROR_TYPE))


def derive_request(root: SpanView, children: Iterable[SpanView] = ()) -> RequestRecord:
    """Derive a record from a root span and the trace's other wanted spans."""
    a = root.attributes
    side = 1 if root.name == sc.SPAN_LLM_REQUEST else 0
    chunks = sorted(
        (c for c in children if c.name == sc.SPAN_LLMTRACE_DECODE_CHUNK),
        key=lambda c: _num(c.attributes, sc.LLMTRACE_DECODE_CHUNK_INDEX, 0))
    return RequestRecord(
        trace_id=root.trace_id.hex(), start_ns=root.start_ns, end_ns=root.end_ns,
        e2e_s=_num(a, _E2E[side], (root.end_ns - root.start_ns) / 1e9),
        **_identity(root),
        **{f: _num(a, keys[side]) for f, keys in _TIMES.items()},
        **{f: int(_num(a, keys[side], 0)) for f, keys in _COUNTS.items()},
        decode_chunks=[DecodeChunk(int(_num(c.attributes, sc.LLMTRACE_DECODE_CHUNK_TOKENS, 0)),
                                   _num(c.attributes, sc.LLMTRACE_DECODE_CHUNK_ITL_MIN),
                                   _num(c.attributes, sc.LLMTRACE_DECODE_CHUNK_ITL_MEAN),
                                   _num(c.attributes, sc.LLMTRACE_DECODE_CHUNK_ITL_MAX))
                       for c in chunks])
