"""One record per finished request, and one per request's engine usage.

These are the only inputs of the metric outputs: the SDK builds them at the
source (``llmtrace.instrumentation``), the pipeline builds them from spans
(``llmtrace.pipeline.inputs``), and both outputs feed them through the
generated metric schema (``llmtrace.schema``). Field names are the schema's
``feeds`` and ``x-record-labels`` values; a None field records nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmtrace import semconv as sc
from llmtrace.record.histogram import Histogram
from llmtrace.record.timeline import Phases

UNKNOWN = "unknown"
#: request span attribute -> record field: how llmtrace spans carry a record's durations
#: (written by ``llmtrace.telemetry.phase_spans``, read by ``llmtrace.pipeline.inputs``)
LATENCY_ATTRIBUTES = {
    sc.LLMTRACE_LATENCY_TIME_TO_FIRST_TOKEN: "ttft_s",
    sc.LLMTRACE_LATENCY_PREPROCESS: "preprocess_s",
    sc.LLMTRACE_LATENCY_QUEUE: "queue_s",
    sc.LLMTRACE_LATENCY_PREFILL: "prefill_s",
    sc.LLMTRACE_LATENCY_FIRST_TOKEN_DELIVERY: "first_token_delivery_s",
    sc.LLMTRACE_LATENCY_DECODE: "decode_s",
}
#: W3C tracestate entry llmtrace puts on vLLM's own request span when it also records the
#: request (vLLM's ``--otlp-traces-endpoint`` on): the pipeline skips that span, which
#: would count the request a second time
VLLM_DUPLICATE_STATE = "llmtrace=r"
#: ``llmtrace.record.source`` values
SOURCE_LLMTRACE = "llmtrace"
SOURCE_VLLM_BUILTIN = "vllm_builtin"


@dataclass(slots=True)
class RequestRecord:
    """Identity, durations (seconds), token counts and ITL of one finished request."""

    source: str
    trace_id: str
    request_id: str
    model: str
    tenant: str
    version: str
    finish_reason: str
    error_type: str | None
    start_ns: int
    end_ns: int
    e2e_s: float
    ttft_s: float | None = None
    preprocess_s: float | None = None
    queue_s: float | None = None
    prefill_s: float | None = None
    first_token_delivery_s: float | None = None
    decode_s: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    #: of ``cached_tokens``, those loaded through a KV connector; None: not reported
    cached_external_tokens: int | None = None
    output_tokens: int = 0
    preemptions: int = 0
    itl: Histogram | None = None
    #: token-basis USD, set by :func:`llmtrace.pricing.price_request` when a table is set
    usd: float | None = None
    #: 1 when a price table is set and has no price for this model, else None
    unpriced: int | None = None
    #: llm-d router decision (``llmtrace.router.*``), when its spans came first
    routing: dict[str, Any] = field(default_factory=dict)
    #: data-parallel rank the API server sent the request to, and why (``llmtrace.dp.*``)
    dp_rank: int | None = None
    dp_reason: str | None = None
    #: busiest over mean waiting+running across ranks, at a balanced choice only
    dp_load_imbalance: float | None = None
    #: a chunked generation's continuation: its chunk number and the gap since the
    #: previous chunk ended (``llmtrace.generation.*``)
    generation_chunk: int | None = None
    generation_gap_s: float | None = None
    #: mean per-token entropy of the output distribution (``llmtrace.output.entropy``),
    #: nats; None without logprobs
    output_entropy: float | None = None
    #: the tenant sent the same prompt within the regeneration window
    regeneration: bool = False

    one = 1  # the value a per-request counter adds
    basis = "price_table"  # ``llmtrace.cost.basis`` of this record's USD

    @property
    def source_label(self) -> str | None:
        """``llmtrace.record.source`` as a metric label: left off llmtrace's own records."""
        return None if self.source == SOURCE_LLMTRACE else self.source

    @property
    def regenerated(self) -> int | None:
        """1 for a regeneration (the regenerations counter)."""
        return 1 if self.regeneration else None

    @property
    def dp_routed(self) -> int | None:
        """1 for a request with a data-parallel rank (the routed-requests counter)."""
        return None if self.dp_rank is None else 1

    @property
    def prefix_prediction(self) -> float | None:
        """The router's predicted prefix-cache hit fraction (llm-d), when it made one."""
        score = self.routing.get(sc.LLMTRACE_ROUTER_PREFIX_CACHE_SCORE)
        if isinstance(score, bool) or not isinstance(score, int | float) or \
                not 0.0 <= score <= 1.0 or self.prompt_tokens <= 0:
            return None
        return float(score)

    @property
    def prefix_prediction_error(self) -> float | None:
        """|predicted - actual| hit fraction: the engine's truth is cached / prompt tokens."""
        predicted = self.prefix_prediction
        if predicted is None:
            return None
        return abs(predicted - self.cached_tokens / self.prompt_tokens)

    @property
    def predicted_cached_tokens(self) -> float | None:
        predicted = self.prefix_prediction
        return None if predicted is None else predicted * self.prompt_tokens

    @property
    def routed_cached_tokens(self) -> int | None:
        """Cached tokens of a request the router made a prefix-cache prediction for."""
        return None if self.prefix_prediction is None else self.cached_tokens

    @property
    def tpot_s(self) -> float | None:
        if self.decode_s is None or self.output_tokens < 2:
            return None
        return self.decode_s / (self.output_tokens - 1)

    def set_phases(self, p: Phases) -> None:
        """Copy the durations the timeline computed (the SDK's path)."""
        self.ttft_s, self.e2e_s = p.ttft_s, p.e2e_s
        self.preprocess_s, self.queue_s, self.prefill_s = p.preprocess_s, p.queue_s, p.prefill_s
        self.first_token_delivery_s, self.decode_s = p.first_token_delivery_s, p.decode_s


@dataclass(slots=True)
class TransferRecord:
    """One request's KV transfer through a KV connector, as one engine saw it.

    The SDK builds it in the engine core from the connector hooks; the pipeline
    reads it back from the ``llmtrace.kv_transfer`` span, which carries the same
    timestamps, so both outputs count the same duration.
    """

    trace_id: str
    model: str
    version: str
    connector: str
    direction: str  # "load" (consumer) or "save" (producer)
    duration_s: float
    blocks: int
    bytes: int
    tokens: int = 0
    #: ``llmtrace.kv_transfer.failure`` of a failed transfer, else None
    error_type: str | None = None
    source: str = SOURCE_LLMTRACE
    start_ns: int = 0
    end_ns: int = 0
    #: the producer's request id (``llmtrace.kv_transfer.peer_request_id``), when known
    peer_request_id: str | None = None

    @property
    def source_label(self) -> str | None:
        return None if self.source == SOURCE_LLMTRACE else self.source

    @property
    def kib(self) -> float:
        return self.bytes / 1024

    @property
    def ok_bytes(self) -> int | None:
        """Bytes a successful transfer moved (the bytes counter); None for a failure."""
        return None if self.error_type else self.bytes

    @property
    def failed(self) -> int | None:
        """1 for a failed transfer (the failures counter)."""
        return 1 if self.error_type else None


@dataclass(slots=True)
class DisaggregatedRecord:
    """One disaggregated request's time to first token, broken down across instances.

    Joined in the pipeline from the prefill instance's request record, the decode
    instance's request record and the decode side's KV load, all in one trace. The
    parts tile ``ttft_s``, from the prefill request's start to the decode
    instance's first token: remote prefill (the prefill request, start to end),
    handoff (prefill answered to decode request read: the proxy's hop), KV transfer
    (the load span) and local work (the rest of the decode instance's TTFT:
    preprocess, queueing, the local prefill of the last token, first-token delivery).
    """

    trace_id: str
    model: str
    version: str
    connector: str
    ttft_s: float
    remote_prefill_s: float
    handoff_s: float
    kv_transfer_s: float
    local_s: float
    source: str = SOURCE_LLMTRACE

    @property
    def source_label(self) -> str | None:
        return None if self.source == SOURCE_LLMTRACE else self.source


@dataclass(slots=True)
class UsageRecord:
    """One request's batch-share accelerator time, from the engine core."""

    trace_id: str
    model: str
    tenant: str
    version: str
    instance_type: str | None
    accelerator_s: float
    steps: int
    usd: float | None = None
    unpriced: int | None = None
    #: head-of-line blocking (``llmtrace.request.hol_blocking``), seconds
    hol_s: float | None = None

    basis = "batch_share"


@dataclass(slots=True)
class EvaluationRecord:
    """One judge score of one request, or one failed judge call.

    A verdict becomes one record per dimension (helpfulness, accuracy,
    coherence, safety) and one for ``composite``, which also carries what is
    counted once per judged request: the evaluation, the hallucination flag and
    the call's latency. A failed call is one record with ``error_type`` and no
    dimension or score.
    """

    trace_id: str
    model: str
    tenant: str
    version: str
    judge_model: str
    dimension: str | None
    score: float | None
    latency_s: float | None = None
    hallucination: bool | None = None
    error_type: str | None = None
    #: 1 on the record that counts the judged request (composite, or the failure)
    counted: bool = False

    @property
    def evaluated(self) -> int | None:
        return 1 if self.counted and self.error_type is None else None

    @property
    def hallucinated(self) -> int | None:
        return 1 if self.counted and self.hallucination else None

    @property
    def failed(self) -> int | None:
        return 1 if self.counted and self.error_type is not None else None
