"""Generate llmtrace's Python constants and Markdown reference from ``semconv/``.

The registry YAML (OpenTelemetry weaver's v1 ``groups`` format) is the single
source of names. OpenTelemetry weaver is not installable from the registries
this project may use, so this small Jinja2 generator stands in for
``weaver registry generate``: it validates the registry (unique ids, every
``ref`` resolves, metrics have instrument and unit) and renders two templates.

It also renders the metric schema (``llmtrace/schema.py``): for every metric
its instrument, unit, label set, buckets, SLO threshold and the record field
that feeds it, from each metric group's ``annotations.llmtrace``. Both metric
outputs (the SDK's instruments and the collector's Prometheus registry)
iterate that one table.

    python semconv/codegen/generate.py           # write the generated files
    python semconv/codegen/generate.py --check   # exit 1 if they are stale
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import yaml

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = Path(__file__).resolve().parent / "templates"
DEFAULT_REGISTRY = ROOT / "semconv" / "registry"
DEFAULT_PYTHON = ROOT / "llmtrace" / "semconv.py"
DEFAULT_MARKDOWN = ROOT / "semconv" / "REGISTRY.md"
DEFAULT_SCHEMA = ROOT / "llmtrace" / "schema.py"
#: records a metric may be fed by (``llmtrace/record/``) and the outputs that publish it
RECORDS = ("request", "usage", "transfer", "disaggregated", "evaluation")
OUTPUTS = ("sdk", "collector")

GROUP_TYPES = {"attribute_group", "span", "event", "metric"}
INSTRUMENTS = {"counter", "updowncounter", "gauge", "histogram"}
# Groups describing what other software emits: llmtrace reads these, never writes them.
INPUT_ONLY_GROUPS = ("registry.vllm.", "span.llm_request", "registry.llm_d.")


class RegistryError(ValueError):
    """The registry is invalid; the message names the file and group."""


@dataclass
class Attribute:
    name: str
    type: str
    brief: str
    note: str = ""
    upstream: bool = False
    input_only: bool = False
    members: list[dict] = field(default_factory=list)
    examples: list = field(default_factory=list)


@dataclass
class Signal:
    """A span, event or metric definition."""

    kind: str
    name: str
    brief: str
    note: str = ""
    attributes: list[str] = field(default_factory=list)
    span_kind: str = ""
    instrument: str = ""
    unit: str = ""
    prometheus: str = ""
    input_only: bool = False
    #: metric schema (``annotations.llmtrace``): record -> field, buckets, SLO, outputs
    feeds: dict[str, str] = field(default_factory=dict)
    buckets: list[float] = field(default_factory=list)
    slo: dict = field(default_factory=dict)
    outputs: list[str] = field(default_factory=lambda: list(OUTPUTS))


@dataclass
class Registry:
    attributes: dict[str, Attribute]
    spans: list[Signal]
    events: list[Signal]
    metrics: list[Signal]
    #: attribute -> record field giving a fed metric's label its value
    record_labels: dict[str, str] = field(default_factory=dict)


def constant(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).upper().strip("_")


def enum_class(name: str) -> str:
    return "".join(p.capitalize() for p in re.split(r"[^A-Za-z0-9]+", name)) + "Values"


_UNIT_WORDS = {"s": "seconds", "ms": "milliseconds", "By": "bytes", "%": "percent",
               "W": "watts", "Cel": "celsius"}


def prometheus_name(name: str, unit: str, instrument: str) -> str:
    """The Prometheus name an OTLP->Prometheus exporter gives this metric (OTel compat spec).

    Unit ``1`` adds no word: the SDK's Prometheus exporter, which serves the
    engine core's and API server's series, maps it to nothing (its ``_mapping``,
    pending specification issue 4058). An OpenTelemetry Collector's Prometheus
    exporter appends ``_ratio`` to such gauges instead (docs/hardware.md).
    """
    base = re.sub(r"[^a-zA-Z0-9_:]", "_", name)
    word = "" if unit.startswith("{") or unit == "1" else _UNIT_WORDS.get(unit, unit)
    if word and not base.endswith(f"_{word}"):
        base = f"{base}_{word}"
    if instrument == "counter" and not base.endswith("_total"):
        base = f"{base}_total"
    return base


def _type_name(raw) -> tuple[str, list[dict]]:
    if isinstance(raw, dict):
        return "enum", list(raw.get("members", []))
    return str(raw), []


def load_registry(path: Path) -> Registry:
    files = sorted(path.glob("*.yaml"))
    if not files:
        raise RegistryError(f"{path}: no registry YAML files")
    groups: list[tuple[Path, dict]] = []
    record_labels: dict[str, str] = {}
    for f in files:
        try:
            doc = yaml.safe_load(f.read_text())
        except yaml.YAMLError as exc:
            raise RegistryError(f"{f.name}: not valid YAML: {exc}") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("groups"), list):
            raise RegistryError(f"{f.name}: top level must be a mapping with a `groups` list")
        groups.extend((f, g) for g in doc["groups"])
        record_labels.update(doc.get("x-record-labels") or {})

    attrs: dict[str, Attribute] = {}
    seen_ids: set[str] = set()
    for f, g in groups:
        gid = g.get("id") if isinstance(g, dict) else None
        where = f"{f.name}: group {gid!r}"
        if not gid or g.get("type") not in GROUP_TYPES:
            raise RegistryError(f"{where}: needs an `id` and a `type` in {sorted(GROUP_TYPES)}")
        if gid in seen_ids:
            raise RegistryError(f"{where}: duplicate group id")
        seen_ids.add(gid)
        if not g.get("brief"):
            raise RegistryError(f"{where}: missing `brief`")
        input_only = gid.startswith(INPUT_ONLY_GROUPS)
        for a in g.get("attributes", []) or []:
            if "id" in a:
                if g["type"] != "attribute_group":
                    raise RegistryError(
                        f"{where}: define attribute {a['id']!r} in an attribute_group")
                if a["id"] in attrs:
                    raise RegistryError(f"{where}: attribute {a['id']!r} defined twice")
                if not a.get("type") or not a.get("brief"):
                    raise RegistryError(f"{where}: attribute {a['id']!r} needs `type` and `brief`")
                type_name, members = _type_name(a["type"])
                attrs[a["id"]] = Attribute(
                    a["id"], type_name, str(a["brief"]).strip(), str(a.get("note", "")).strip(),
                    members=members, examples=list(a.get("examples", []) or []),
                    input_only=input_only,
                )
            elif "ref" in a and g["type"] == "attribute_group":
                if a["ref"] in attrs:
                    raise RegistryError(f"{where}: upstream ref {a['ref']!r} declared twice")
                attrs[a["ref"]] = Attribute(a["ref"], "upstream", str(a.get("brief", "")).strip(),
                                            upstream=True, input_only=input_only)

    spans, events, metrics = [], [], []
    for f, g in groups:
        if g["type"] == "attribute_group":
            continue
        where = f"{f.name}: group {g['id']!r}"
        refs = []
        for a in g.get("attributes", []) or []:
            ref = a.get("ref")
            if ref is None:
                raise RegistryError(f"{where}: signals may only `ref` attributes")
            if ref not in attrs:
                raise RegistryError(f"{where}: `ref: {ref}` is not defined in the registry")
            refs.append(ref)
        common = dict(brief=str(g["brief"]).strip(), note=str(g.get("note", "")).strip(),
                      attributes=refs, input_only=g["id"].startswith(INPUT_ONLY_GROUPS))
        if g["type"] == "span":
            if not g["id"].startswith("span."):
                raise RegistryError(f"{where}: span group ids start with `span.`")
            spans.append(Signal("span", g["id"][5:], span_kind=g.get("span_kind", ""), **common))
        elif g["type"] == "event":
            if not g.get("name"):
                raise RegistryError(f"{where}: event needs a `name`")
            events.append(Signal("event", g["name"], **common))
        else:
            name, inst, unit = g.get("metric_name"), g.get("instrument"), g.get("unit")
            if not name or inst not in INSTRUMENTS or unit is None:
                raise RegistryError(
                    f"{where}: metric needs `metric_name`, `unit` and `instrument` in "
                    f"{sorted(INSTRUMENTS)}")
            metrics.append(Signal("metric", name, instrument=inst, unit=str(unit),
                                  prometheus=prometheus_name(name, str(unit), inst),
                                  **_schema(where, g, inst, refs, record_labels), **common))
    for kind, items in (("span", spans), ("event", events), ("metric", metrics)):
        names = [s.name for s in items]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise RegistryError(f"duplicate {kind} names: {dupes}")
    return Registry(dict(sorted(attrs.items())), sorted(spans, key=lambda s: s.name),
                    sorted(events, key=lambda s: s.name), sorted(metrics, key=lambda s: s.name),
                    record_labels)


def _schema(where: str, group: dict, instrument: str, labels: list[str],
            record_labels: dict[str, str]) -> dict:
    """Validate one metric's ``annotations.llmtrace`` (its row of the metric schema)."""
    ann = ((group.get("annotations") or {}).get("llmtrace")) or {}
    feeds = dict(ann.get("feeds") or {})
    buckets = list(ann.get("buckets") or [])
    if not all(type(b) is float and 0 < b < 1e6 for b in buckets):
        # OpenTelemetry's Prometheus exporter prints `le` with str(), prometheus_client in
        # Go's float format: they agree only for floats below 1e6 (4096 vs "4096.0", and
        # "1048576.0" vs "1.048576e+06", would be different series)
        raise RegistryError(f"{where}: buckets must be floats in (0, 1e6), e.g. 4096.0")
    slo = dict(ann.get("slo") or {})
    outputs = list(ann.get("outputs") or OUTPUTS)
    if not set(feeds) <= set(RECORDS) or not set(outputs) <= set(OUTPUTS):
        raise RegistryError(f"{where}: feeds records {RECORDS}, outputs {OUTPUTS}")
    if feeds:
        missing = [a for a in labels if a not in record_labels]
        if missing:
            raise RegistryError(f"{where}: no record field for label(s) {missing} "
                                "(x-record-labels)")
        if instrument == "histogram" and not buckets:
            raise RegistryError(f"{where}: a fed histogram needs `buckets`")
    if buckets != sorted(set(buckets)):
        raise RegistryError(f"{where}: buckets must increase strictly")
    if slo and float(slo.get("threshold", -1)) not in buckets:
        raise RegistryError(f"{where}: the SLO threshold must be a bucket edge, so the "
                            "SLI is an exact bucket count")
    return dict(feeds=feeds, buckets=buckets, slo=slo, outputs=outputs)


def render(registry: Registry) -> dict[str, str]:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES), keep_trailing_newline=True,
        trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined,
    )
    env.filters["const"] = constant
    env.filters["enum_class"] = enum_class
    env.filters["md"] = lambda s: str(s).replace("|", "\\|").replace("\n", " ")
    env.filters["pystr"] = repr
    ctx = {"r": registry, "records": RECORDS}
    return {
        "python": env.get_template("semconv.py.j2").render(ctx),
        "markdown": env.get_template("registry.md.j2").render(ctx),
        "schema": env.get_template("schema.py.j2").render(ctx),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if generated files are stale")
    parser.add_argument("--registry", type=Path, default=DEFAULT_REGISTRY)
    parser.add_argument("--python", type=Path, default=DEFAULT_PYTHON)
    parser.add_argument("--markdown", type=Path, default=DEFAULT_MARKDOWN)
    parser.add_argument("--schema", type=Path, default=DEFAULT_SCHEMA)
    args = parser.parse_args(argv)
    try:
        outputs = render(load_registry(args.registry))
    except RegistryError as exc:
        print(f"semconv registry error: {exc}", file=sys.stderr)
        return 2
    targets = {"python": args.python, "markdown": args.markdown, "schema": args.schema}
    stale = [p for key, p in targets.items()
             if not p.exists() or p.read_text() != outputs[key]]
    if args.check:
        if stale:
            print("stale generated semconv files (run `make semconv`): "
                  + ", ".join(str(p) for p in stale), file=sys.stderr)
            return 1
        print("semconv generated files are up to date")
        return 0
    for key, p in targets.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(outputs[key])
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
