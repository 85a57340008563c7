"""Streaming drift of request features, per model and version, against a baseline.

The SDK (every request, on the builder thread) and the collector (records derived
from spans) feed the same :class:`DriftMonitor`, so a drift gauge means the same
thing wherever it is computed. Every feature is counted into bins fixed in this
module, never derived from the data: memory stays bounded (a window is a ring of a
few hundred integers per model and version) and a baseline file saved by one
process compares bin for bin with the counts of another. Bins are few, so the
statistics run in plain Python.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtrace import semconv as sc

log = logging.getLogger(__name__)
#: pseudo-count added to every bin before PSI and KL (Jeffreys' prior): keeps ln(q/p)
#: finite on empty bins and the proportions summing to 1; the one smoothing used here
SMOOTHING = 0.5
#: the ``format`` value of a baseline file
FORMAT = "llmtrace.drift.baseline/1"
#: token counts: powers of 2 from 1 to 32768, then an overflow bin
TOKEN_EDGES: tuple[int, ...] = tuple(2 ** i for i in range(16))
#: mean per-token entropy, nats: 0.5-nat steps up to 8, then an overflow bin
ENTROPY_EDGES: tuple[float, ...] = tuple(0.5 * i for i in range(1, 17))
#: time to first token, seconds: log-spaced (1-2.5-5) from 5 ms to 60 s, then overflow
TTFT_EDGES: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                                 10.0, 25.0, 60.0)
#: finish reasons; any other value counts as the last one, ``other``
FINISH_REASONS: tuple[str, ...] = ("stop", "length", "abort", "error", "repetition", "other")


@dataclass(frozen=True, slots=True)
class Feature:
    """One drift feature: the record field it reads and its fixed bins.

    Numeric: ``len(edges) + 1`` bins with ``le`` edges (a value on an edge counts in
    that bin), the last one the overflow. Categorical: one bin per category, the last
    catching unknown values. A None (or NaN) value leaves the record out of this
    feature only, so a record without entropy still counts for the other four.
    """

    name: str
    field: str
    edges: tuple[float, ...] = ()
    categories: tuple[str, ...] = ()

    @property
    def nbins(self) -> int:
        return len(self.categories) or len(self.edges) + 1

    def bin(self, record: Any) -> int | None:
        value = getattr(record, self.field, None)
        if value is None:
            return None
        if self.categories:
            cats = self.categories
            return cats.index(value) if value in cats else len(cats) - 1
        return None if value != value else bisect_left(self.edges, value)

    def describe(self, counts: Sequence[int]) -> dict[str, list]:
        """This feature's entry in a baseline file: its bins and their counts."""
        bins = {"categories": list(self.categories)} if self.categories else \
            {"edges": list(self.edges)}
        return {**bins, "counts": list(counts)}


#: the ``llmtrace.drift.feature`` label values, in count-vector order
FEATURES: tuple[Feature, ...] = (
    Feature("prompt_length", "prompt_tokens", TOKEN_EDGES),
    Feature("output_length", "output_tokens", TOKEN_EDGES),
    Feature("output_entropy", "output_entropy", ENTROPY_EDGES),
    Feature("finish_reason", "finish_reason", categories=FINISH_REASONS),
    Feature("ttft", "ttft_s", TTFT_EDGES),
)
_REQUESTS = 3  # every record has a finish reason: that feature's total is the request count

Counts = list[list[int]]  # per feature (FEATURES order), per bin


def smoothed(counts: Sequence[float]) -> list[float]:
    """Proportions with :data:`SMOOTHING` pseudo-counts per bin: all > 0, summing to 1."""
    total = sum(counts) + SMOOTHING * len(counts)
    return [(c + SMOOTHING) / total for c in counts]


def psi(baseline: Sequence[float], current: Sequence[float]) -> float:
    """Population stability index, sum (q - p) ln(q / p) over smoothed proportions.

    It equals KL(q || p) + KL(p || q), the symmetrised KL. The usual reading: under
    0.1 stable, 0.1 to 0.25 a moderate shift, over 0.25 a shift worth an alert.
    """
    p, q = smoothed(baseline), smoothed(current)
    return sum((qi - pi) * math.log(qi / pi) for pi, qi in zip(p, q, strict=True))


def kl(baseline: Sequence[float], current: Sequence[float]) -> float:
    """KL divergence D(current || baseline) in nats, over smoothed proportions."""
    p, q = smoothed(baseline), smoothed(current)
    return sum(qi * math.log(qi / pi) for pi, qi in zip(p, q, strict=True))


def chi2_test(baseline: Sequence[float], current: Sequence[float]) -> tuple[float, float]:
    """Chi-squared test of homogeneity of two count vectors: (statistic, p-value).

    A 2 x k contingency table without Yates' correction. Bins empty in both vectors
    are dropped (their expected count would be 0); with fewer than two bins left, or
    an empty side, the samples cannot be told apart: (0.0, 1.0).
    """
    cols = [(b, c) for b, c in zip(baseline, current, strict=True) if b or c]
    nb, nc = sum(b for b, _ in cols), sum(c for _, c in cols)
    if len(cols) < 2 or not nb or not nc:
        return 0.0, 1.0
    stat = 0.0
    for b, c in cols:
        eb, ec = nb * (b + c) / (nb + nc), nc * (b + c) / (nb + nc)
        stat += (b - eb) ** 2 / eb + (c - ec) ** 2 / ec
    return stat, chi2_sf(len(cols) - 1, stat)


def chi2_sf(dof: int, stat: float) -> float:
    """P(X >= stat) for X ~ chi-squared(dof), dof a whole number (bins - 1).

    The finite sums of Abramowitz & Stegun 26.4.4 and 26.4.5 (all terms positive, so no
    cancellation), which the tests hold to scipy's ``chdtrc``. Not scipy itself: these
    statistics are computed where a scrape reads them, in vLLM's API server, whose event
    loop must not wait for scipy's import (0.35 s on an idle core here, several times
    that under load: it showed as multi-second TTFT outliers in the canary test).
    """
    if stat <= 0:
        return 1.0
    h, odd = stat / 2, dof % 2
    head = math.erfc(math.sqrt(h)) if odd else 0.0
    return head + sum(math.exp((j + odd / 2) * math.log(h) - h - math.lgamma(j + 1 + odd / 2))
                      for j in range(dof // 2))


@dataclass(frozen=True, slots=True)
class DriftRow:
    """One (model, version, feature) comparison: the drift gauges' labels and values."""

    model: str
    version: str
    feature: str
    psi: float
    kl: float
    chi2: float
    p_value: float
    baseline_n: int
    current_n: int


def load_baseline(path: str | Path) -> dict[str, list[list[int] | None]]:
    """Read and check a baseline file: model (or ``*``) -> counts per feature, or None.

    A file whose bins differ from this module's would compare unlike bins, so every
    mismatch is a ``ValueError`` naming the file and the problem, never a re-binning.
    """
    def bad(problem: str) -> ValueError:
        return ValueError(f"drift baseline file {path}: {problem}")

    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise bad(f"cannot be read as JSON ({e})") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), dict):
        raise bad("expected a JSON object with a 'models' object")
    if doc.get("format", FORMAT) != FORMAT:
        raise bad(f"format {doc['format']!r} is not {FORMAT!r}")
    index = {f.name: i for i, f in enumerate(FEATURES)}
    out: dict[str, list[list[int] | None]] = {}
    for model, features in doc["models"].items():
        if not isinstance(features, dict):
            raise bad(f"model {model!r}: expected an object of features")
        row: list[list[int] | None] = [None] * len(FEATURES)
        for name, spec in features.items():
            where = f"model {model!r} feature {name!r}"
            if name not in index:
                raise bad(f"{where}: unknown feature (known: {', '.join(index)})")
            f = FEATURES[index[name]]
            key, want = ("categories", list(f.categories)) if f.categories else \
                ("edges", list(f.edges))
            got = spec.get(key) if isinstance(spec, dict) else None
            if got != want:
                raise bad(f"{where}: {key} {got!r} do not match the built-in {key} {want!r}")
            counts = spec.get("counts")
            if not isinstance(counts, list) or len(counts) != f.nbins or \
                    not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
                raise bad(f"{where}: 'counts' must be a list of {f.nbins} integers")
            if any(c < 0 for c in counts):
                raise bad(f"{where}: negative counts {counts!r}")
            row[index[name]] = counts
        out[model] = row
    return out


class _Window:
    """A ring of time slots for one (model, version), each with per-feature counts.

    Slot ``s`` holds records that ended in ``[s, s + 1) * slot_ns``, at ring position
    ``s % slots``: a newer slot overwrites the one a full window older, so old traffic
    ages out without a sweep and memory never grows.
    """

    __slots__ = ("ids", "counts", "first", "last", "frozen")

    def __init__(self, slots: int, first: int) -> None:
        self.ids = [-1] * slots
        self.counts: list[Counts] = [_zeros() for _ in range(slots)]
        self.first = self.last = first
        self.frozen: Counts | None = None  # the pinned baseline, once frozen

    def add(self, slot: int, bins: list[int | None]) -> bool:
        pos = slot % len(self.ids)
        if self.ids[pos] != slot:
            if self.ids[pos] > slot:
                return False  # older than everything the ring still holds
            self.ids[pos], self.counts[pos] = slot, _zeros()
        for counts, b in zip(self.counts[pos], bins, strict=True):
            if b is not None:
                counts[b] += 1
        self.last = max(self.last, slot)
        return True

    def total(self, lo: int, hi: float = math.inf) -> Counts:
        """Counts summed over the slots ``lo <= s <= hi``."""
        out = _zeros()
        for sid, slot in zip(self.ids, self.counts, strict=True):
            if lo <= sid <= hi:
                for acc, counts in zip(out, slot, strict=True):
                    for i, c in enumerate(counts):
                        acc[i] += c
        return out


def _zeros() -> Counts:
    return [[0] * f.nbins for f in FEATURES]


class DriftMonitor:
    """Per (model, version) sliding windows of feature counts, compared to a baseline.

    ``baseline`` is ``pinned`` (each model and version's first complete window with at
    least ``min_samples`` requests, frozen when the next record arrives), ``file:PATH``
    (:func:`load_baseline`; a model missing from the file uses its ``*`` entry) or
    ``version:STABLE`` (the live window of version STABLE of the same model: canary
    against stable). Records are placed by their end time; ``clock`` (seconds) says
    where "now" is at snapshot. One writer thread and one reader thread may share it.
    """

    def __init__(self, baseline: str = "pinned", window_s: float = 1800.0, slots: int = 30,
                 min_samples: int = 100, max_keys: int = 64,
                 clock: Callable[[], float] = time.time) -> None:
        kind, _, arg = baseline.partition(":")
        self._file = load_baseline(arg) if kind == "file" and arg else None
        self._stable = arg if kind == "version" and arg else None
        self._pinned = baseline == "pinned"
        if not (self._pinned or self._file is not None or self._stable):
            raise ValueError(f"drift baseline {baseline!r}: expected 'pinned', 'file:PATH' "
                             "or 'version:STABLE'")
        self.window_s, self.slots, self.min_samples = window_s, slots, min_samples
        self._slot_ns = max(1, round(window_s * 1e9 / slots))
        self._max_keys, self._clock = max_keys, clock
        self._windows: dict[tuple[str, str], _Window] = {}
        self._lock = threading.Lock()
        self._cached: tuple[float, list[DriftRow]] | None = None
        #: records not counted because ``max_keys`` windows were all in use
        self.overflow_records = 0
        #: records not counted because they ended before the window the ring holds
        self.stale_records = 0

    def observe(self, record: Any) -> None:
        """Count one finished request: bins found before the lock, one increment each under it."""
        bins = [f.bin(record) for f in FEATURES]
        slot, key = record.end_ns // self._slot_ns, (record.model, record.version)
        with self._lock:
            win = self._windows.get(key) or self._open(key, slot)
            if win is None:
                self.overflow_records += 1
                return
            if self._pinned and win.frozen is None and win.ids[slot % self.slots] < slot:
                self._freeze(win, slot)  # a new slot: the ring still holds the window before it
            if not win.add(slot, bins):
                self.stale_records += 1

    def _open(self, key: tuple[str, str], slot: int) -> _Window | None:
        """A new window; at the cap, in place of a key idle for a full window (its pin is lost)."""
        if len(self._windows) >= self._max_keys:
            idle = min(self._windows, key=lambda k: self._windows[k].last)
            if self._windows[idle].last > slot - self.slots:
                return None
            del self._windows[idle]
        win = self._windows[key] = _Window(self.slots, slot)
        return win

    def _freeze(self, win: _Window, slot: int) -> None:
        """Pin the complete window before ``slot`` if it has ``min_samples`` requests.

        Tried when a record opens a new slot, before the ring overwrites the slot a
        window older, so the frozen counts are always a whole window.
        """
        if slot >= win.first + self.slots:
            counts = win.total(slot - self.slots, slot - 1)
            if sum(counts[_REQUESTS]) >= self.min_samples:
                win.frozen = counts

    def _now(self) -> int:
        return int(self._clock() * 1e9) // self._slot_ns

    def counts(self, model: str, version: str) -> dict[str, list[int]]:
        """The current window's counts per feature name (all zero for an unseen key)."""
        now = self._now()
        with self._lock:
            win = self._windows.get((model, version))
            counts = win.total(now - self.slots + 1) if win else _zeros()
        return {f.name: c for f, c in zip(FEATURES, counts, strict=True)}

    def snapshot(self) -> list[DriftRow]:
        """One row per (model, version, feature) with ``min_samples`` on both sides."""
        now = self._now()
        pairs: list[tuple[str, str, list[list[int] | None], Counts]] = []
        with self._lock:
            for (model, version), win in self._windows.items():
                base = self._baseline(model, version, win, now)
                if base is not None:
                    pairs.append((model, version, base, win.total(now - self.slots + 1)))
        rows = []
        for model, version, base, current in pairs:  # outside the lock: observe never waits
            for f, b, c in zip(FEATURES, base, current, strict=True):
                if b is None or sum(b) < self.min_samples or sum(c) < self.min_samples:
                    continue
                stat, p = chi2_test(b, c)
                rows.append(DriftRow(model, version, f.name, psi(b, c), kl(b, c), stat, p,
                                     sum(b), sum(c)))
        return rows

    def recent(self, max_age_s: float = 1.0) -> list[DriftRow]:
        """:meth:`snapshot`, reused for ``max_age_s``: one collection reads several gauges."""
        now = time.monotonic()
        cached = self._cached
        if cached is None or now - cached[0] > max_age_s:
            cached = self._cached = (now, self.snapshot())
        return cached[1]

    def _baseline(self, model: str, version: str, win: _Window,
                  now: int) -> list[list[int] | None] | None:
        if self._file is not None:
            return self._file.get(model) or self._file.get("*")
        if self._stable is not None:
            stable = self._windows.get((model, self._stable))
            if version == self._stable or stable is None:
                return None
            return stable.total(now - self.slots + 1)
        return win.frozen

    def save_baseline(self, path: str | Path) -> None:
        """Write the current windows, summed per model over its versions, as a baseline file."""
        now = self._now()
        models: dict[str, Counts] = {}
        with self._lock:
            for (model, _), win in self._windows.items():
                acc = models.setdefault(model, _zeros())
                for a, c in zip(acc, win.total(now - self.slots + 1), strict=True):
                    a[:] = [x + y for x, y in zip(a, c, strict=True)]
        doc = {"format": FORMAT, "window_s": self.window_s, "models": {
            model: {f.name: f.describe(c) for f, c in zip(FEATURES, counts, strict=True)}
            for model, counts in models.items()}}
        Path(path).write_text(json.dumps(doc, indent=1) + "\n")


#: drift gauge -> the :class:`DriftRow` field it reports; both outputs (the SDK's
#: observable gauges, the collector's Prometheus registry) iterate this table
GAUGES: dict[str, str] = {
    sc.METRIC_LLMTRACE_DRIFT_PSI: "psi",
    sc.METRIC_LLMTRACE_DRIFT_KL_DIVERGENCE: "kl",
    sc.METRIC_LLMTRACE_DRIFT_CHI_SQUARED: "chi2",
    sc.METRIC_LLMTRACE_DRIFT_P_VALUE: "p_value",
}


def row_labels(row: DriftRow) -> dict[str, str]:
    return {sc.GEN_AI_REQUEST_MODEL: row.model, sc.LLMTRACE_DEPLOYMENT_VERSION: row.version,
            sc.LLMTRACE_DRIFT_FEATURE: row.feature}


def gauge_values(rows: Sequence[DriftRow]) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every drift gauge's (labels, value) pairs for ``rows``, samples included."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {name: [] for name in GAUGES}
    samples = out[sc.METRIC_LLMTRACE_DRIFT_SAMPLES] = []
    window = sc.LLMTRACE_DRIFT_WINDOW
    for row in rows:
        labels = row_labels(row)
        for name, field in GAUGES.items():
            out[name].append((labels, getattr(row, field)))
        samples.append(({**labels, window: "baseline"}, row.baseline_n))
        samples.append(({**labels, window: "current"}, row.current_n))
    return out


def monitor_for(config: Any) -> DriftMonitor:
    """The monitor a configuration asks for; a baseline file that cannot be used falls
    back to ``pinned`` with one warning (drift is worth less than serving)."""
    try:
        return DriftMonitor(config.drift_baseline, config.drift_window_s,
                            min_samples=config.drift_min_samples)
    except (OSError, ValueError) as exc:
        log.warning("llmtrace: drift baseline %r unusable (%s); using 'pinned'",
                    config.drift_baseline, exc)
        return DriftMonitor("pinned", config.drift_window_s,
                            min_samples=config.drift_min_samples)
