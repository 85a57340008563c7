"""The one place durations are computed: phases tile [read, first token] in every case."""

from __future__ import annotations

import pytest

from llmtrace.record import PREEMPTED, SCHEDULED, Histogram, Timeline, phases

MS = 1_000_000


def _tiles_cover(p, read: int, first: int) -> None:
    tiles = p.tiles
    assert tiles[0].start_ns == read and tiles[-1].end_ns == first
    for a, b in zip(tiles, tiles[1:], strict=False):
        assert a.end_ns == b.start_ns and a.start_ns <= a.end_ns
    parts = (p.preprocess_s, p.queue_s, p.prefill_s, p.first_token_delivery_s)
    assert sum(x for x in parts if x is not None) == pytest.approx(p.ttft_s, abs=1e-12)


def test_plain_request_tiles_ttft():
    t = Timeline(read_ns=0, engine_arrival_ns=3 * MS, prompt_done_ns=20 * MS,
                 first_token_ns=21 * MS, last_token_ns=50 * MS, end_ns=50 * MS,
                 events=[(SCHEDULED, 5 * MS)])
    p = phases(t)
    assert (p.preprocess_s, p.queue_s, p.prefill_s, p.first_token_delivery_s) == \
        pytest.approx((0.003, 0.002, 0.015, 0.001))
    assert (p.ttft_s, p.decode_s, p.e2e_s) == pytest.approx((0.021, 0.029, 0.05))
    _tiles_cover(p, 0, 21 * MS)
    assert [s.phase for s in p.tiles] == ["preprocess", "queue", "prefill",
                                          "first_token_delivery"]


def test_preemption_during_prefill_splits_prefill_and_counts_as_queue():
    t = Timeline(read_ns=0, engine_arrival_ns=1 * MS, prompt_done_ns=30 * MS,
                 first_token_ns=31 * MS, last_token_ns=40 * MS, end_ns=40 * MS,
                 events=[(SCHEDULED, 2 * MS), (PREEMPTED, 10 * MS), (SCHEDULED, 18 * MS)])
    p = phases(t)
    assert p.queue_s == pytest.approx(0.001 + 0.008)
    assert p.prefill_s == pytest.approx(0.008 + 0.012)
    assert [s.phase for s in p.tiles] == ["preprocess", "queue", "prefill", "queue",
                                          "prefill", "first_token_delivery"]
    assert [s.reason for s in p.tiles if s.phase == "queue"] == ["arrival", "preemption"]
    assert [(s.start_ns, s.end_ns) for s in p.preemptions] == [(10 * MS, 18 * MS)]
    _tiles_cover(p, 0, 31 * MS)


def test_decode_preemption_stays_in_decode():
    t = Timeline(read_ns=0, engine_arrival_ns=1 * MS, prompt_done_ns=5 * MS,
                 first_token_ns=6 * MS, last_token_ns=60 * MS, end_ns=60 * MS,
                 events=[(SCHEDULED, 2 * MS), (PREEMPTED, 20 * MS), (SCHEDULED, 35 * MS)])
    p = phases(t)
    assert p.queue_s == pytest.approx(0.001) and p.decode_s == pytest.approx(0.054)
    assert [(s.start_ns, s.end_ns) for s in p.preemptions] == [(20 * MS, 35 * MS)]
    _tiles_cover(p, 0, 6 * MS)


def test_clock_skew_is_clamped_so_the_tiles_still_add_up():
    # the engine's events (another process's clock) land before the hand-off
    t = Timeline(read_ns=10 * MS, engine_arrival_ns=12 * MS, prompt_done_ns=11 * MS,
                 first_token_ns=15 * MS, last_token_ns=15 * MS, end_ns=15 * MS,
                 events=[(SCHEDULED, 9 * MS)])
    p = phases(t)
    assert min(p.preprocess_s, p.queue_s, p.prefill_s, p.first_token_delivery_s) >= 0
    _tiles_cover(p, 10 * MS, 15 * MS)


def test_without_scheduler_events_queue_and_prefill_are_unknown_not_zero():
    t = Timeline(read_ns=0, engine_arrival_ns=2 * MS, prompt_done_ns=9 * MS,
                 first_token_ns=10 * MS, last_token_ns=12 * MS, end_ns=12 * MS)
    p = phases(t)
    assert (p.queue_s, p.prefill_s) == (None, None)
    assert p.preprocess_s == pytest.approx(0.002)
    assert p.first_token_delivery_s == pytest.approx(0.001)


def test_a_request_that_never_produced_a_token():
    t = Timeline(read_ns=0, engine_arrival_ns=2 * MS, end_ns=40 * MS,
                 events=[(SCHEDULED, 5 * MS)])
    p = phases(t)
    assert p.ttft_s is None and p.decode_s is None and p.queue_s is None
    assert p.preprocess_s == pytest.approx(0.002) and p.e2e_s == pytest.approx(0.04)
    assert [s.phase for s in p.tiles] == ["preprocess"]


def test_histogram_extend_equals_add_and_rebuilds_from_counts():
    gaps = [0.0005, 0.001, 0.0012, 0.1, 0.1, 3.0]
    one, many = Histogram(), Histogram()
    for g in gaps:
        one.add(g)
    many.extend(gaps)
    assert one.counts == many.counts and one.count == 6
    assert (one.low, one.high) == (many.low, many.high) == (0.0005, 3.0)
    assert one.counts[one.bounds.index(0.1)] == 2  # an edge value counts in its bucket (le)
    again = Histogram.from_counts(one.counts, one.total, one.low, one.high)
    assert again.counts == one.counts and again.total == one.total
    with pytest.raises(ValueError):
        Histogram.from_counts([1, 2], 0.1)
    with pytest.raises(ValueError):
        Histogram.from_counts([-1] * len(one.counts), 0.1)
    assert 0.0 < one.quantile(0.5) <= 0.1
