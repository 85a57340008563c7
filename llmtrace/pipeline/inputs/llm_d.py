"""Routing decisions of llm-d's router (the endpoint picker, EPP), read from its spans.

Span names and attribute keys are those of GH llm-d/llm-d-router at commit
ebab687927f5 (2026-08-21), the repository that replaced llm-d-inference-scheduler
and now embeds the Gateway API Inference Extension EPP:

- ``pkg/epp/requestcontrol/director.go``: ``gateway.request_orchestration``
  (child of the SERVER span ``gateway.request`` in ``pkg/epp/handlers/server.go``)
- ``pkg/epp/scheduling/scheduler.go``: ``run_scheduler_profile``, one per profile run
- ``pkg/epp/scheduling/scheduler_profile.go``: ``llm_d.epp.scoring`` ->
  ``llm_d.epp.scorer.<type>``, and ``pick_endpoints``
- ``pkg/epp/framework/plugins/scheduling/profilehandler/disagg/``: ``pick_pd_profile``
  (pd_profile_handler.go), ``pick_disagg_profile`` and ``prepare_disaggregation``
  (disagg_profile_handler.go, disagg_headers_handler.go)
- ``pkg/epp/framework/plugins/scheduling/scorer/preciseprefixcache/``:
  ``score_prefix_cache``

llm-d-inference-scheduler (520af47, 2026-05) named the P/D span
``llm_d.epp.prerequest.disaggregation``, with the same attributes; it is read too.

One request's tree: ``gateway.request_orchestration`` -> ``run_scheduler_profile``
(``decode``, ``prefill``, ...) -> ``llm_d.epp.scoring`` -> ``llm_d.epp.scorer.<type>``
and ``run_scheduler_profile`` -> ``pick_endpoints``; the profile-handler and
``prepare_disaggregation`` spans hang off the orchestration span. The router's
spans share the engine's trace but are not children of its request span.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from llmtrace import semconv as sc
from llmtrace.pipeline.view import SpanView

ORCHESTRATION = "gateway.request_orchestration"
PROFILE_RUN = "run_scheduler_profile"
SCORING = "llm_d.epp.scoring"
SCORER_PREFIX = "llm_d.epp.scorer."  # + scorer plugin type
PRECISE_PREFIX_SCORE = "score_prefix_cache"
PICK = "pick_endpoints"
PICK_PD_PROFILE = "pick_pd_profile"
PICK_DISAGG_PROFILE = "pick_disagg_profile"
PREPARE_DISAGG = "prepare_disaggregation"
PREPARE_DISAGG_OLD = "llm_d.epp.prerequest.disaggregation"

#: scorer plugin types built into llm-d-router at that commit (custom ones: see router_keys)
SCORER_TYPES = (
    "active-request-scorer", "endpoint-attribute-scorer", "header-label-affinity-scorer",
    "kv-cache-utilization-scorer", "latency-scorer", "load-aware-scorer",
    "lora-affinity-scorer", "mm-embeddings-cache-scorer",
    "multicluster-kv-cache-utilization-scorer", "multicluster-prefix-cache-scorer",
    "multicluster-queue-scorer", "no-hit-lru-scorer", "precise-prefix-cache-scorer",
    "prefix-cache-scorer", "queue-scorer", "running-requests-size-scorer",
    "session-affinity-scorer", "token-load-scorer", "topology-affinity-scorer",
)
PREFIX_SCORERS = frozenset({"prefix-cache-scorer", "precise-prefix-cache-scorer",
                            "multicluster-prefix-cache-scorer"})

_SCORER_KEYS = frozenset({sc.LLM_D_EPP_SCORER_TYPE, sc.LLM_D_EPP_SCORER_SCORE_MAX})
_DISAGG_KEYS = frozenset({
    sc.LLM_D_EPP_PD_DISAGGREGATION_USED, sc.LLM_D_EPP_PD_REASON, sc.LLM_D_EPP_DISAGG_REASON,
    sc.LLM_D_EPP_PD_PREFILL_POD_ADDRESS, sc.LLM_D_EPP_PD_PREFILL_POD_PORT,
})

#: llm-d span name -> attribute keys routing_of reads (an empty set: timing or tree links)
ROUTER_WANTED: dict[str, frozenset[str]] = {
    ORCHESTRATION: frozenset(),
    PROFILE_RUN: frozenset({sc.LLM_D_EPP_SCHEDULING_PROFILE_NAME}),
    SCORING: frozenset(),
    **{SCORER_PREFIX + t: _SCORER_KEYS for t in SCORER_TYPES},
    PRECISE_PREFIX_SCORE: frozenset({sc.LLM_D_EPP_SCORER_SCORE_MAX}),
    PICK: frozenset({sc.LLM_D_EPP_PICKER_TOP_ENDPOINTS, sc.LLM_D_EPP_PICKER_TOP_SCORES}),
    PICK_PD_PROFILE: frozenset({sc.LLM_D_EPP_PROFILE_HANDLER_DECISION,
                                sc.LLM_D_EPP_PROFILE_HANDLER_SELECTED_PROFILE}),
    PICK_DISAGG_PROFILE: frozenset({sc.LLM_D_EPP_PROFILE_HANDLER_DECISION}),
    PREPARE_DISAGG: _DISAGG_KEYS,
    PREPARE_DISAGG_OLD: _DISAGG_KEYS,
}

# profile-handler decisions that say nothing about the outcome (a step, or "done")
_STEP_DECISIONS = frozenset({"run_decode", "complete"})
_MAX_DEPTH = 16


def router_keys(name: str) -> frozenset[str] | None:
    """ROUTER_WANTED lookup that also accepts scorer spans of custom plugin types."""
    keys = ROUTER_WANTED.get(name)
    if keys is None and name.startswith(SCORER_PREFIX):
        return _SCORER_KEYS
    return keys


def _get(span: SpanView, key: str) -> Any:
    attrs = span.attributes
    return attrs.get(key) if isinstance(attrs, dict) else None


def _str(span: SpanView, key: str) -> str | None:
    value = _get(span, key)
    return value if isinstance(value, str) and value else None


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _ns(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _end(span: SpanView) -> int:
    return _ns(span.end_ns) or 0


def _seconds(start: Any, end: Any) -> float | None:
    start, end = _ns(start), _ns(end)
    if start is None or end is None or end < start or start <= 0:
        return None
    return (end - start) / 1e9


def _first(value: Any, kind: type) -> Any:
    if not isinstance(value, (list, tuple)) or not value:
        return None
    head = value[0]
    if kind is float:
        return _num(head)
    return head if isinstance(head, kind) and head else None


def _host_port(host: str, port: Any) -> str:
    if isinstance(port, int) and not isinstance(port, bool):
        port = str(port)
    if not isinstance(port, str) or not port:
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # like Go's net.JoinHostPort


def _ancestor(span: SpanView, by_id: dict[bytes, SpanView], name: str) -> SpanView | None:
    current = span
    for _ in range(_MAX_DEPTH):
        parent = current.parent_span_id
        current = by_id.get(parent) if isinstance(parent, bytes) and parent else None
        if current is None or current.name == name:
            return current
    return None


def _primary_profile(profiles: set[str], handler_spans: list[SpanView]) -> str | None:
    """The profile whose pick is the endpoint serving the request (decode, in P/D)."""
    for span in handler_spans:
        if _str(span, sc.LLM_D_EPP_PROFILE_HANDLER_DECISION) == "run_decode":
            chosen = _str(span, sc.LLM_D_EPP_PROFILE_HANDLER_SELECTED_PROFILE)
            if chosen is not None:
                return chosen
    if len(profiles) == 1:
        return next(iter(profiles))
    if "decode" in profiles:  # llm-d's default decode profile name
        return "decode"
    rest = profiles - {"prefill", "encode"}
    return next(iter(rest)) if len(rest) == 1 else None


def routing_of(spans: Iterable[SpanView], trace_id: bytes | None = None) -> dict[str, Any]:
    """Map one trace's llm-d router spans to ``llmtrace.router.*`` attributes.

    Other spans are ignored, as are spans of another trace than ``trace_id``
    (default: the trace of the first orchestration span, else of the first
    router span). When the trace holds several router passes (a retry, or
    several requests under one ``traceparent``), the latest pass is described.
    Missing or wrongly typed values leave their attribute out; it never raises.
    """
    router = [s for s in spans if isinstance(s, SpanView) and isinstance(s.name, str)
              and router_keys(s.name) is not None]
    if trace_id is None:
        anchors = [s for s in router if s.name == ORCHESTRATION] or router
        trace_id = anchors[0].trace_id if anchors else None
    router = [s for s in router if s.trace_id == trace_id]
    by_id = {s.span_id: s for s in router if isinstance(s.span_id, bytes) and s.span_id}
    passes = [s for s in router if s.name == ORCHESTRATION]
    anchor = max(passes, key=lambda s: _ns(s.start_ns) or 0) if passes else None
    if len(passes) > 1:
        router = [s for s in router
                  if s is anchor or _ancestor(s, by_id, ORCHESTRATION) is anchor]

    out: dict[str, Any] = {}
    if anchor is not None and (d := _seconds(anchor.start_ns, anchor.end_ns)) is not None:
        out[sc.LLMTRACE_ROUTER_ORCHESTRATION_DURATION] = d

    runs = [s for s in router if s.name == PROFILE_RUN]
    starts = [t for s in runs if (t := _ns(s.start_ns)) is not None]
    ends = [t for s in runs if (t := _ns(s.end_ns)) is not None]
    if starts and ends and (d := _seconds(min(starts), max(ends))) is not None:
        out[sc.LLMTRACE_ROUTER_SCHEDULING_DURATION] = d

    profile_of = {s.span_id: _str(s, sc.LLM_D_EPP_SCHEDULING_PROFILE_NAME)
                  for s in runs if isinstance(s.span_id, bytes)}
    profiles = {p for p in profile_of.values() if p is not None}
    handlers = sorted((s for s in router if s.name in (PICK_PD_PROFILE, PICK_DISAGG_PROFILE)),
                      key=_end)
    primary = _primary_profile(profiles, handlers)

    def in_primary(span: SpanView) -> bool:
        run = _ancestor(span, by_id, PROFILE_RUN)
        profile = profile_of.get(run.span_id) if run is not None else None
        if profile is None:
            return len(profiles) <= 1
        return profile == primary

    picks = [s for s in router if s.name == PICK]
    chosen = [s for s in picks if in_primary(s)] or (picks if len(picks) == 1 else [])
    if chosen:
        pick = max(chosen, key=_end)
        if (endpoint := _first(_get(pick, sc.LLM_D_EPP_PICKER_TOP_ENDPOINTS), str)) is not None:
            out[sc.LLMTRACE_ROUTER_ENDPOINT] = endpoint
        if (score := _first(_get(pick, sc.LLM_D_EPP_PICKER_TOP_SCORES), float)) is not None:
            out[sc.LLMTRACE_ROUTER_ENDPOINT_SCORE] = score

    scorer_max: dict[str, float] = {}
    for span in router:
        if not span.name.startswith(SCORER_PREFIX) or not in_primary(span):
            continue
        kind = _str(span, sc.LLM_D_EPP_SCORER_TYPE) or span.name[len(SCORER_PREFIX):]
        score = _num(_get(span, sc.LLM_D_EPP_SCORER_SCORE_MAX))
        if kind and score is not None:
            scorer_max[kind] = max(score, scorer_max.get(kind, score))
    for kind, score in sorted(scorer_max.items()):
        out[f"{sc.LLMTRACE_ROUTER_SCORER_MAX}.{kind}"] = score
    prefix = [v for k, v in scorer_max.items() if k in PREFIX_SCORERS] or [
        v for s in router if s.name == PRECISE_PREFIX_SCORE and in_primary(s)
        if (v := _num(_get(s, sc.LLM_D_EPP_SCORER_SCORE_MAX))) is not None]
    if prefix:
        out[sc.LLMTRACE_ROUTER_PREFIX_CACHE_SCORE] = max(prefix)

    decisions = [d for s in handlers
                 if (d := _str(s, sc.LLM_D_EPP_PROFILE_HANDLER_DECISION)) is not None
                 and d not in _STEP_DECISIONS]
    if decisions:
        out[sc.LLMTRACE_ROUTER_DECISION] = decisions[-1]

    prepared = [s for s in router if s.name in (PREPARE_DISAGG, PREPARE_DISAGG_OLD)]
    if prepared:
        prep = max(prepared, key=_end)
        used = _get(prep, sc.LLM_D_EPP_PD_DISAGGREGATION_USED)
        if isinstance(used, bool):
            out[sc.LLMTRACE_ROUTER_PD_DISAGGREGATED] = used
        reason = _str(prep, sc.LLM_D_EPP_PD_REASON) or _str(prep, sc.LLM_D_EPP_DISAGG_REASON)
        if reason is not None:
            out[sc.LLMTRACE_ROUTER_PD_REASON] = reason
        host = _str(prep, sc.LLM_D_EPP_PD_PREFILL_POD_ADDRESS)
        if host is not None and used is not False:
            out[sc.LLMTRACE_ROUTER_PREFILL_ADDRESS] = _host_port(
                host, _get(prep, sc.LLM_D_EPP_PD_PREFILL_POD_PORT))
    return out
