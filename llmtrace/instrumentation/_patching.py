"""Install and remove wrapt wrappers from a declarative hook table.

Each hook names its target (module, dotted attribute) and the parameters it
relies on. A target that is missing, or whose signature lacks one of those
parameters (a changed internal in a newer release), disables that one hook
with one clear warning; every other hook still installs.

Hook bodies stay small: ``before(instance, args, kwargs)`` runs before the
target and may return a token; ``after(instance, args, kwargs, result, token)``
runs after it. :func:`install` wraps each body in the guard named by the
table (:class:`~llmtrace.telemetry.guard.HookGuard`: an exception is counted,
logged once and disables that hook, never reaching the host) and skips it
while the optional ``gate()`` says there is nothing to do, so an idle hook
costs one call.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import wrapt
from opentelemetry.instrumentation.utils import unwrap

from llmtrace.telemetry.guard import DISABLED_HOOKS, HookGuard, disable_hook


@dataclass(frozen=True)
class Hook:
    name: str  # stable hook name used in warnings and self-telemetry
    module: str
    attr: str  # "Class.method" or "function"
    params: tuple[str, ...]  # parameter names the bodies read
    before: Callable | None = None  # (instance, args, kwargs) -> token
    after: Callable | None = None  # (instance, args, kwargs, result, token) -> None
    gate: Callable[[], bool] | None = None  # False: nothing to do, skip the bodies


def guarded(hook: Hook, measure: bool = False) -> Callable:
    """The wrapt wrapper running ``hook``'s bodies under the guard of ``hook.name``."""
    name, before, after, gate = hook.name, hook.before, hook.after, hook.gate

    def wrapper(wrapped, instance, args, kwargs):
        token = None
        if before is not None and (gate is None or gate()):
            with HookGuard(name, measure) as g:
                if g.enabled:
                    token = before(instance, args, kwargs)
        result = wrapped(*args, **kwargs)
        if after is not None and (gate is None or gate()):
            with HookGuard(name, measure) as g:
                if g.enabled:
                    after(instance, args, kwargs, result, token)
        return result

    return wrapper


@dataclass
class Installed:
    hook: Hook
    owner: object
    attr: str


def _resolve(hook: Hook) -> tuple[object, str, Callable]:
    module = importlib.import_module(hook.module)
    owner: object = module
    *path, leaf = hook.attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, leaf, getattr(owner, leaf)


def _check_signature(hook: Hook, target: Callable) -> str | None:
    if not hook.params:
        return None
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return None  # builtins without signatures: trust the name
    missing = [p for p in hook.params if p not in params]
    if missing:
        return f"{hook.module}.{hook.attr} no longer takes {', '.join(missing)}"
    return None


def is_wrapped(owner: object, attr: str) -> bool:
    """Whether ``owner.attr`` is a wrapt wrapper (looked up without descriptor binding)."""
    return isinstance(inspect.getattr_static(owner, attr, None), wrapt.FunctionWrapper)


def check(hook: Hook) -> str | None:
    """Why ``hook`` cannot be installed against the vLLM in this environment; None: it can."""
    try:
        _, _, target = _resolve(hook)
    except (ImportError, AttributeError) as exc:
        return f"{hook.module}.{hook.attr} not found ({exc})"
    return _check_signature(hook, target)


def install(hooks: list[Hook], measure: bool = False) -> list[Installed]:
    """Wrap every hook that resolves and matches; warn once for each that does not.

    ``measure``: charge each body's thread CPU time to its hook (benchmark mode).
    """
    done: list[Installed] = []
    for hook in hooks:
        if hook.name in DISABLED_HOOKS:
            continue
        try:
            owner, leaf, target = _resolve(hook)
        except (ImportError, AttributeError) as exc:
            disable_hook(hook.name, f"{hook.module}.{hook.attr} not found ({exc})")
            continue
        problem = _check_signature(hook, target)
        if problem:
            disable_hook(hook.name, problem)
            continue
        if is_wrapped(owner, leaf):  # already wrapped (idempotent install)
            continue
        try:
            wrapt.wrap_function_wrapper(owner, leaf, guarded(hook, measure))
        except Exception as exc:  # noqa: BLE001 - a hook we cannot install is skipped
            disable_hook(hook.name, f"cannot wrap {hook.module}.{hook.attr}: {exc}")
            continue
        done.append(Installed(hook, owner, leaf))
    return done


def uninstall(installed: list[Installed]) -> None:
    for item in reversed(installed):
        unwrap(item.owner, item.attr)
    installed.clear()
