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
from collections.abc import Callable

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


#: hook name -> (group name, every member, the group's state release)
_GROUP_OF: dict[str, tuple[str, tuple[str, ...], Callable[[], None]]] = {}
#: how often a reminder names the hooks still disabled (seconds)
REMIND_EVERY_S = 600.0
_reminded = [0.0]


def register_group(group: str, members: tuple[str, ...], release: Callable[[], None]) -> None:
    """Hooks that share state: when one fails at run time, all go, and ``release`` frees
    what they held (see ``llmtrace.instrumentation.vllm.hooks.GROUPS``)."""
    for name in members:
        _GROUP_OF[name] = (group, members, release)


def disable_hook(name: str, reason: str) -> None:
    """Disable one hook with one clear warning (repeated calls stay silent)."""
    if name in DISABLED_HOOKS:
        return
    DISABLED_HOOKS[name] = reason
    _reminded[0] = time.monotonic()
    logger.warning("llmtrace: hook %s disabled: %s; the host keeps running without it",
                   name, reason)


def hook_failed(name: str, exc: BaseException) -> None:
    """A hook body raised: count it, disable the hook (and its group), log once."""
    HOOK_ERRORS[name] += 1
    if name not in DISABLED_HOOKS:
        DISABLED_HOOKS[name] = f"{type(exc).__name__}: {exc}"
        _reminded[0] = time.monotonic()
        logger.warning("llmtrace: hook %s raised %s: %s; hook disabled, host unaffected",
                       name, type(exc).__name__, exc, exc_info=exc)
        disable_group_of(name)


def disable_group_of(name: str) -> None:
    """Disable every hook sharing state with ``name`` and release that state."""
    entry = _GROUP_OF.get(name)
    if entry is None:
        return
    group, members, release = entry
    for other in members:
        if other != name:
            disable_hook(other, f"it shares per-request state with {name}, which is "
                                f"disabled (group {group})")
    try:
        release()
    except Exception as exc:  # noqa: BLE001 - releasing must not break the host either
        logger.warning("llmtrace: releasing the state of group %s raised %s", group, exc)


def remind_disabled(now: float | None = None) -> None:
    """While hooks stay disabled, say so again every :data:`REMIND_EVERY_S` (called from
    the metric collection, which runs periodically without costing the serving path)."""
    if not DISABLED_HOOKS:
        return
    now = time.monotonic() if now is None else now
    if now - _reminded[0] < REMIND_EVERY_S:
        return
    _reminded[0] = now
    logger.warning("llmtrace: %d hook(s) still disabled, their telemetry missing: %s",
                   len(DISABLED_HOOKS), ", ".join(sorted(DISABLED_HOOKS)))


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
