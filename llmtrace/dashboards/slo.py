"""Multiwindow, multi-burn-rate SLO rules from a Sloth ``prometheus/v1`` spec.

Sloth (github.com/slok/sloth) cannot be installed here (no package, no Go module
proxy), so this module writes the rules ``sloth generate`` writes, read from Sloth
v0.16.0 (commit 0e395d8): the default plugin chain sli_rules/v1 (optimized period
SLI), metadata_rules/v1 and alert_rules/v1 with the google-30d alert windows.
Names, labels, group names, expressions and float formatting are Sloth's. The
differences: one rules file per SLO (Sloth writes one per spec), so each SLO can be
loaded, dropped and unit-tested on its own; the file header; and
``sloth_version="llmtrace"`` on ``sloth_slo_info``. Only the Sloth features the spec
needs are implemented (no SLI or SLO plugins); the rest is rejected by name.

    python -m llmtrace.dashboards.slo           # (re)write dashboards/slo/rules/
    python -m llmtrace.dashboards.slo --check   # exit 1 if those files are stale
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, NoReturn

import yaml

from llmtrace.dashboards import in_checkout, slo_spec

ROOT = Path(__file__).resolve().parents[2]
#: the checkout's spec, or the copy shipped in the wheel (read-only there)
SPEC = ROOT / "dashboards" / "slo" / "llmtrace.sloth.yaml" if in_checkout() else \
    Path(__file__).resolve().parents[1] / "assets" / "dashboards" / "slo" / "llmtrace.sloth.yaml"
RULES_DIR = ROOT / "dashboards" / "slo" / "rules"

SPEC_VERSION = "prometheus/v1"
PERIOD = "30d"  # Sloth's default --default-slo-period; the spec format has no field for it
NAME_RE = re.compile(r"^[A-Za-z0-9][-A-Za-z0-9_.]*[A-Za-z0-9]$")  # Sloth's NameRegexp
LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
WINDOW_VAR = re.compile(r"{{ *\.window *}}")  # the only template variable Sloth renders
_HOURS = {"m": 1 / 60, "h": 1.0, "d": 24.0}


@dataclass(frozen=True)
class BurnWindow:
    """One window pair of an alert: alert when ``budget_percent`` of the period's
    error budget would be spent within ``long`` (and the ``short`` window agrees)."""

    short: str
    long: str
    budget_percent: float

    def burn_rate(self) -> float:
        # Sloth's getBurnRateFactor: 2% of 30d in 1h -> 14.4, 5% in 6h -> 6, ...
        return self.budget_percent * _hours(PERIOD) / 100 / _hours(self.long)


# internal/alert/windows/google-30d.yaml: (quick, slow) for page and for ticket.
PAGE = (BurnWindow("5m", "1h", 2), BurnWindow("30m", "6h", 5))
TICKET = (BurnWindow("2h", "1d", 10), BurnWindow("6h", "3d", 10))
SLI_WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")


@dataclass(frozen=True)
class Alert:
    name: str
    labels: dict[str, str]
    annotations: dict[str, str]


@dataclass(frozen=True)
class SLO:
    service: str
    name: str
    objective: float  # percent, (0, 100)
    labels: dict[str, str]
    error_query: str | None  # events SLI ...
    total_query: str | None
    error_ratio_query: str | None  # ... or raw SLI
    page: Alert | None
    ticket: Alert | None

    @property
    def id(self) -> str:
        return f"{self.service}-{self.name}"


class SpecError(ValueError):
    """The spec is invalid; the message names the file and the field."""


def _hours(duration: str) -> float:
    return float(duration[:-1]) * _HOURS[duration[-1]]


def _go_float(x: float) -> str:
    """Format like Go's ``%v``/``%g`` on a float64: shortest digits, exponent
    below 1e-4 and from 1e6 (Sloth prints its thresholds this way)."""
    sign, digits, exp = Decimal(repr(x)).normalize().as_tuple()
    assert isinstance(exp, int)
    mant = "".join(map(str, digits))
    e10 = len(mant) + exp - 1
    if e10 < -4 or e10 >= 6:
        frac = f".{mant[1:]}" if len(mant) > 1 else ""
        return f"{'-' if sign else ''}{mant[0]}{frac}e{e10:+03d}"
    return _go_fixed(x)


def _go_fixed(x: float) -> str:
    """Go's ``strconv.FormatFloat(x, 'f', -1, 64)``."""
    s = format(Decimal(repr(x)), "f")
    return s.rstrip("0").rstrip(".") if "." in s else s


# -- spec loading and validation ------------------------------------------------


class _Fields:
    """Reads one mapping of the spec; every error names the field's path."""

    def __init__(self, src: str, path: str, data: Any, known: set[str]) -> None:
        self.src, self.path = src, path
        if not isinstance(data, dict):
            self.fail("", f"must be a mapping, got {type(data).__name__}")
        self.data: dict[str, Any] = data
        unsupported = {"slo_plugins", "plugins", "plugin"} & set(data)
        if unsupported:
            self.fail(sorted(unsupported)[0], "Sloth plugins are not supported by this generator")
        unknown = sorted(set(data) - known)
        if unknown:
            self.fail(unknown[0], f"unknown field (expected one of: {', '.join(sorted(known))})")

    def fail(self, key: str, msg: str) -> NoReturn:
        field = f"{self.path}.{key}".strip(".") if key else (self.path or "<root>")
        raise SpecError(f"{self.src}: {field}: {msg}")

    def sub(self, key: str, known: set[str], required: bool = True) -> _Fields | None:
        if key not in self.data:
            if required:
                self.fail(key, "is required")
            return None
        return _Fields(self.src, f"{self.path}.{key}".strip("."), self.data[key], known)

    def string(self, key: str, required: bool = True) -> str:
        value = self.data.get(key)
        if value is None or value == "":
            if required:
                self.fail(key, "is required")
            return ""
        if not isinstance(value, str):
            self.fail(key, f"must be a string, got {value!r}")
        return value

    def name(self, key: str) -> str:
        value = self.string(key)
        if not NAME_RE.match(value):
            self.fail(key, f"{value!r}: must start and end with an alphanumeric and contain "
                           "only alphanumerics, '.', '_' and '-'")
        return value

    def strmap(self, key: str, keys_are_labels: bool = True) -> dict[str, str]:
        value = self.data.get(key) or {}
        if not isinstance(value, dict):
            self.fail(key, "must be a mapping of strings")
        for k, v in value.items():
            if not isinstance(k, str) or (keys_are_labels and not LABEL_RE.match(k)):
                self.fail(f"{key}.{k}", "is not a valid Prometheus label name")
            if not isinstance(v, str):
                self.fail(f"{key}.{k}", f"must be a string (quote it), got {v!r}")
        return dict(value)

    def query(self, key: str) -> str:
        value = self.string(key)
        if not WINDOW_VAR.search(value):
            self.fail(key, "must use the {{.window}} template variable in its range selectors")
        if "{{" in WINDOW_VAR.sub("", value):
            self.fail(key, "only the {{.window}} template variable is supported")
        return value


def _alert(common: _Fields, key: str, name: str) -> Alert | None:
    sub = common.sub(key, {"disable", "labels", "annotations"}, required=False)
    if sub is not None and sub.data.get("disable") is True:
        return None
    if not name:
        common.fail("name", f"is required unless {key} is disabled")
    own = sub.strmap("labels") if sub else {}
    notes = sub.strmap("annotations", keys_are_labels=False) if sub else {}
    return Alert(name, {**common.strmap("labels"), **own},
                 {**common.strmap("annotations", keys_are_labels=False), **notes})


def load_spec(path: Path = SPEC) -> list[SLO]:
    """Load and validate a Sloth ``prometheus/v1`` spec (one YAML document)."""
    src = path.name
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"{src}: not valid YAML: {e}") from e
    root = _Fields(src, "", data, {"version", "service", "labels", "slos"})
    if root.data.get("version") != SPEC_VERSION:
        root.fail("version", f"must be {SPEC_VERSION!r}, got {root.data.get('version')!r}")
    service = root.name("service")
    labels = root.strmap("labels")
    items = root.data.get("slos")
    if not isinstance(items, list) or not items:
        root.fail("slos", "must be a non-empty list of SLOs")
    slos: list[SLO] = []
    known = {"name", "description", "objective", "labels", "sli", "alerting"}
    for i, item in enumerate(items):
        label = item.get("name") if isinstance(item, dict) else None
        where = f"slos[{i}]({label})" if isinstance(label, str) and label else f"slos[{i}]"
        f = _Fields(src, where, item, known)
        name = f.name("name")
        if any(s.name == name for s in slos):
            f.fail("name", f"{name!r} is used by another SLO")
        objective = f.data.get("objective")
        if isinstance(objective, bool) or not isinstance(objective, int | float):
            f.fail("objective", f"must be a number (percent, e.g. 99.9), got {objective!r}")
        if not 0 < objective < 100:
            f.fail("objective", f"must be > 0 and < 100 (percent), got {objective!r}; "
                                "100 leaves no error budget to burn")
        f.string("description", required=False)
        sli = f.sub("sli", {"events", "raw"})
        assert sli is not None
        if ("events" in sli.data) == ("raw" in sli.data):
            sli.fail("", "needs exactly one of 'events' or 'raw'")
        events = sli.sub("events", {"error_query", "total_query"}, required=False)
        raw = sli.sub("raw", {"error_ratio_query"}, required=False)
        error_query = events.query("error_query") if events else None
        total_query = events.query("total_query") if events else None
        if events and error_query == total_query:
            events.fail("total_query", "must differ from error_query")
        alerting = f.sub("alerting", {"name", "labels", "annotations", "page_alert",
                                      "ticket_alert"})
        assert alerting is not None
        alert_name = alerting.string("name", required=False)
        slos.append(SLO(
            service=service, name=name, objective=float(objective),
            labels={**labels, **f.strmap("labels")},
            error_query=error_query, total_query=total_query,
            error_ratio_query=raw.query("error_ratio_query") if raw else None,
            page=_alert(alerting, "page_alert", alert_name),
            ticket=_alert(alerting, "ticket_alert", alert_name),
        ))
    return slos


# -- rule generation (Sloth's templates) ----------------------------------------


def _sli_metric(window: str) -> str:
    return f"slo:sli_error:ratio_rate{window}"


def _ids(slo: SLO) -> dict[str, str]:
    return {"sloth_id": slo.id, "sloth_service": slo.service, "sloth_slo": slo.name}


def _filter(slo: SLO) -> str:
    # prometheus/common LabelSet.String(): sorted, ", "-separated, Go-quoted values
    return "{" + ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(_ids(slo).items())) + "}"


def _sorted(labels: dict[str, str]) -> dict[str, str]:
    return dict(sorted(labels.items()))


def _sli_rules(slo: SLO) -> list[dict[str, Any]]:
    rules = []
    for window in (*SLI_WINDOWS, PERIOD):
        if window == PERIOD:  # optimized: average of the 5m SLI over the period
            m = _sli_metric(SLI_WINDOWS[0]) + _filter(slo)
            expr = (f"sum_over_time({m}[{window}])\n/ ignoring (sloth_window)\n"
                    f"count_over_time({m}[{window}])\n")
        elif slo.error_ratio_query is not None:
            expr = f"({WINDOW_VAR.sub(window, slo.error_ratio_query)})"
        else:
            assert slo.error_query is not None and slo.total_query is not None
            expr = (f"({WINDOW_VAR.sub(window, slo.error_query)})\n/\n"
                    f"({WINDOW_VAR.sub(window, slo.total_query)})\n")
        labels = {**_ids(slo), "sloth_window": window, **slo.labels}
        rules.append({"record": _sli_metric(window), "expr": expr, "labels": _sorted(labels)})
    return rules


def _meta_rules(slo: SLO) -> list[dict[str, Any]]:
    labels = _sorted({**_ids(slo), **slo.labels})
    f = _filter(slo)
    ratio = slo.objective / 100

    def burn(window: str) -> str:
        return (f"{_sli_metric(window)}{f}\n/ on(sloth_id, sloth_slo, sloth_service) group_left\n"
                f"slo:error_budget:ratio{f}\n")

    info = {**labels, "sloth_version": "llmtrace", "sloth_mode": "cli-gen-prom",
            "sloth_spec": SPEC_VERSION, "sloth_objective": _go_fixed(slo.objective)}
    return [{"record": record, "expr": expr, "labels": _sorted(lab)} for record, expr, lab in (
        ("slo:objective:ratio", f"vector({_go_float(ratio)})", labels),
        ("slo:error_budget:ratio", f"vector(1-{_go_float(ratio)})", labels),
        ("slo:time_period:days", f"vector({_go_float(_hours(PERIOD) / 24)})", labels),
        ("slo:current_burn_rate:ratio", burn(SLI_WINDOWS[0]), labels),
        ("slo:period_burn_rate:ratio", burn(PERIOD), labels),
        ("slo:period_error_budget_remaining:ratio",
         f"1 - slo:period_burn_rate:ratio{f}", labels),
        ("sloth_slo_info", "vector(1)", info),
    )]


def _alert_rule(slo: SLO, alert: Alert, severity: str,
                windows: tuple[BurnWindow, BurnWindow]) -> dict[str, Any]:
    f, budget = _filter(slo), _go_float((100 - slo.objective) / 100)

    def cond(metric_window: str, w: BurnWindow) -> str:
        return (f"    max({_sli_metric(metric_window)}{f} > ({_go_float(w.burn_rate())} * "
                f"{budget})) without (sloth_window)\n")

    quick, slow = windows
    expr = (f"(\n{cond(quick.short, quick)}    and\n{cond(quick.long, quick)})\nor\n"
            f"(\n{cond(slow.short, slow)}    and\n{cond(slow.long, slow)})\n")
    notes = {
        "title": f"({severity}) {{{{$labels.sloth_service}}}} {{{{$labels.sloth_slo}}}} "
                 "SLO error budget burn rate is too fast.",
        "summary": "{{$labels.sloth_service}} {{$labels.sloth_slo}} "
                   "SLO error budget burn rate is over expected.",
        **alert.annotations,
    }
    return {"alert": alert.name, "expr": expr,
            "labels": _sorted({"sloth_severity": severity, **alert.labels}),
            "annotations": _sorted(notes)}


def rule_groups(slo: SLO) -> list[dict[str, Any]]:
    """The three rule groups Sloth generates for one SLO."""
    alerts = [_alert_rule(slo, a, sev, w) for a, sev, w in
              ((slo.page, "page", PAGE), (slo.ticket, "ticket", TICKET)) if a is not None]
    groups = [
        {"name": f"sloth-slo-sli-recordings-{slo.id}", "rules": _sli_rules(slo)},
        {"name": f"sloth-slo-meta-recordings-{slo.id}", "rules": _meta_rules(slo)},
    ]
    if alerts:
        groups.append({"name": f"sloth-slo-alerts-{slo.id}", "rules": alerts})
    return groups


class _Dumper(yaml.SafeDumper):
    """Block scalars for multi-line expressions, as Sloth's YAML output has."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar(
    "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def render(slo: SLO, spec: Path = SPEC) -> str:
    shown = spec.relative_to(ROOT) if spec.is_relative_to(ROOT) else spec.name
    header = (f"# Code generated by llmtrace.dashboards.slo from {shown}: the rules Sloth\n"
              f"# generates for SLO {slo.id!r}. DO NOT EDIT; run `python -m "
              "llmtrace.dashboards.slo`.\n")
    return header + yaml.dump({"groups": rule_groups(slo)}, Dumper=_Dumper, sort_keys=False)


def build(spec: Path = SPEC) -> dict[str, str]:
    """File name -> content of every rules file the spec produces."""
    return {f"{slo.name}.rules.yml": render(slo, spec) for slo in load_spec(spec)}


def stale(spec: Path = SPEC, out: Path = RULES_DIR) -> list[str]:
    """Rules files that are missing, differ from the spec, or belong to no SLO."""
    want = build(spec)
    have = {p.name for p in out.glob("*.rules.yml")} if out.is_dir() else set()
    wrong = [n for n, text in want.items() if n not in have or (out / n).read_text() != text]
    return sorted(wrong + [n for n in have if n not in want])


def write(spec: Path = SPEC, out: Path = RULES_DIR) -> list[str]:
    """(Re)write the rules files, remove orphans; returns the files changed."""
    want, changed = build(spec), stale(spec, out)
    out.mkdir(parents=True, exist_ok=True)
    for name in changed:
        if name in want:
            (out / name).write_text(want[name])
        else:
            (out / name).unlink()
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmtrace.dashboards.slo",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", type=Path, default=SPEC, help="Sloth prometheus/v1 spec")
    parser.add_argument("--out", type=Path, default=None,
                        help="rules directory (in a source checkout: dashboards/slo/rules)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the rules files are stale")
    args = parser.parse_args(argv)
    if args.out is None:
        if not in_checkout():
            parser.error("--out DIR is required outside a source checkout")
        args.out = RULES_DIR
    try:
        spec_changed = args.spec == SPEC and in_checkout() and slo_spec.sync(SPEC, args.check)
        changed = stale(args.spec, args.out) if args.check else write(args.spec, args.out)
        if spec_changed:
            print(f"{'stale' if args.check else 'wrote'}: {SPEC}")
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    verb = "stale" if args.check else "wrote"
    for name in changed:
        print(f"{verb}: {args.out / name}")
    if args.check and (changed or spec_changed):
        print("run `python -m llmtrace.dashboards.slo` to regenerate", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
