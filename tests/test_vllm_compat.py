"""The static compatibility check (scripts/vllm_compat.py) and the matrix it wrote.

The matrix in docs/ comes from released wheels downloaded by the script (too
large for CI); here the installed vLLM's sources are checked the same way and
must give the committed column for that version, and the runtime's resolution
of every hook must agree with the static one.
"""

from __future__ import annotations

import json
import textwrap
from importlib.metadata import version
from pathlib import Path

import pytest

from llmtrace.config import load_config
from llmtrace.instrumentation._patching import resolve
from llmtrace.instrumentation.targets import Fields, Target
from llmtrace.instrumentation.vllm import hook_table, vllm_distribution
from llmtrace.instrumentation.vllm.engine import EngineTracer
from llmtrace.instrumentation.vllm.frontend import FrontendTracer
from llmtrace.instrumentation.vllm.hooks import CHECKED_RELEASES
from llmtrace.telemetry import Telemetry
from scripts import vllm_compat as compat


def _committed() -> dict:
    return json.loads(compat.JSON_PATH.read_text())


def test_installed_vllm_gives_the_committed_column_and_the_runtimes_resolution():
    import vllm

    dist = vllm_distribution()
    release = version(dist).split("+")[0]
    label = f"{dist} {release}"
    columns = {c["label"]: c for c in _committed()["columns"]}
    assert label in columns, f"no column for {label}: run scripts/vllm_compat.py --write"
    site = Path(vllm.__file__).resolve().parents[1]
    cells = compat.check_source(compat.SourceTree(site))
    assert cells == columns[label]["hooks"]

    cfg = load_config()
    telemetry = Telemetry(cfg)
    for hook in hook_table(FrontendTracer(cfg, telemetry), EngineTracer(cfg, telemetry)):
        if hook.name not in cells:  # uvicorn's hooks: not in vLLM's sources
            assert hook.targets[0].module.startswith("uvicorn.")
            continue
        found = resolve(hook)
        assert (found.target.qualname if found.target else None) == cells[hook.name]["target"]


def test_docs_render_the_committed_matrix_and_agree_with_the_declared_versions():
    data = _committed()
    assert compat.doc_in_sync(data), "docs/compatibility.md is stale: run --write"
    assert [p for c in data["columns"] for p in compat.declared_mismatches(c)] == []
    released = {c["version"] for c in data["columns"] if c["distribution"] == "vllm"}
    assert set(CHECKED_RELEASES) <= released
    assert any(c["label"].startswith("main") for c in data["columns"])


def _tree(root: Path, files: dict[str, str]) -> compat.SourceTree:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return compat.SourceTree(root)


@pytest.fixture()
def tree(tmp_path):
    return _tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/impl/__init__.py": "",
        "pkg/impl/app.py": """
            def build(args, tasks=None):
                ...
        """,
        "pkg/impl/entry.py": "from .app import build\n",
        # a compatibility shim, as vLLM main leaves at moved modules' old paths
        "pkg/entry.py": """
            import importlib
            import sys
            sys.modules[__name__] = importlib.import_module("pkg.impl.entry")
        """,
        "pkg/star.py": "from pkg.impl.app import *\n",
        "pkg/base.py": """
            class Base:
                __slots__ = ("slotted",)
                kind: int = 0

                def inherited(self, request, when):
                    self.from_base = 1
        """,
        "pkg/sched.py": """
            from pkg.base import Base

            class Sched(Base):
                def __init__(self, config):
                    self.config, self.pair = config, None

                def varargs(self, *args):
                    ...

                @staticmethod
                def static(request):
                    ...

                @property
                def computed(self):
                    return 1
        """,
    })


@pytest.mark.parametrize("target, problem", [
    (Target("pkg.impl.app", "build", ("args", "tasks")), None),
    (Target("pkg.entry", "build", ("args",)), None),  # through the shim and a relative import
    (Target("pkg.star", "build", ("args",)), None),  # a star re-export
    (Target("pkg.sched", "Sched.inherited", ("request", "when")), None),  # from the base
    (Target("pkg.sched", "Sched.static", ("request",)), None),  # no self to skip
    (Target("pkg.sched", "Sched.inherited", ("when",)),
     "pkg.sched.Sched.inherited takes (request) where llmtrace reads (when)"),
    (Target("pkg.sched", "Sched.varargs", ("request",)),
     "pkg.sched.Sched.varargs takes (nothing) where llmtrace reads (request)"),
    (Target("pkg.sched", "Sched.gone"), "not found (no gone on the class or its bases)"),
    (Target("pkg.nowhere", "f"), "not found (module pkg.nowhere not found)"),
    (Target("pkg.impl", "app"), "pkg.impl has no app"),
])
def test_static_check_resolves_like_an_import(tree, target, problem):
    got = compat.check_target(tree, target)
    if problem is None:
        assert got is None
    else:
        assert got is not None and problem in got


def test_static_check_finds_fields_on_the_class_and_its_bases(tree):
    ok = Fields("pkg.sched", "Sched", ("config", "pair", "slotted", "kind", "from_base",
                                       "computed"))
    assert compat.check_fields(tree, ok) is None
    assert compat.check_fields(tree, Fields("pkg.sched", "Sched", ("config", "gone"))) == \
        "pkg.sched.Sched has no gone"
