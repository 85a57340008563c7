"""Artefacts shipped with llmtrace for the stack around it.

Generated Grafana dashboards, the Sloth SLO spec and its Prometheus rules, the
Prometheus scrape config, the OpenTelemetry Collector configs and an example
price table. In a source checkout these are the top-level ``dashboards/``,
``collector/`` and ``examples/prices.yaml`` (linked here, copied into the
wheel); ``llmtrace assets --out DIR`` writes them where the user wants them.
"""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

#: (package-relative path, file-name suffixes) of what ships
SHIPPED = (("dashboards", (".json", ".yml", ".yaml")), ("collector", (".yaml",)),
           ("prices.example.yaml", (".yaml",)))


def _walk(node: Traversable, rel: Path, suffixes: tuple[str, ...]):
    if node.is_file():
        if node.name.endswith(suffixes):
            yield rel, node
        return
    for child in node.iterdir():
        if child.name.startswith(("_", ".")) or child.name == "tests":
            continue
        yield from _walk(child, rel / child.name, suffixes)


def shipped() -> list[tuple[Path, Traversable]]:
    """Every shipped artefact: (path relative to the output directory, resource)."""
    root = files(__name__)
    out = []
    for name, suffixes in SHIPPED:
        node = root / name
        if node.is_file() or node.is_dir():
            out.extend(_walk(node, Path(name), suffixes))
    return sorted(out, key=lambda item: str(item[0]))


def copy_to(dest: Path) -> list[Path]:
    """Write every shipped artefact under ``dest``; returns the files written."""
    written = []
    for rel, resource in shipped():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(resource.read_bytes())
        written.append(target)
    return written
