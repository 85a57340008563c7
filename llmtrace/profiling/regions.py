"""Profiling regions recorded during sampled engine steps, as child spans of the step.

vLLM wraps its model runner's phases (``gpu_model_runner: forward``, ``...: sample``)
and its scheduler's (``schedule: allocate_slots``) in ``record_function_or_nullcontext``,
which calls the module global ``vllm.v1.utils._PROFILER_FUNC``. llmtrace sets that
global to :func:`vllm_scope`: on a step that is not sampled it returns what vLLM would
have used (``nullcontext``, or torch's ``record_function`` / NVTX when vLLM's own
switches ask for it), so unsampled steps pay one attribute check per scope. On a
sampled step, on the thread running it, each scope and each ``llmtrace.region()``
block is timed (two clock reads), given a span id, and nested under the region open
around it; the step's owner takes the list when the step ends and builds the spans
off the serving path. While a torch profiler runs, a region also enters torch's
``record_function`` under its name tagged with the step's trace id and its own span
id (:mod:`llmtrace.profiling.tags`), so the profile and the trace name each other.

Regions must stay outside compiled code (torch.compile traces the model's forward;
a Python timer there would run once, at trace time).
"""

from __future__ import annotations

import random
import threading
import time
from contextlib import ContextDecorator, nullcontext
from typing import Any

#: one region: (name, source, start_ns, end_ns, span id, parent span id or 0)
Region = tuple[str, str, int, int, int, int]

#: regions kept per step at most; beyond this they are counted, not kept
MAX_REGIONS = 256


class Recorder:
    """The sampled step under way in this process, if any, and its regions."""

    __slots__ = ("thread", "trace_id", "regions", "stack", "overflow")

    def __init__(self) -> None:
        self.thread = 0  # the thread running the sampled step; 0: none is sampled
        self.trace_id = 0
        self.regions: list[Region] = []
        self.stack: list[int] = []
        self.overflow = 0

    def begin(self, trace_id: int) -> None:
        self.trace_id = trace_id
        self.regions = []
        self.stack = []
        self.overflow = 0
        self.thread = threading.get_ident()

    def end(self) -> tuple[list[Region], int]:
        """Stop recording; the step's regions and how many did not fit."""
        self.thread = 0
        regions, self.regions, self.stack = self.regions, [], []
        return regions, self.overflow


RECORDER = Recorder()


def _profiler_on() -> bool:
    try:
        from torch.autograd import profiler
    except ImportError:  # pragma: no cover - torch is vLLM's dependency
        return False
    return bool(getattr(profiler, "_is_profiler_enabled", False))


class _Region(ContextDecorator):
    """One timed region of a sampled step (and, under a profiler, a tagged torch region)."""

    __slots__ = ("name", "source", "start", "span_id", "parent", "_torch")

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self._torch: Any = None

    def __enter__(self):
        rec = RECORDER
        self.span_id = random.getrandbits(64) or 1
        self.parent = rec.stack[-1] if rec.stack else 0
        rec.stack.append(self.span_id)
        if _profiler_on():
            from torch.profiler import record_function

            from llmtrace.profiling.tags import tag

            self._torch = record_function(tag(self.name, rec.trace_id, self.span_id))
            self._torch.__enter__()
        self.start = time.time_ns()
        return self

    def __exit__(self, *exc) -> bool:
        end = time.time_ns()
        rec = RECORDER
        if self._torch is not None:
            self._torch.__exit__(*exc)
            self._torch = None
        if rec.stack and rec.stack[-1] == self.span_id:
            rec.stack.pop()
        if len(rec.regions) < MAX_REGIONS:
            rec.regions.append((self.name, self.source, self.start, end, self.span_id,
                                self.parent))
        else:
            rec.overflow += 1
        return False


def _vllm_default():
    """What vLLM's record_function_or_nullcontext would pick on its own."""
    try:
        from vllm import envs
    except ImportError:  # pragma: no cover
        return nullcontext
    if envs.VLLM_CUSTOM_SCOPES_FOR_PROFILING:
        from torch.profiler import record_function

        return record_function
    if envs.VLLM_NVTX_SCOPES_FOR_PROFILING:
        import nvtx

        return nvtx.annotate
    return nullcontext


class VLLMScope:
    """The callable set as ``vllm.v1.utils._PROFILER_FUNC``."""

    def __init__(self, fallback=None) -> None:
        self.fallback = fallback or _vllm_default()

    def __call__(self, name: str):
        if RECORDER.thread and RECORDER.thread == threading.get_ident():
            return _Region(name, "vllm")
        return self.fallback(name)


class region(ContextDecorator):  # noqa: N801 - used like a function: llmtrace.region(...)
    """A named region of your serving code, as a context manager or decorator.

    Inside a sampled engine step it becomes an ``llmtrace.region`` span under the step
    (and a tagged torch profiler region while a profiler runs); elsewhere it is
    torch's ``record_function`` while a profiler runs, else nothing. The choice is
    made on each entry, so a decorated function follows the step it runs in::

        with llmtrace.region("my_logits_processor"):
            ...
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._cm: Any = None

    def _recreate_cm(self):  # a decorated function may recurse or run on two threads
        return region(self.name)

    def __enter__(self):
        if RECORDER.thread and RECORDER.thread == threading.get_ident():
            cm: Any = _Region(self.name, "user")
        elif _profiler_on():
            from torch.profiler import record_function

            cm = record_function(self.name)
        else:
            cm = nullcontext()
        self._cm = cm
        return cm.__enter__()

    def __exit__(self, *exc) -> bool:
        cm, self._cm = self._cm, None
        return bool(cm.__exit__(*exc)) if cm is not None else False
