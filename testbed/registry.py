"""Check emitted telemetry against the ``semconv/`` registry.

Tests call :func:`assert_in_registry` on what arrived over OTLP so a name that
is not in the registry (a typo, or a new attribute nobody documented) fails a
test instead of reaching users' dashboards.
"""

from __future__ import annotations

from collections.abc import Iterable

from llmtrace import semconv
from testbed.otlp_receiver import ReceivedPoint, ReceivedSpan


def registry_violations(
    spans: Iterable[ReceivedSpan] = (),
    points: Iterable[ReceivedPoint] = (),
    scope_prefix: str = "llmtrace",
) -> list[str]:
    """Describe every span, event, attribute or metric name the registry does not allow.

    Only telemetry from instrumentation scopes starting with ``scope_prefix`` is
    checked: the host (vLLM's own start-up spans, say) is not ours to police.
    """
    problems: list[str] = []
    for s in spans:
        if not s.scope.startswith(scope_prefix):
            continue
        allowed = semconv.SPAN_ATTRIBUTES.get(s.name)
        if s.name not in semconv.SPAN_KINDS or allowed is None:
            problems.append(f"span name {s.name!r} is not in the registry")
            continue
        for key in s.attributes:
            if key not in allowed:
                problems.append(f"span {s.name!r}: attribute {key!r} is not registered for it")
        for ev in s.events:
            if ev.name not in semconv.EVENTS:
                problems.append(f"span {s.name!r}: event {ev.name!r} is not in the registry")
            problems.extend(
                f"event {ev.name!r}: attribute {key!r} is not in the registry"
                for key in ev.attributes if key not in semconv.ATTRIBUTES
            )
    for p in points:
        if not p.scope.startswith(scope_prefix):
            continue
        if p.metric not in semconv.METRIC_UNITS:
            problems.append(f"metric {p.metric!r} is not in the registry")
            continue
        if p.unit != semconv.METRIC_UNITS[p.metric]:
            expected = semconv.METRIC_UNITS[p.metric]
            problems.append(f"metric {p.metric!r}: unit {p.unit!r} != registry {expected!r}")
        allowed = semconv.METRIC_ATTRIBUTES[p.metric]
        problems.extend(
            f"metric {p.metric!r}: attribute {key!r} is not registered for it"
            for key in p.attributes if key not in allowed
        )
    return sorted(set(problems))


def assert_in_registry(
    spans: Iterable[ReceivedSpan] = (),
    points: Iterable[ReceivedPoint] = (),
    scope_prefix: str = "llmtrace",
) -> None:
    problems = registry_violations(spans, points, scope_prefix)
    assert not problems, "names missing from semconv/ registry:\n  " + "\n  ".join(problems)
