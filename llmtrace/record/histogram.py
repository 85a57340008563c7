"""A fixed-bucket histogram of one request's inter-token gaps (exact ITL on every path).

The SDK records a request's gaps into the schema's ITL buckets; each decode
chunk span carries its own counts (``llmtrace.decode.chunk.itl_bucket_counts``)
and sum, so the collector rebuilds the very same histogram from spans instead
of approximating it from chunk means.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field

from llmtrace import schema
from llmtrace import semconv as sc

#: upper bounds of the ITL histogram (the last bucket is +Inf)
ITL_BOUNDS: tuple[float, ...] = \
    schema.BY_NAME[sc.METRIC_LLMTRACE_SERVER_INTER_TOKEN_LATENCY].buckets or ()


@dataclass(slots=True)
class Histogram:
    """Counts per bucket (``len(bounds) + 1``, last is +Inf), sum, min and max."""

    bounds: tuple[float, ...] = ITL_BOUNDS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    low: float = float("inf")
    high: float = float("-inf")

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    @property
    def count(self) -> int:
        return sum(self.counts)

    def add(self, value: float) -> None:
        """One observation; ``le`` semantics (a value on an edge counts in that bucket)."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value
        if value < self.low:
            self.low = value
        if value > self.high:
            self.high = value

    def extend(self, values: list[float]) -> None:
        """Many observations in one pass (cheaper than :meth:`add` per value)."""
        if not values:
            return
        counts, bounds = self.counts, self.bounds
        for v in values:
            counts[bisect_left(bounds, v)] += 1
        self.total += sum(values)
        self.low = min(self.low, min(values))
        self.high = max(self.high, max(values))

    def merge(self, other: Histogram) -> None:
        """Add ``other`` (same bounds) into this one."""
        counts = self.counts
        for i, c in enumerate(other.counts):
            if c:
                counts[i] += c
        self.total += other.total
        self.low = min(self.low, other.low)
        self.high = max(self.high, other.high)

    def edges(self) -> list[tuple[float, int]]:
        """(value, count) per non-empty bucket, each at its upper bound (+Inf: the largest
        value seen): what an output without a bulk merge records, exact in counts."""
        top = len(self.bounds)
        return [(self.bounds[i] if i < top else self.high, c)
                for i, c in enumerate(self.counts) if c]

    def quantile(self, q: float) -> float | None:
        """The q-quantile (0..1), interpolated inside its bucket as PromQL's
        ``histogram_quantile`` does; None when empty."""
        n = self.count
        if not n:
            return None
        rank, seen = q * n, 0
        for i, c in enumerate(self.counts):
            if c and seen + c >= rank:
                if i == len(self.bounds):
                    return self.bounds[-1] if self.bounds else self.high
                low = self.bounds[i - 1] if i else 0.0
                return low + (self.bounds[i] - low) * (rank - seen) / c
            seen += c
        return self.high

    @classmethod
    def from_counts(cls, counts: Sequence[int], total: float, low: float | None = None,
                    high: float | None = None,
                    bounds: tuple[float, ...] = ITL_BOUNDS) -> Histogram:
        """Rebuild from a span's bucket counts; a count list of the wrong shape is refused."""
        if len(counts) != len(bounds) + 1 or set(map(type, counts)) != {int} or min(counts) < 0:
            raise ValueError(f"expected {len(bounds) + 1} non-negative bucket counts")
        return cls(bounds, list(counts), float(total),
                   float("inf") if low is None else low, float("-inf") if high is None else high)
