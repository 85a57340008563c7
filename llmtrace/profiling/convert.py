"""Turn a torch profiler Chrome trace into OTLP spans joined to llmtrace's traces.

The join: llmtrace tags each region it enters while a profiler runs with the
ids of the span it exports for that region (:mod:`llmtrace.profiling.tags`).
Each tagged region of the profile becomes one ``llmtrace.profile.excerpt`` span
in the region's trace, a child of that span: it covers the region as the
profile timed it (the profiler's clock and the span's may differ by a little;
both are shown, neither is rewritten). The tagged event itself is not emitted
again, since llmtrace already exported it. What ran inside the region (by
time containment on the same pid and thread) hangs under the excerpt, nesting
preserved; device work (kernels, memory copies, GPU annotations) hangs under
the host event that launched it, found by the launch's ``correlation`` id or
the ``External id`` Kineto gives both sides.

Everything outside a tagged region goes under one ``llmtrace.profile`` root
span per file, in a trace of its own. The root links to every trace the file
touched and each excerpt links back to the root, so a profile opens from a
trace and a trace from a profile.

Volume is bounded (:class:`Limits`): by default user annotations, host
operators that no other operator encloses, and device work above a minimum
duration; at most ``max_events`` spans, preferring regions, then events inside
them, annotations, and longer events; what the cap cut is counted on the root.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from opentelemetry.sdk.resources import HOST_NAME, PROCESS_PID, SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags

from llmtrace import __version__, semconv
from llmtrace.profiling.chrome import ChromeTrace, Event
from llmtrace.profiling.tags import parse
from llmtrace.telemetry import FrozenResource

ANNOTATIONS = frozenset({"user_annotation", "gpu_user_annotation"})
#: device-side work; with gpu_user_annotation, the events placed under their launch
DEVICE_WORK = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})
DEVICE_SIDE = DEVICE_WORK | {"gpu_user_annotation"}
#: host events whose ``External id`` a device event can name (not the runtime calls)
_EXTERNAL_OWNERS = frozenset({"cpu_op", "user_annotation"})
#: the SDK's default span link limit (OTEL_SPAN_LINK_COUNT_LIMIT); backends apply it too
MAX_LINKS = 128
DEFAULT_SERVICE = "llmtrace-profile"

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


@dataclass(frozen=True)
class Limits:
    """What a conversion keeps; the defaults fit a few profiled steps of a large model."""

    max_events: int = 10_000
    #: operators and device work shorter than this are left out (annotations never are)
    min_duration_us: float = 5.0
    #: every complete event above the minimum duration, nested operators included
    all_events: bool = False


@dataclass
class Conversion:
    spans: list[ReadableSpan]
    root: ReadableSpan
    #: trace ids of the tagged regions the file touched
    traces: list[int]
    events_read: int
    converted: int
    dropped: int


def _nesting(events: list[Event]) -> tuple[list[int], list[int]]:
    """Each event's innermost enclosing event on its pid/thread, and a parent-first order.

    Host events come before device events in the order, so a device event's
    launch (always a host event) is resolved before it.
    """
    parent = [-1] * len(events)
    lanes: dict[tuple[bool, Any, Any], list[int]] = {}
    for i, e in enumerate(events):
        lanes.setdefault((e.cat in DEVICE_SIDE, e.pid, e.tid), []).append(i)
    order: list[int] = []
    for key in sorted(lanes, key=lambda k: (k[0], str(k[1]), str(k[2]))):
        lane = lanes[key]
        lane.sort(key=lambda i: (events[i].start_ns, -events[i].end_ns))
        stack: list[int] = []
        for i in lane:
            while stack and events[stack[-1]].end_ns < events[i].end_ns:
                stack.pop()
            if stack:
                parent[i] = stack[-1]
            stack.append(i)
        order.extend(lane)
    return parent, order


def _anchor_device_events(events: list[Event], parent: list[int]) -> None:
    """Re-parent device events under the host event that launched them."""
    by_corr: dict[Any, int] = {}
    by_external: dict[Any, int] = {}
    for i, e in enumerate(events):
        if e.cat in DEVICE_SIDE:
            continue
        corr = e.args.get("correlation")
        if corr is not None:
            by_corr.setdefault(corr, i)
        ext = e.args.get("External id")
        if ext is not None and e.cat in _EXTERNAL_OWNERS:  # a launch shares its op's id
            by_external.setdefault(ext, i)
    for i, e in enumerate(events):
        if e.cat in DEVICE_SIDE:
            host = by_corr.get(e.args.get("correlation"))
            if host is None:
                host = by_external.get(e.args.get("External id"))
            if host is not None:
                parent[i] = host


def _ids() -> tuple[int, int]:
    return random.getrandbits(128) or 1, random.getrandbits(64) or 1


def _event_attributes(e: Event) -> dict[str, Any]:
    attrs: dict[str, Any] = {semconv.LLMTRACE_PROFILE_CATEGORY: e.cat}
    for key, value in ((semconv.LLMTRACE_PROFILE_PID, e.pid), (semconv.LLMTRACE_PROFILE_TID, e.tid),
                       (semconv.LLMTRACE_PROFILE_DEVICE, e.args.get("device")),
                       (semconv.LLMTRACE_PROFILE_STREAM, e.args.get("stream"))):
        if isinstance(value, int) and not isinstance(value, bool):
            attrs[key] = value
    return attrs


def _main_process(trace: ChromeTrace) -> Any:
    """The host process the profile belongs to: the pid with the most host events."""
    counts: dict[Any, int] = {}
    for e in trace.events:
        if e.cat not in DEVICE_SIDE and isinstance(e.pid, int):
            counts[e.pid] = counts.get(e.pid, 0) + 1
    return max(counts, key=counts.__getitem__) if counts else None


def resource_for(trace: ChromeTrace, pid: Any) -> Resource:
    """OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES apply; the profile's host and pid join."""
    created = Resource.create({})
    attrs: dict[str, Any] = {}
    if str(created.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        attrs[SERVICE_NAME] = DEFAULT_SERVICE
    if trace.host_name:
        attrs[HOST_NAME] = trace.host_name
    if isinstance(pid, int):
        attrs[PROCESS_PID] = pid
    merged = created.merge(Resource(attrs))
    # hashed once: the OTLP encoder hashes the resource of every span it groups
    return FrozenResource(merged.attributes, merged.schema_url)


def convert(trace: ChromeTrace, limits: Limits = Limits(),
            resource: Resource | None = None) -> Conversion:
    """The spans of one profile file: its root, region excerpts and selected events."""
    events = trace.events
    parent, order = _nesting(events)
    _anchor_device_events(events, parent)
    tags = [parse(e.name) for e in events]
    is_region = [t is not None and e.cat not in DEVICE_SIDE
                 for t, e in zip(tags, events, strict=True)]

    # which tagged region (if any) holds each event, and whether an operator encloses it
    region = [-1] * len(events)
    under_op = [False] * len(events)
    for i in order:
        p = parent[i]
        if p >= 0:
            region[i] = p if is_region[p] else region[p]
            under_op[i] = events[p].cat == "cpu_op" or under_op[p]

    min_ns = round(limits.min_duration_us * 1000)
    candidates = []
    for i, e in enumerate(events):
        long_enough = e.end_ns - e.start_ns >= min_ns
        if (is_region[i] or (limits.all_events and long_enough) or e.cat in ANNOTATIONS
                or (e.cat == "cpu_op" and not under_op[i] and long_enough)
                or (e.cat in DEVICE_WORK and long_enough)):
            candidates.append(i)
    if len(candidates) > limits.max_events:
        candidates.sort(key=lambda i: (not is_region[i], region[i] < 0,
                                       events[i].cat not in ANNOTATIONS,
                                       events[i].start_ns - events[i].end_ns))
    kept = set(candidates[:max(limits.max_events, 0)])
    dropped = len(candidates) - len(kept)

    pid = _main_process(trace)
    resource = resource or resource_for(trace, pid)
    scope = InstrumentationScope("llmtrace.profiling", __version__)
    root_trace, root_span = _ids()
    root_ctx = SpanContext(root_trace, root_span, False, _SAMPLED)
    root_link = (Link(root_ctx),)

    def span(name: str, ctx: SpanContext, parent_ctx: SpanContext, e: Event,
             attrs: dict[str, Any], links: tuple[Link, ...] = ()) -> ReadableSpan:
        return ReadableSpan(name=name, context=ctx, parent=parent_ctx, resource=resource,
                            attributes=attrs, links=links, kind=SpanKind.INTERNAL,
                            instrumentation_scope=scope, start_time=e.start_ns,
                            end_time=e.end_ns)

    #: the context children of each event hang under (itself if emitted, else inherited)
    under: list[SpanContext | None] = [None] * len(events)
    spans: list[ReadableSpan] = []
    traces: dict[int, int] = {}  # tagged trace -> first tagged span, for the root's links
    for i in order:
        e = events[i]
        inherited = under[parent[i]] if parent[i] >= 0 else root_ctx
        if is_region[i]:
            name, trace_id, span_id = tags[i]
            traces.setdefault(trace_id, span_id)
            tagged = SpanContext(trace_id, span_id, False, _SAMPLED)
            under[i] = tagged
            if i in kept:
                ctx = SpanContext(trace_id, _ids()[1], False, _SAMPLED)
                attrs = _event_attributes(e)
                attrs[semconv.LLMTRACE_PROFILE_REGION] = name
                attrs[semconv.LLMTRACE_PROFILE_FILE] = trace.path
                spans.append(span(semconv.SPAN_LLMTRACE_PROFILE_EXCERPT, ctx, tagged, e, attrs,
                                  root_link))
                under[i] = ctx
            continue
        under[i] = inherited
        if i in kept:
            ctx = SpanContext(inherited.trace_id, _ids()[1], False, _SAMPLED)
            name = tags[i][0] if tags[i] else e.name
            spans.append(span(name, ctx, inherited, e, _event_attributes(e)))
            under[i] = ctx

    links = [Link(SpanContext(t, s, False, _SAMPLED)) for t, s in traces.items()]
    root_attrs: dict[str, Any] = {
        semconv.LLMTRACE_PROFILE_FILE: trace.path,
        semconv.LLMTRACE_PROFILE_EVENTS_READ: len(events),
        semconv.LLMTRACE_PROFILE_EVENTS_CONVERTED: len(spans),
        semconv.LLMTRACE_PROFILE_EVENTS_DROPPED: dropped,
        semconv.LLMTRACE_PROFILE_TRACES: len(traces),
        semconv.LLMTRACE_PROFILE_LINKS_DROPPED: max(len(links) - MAX_LINKS, 0),
    }
    if isinstance(pid, int):
        root_attrs[semconv.LLMTRACE_PROFILE_PID] = pid
        if pid in trace.process_names:
            root_attrs[semconv.LLMTRACE_PROFILE_PROCESS_NAME] = trace.process_names[pid]
    root = ReadableSpan(name=semconv.SPAN_LLMTRACE_PROFILE, context=root_ctx, parent=None,
                        resource=resource, attributes=root_attrs, links=links[:MAX_LINKS],
                        kind=SpanKind.INTERNAL, instrumentation_scope=scope,
                        start_time=min(e.start_ns for e in events),
                        end_time=max(e.end_ns for e in events))
    return Conversion([root, *spans], root, list(traces), len(events), len(spans), dropped)
