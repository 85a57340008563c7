"""A judge's verdict -> its span, its GenAI evaluation events and its records.

The verdict arrives on a judge thread; everything here runs on the builder thread
(the judge hands the verdict over), the one writer of the metric instruments.
The ``llmtrace.judge`` span is a child of the judged request's span, so the
evaluation results sit in the request's trace; its ``gen_ai.evaluation.result``
events carry the scores, and the explanation only with content capture on (a
judge's explanation may quote the prompt or the answer).
"""

from __future__ import annotations

from typing import Any

from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    Status,
    StatusCode,
    TraceFlags,
    set_span_in_context,
)

from llmtrace import semconv as sc
from llmtrace.quality.judge import DIMENSIONS, Verdict
from llmtrace.record import EvaluationRecord

COMPOSITE = sc.LlmtraceQualityDimensionValues.COMPOSITE.value
HALLUCINATION = "hallucination"


def _label(score: float) -> str:
    """A score's ``gen_ai.evaluation.score.label``: the rubric's 1-5 answer in words."""
    return "good" if score >= 0.75 else "fair" if score >= 0.5 else "poor"


def records(verdict: Verdict, judge_model: str) -> list[EvaluationRecord]:
    """One record per dimension and the composite; one record for a failed call."""
    j = verdict.judgment
    base = dict(trace_id=f"{j.trace_id:032x}", model=j.model, tenant=j.tenant or "default",
                version=j.version or "unknown", judge_model=judge_model)
    if verdict.error is not None:
        return [EvaluationRecord(**base, dimension=None, score=None,
                                 latency_s=verdict.latency_s, error_type=verdict.error,
                                 counted=True)]
    out = [EvaluationRecord(**base, dimension=d, score=verdict.scores[d]) for d in DIMENSIONS]
    out.append(EvaluationRecord(**base, dimension=COMPOSITE, score=verdict.composite,
                                latency_s=verdict.latency_s,
                                hallucination=verdict.hallucination, counted=True))
    return out


def emit_span(telemetry, verdict: Verdict, judge_model: str, capture_content: bool) -> None:
    """The ``llmtrace.judge`` span under the request's span, with one event per result."""
    j = verdict.judgment
    parent = set_span_in_context(NonRecordingSpan(SpanContext(
        j.trace_id, j.span_id, False, TraceFlags(TraceFlags.SAMPLED))))
    attrs: dict[str, Any] = {sc.LLMTRACE_JUDGE_MODEL: judge_model,
                             sc.GEN_AI_REQUEST_MODEL: j.model}
    if verdict.hallucination is not None:
        attrs[sc.LLMTRACE_JUDGE_HALLUCINATION] = verdict.hallucination
    if verdict.error is not None:
        attrs[sc.ERROR_TYPE] = verdict.error
    span = telemetry.child_span(sc.SPAN_LLMTRACE_JUDGE, parent, verdict.start_ns, attrs)
    if verdict.error is not None:
        span.set_status(Status(StatusCode.ERROR, verdict.error))
    else:
        explanation = verdict.explanation if capture_content else None
        results = [(d, verdict.scores[d]) for d in DIMENSIONS]
        results.append((COMPOSITE, verdict.composite))
        for name, score in results:
            event = {sc.GEN_AI_EVALUATION_NAME: name, sc.GEN_AI_EVALUATION_SCORE_VALUE: score,
                     sc.GEN_AI_EVALUATION_SCORE_LABEL: _label(score)}
            if explanation and name == COMPOSITE:
                event[sc.GEN_AI_EVALUATION_EXPLANATION] = explanation
            span.add_event(sc.EVENT_GEN_AI_EVALUATION_RESULT, event, verdict.end_ns)
        if verdict.hallucination is not None:
            span.add_event(sc.EVENT_GEN_AI_EVALUATION_RESULT, {
                sc.GEN_AI_EVALUATION_NAME: HALLUCINATION,
                sc.GEN_AI_EVALUATION_SCORE_VALUE: 1.0 if verdict.hallucination else 0.0,
                sc.GEN_AI_EVALUATION_SCORE_LABEL:
                    "hallucinated" if verdict.hallucination else "grounded"}, verdict.end_ns)
    span.end(end_time=verdict.end_ns)
