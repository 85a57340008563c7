"""The builder thread: work off the serving thread, bounded, dropped and counted when full."""

from __future__ import annotations

import threading
from collections import Counter

from llmtrace.telemetry.builder import BUILD_QUEUE_FULL, Builder
from llmtrace.telemetry.guard import HOOK_ERRORS


def test_a_full_queue_drops_and_counts_instead_of_blocking():
    dropped: Counter[str] = Counter()
    builder = Builder(dropped, capacity=3, interval_s=0.01)
    started, release = threading.Event(), threading.Event()
    built = []

    def stuck(item):
        started.set()
        release.wait(30)  # a builder starved or blocked by an exporter
        built.append(item)

    try:
        assert builder.submit(stuck, "first")
        assert started.wait(10)  # the thread holds "first"; the queue is empty again
        accepted = [builder.submit(built.append, i) for i in range(10)]
        # every submit returned while the builder is stuck: none of them waited
        assert accepted == [True] * 3 + [False] * 7
        assert dropped[BUILD_QUEUE_FULL] == 7 and builder.pending == 3
    finally:
        release.set()
    assert builder.flush(10)
    assert built == ["first", 0, 1, 2]
    builder.shutdown()
    assert not builder.submit(built.append, "late")  # after shutdown: dropped, counted
    assert dropped[BUILD_QUEUE_FULL] == 8


def test_one_failing_item_loses_only_itself():
    builder = Builder(Counter(), interval_s=0.01)
    built = []

    def job(item):
        if item == 1:
            raise ValueError("bad record")
        built.append(item)

    before = HOOK_ERRORS["builder"]
    for i in range(4):
        builder.submit(job, i)
    assert builder.flush(10)
    assert built == [0, 2, 3]
    assert HOOK_ERRORS["builder"] == before + 1
    builder.shutdown()


def test_flush_from_another_thread_waits_for_the_queue_to_empty():
    builder = Builder(Counter(), interval_s=5.0)  # the thread would sleep 5 s between drains
    built = []
    for i in range(100):
        builder.submit(built.append, i)
    assert builder.flush(10)  # wakes the thread and waits, well before 5 s
    assert built == list(range(100))
    builder.shutdown()


def test_an_idle_builder_does_not_wake_up():
    """No periodic work on an idle server: batch callbacks run after jobs, not on a timer."""
    builder = Builder(Counter(), interval_s=0.01)
    batches = []
    builder.after_batch.append(lambda: batches.append(builder.pending))
    built = []
    builder.submit(built.append, 1)
    assert builder.flush(10) and built == [1]
    after_job = len(batches)
    assert after_job >= 1
    threading.Event().wait(0.3)  # thirty former polling intervals
    assert len(batches) == after_job
    builder.submit(built.append, 2)  # the next job wakes it again
    assert builder.flush(10) and built == [1, 2]
    builder.shutdown()
