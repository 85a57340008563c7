"""The pipeline's inputs, one module per span source, each turning spans into records.

- :mod:`llmtrace_spans`: llmtrace's request root, decode chunks and engine usage;
- :mod:`vllm_builtin`: vLLM's built-in ``llm_request`` span;
- :mod:`llm_d`: llm-d router (endpoint picker) spans, joined to the request record.
"""

from __future__ import annotations

from collections.abc import Iterable

from llmtrace.pipeline.inputs import llm_d, llmtrace_spans, vllm_builtin
from llmtrace.pipeline.view import SpanView
from llmtrace.record import RequestRecord, TransferRecord, UsageRecord

#: span name -> attribute keys the inputs read from it
WANTED: dict[str, frozenset[str]] = {**llmtrace_spans.WANTED, **vllm_builtin.WANTED,
                                     **llm_d.ROUTER_WANTED}
#: root spans: one per request; their arrival makes a trace derivable
ROOTS = frozenset({llmtrace_spans.ROOT, vllm_builtin.ROOT})
#: spans that carry a request's cost on their own: aggregated, never held
USAGE = frozenset({llmtrace_spans.USAGE})
#: spans of one request's KV transfer: aggregated at once, and joined to the request
#: records of their trace for the disaggregated TTFT breakdown
TRANSFER = frozenset({llmtrace_spans.TRANSFER})


def wanted_keys(name: str) -> frozenset[str] | None:
    """Attribute keys read from a span named ``name``; None: the span is skipped."""
    keys = WANTED.get(name)
    return keys if keys is not None else llm_d.router_keys(name)


def request_record(root: SpanView, children: Iterable[SpanView] = ()) -> RequestRecord:
    """The record of the request whose root span is ``root``, by the root's source."""
    if root.name == vllm_builtin.ROOT:
        return vllm_builtin.request_record(root)
    return llmtrace_spans.request_record(root, children)


def usage_record(span: SpanView) -> UsageRecord:
    return llmtrace_spans.usage_record(span)


def transfer_record(span: SpanView) -> TransferRecord:
    return llmtrace_spans.transfer_record(span)


__all__ = ["ROOTS", "TRANSFER", "USAGE", "WANTED", "llm_d", "request_record",
           "transfer_record", "usage_record", "wanted_keys"]
