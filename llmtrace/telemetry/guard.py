"""Guards that keep instrumentation from ever breaking the host.

An exception raised inside a patched vLLM scheduler method kills the engine,
so every hook body runs inside a :class:`HookGuard`: the first failure is
logged once with the hook's name, counted, and the hook disables itself; the
host's own call always proceeds.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import Counter

logger = logging.getLogger("llmtrace")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (it may be replaced later)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _ensure_visible_logging() -> None:
    """Give llmtrace's logger its own stderr handler.

    vLLM's API server imports a package that reconfigures root logging, after
    which warnings that rely on propagation or logging's last-resort handler
    vanish; a disabled hook must still be reported.
    """
    if logger.handlers:
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [llmtrace] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("LLMTRACE_LOG_LEVEL", "WARNING").upper())
    logger.propagate = False


_ensure_visible_logging()

#: hook name -> exceptions swallowed, for the self-telemetry counter and tests.
HOOK_ERRORS: Counter[str] = Counter()
#: hook name -> reason it is disabled.
DISABLED_HOOKS: dict[str, str] = {}
#: hook name -> CPU seconds spent inside guarded hook bodies (benchmark mode only).
HOOK_CPU_S: Counter[str] = Counter()


def disable_hook(name: str, reason: str) -> None:
    """Disable one hook with one clear warning (repeated calls stay silent)."""
    if name in DISABLED_HOOKS:
        return
    DISABLED_HOOKS[name] = reason
    logger.warning("llmtrace: hook %s disabled: %s; the host keeps running without it",
                   name, reason)


def hook_failed(name: str, exc: BaseException) -> None:
    """A hook body raised: count it, disable the hook, log once (with the traceback)."""
    HOOK_ERRORS[name] += 1
    if name not in DISABLED_HOOKS:
        DISABLED_HOOKS[name] = f"{type(exc).__name__}: {exc}"
        logger.warning("llmtrace: hook %s raised %s: %s; hook disabled, host unaffected",
                       name, type(exc).__name__, exc, exc_info=exc)


class HookGuard:
    """Context manager around a hook body: swallow, count, disable on first error."""

    __slots__ = ("name", "enabled", "_measure", "_t0")

    def __init__(self, name: str, measure: bool = False) -> None:
        self.name = name
        self.enabled = name not in DISABLED_HOOKS
        self._measure = measure
        self._t0 = 0.0

    def __enter__(self) -> HookGuard:
        if self._measure:
            self._t0 = time.thread_time()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._measure:
            HOOK_CPU_S[self.name] += time.thread_time() - self._t0
        if exc_type is None:
            return False
        self.enabled = False
        hook_failed(self.name, exc)
        return True  # swallow: the host must never see our exception
