"""Span and metric building off the serving thread.

The hooks on vLLM's serving path only record: timestamps, ids and counts, into
plain per-request state. When a request finishes, that state is handed here
(:meth:`Builder.submit`: one length check and one deque append) and a
background thread turns it into the finished-request record, its spans and its
metric updates. Span start and end times are the recorded timestamps, so
moving the work changes no timing.

The hand-off queue is bounded: when the builder falls behind (a starved
thread, an exporter blocking it), new work is dropped and counted
(``llmtrace.telemetry.dropped{reason="build_queue_full"}``), never waited for.
The thread sleeps while there is nothing to build (on an idle server it wakes
once a second, to nothing): the first job of a batch wakes it, and it gathers the batch for
``interval_s`` before building. It releases the GIL every few items
(``time.sleep(0)``), so a burst of finished requests does not hold the serving
loop for a whole switch interval.
After each batch it runs the ``after_batch`` callbacks: metric updates summed
over the batch reach the SDK there, one call per series rather than per request.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

from llmtrace.telemetry.guard import HOOK_CPU_S, HOOK_ERRORS

logger = logging.getLogger("llmtrace")

#: the self-telemetry reason for work dropped on a full hand-off queue
BUILD_QUEUE_FULL = "build_queue_full"


class Builder:
    """One background thread per process draining a bounded queue of build jobs."""

    def __init__(self, dropped: dict, capacity: int = 2048, interval_s: float = 0.05,
                 name: str = "llmtrace-builder", measure: bool = False) -> None:
        self.capacity = capacity
        self._dropped = dropped
        self._interval = interval_s
        self._name = name
        self._measure = measure
        self._items: deque[tuple[Callable[[Any], None], Any]] = deque()
        #: called after each batch of jobs (batched metric updates reach the SDK here)
        self.after_batch: list[Callable[[], None]] = []
        self._busy = 0  # drains under way
        self._wake = threading.Event()
        self._idle = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._warned = False
        if hasattr(os, "register_at_fork"):  # a forked child starts without the thread
            ref = weakref.ref(self)

            def after_fork_in_child() -> None:
                if (builder := ref()) is not None:
                    builder._thread = None
                    builder._items.clear()

            os.register_at_fork(after_in_child=after_fork_in_child)

    def submit(self, job: Callable[[Any], None], item: Any) -> bool:
        """Queue ``job(item)``; False (and counted) when the queue is full. Never blocks."""
        items = self._items
        if len(items) >= self.capacity or self._stopped:
            self._dropped[BUILD_QUEUE_FULL] += 1
            return False
        items.append((job, item))
        if self._thread is None:
            self._start()
        elif len(items) == 1:  # the first of a batch wakes the thread; the rest ride along
            self._wake.set()
        return True

    @property
    def pending(self) -> int:
        return len(self._items)

    def _start(self) -> None:
        with self._idle:
            if self._thread is None:
                thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread = thread
                thread.start()

    def _run(self) -> None:
        # Asleep while there is nothing to build (a wake-up a second at most, instead
        # of twenty: the timeout only guards against a lost wake-up). Woken by the
        # first job of a batch, it waits ``interval`` for the
        # rest to arrive, so a busy server's requests are built (and their metric
        # updates handed to the SDK) in batches.
        while not self._stopped:
            if not self._items:
                self._wake.wait(1.0)
            self._wake.clear()
            if self._stopped:
                break
            if self._items:
                self._wake.wait(self._interval)  # gather a batch; a flush cuts it short
                self._wake.clear()
                self.drain(callbacks=False)

    def drain(self, callbacks: bool = True) -> None:
        """Run every queued job now, then the after-batch callbacks: always if
        ``callbacks`` (flush, tests), else only when a job ran (the thread's loop)."""
        items = self._items
        measure = self._measure
        with self._idle:
            self._busy += 1
        try:
            ran = self._run_jobs(items, measure)
            for callback in self.after_batch if (callbacks or ran) else ():
                t0 = time.thread_time() if measure else 0.0
                try:
                    callback()
                except Exception as exc:  # noqa: BLE001 - as for a job
                    HOOK_ERRORS["builder"] += 1
                    logger.warning("llmtrace: a batch callback raised %s: %s",
                                   type(exc).__name__, exc)
                if measure:
                    HOOK_CPU_S["builder"] += time.thread_time() - t0
        finally:
            with self._idle:
                self._busy -= 1
                self._idle.notify_all()

    def _run_jobs(self, items: deque, measure: bool) -> int:
        done = 0
        while items:
            try:
                job, item = items.popleft()
            except IndexError:  # another drainer took the last one
                break
            t0 = time.thread_time() if measure else 0.0
            try:
                job(item)
            except Exception as exc:  # noqa: BLE001 - one bad record must not stop the rest
                HOOK_ERRORS["builder"] += 1
                if not self._warned:
                    self._warned = True
                    logger.warning("llmtrace: building telemetry raised %s: %s; that item "
                                   "is lost, the others are built (counted as hook "
                                   "'builder')", type(exc).__name__, exc, exc_info=exc)
            if measure:
                HOOK_CPU_S["builder"] += time.thread_time() - t0
            done += 1
            if done % 8 == 0:
                time.sleep(0)  # let the serving thread run between small batches
        return done

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Build everything queued so far; True when the queue emptied in time."""
        if self._thread is None or threading.current_thread() is self._thread:
            self.drain()
            return not self._items
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while (self._items or self._busy) and time.monotonic() < deadline:
                self._wake.set()
                self._idle.wait(min(0.05, max(0.0, deadline - time.monotonic())))
        return not self._items and not self._busy

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self.flush(timeout_s)
        self._stopped = True
        self._wake.set()
