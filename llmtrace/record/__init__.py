"""The record step of the data path: one record per finished request.

hook (``llmtrace.instrumentation``) -> **record** -> span / metric
(``llmtrace.telemetry``) -> OTLP -> pipeline (``llmtrace.pipeline``) ->
Prometheus -> dashboards. Durations are defined once (``semconv/``) and
computed once (:func:`~llmtrace.record.timeline.phases`).
"""

from llmtrace.record.histogram import ITL_BOUNDS, Histogram
from llmtrace.record.request import (
    LATENCY_ATTRIBUTES,
    SOURCE_LLMTRACE,
    SOURCE_VLLM_BUILTIN,
    UNKNOWN,
    VLLM_DUPLICATE_STATE,
    DisaggregatedRecord,
    EvaluationRecord,
    RequestRecord,
    TransferRecord,
    UsageRecord,
)
from llmtrace.record.timeline import PREEMPTED, SCHEDULED, Phases, Segment, Timeline, phases

__all__ = ["ITL_BOUNDS", "LATENCY_ATTRIBUTES", "PREEMPTED", "SCHEDULED", "SOURCE_LLMTRACE",
           "SOURCE_VLLM_BUILTIN", "UNKNOWN", "VLLM_DUPLICATE_STATE", "DisaggregatedRecord",
           "EvaluationRecord", "Histogram", "Phases", "RequestRecord", "Segment", "Timeline",
           "TransferRecord", "UsageRecord", "phases"]
