"""Install and remove wrapt wrappers from a declarative hook table.

Each hook names its target (module, dotted attribute) and the parameters it
relies on. A target that is missing, or whose signature lacks one of those
parameters (a changed internal in a newer release), disables that one hook
with one clear warning; every other hook still installs.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import wrapt
from opentelemetry.instrumentation.utils import unwrap

from llmtrace.telemetry.guard import DISABLED_HOOKS, disable_hook


@dataclass(frozen=True)
class Hook:
    name: str  # stable hook name used in warnings and self-telemetry
    module: str
    attr: str  # "Class.method" or "function"
    params: tuple[str, ...]  # parameter names the wrapper reads
    wrapper: Callable


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


def install(hooks: list[Hook]) -> list[Installed]:
    """Wrap every hook that resolves and matches; warn once for each that does not."""
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
            wrapt.wrap_function_wrapper(owner, leaf, hook.wrapper)
        except Exception as exc:  # noqa: BLE001 - a hook we cannot install is skipped
            disable_hook(hook.name, f"cannot wrap {hook.module}.{hook.attr}: {exc}")
            continue
        done.append(Installed(hook, owner, leaf))
    return done


def uninstall(installed: list[Installed]) -> None:
    for item in reversed(installed):
        unwrap(item.owner, item.attr)
    installed.clear()
