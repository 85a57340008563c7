"""Range checks on records derived from spans someone else sent.

The collector derives records from spans it did not make. A record with a NaN,
infinite or negative duration, or a token count no request can have, would be
added to histogram sums and counters that never recover (a Prometheus counter
cannot go back down). Such a record is refused as a whole, with the reason
counted (``llmtrace_pipeline_dropped_spans_total{reason="invalid_record"}``),
and its neighbours in the same payload are derived as usual.
"""

from __future__ import annotations

import math

from llmtrace.record.request import RequestRecord, TransferRecord, UsageRecord

#: longest duration a request or its share of the accelerator can have, in seconds
MAX_DURATION_S = 7 * 24 * 3600.0
#: most tokens (prompt, cached, output) or preemptions or steps one request can count
MAX_COUNT = 1_000_000_000
#: largest mean per-token entropy, nats: ln of a 2**40-token vocabulary (about 27.7)
MAX_ENTROPY = 40 * math.log(2)
#: most bytes one request's KV transfer can move (1 PiB)
MAX_BYTES = 2**50

_DURATIONS = ("e2e_s", "ttft_s", "preprocess_s", "queue_s", "prefill_s",
              "first_token_delivery_s", "decode_s")
_COUNTS = ("prompt_tokens", "cached_tokens", "output_tokens", "preemptions")


def _duration_problem(name: str, value) -> str | None:
    if value is None:
        return None
    if not isinstance(value, int | float) or not math.isfinite(value) \
            or not 0.0 <= value <= MAX_DURATION_S:
        return f"{name}={value!r} is not a duration in [0, {MAX_DURATION_S:.0f}] s"
    return None


def _count_problem(name: str, value) -> str | None:
    if not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        return f"{name}={value!r} is not a count in [0, {MAX_COUNT}]"
    return None


def request_problem(record: RequestRecord) -> str | None:
    """What makes ``record`` unusable for metrics, or None."""
    for name in _DURATIONS:
        if problem := _duration_problem(name, getattr(record, name)):
            return problem
    for name in _COUNTS:
        if problem := _count_problem(name, getattr(record, name)):
            return problem
    external = record.cached_external_tokens
    if external is not None and (problem := _count_problem("cached_external_tokens", external)):
        return problem
    if record.dp_rank is not None and (problem := _count_problem("dp_rank", record.dp_rank)):
        return problem
    imbalance = record.dp_load_imbalance
    if imbalance is not None and (not isinstance(imbalance, int | float)
                                  or not math.isfinite(imbalance)
                                  or not 1.0 <= imbalance <= MAX_COUNT):
        return f"dp_load_imbalance={imbalance!r} is not a ratio >= 1"
    entropy = record.output_entropy
    if entropy is not None and (not isinstance(entropy, int | float)
                                or not math.isfinite(entropy)
                                or not 0.0 <= entropy <= MAX_ENTROPY):
        return f"output_entropy={entropy!r} is not an entropy in [0, {MAX_ENTROPY:g}] nats"
    itl = record.itl
    if itl is not None and (any(c < 0 for c in itl.counts) or not math.isfinite(itl.total)
                            or itl.total < 0):
        return "the inter-token latency histogram has negative or non-finite values"
    return None


def usage_problem(usage: UsageRecord) -> str | None:
    """What makes ``usage`` unusable for metrics, or None."""
    return _duration_problem("accelerator_s", usage.accelerator_s) or \
        _count_problem("steps", usage.steps)


def transfer_problem(transfer: TransferRecord) -> str | None:
    """What makes ``transfer`` unusable for metrics, or None."""
    problem = _duration_problem("duration_s", transfer.duration_s) or \
        _count_problem("blocks", transfer.blocks) or _count_problem("tokens", transfer.tokens)
    if problem:
        return problem
    if not isinstance(transfer.bytes, int) or not 0 <= transfer.bytes <= MAX_BYTES:
        return f"bytes={transfer.bytes!r} is not a size in [0, {MAX_BYTES}]"
    return None


__all__ = ["MAX_BYTES", "MAX_COUNT", "MAX_DURATION_S", "request_problem", "transfer_problem",
           "usage_problem"]
