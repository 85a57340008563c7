"""Write the llmtrace Grafana dashboards as JSON, or check that the committed ones are fresh.

    python -m llmtrace.dashboards.generate            # writes dashboards/*.json
    python -m llmtrace.dashboards.generate --check    # exit 1 when a file is stale
    python -m llmtrace.dashboards.generate --out DIR

Output is deterministic: sorted keys, explicit panel ids, no timestamps. The
query helpers (``panel_queries``, ``substitute``, ``metric_names``) work on the
JSON alone and need no Grafana SDK, so query checks against a real Prometheus
can use them.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from llmtrace.dashboards import in_checkout

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "dashboards"
#: dashboard modules in llmtrace.dashboards, each with FILENAME and build()
MODULES = ("l1_oncall", "l2_quality", "l3_cost")

#: what ``substitute`` puts in place of each variable: "All" for the multi-selects,
#: the defaults for the others, and Grafana's built-ins at a 1-minute resolution
DEFAULT_VARIABLES: dict[str, str] = {
    "model": ".*",
    "tenant": ".*",
    "version": ".*",
    "instance": ".*",
    "slo": ".*",
    "cost_basis": "batch_share",
    "budget": "10000",
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "1h",
}

_VARIABLE = re.compile(r"\$\{([A-Za-z_]\w*)(?::\w+)?\}|\$([A-Za-z_]\w*)")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = frozenset({"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
                       "group_right", "bool", "offset", "inf", "nan", "Inf", "NaN"})


# -- JSON helpers (no SDK needed) -----------------------------------------------------

def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """Every panel, rows included, with the panels of collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def panel_queries(dashboard: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(panel title, PromQL expression)`` for every query of every panel, in order."""
    return [(panel["title"], target["expr"])
            for panel in iter_panels(dashboard)
            for target in panel.get("targets", [])
            if target.get("expr")]


def annotation_queries(dashboard: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(annotation name, PromQL expression)`` of the Prometheus annotations.

    Kept apart from ``panel_queries``: an annotation returns data only while its
    condition holds (e.g. TTFT p99 over the SLO), so an empty result is normal.
    """
    return [(a["name"], a["expr"]) for a in dashboard.get("annotations", {}).get("list", [])
            if a.get("expr")]


def substitute(expr: str, variables: Mapping[str, str] | None = None) -> str:
    """Replace Grafana variables (``$model``, ``${model}``) so Prometheus can run ``expr``.

    Defaults are ``DEFAULT_VARIABLES``; ``variables`` overrides them. An unknown
    variable raises ``KeyError`` rather than leaving a ``$`` for Prometheus to reject.
    """
    values = {**DEFAULT_VARIABLES, **(variables or {})}

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"no value for ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(value, expr)


def variables_used(expr: str) -> set[str]:
    return {m.group(1) or m.group(2) for m in _VARIABLE.finditer(expr)}


def metric_names(expr: str) -> set[str]:
    """Metric and recording-rule names a PromQL expression reads.

    Strings, label matchers, ranges, variables and grouping clauses are blanked
    out; what is left that looks like a name, is not followed by ``(`` (a
    function or aggregation) and is not a keyword or part of a number, is a metric.
    """
    s = _STRING.sub('""', expr)
    s = _MATCHERS.sub(" ", s)
    s = _RANGES.sub(" ", s)
    s = _VARIABLE.sub(" ", s)
    s = _GROUPING.sub(" ", s)
    names = set()
    for m in _IDENT.finditer(s):
        before = s[m.start() - 1] if m.start() else " "
        if before.isalnum() or before in "._":
            continue  # the exponent of a number such as 1e12
        if s[m.end():].lstrip().startswith("(") or m.group() in _KEYWORDS:
            continue
        names.add(m.group())
    return names


# -- generation ----------------------------------------------------------------------------

def _module(name: str):
    return importlib.import_module(f"llmtrace.dashboards.{name}")


def render(model: Any) -> str:
    from grafana_foundation_sdk.cog.encoder import JSONEncoder

    return JSONEncoder(sort_keys=True, indent=2).encode(model) + "\n"


def _check_ids(filename: str, dashboard: Mapping[str, Any]) -> None:
    ids = [p.get("id") for p in iter_panels(dashboard)]
    missing = [p["title"] for p in iter_panels(dashboard) if p.get("id") is None]
    duplicates = sorted({i for i in ids if i is not None and ids.count(i) > 1})
    if missing or duplicates:
        raise ValueError(f"{filename}: panels without id {missing}, duplicate ids {duplicates}")


def build_all() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    import json

    out = {}
    for name in MODULES:
        module = _module(name)
        text = render(module.build().build())
        _check_ids(module.FILENAME, json.loads(text))
        out[module.FILENAME] = text
    return out


def stale(out_dir: Path, generated: Mapping[str, str]) -> list[str]:
    """Files in ``out_dir`` that are missing or differ from ``generated``."""
    return [name for name, text in generated.items()
            if not (out_dir / name).is_file() or (out_dir / name).read_text() != text]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmtrace.dashboards.generate",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 when a committed dashboard is stale")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (in a source checkout: its dashboards/)")
    args = parser.parse_args(argv)
    if args.out is None:
        if not in_checkout():
            parser.error("--out DIR is required outside a source checkout")
        args.out = DEFAULT_OUT
    generated = build_all()
    if args.check:
        outdated = stale(args.out, generated)
        for name in outdated:
            print(f"stale: {args.out / name} (run python -m llmtrace.dashboards.generate)",
                  file=sys.stderr)
        return 1 if outdated else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in generated.items():
        (args.out / name).write_text(text)
        print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
