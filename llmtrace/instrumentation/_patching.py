"""Install and remove wrapt wrappers from a declarative hook table.

Each hook names its targets (module, dotted attribute, the leading parameters
its bodies read), tried in order. A hook none of whose targets resolves and
fits (a moved or changed internal in another release) is disabled with one
clear warning naming hook, targets and installed version; every other hook
still installs.

Hook bodies stay small: ``before(instance, args, kwargs)`` runs before the
target and may return a token; ``after(instance, args, kwargs, result, token)``
runs after it. :func:`install` wraps each body in the guard named by the
table (:class:`~llmtrace.telemetry.guard.HookGuard`: an exception is counted,
logged once and disables that hook, never reaching the host) and skips it
while the optional ``gate()`` says there is nothing to do, so an idle hook
costs one call.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import wrapt
from opentelemetry.instrumentation.utils import unwrap

from llmtrace.instrumentation.targets import Target, params_problem
from llmtrace.telemetry.guard import DISABLED_HOOKS, HookGuard, disable_hook, hook_failed


@dataclass(frozen=True)
class Hook:
    name: str  # stable hook name used in warnings and self-telemetry
    targets: tuple[Target, ...]  # tried in order; the first that resolves and fits is wrapped
    before: Callable | None = None  # (instance, args, kwargs) -> token
    after: Callable | None = None  # (instance, args, kwargs, result, token) -> None
    gate: Callable[[], bool] | None = None  # False: nothing to do, skip the bodies


def guarded(hook: Hook, measure: bool = False, awaitable: bool = False) -> Callable:
    """The wrapt wrapper running ``hook``'s bodies under the guard of ``hook.name``.

    Without ``measure`` the guard is inlined (a try/except and a dict lookup, no
    guard object per call): these wrappers run per engine step and per output batch.
    ``awaitable``: the target may be a coroutine function (a library's async API);
    ``after`` then runs when its result is awaited, with the awaited value.
    """
    if awaitable:
        return _guarded_awaitable(hook)
    name, before, after, gate = hook.name, hook.before, hook.after, hook.gate
    if not measure:
        disabled = DISABLED_HOOKS

        def fast(wrapped, instance, args, kwargs):
            token = None
            if before is not None and name not in disabled and (gate is None or gate()):
                try:
                    token = before(instance, args, kwargs)
                except Exception as exc:  # noqa: BLE001 - the host must never see it
                    hook_failed(name, exc)
            result = wrapped(*args, **kwargs)
            if after is not None and name not in disabled and (gate is None or gate()):
                try:
                    after(instance, args, kwargs, result, token)
                except Exception as exc:  # noqa: BLE001 - the host must never see it
                    hook_failed(name, exc)
            return result

        return fast

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


def _guarded_awaitable(hook: Hook) -> Callable:
    """:func:`guarded` for targets that may return an awaitable (kept apart so the
    per-step wrappers of synchronous targets pay no ``isawaitable`` check)."""
    name, before, after, gate = hook.name, hook.before, hook.after, hook.gate
    disabled = DISABLED_HOOKS

    def body(fn: Callable | None, *args) -> object:
        if fn is None or name in disabled or (gate is not None and not gate()):
            return None
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - the host must never see it
            hook_failed(name, exc)
            return None

    def wrapper(wrapped, instance, args, kwargs):
        token = body(before, instance, args, kwargs)
        result = wrapped(*args, **kwargs)
        if not inspect.isawaitable(result):
            body(after, instance, args, kwargs, result, token)
            return result

        async def finish():
            value = await result
            body(after, instance, args, kwargs, value, token)
            return value

        return finish()

    return wrapper


@dataclass
class Installed:
    hook: Hook
    target: Target
    owner: object
    attr: str
    #: the attribute as it was (a classmethod stays one: unwrapping gives its function)
    original: object = None


@dataclass(frozen=True)
class Resolution:
    """Where a hook goes in this environment: the matching target, or why none fits."""

    target: Target | None
    owner: object = None
    attr: str = ""
    problems: tuple[str, ...] = ()

    @property
    def reason(self) -> str:
        return "; ".join(self.problems)


def _lookup(target: Target) -> tuple[object, str, Callable]:
    owner: object = importlib.import_module(target.module)
    *path, leaf = target.attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, leaf, getattr(owner, leaf)


def _signature_problem(target: Target, owner: object, leaf: str, fn: Callable) -> str | None:
    if not target.params:
        return None
    try:
        names = [p.name for p in inspect.signature(fn).parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return None  # builtins without signatures: trust the name
    # A plain function found on a class takes self first; static and class methods do not.
    is_method = inspect.isclass(owner) and inspect.isfunction(inspect.getattr_static(owner, leaf))
    return params_problem(target, names, is_method)


def resolve(hook: Hook) -> Resolution:
    """The first of ``hook``'s targets that imports and whose parameters fit."""
    problems = []
    for target in hook.targets:
        try:
            owner, leaf, fn = _lookup(target)
        except (ImportError, AttributeError) as exc:
            problems.append(f"{target.qualname} not found ({exc})")
            continue
        problem = _signature_problem(target, owner, leaf, fn)
        if problem:
            problems.append(problem)
            continue
        return Resolution(target, owner, leaf)
    return Resolution(None, problems=tuple(problems))


@functools.cache
def installed_version(module: str) -> str:
    """'<distribution> <version>' providing ``module``'s top-level package, for warnings."""
    top = module.split(".")[0]
    names = importlib.metadata.packages_distributions().get(top) or [top]
    for dist in names:
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return f"{top} (not installed)"


def is_wrapped(owner: object, attr: str) -> bool:
    """Whether ``owner.attr`` is a wrapt wrapper (looked up without descriptor binding)."""
    return isinstance(inspect.getattr_static(owner, attr, None), wrapt.FunctionWrapper)


def install(hooks: list[Hook], measure: bool = False) -> list[Installed]:
    """Wrap every hook that resolves and fits; warn once for each that does not.

    The warning names the hook, each target tried and why it did not fit, and the
    installed version of the package it patches. ``measure``: charge each body's
    thread CPU time to its hook (benchmark mode).
    """
    done: list[Installed] = []
    for hook in hooks:
        if hook.name in DISABLED_HOOKS:
            continue
        found = resolve(hook)
        if found.target is None:
            module = hook.targets[0].module if hook.targets else "?"
            disable_hook(hook.name, f"{found.reason} [installed: {installed_version(module)}]")
            continue
        owner, leaf = found.owner, found.attr
        if is_wrapped(owner, leaf):  # already wrapped (idempotent install)
            continue
        original = inspect.getattr_static(owner, leaf)
        try:
            wrapt.wrap_function_wrapper(owner, leaf, guarded(hook, measure))
        except Exception as exc:  # noqa: BLE001 - a hook we cannot install is skipped
            disable_hook(hook.name, f"cannot wrap {found.target.qualname}: {exc} "
                                    f"[installed: {installed_version(found.target.module)}]")
            continue
        done.append(Installed(hook, found.target, owner, leaf, original))
    return done


def method_of(obj: object, hook: Hook) -> tuple[str, Callable | None]:
    """``obj``'s own method for ``hook`` (its first target's leaf name), checked like
    :func:`install` checks a class's: None when ``obj`` lacks it (an optional method)
    or when it no longer takes the parameters the bodies read, which disables the hook
    with one warning naming ``obj``'s class."""
    target = hook.targets[0]
    leaf = target.attr.rsplit(".", 1)[-1]
    bound = getattr(obj, leaf, None)
    if bound is None or not target.params:
        return leaf, bound
    try:
        names = [p.name for p in inspect.signature(bound).parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return leaf, bound  # no signature to check: trust the name
    if problem := params_problem(target, names, is_method=False):
        cls = type(obj)
        disable_hook(hook.name, f"{cls.__module__}.{cls.__qualname__}.{leaf}: {problem} "
                                f"[installed: {installed_version(target.module)}]")
        return leaf, None
    return leaf, bound


def install_on(obj: object, hooks: list[Hook], measure: bool = False) -> list[str]:
    """Wrap ``hooks`` on one object (an instance attribute shadowing its class's method).

    For interfaces whose implementations override the method (vLLM's KV connectors):
    each hook's first target names the interface method, whose leading parameters the
    object's own method must still take (:func:`method_of`). Returns the names of the
    hooks wrapped.
    """
    done = []
    for hook in hooks:
        if hook.name in DISABLED_HOOKS or not hook.targets:
            continue
        leaf, bound = method_of(obj, hook)
        if bound is None:
            continue
        wrapper = guarded(hook, measure)

        def call(*args, _bound=bound, _wrapper=wrapper, **kwargs):
            return _wrapper(_bound, obj, args, kwargs)

        try:
            setattr(obj, leaf, functools.wraps(bound)(call))
        except (AttributeError, TypeError) as exc:  # __slots__ and the like
            disable_hook(hook.name, f"cannot wrap {type(obj).__qualname__}.{leaf} on its "
                                    f"instance: {exc}")
            continue
        done.append(hook.name)
    return done


def uninstall(installed: list[Installed]) -> None:
    for item in reversed(installed):
        if item.original is not None and is_wrapped(item.owner, item.attr):
            setattr(item.owner, item.attr, item.original)
        else:
            unwrap(item.owner, item.attr)
    installed.clear()
