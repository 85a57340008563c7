"""Hook targets as data: where a hook goes, and the check that it still fits.

Shared by the runtime installer (:mod:`llmtrace.instrumentation._patching`, from
``inspect.signature``) and the static compatibility check
(``scripts/vllm_compat.py``, from a release's source AST), so both apply one
rule. Nothing here imports the instrumented library.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    module: str
    attr: str  # "Class.method" or "function", looked up in ``module``'s namespace
    params: tuple[str, ...] = ()  # read positionally by the bodies: a prefix after self
    versions: str = ""  # where this target is known to match, as the matrix shows it

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.attr}"


@dataclass(frozen=True)
class Fields:
    """Attributes a hook's bodies read without a default from one class of the target.

    A missing one is caught at run time (the guard disables the hook on its
    first AttributeError); the static check finds it before a release is run.
    """

    module: str
    cls: str
    names: tuple[str, ...]

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.cls}"


@dataclass(frozen=True)
class HookSpec:
    name: str  # stable: used in warnings, self-telemetry and the matrix
    process: str  # where it fires: "api-server", "engine-core" or "worker"
    targets: tuple[Target, ...]
    why: str  # what the hook records, for the docs and the doctor
    reads: tuple[Fields, ...] = ()
    #: wrapped on each object the owner hook creates (a KV connector: subclasses override
    #: the interface method), not on the class; the target is the interface method, whose
    #: parameters the compatibility check and the runtime check both test
    per_instance: bool = False


def params_problem(target: Target, names: Sequence[str], is_method: bool) -> str | None:
    """Why ``names`` (the callable's positional parameters) do not fit ``target``.

    ``is_method``: the callable is a function defined in a class, so its first
    parameter (``self``) is not counted. Shared by the runtime check (from
    ``inspect.signature``) and the static one (from the source's AST).
    """
    names = list(names[1:] if is_method and names else names)
    want = list(target.params)
    if names[: len(want)] == want:
        return None
    got = ", ".join(names[: max(len(want), 1)]) or "nothing"
    return f"{target.qualname} takes ({got}) where llmtrace reads ({', '.join(want)})"
