"""Output entropy from the sampler's logprobs: defined once, here.

vLLM reports, per output position, the log-probabilities of the top-k tokens and
of the sampled one (``raw_logprobs``: the model's distribution before temperature
and penalties). The full distribution is not sent, so per position the entropy is
taken over the reported tokens plus one more outcome holding the rest of the
probability mass. That is a lower bound of the true entropy (merging outcomes
never raises entropy), exact when k covers the vocabulary, and it moves with it:
collapsed, repetitive output drives it towards zero, incoherent sampling up. The
request's value is the mean over its positions, in nats (``llmtrace.output.entropy``).
"""

from __future__ import annotations

import math
from typing import Any

#: per-position entries needed: with the sampled token alone the bound says little
MIN_ENTRIES = 2


def position_entropy(logprobs: list[float]) -> float:
    """Entropy, nats, of the reported tokens plus the remaining mass as one outcome."""
    h, mass = 0.0, 0.0
    for lp in logprobs:
        if lp > -math.inf:
            p = math.exp(lp)
            mass += p
            h -= p * lp
    rest = 1.0 - mass
    if rest > 1e-12:
        h -= rest * math.log(rest)
    return max(h, 0.0)


def _positions(logprobs: Any):
    """Each position's distinct logprob values: vLLM's list of ``{token: Logprob}``
    dicts, or its ``FlatLogprobs`` (parallel flat lists with per-position ranges)."""
    flat = getattr(logprobs, "start_indices", None)
    if flat is not None:
        values, tokens = logprobs.logprobs, logprobs.token_ids
        for start, end in zip(flat, logprobs.end_indices, strict=False):
            seen: dict[int, float] = {}
            for i in range(start, end):
                seen.setdefault(tokens[i], values[i])  # the sampled token may repeat
            yield list(seen.values())
        return
    for position in logprobs:
        if position:
            yield [lp.logprob for lp in position.values()]


def mean_entropy(logprobs: Any) -> float | None:
    """The request's mean per-token entropy, or None without usable logprobs."""
    if not logprobs:
        return None
    total, n = 0.0, 0
    for values in _positions(logprobs):
        if len(values) >= MIN_ENTRIES:
            total += position_entropy(values)
            n += 1
    return total / n if n else None
