"""llm-d router (EPP) spans -> ``llmtrace.router.*`` attributes.

llm-d's router is a Go service that needs Kubernetes and an Envoy gateway; it
cannot run on this machine. The spans below are built to match what its source
emits (GH llm-d/llm-d-router at ebab687927f5): names, attribute keys, value
types and parent/child links from pkg/epp/requestcontrol/director.go,
pkg/epp/scheduling/scheduler.go, pkg/epp/scheduling/scheduler_profile.go and
pkg/epp/framework/plugins/scheduling/profilehandler/disagg/
{pd_profile_handler.go,disagg_profile_handler.go}. Scores are float64, endpoint
ids are Kubernetes "namespace/name", prefill ports are strings.
"""

from __future__ import annotations

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from llmtrace import semconv as sc
from llmtrace.pipeline.inputs.llm_d import ROUTER_WANTED, router_keys, routing_of
from llmtrace.pipeline.spans import SpanView, spans_from_request

MS = 1_000_000
T0 = 1_760_000_000_000 * MS
TRACE = b"\x11" * 16
OTHER_TRACE = b"\x22" * 16
GATEWAY = b"\x00" * 7 + b"\x01"  # gateway.request, the EPP's SERVER span (never wanted)


def _sid(n: int) -> bytes:
    return n.to_bytes(8, "big")


# (name, span id, parent id, start ms, end ms, attributes): one request through the EPP
def _pd_request(*, split: bool, base: int = 10) -> list[tuple]:
    orch, run_d, scoring_d, run_p, scoring_p = (_sid(base + i) for i in range(5))
    rows = [
        ("gateway.request_orchestration", orch, GATEWAY, 0.0, 2.0,
         {"target_model": "m", "request_prio": 0}),
        ("pick_pd_profile", _sid(base + 20), orch, 0.10, 0.11, {
            "llm_d.epp.profile_handler.total_profiles": 2,
            "llm_d.epp.profile_handler.executed_profiles": 0,
            "llm_d.epp.profile_handler.decision": "run_decode",
            "llm_d.epp.profile_handler.selected_profile": "decode"}),
        ("run_scheduler_profile", run_d, orch, 0.2, 0.9,
         {"llm_d.epp.scheduling.profile.name": "decode"}),
        ("filter_endpoints", _sid(base + 21), run_d, 0.2, 0.3,
         {"llm_d.epp.filter.candidate_endpoints": 4}),
        ("llm_d.epp.scoring", scoring_d, run_d, 0.3, 0.8, {"llm_d.epp.scorer.count": 3}),
        ("llm_d.epp.scorer.prefix-cache-scorer", _sid(base + 22), scoring_d, 0.3, 0.5, {
            "llm_d.epp.scorer.type": "prefix-cache-scorer", "llm_d.epp.scorer.name": "prefix",
            "llm_d.epp.scorer.weight": 3.0, "llm_d.epp.scorer.score.max": 0.75,
            "llm_d.epp.scorer.score.avg": 0.2, "llm_d.epp.scorer.endpoints_scored": 4}),
        ("llm_d.epp.scorer.queue-scorer", _sid(base + 23), scoring_d, 0.5, 0.6, {
            "llm_d.epp.scorer.type": "queue-scorer", "llm_d.epp.scorer.score.max": 1.0}),
        ("llm_d.epp.scorer.kv-cache-utilization-scorer", _sid(base + 24), scoring_d, 0.6, 0.8,
         {"llm_d.epp.scorer.type": "kv-cache-utilization-scorer",
          "llm_d.epp.scorer.score.max": 0.5}),
        ("pick_endpoints", _sid(base + 25), run_d, 0.8, 0.9, {
            "llm_d.epp.picker.candidate_endpoints": 4,
            "llm_d.epp.picker.top_endpoints": ["llm-d/decode-1", "llm-d/decode-0"],
            "llm_d.epp.picker.top_scores": [2.9, 1.4]}),
    ]
    if split:
        rows += [
            ("pick_pd_profile", _sid(base + 26), orch, 0.95, 0.96, {
                "llm_d.epp.profile_handler.decision": "prefill_decode",
                "llm_d.epp.profile_handler.selected_profile": "prefill"}),
            ("run_scheduler_profile", run_p, orch, 1.0, 1.5,
             {"llm_d.epp.scheduling.profile.name": "prefill"}),
            ("llm_d.epp.scoring", scoring_p, run_p, 1.1, 1.3, {}),
            ("llm_d.epp.scorer.prefix-cache-scorer", _sid(base + 27), scoring_p, 1.1, 1.3, {
                "llm_d.epp.scorer.type": "prefix-cache-scorer",
                "llm_d.epp.scorer.score.max": 0.9}),
            ("pick_endpoints", _sid(base + 28), run_p, 1.3, 1.5, {
                "llm_d.epp.picker.top_endpoints": ["llm-d/prefill-0"],
                "llm_d.epp.picker.top_scores": [0.9]}),
            ("pick_pd_profile", _sid(base + 29), orch, 1.55, 1.56, {
                "llm_d.epp.profile_handler.decision": "complete",
                "llm_d.epp.profile_handler.decode_failed": False}),
            ("prepare_disaggregation", _sid(base + 30), orch, 1.6, 1.7, {
                "gen_ai.request.id": "req-1",
                "llm_d.epp.pd.disaggregation_used": True,
                "llm_d.epp.pd.prefill_pod_address": "10.244.0.21",
                "llm_d.epp.pd.prefill_pod_port": "8000",
                "llm_d.epp.encode.disaggregation_used": False,
                "llm_d.epp.encode.reason": "no_encode_profile_result"}),
        ]
    else:
        rows += [
            ("pick_pd_profile", _sid(base + 26), orch, 0.95, 0.96,
             {"llm_d.epp.profile_handler.decision": "decode_only"}),
            ("prepare_disaggregation", _sid(base + 30), orch, 1.6, 1.7, {
                "llm_d.epp.pd.disaggregation_used": False,
                "llm_d.epp.pd.reason": "no_prefill_profile_result"}),
        ]
    return rows


def _views(rows, trace: bytes = TRACE, t0: int = T0) -> list[SpanView]:
    return [SpanView(name, trace, sid, parent, t0 + int(s * MS), t0 + int(e * MS), 0,
                     dict(attrs), {"service.name": "epp"})
            for name, sid, parent, s, e, attrs in rows]


def _engine_root(trace: bytes = TRACE) -> SpanView:
    # llmtrace's request span: same trace, a sibling of the router's spans, not a child
    return SpanView(sc.SPAN_LLMTRACE_REQUEST, trace, _sid(999), b"\x09" * 8, T0 + 3 * MS,
                    T0 + 900 * MS, 0, {sc.GEN_AI_REQUEST_MODEL: "m"}, {"service.name": "vllm"})


def test_pd_split_maps_the_decode_pick_and_the_prefill_address():
    got = routing_of([_engine_root(), *_views(_pd_request(split=True))])
    assert got == {
        sc.LLMTRACE_ROUTER_ORCHESTRATION_DURATION: pytest.approx(0.002),
        sc.LLMTRACE_ROUTER_SCHEDULING_DURATION: pytest.approx(0.0013),
        sc.LLMTRACE_ROUTER_ENDPOINT: "llm-d/decode-1",
        sc.LLMTRACE_ROUTER_ENDPOINT_SCORE: 2.9,
        f"{sc.LLMTRACE_ROUTER_SCORER_MAX}.prefix-cache-scorer": 0.75,
        f"{sc.LLMTRACE_ROUTER_SCORER_MAX}.queue-scorer": 1.0,
        f"{sc.LLMTRACE_ROUTER_SCORER_MAX}.kv-cache-utilization-scorer": 0.5,
        sc.LLMTRACE_ROUTER_PREFIX_CACHE_SCORE: 0.75,  # decode profile's, not prefill's 0.9
        sc.LLMTRACE_ROUTER_DECISION: "prefill_decode",
        sc.LLMTRACE_ROUTER_PD_DISAGGREGATED: True,
        sc.LLMTRACE_ROUTER_PREFILL_ADDRESS: "10.244.0.21:8000",
    }


def test_decode_only_reports_why_prefill_was_not_split():
    got = routing_of(_views(_pd_request(split=False)))
    assert got[sc.LLMTRACE_ROUTER_PD_DISAGGREGATED] is False
    assert got[sc.LLMTRACE_ROUTER_PD_REASON] == "no_prefill_profile_result"
    assert got[sc.LLMTRACE_ROUTER_DECISION] == "decode_only"
    assert got[sc.LLMTRACE_ROUTER_ENDPOINT] == "llm-d/decode-1"
    assert sc.LLMTRACE_ROUTER_PREFILL_ADDRESS not in got


def test_single_profile_without_pd_handler_still_names_the_endpoint():
    rows = [r for r in _pd_request(split=False)
            if r[0] not in ("pick_pd_profile", "prepare_disaggregation")]
    rows = [(n, i, p, s, e, {**a, "llm_d.epp.scheduling.profile.name": "default"}
             if n == "run_scheduler_profile" else a) for n, i, p, s, e, a in rows]
    got = routing_of(_views(rows))
    assert got[sc.LLMTRACE_ROUTER_ENDPOINT] == "llm-d/decode-1"
    assert got[f"{sc.LLMTRACE_ROUTER_SCORER_MAX}.queue-scorer"] == 1.0
    assert not {sc.LLMTRACE_ROUTER_PD_DISAGGREGATED, sc.LLMTRACE_ROUTER_DECISION} & got.keys()


def test_disagg_handler_legacy_span_name_and_precise_prefix_span():
    # llm-d-inference-scheduler named prepare_disaggregation differently; the
    # disagg handler (no selected_profile) falls back to the default "decode" name
    rows = _pd_request(split=True)
    rows = [("llm_d.epp.prerequest.disaggregation", *r[1:]) if r[0] == "prepare_disaggregation"
            else ("pick_disagg_profile", r[1], r[2], r[3], r[4],
                  {"llm_d.epp.profile_handler.decision": {
                      "run_decode": "run_decode", "prefill_decode": "run_prefill",
                      "complete": "complete_prefill-decode"}[
                          r[5]["llm_d.epp.profile_handler.decision"]]})
            if r[0] == "pick_pd_profile" else r for r in rows]
    # the precise scorer nests score_prefix_cache under its scorer span
    rows = [r for r in rows if r[0] != "llm_d.epp.scorer.prefix-cache-scorer"] + [
        ("llm_d.epp.scorer.precise-prefix-cache-scorer", _sid(70), _sid(12), 0.3, 0.5,
         {"llm_d.epp.scorer.type": "precise-prefix-cache-scorer"}),  # no scores: none computed
        ("score_prefix_cache", _sid(71), _sid(70), 0.31, 0.49,
         {"llm_d.epp.scorer.score.max": 0.6}),
    ]
    got = routing_of(_views(rows))
    assert got[sc.LLMTRACE_ROUTER_ENDPOINT] == "llm-d/decode-1"
    assert got[sc.LLMTRACE_ROUTER_DECISION] == "complete_prefill-decode"
    assert got[sc.LLMTRACE_ROUTER_PD_DISAGGREGATED] is True
    assert got[sc.LLMTRACE_ROUTER_PREFIX_CACHE_SCORE] == 0.6


def test_scorer_max_takes_the_highest_of_repeated_and_custom_scorers():
    rows = _pd_request(split=False) + [
        ("llm_d.epp.scorer.queue-scorer", _sid(80), _sid(12), 0.6, 0.7,
         {"llm_d.epp.scorer.type": "queue-scorer", "llm_d.epp.scorer.score.max": 0.3}),
        ("llm_d.epp.scorer.my-scorer", _sid(81), _sid(12), 0.6, 0.7,  # type from the name
         {"llm_d.epp.scorer.score.max": 0.25}),
    ]
    got = routing_of(_views(rows))
    assert got[f"{sc.LLMTRACE_ROUTER_SCORER_MAX}.queue-scorer"] == 1.0
    assert got[f"{sc.LLMTRACE_ROUTER_SCORER_MAX}.my-scorer"] == 0.25


def test_missing_attributes_leave_their_names_out():
    rows = [(n, i, p, s, e, {}) for n, i, p, s, e, _ in _pd_request(split=True)]
    assert routing_of(_views(rows)) == {
        sc.LLMTRACE_ROUTER_ORCHESTRATION_DURATION: pytest.approx(0.002),
        sc.LLMTRACE_ROUTER_SCHEDULING_DURATION: pytest.approx(0.0013),
    }
    assert routing_of([]) == {}
    assert routing_of([_engine_root()]) == {}


def test_wrong_types_are_skipped_without_raising():
    bad = {
        "llm_d.epp.picker.top_endpoints": "llm-d/decode-1",  # a string, not a list
        "llm_d.epp.picker.top_scores": ["high", 2.0],
        "llm_d.epp.scorer.score.max": "0.75",
        "llm_d.epp.scorer.type": 7,
        "llm_d.epp.scheduling.profile.name": None,
        "llm_d.epp.profile_handler.decision": ["prefill_decode"],
        "llm_d.epp.profile_handler.selected_profile": 3,
        "llm_d.epp.pd.disaggregation_used": "true",
        "llm_d.epp.pd.reason": 0,
        "llm_d.epp.pd.prefill_pod_address": b"10.0.0.1",
    }
    rows = [(n, i, p, s, e, bad) for n, i, p, s, e, _ in _pd_request(split=True)]
    views = _views(rows)
    views.append(SpanView("pick_endpoints", TRACE, None, [1], "x", None, 0, None, {}))
    views.append(SpanView("llm_d.epp.scorer.queue-scorer", TRACE, _sid(90), _sid(12), T0, T0, 0,
                          {"llm_d.epp.scorer.score.max": float("nan")}, {}))
    views.append("not a span")  # type: ignore[arg-type]
    got = routing_of(views)
    assert set(got) == {sc.LLMTRACE_ROUTER_ORCHESTRATION_DURATION,
                        sc.LLMTRACE_ROUTER_SCHEDULING_DURATION}
    rows = [(n, i, p, s, e, {**a, "llm_d.epp.pd.prefill_pod_port": 8000})
            for n, i, p, s, e, a in _pd_request(split=True)]
    assert routing_of(_views(rows))[sc.LLMTRACE_ROUTER_PREFILL_ADDRESS] == "10.244.0.21:8000"
    rows = [(n, i, p, s, e, {**a, "llm_d.epp.pd.prefill_pod_address": "fd00::21"})
            for n, i, p, s, e, a in _pd_request(split=True)]
    assert routing_of(_views(rows))[sc.LLMTRACE_ROUTER_PREFILL_ADDRESS] == "[fd00::21]:8000"


def test_spans_of_an_unrelated_trace_are_ignored():
    mine = _views(_pd_request(split=True))
    other = _views(_pd_request(split=False, base=200), trace=OTHER_TRACE)
    expected = routing_of(mine)
    assert routing_of([*mine, *other]) == expected  # first orchestration span's trace
    assert routing_of([*other, *mine], trace_id=TRACE) == expected
    assert routing_of(mine, trace_id=OTHER_TRACE) == {}
    assert routing_of([*other, *mine])[sc.LLMTRACE_ROUTER_PD_DISAGGREGATED] is False


def test_a_retried_pass_in_the_same_trace_describes_the_latest():
    first = _views(_pd_request(split=False))
    retry = _views(_pd_request(split=True, base=300), t0=T0 + 50 * MS)
    got = routing_of([*retry, *first])
    assert got[sc.LLMTRACE_ROUTER_PD_DISAGGREGATED] is True
    assert got[sc.LLMTRACE_ROUTER_DECISION] == "prefill_decode"


def test_names_are_registered():
    for keys in ROUTER_WANTED.values():
        assert keys <= sc.INPUT_ONLY_ATTRIBUTES
    for key in routing_of(_views(_pd_request(split=True))):
        template = key.startswith(sc.LLMTRACE_ROUTER_SCORER_MAX + ".")
        assert template or key in sc.ATTRIBUTES, key
    assert router_keys("llm_d.epp.scorer.custom") == ROUTER_WANTED[
        "llm_d.epp.scorer.queue-scorer"]
    assert router_keys("filter_endpoints") is None


def _any(value) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, list):
        out = AnyValue()
        out.array_value.values.extend(_any(v) for v in value)
        return out
    return AnyValue(string_value=value)


def test_otlp_protobuf_filtered_with_router_wanted_keeps_what_routing_needs():
    rows = _pd_request(split=True) + [
        ("gateway.request", GATEWAY, b"\x07" * 8, -0.1, 900.0, {}),
        ("index_lookup", _sid(95), _sid(12), 0.31, 0.32,
         {"llm_d.kv_cache.lookup.cache_hit": True}),
    ]
    request = ExportTraceServiceRequest()
    rs = request.resource_spans.add()
    rs.resource.attributes.append(KeyValue(key="service.name", value=_any("epp")))
    scope = rs.scope_spans.add()
    scope.scope.name = "llm-d-router/pkg/epp/scheduling"
    for name, sid, parent, s, e, attrs in rows:
        span = scope.spans.add(name=name, trace_id=TRACE, span_id=sid, parent_span_id=parent,
                               start_time_unix_nano=T0 + int(s * MS),
                               end_time_unix_nano=T0 + int(e * MS))
        span.attributes.extend(KeyValue(key=k, value=_any(v)) for k, v in attrs.items())
    wire = ExportTraceServiceRequest.FromString(request.SerializeToString())

    # the pipeline's own filter (spans.WANTED includes ROUTER_WANTED)
    kept = list(spans_from_request(wire))
    names = {s.name for s in kept}
    assert "gateway.request" not in names and "filter_endpoints" not in names
    assert "index_lookup" not in names
    for s in kept:
        assert set(s.attributes) <= ROUTER_WANTED[s.name]
    assert "llm_d.epp.scorer.score.avg" not in str([s.attributes for s in kept])
    assert routing_of(kept) == routing_of(_views(_pd_request(split=True)))
    assert routing_of(kept)[sc.LLMTRACE_ROUTER_ENDPOINT] == "llm-d/decode-1"


def test_assembler_joins_router_spans_that_came_before_the_request():
    """Through the real TraceAssembler: the EPP's spans wait with the trace for its root."""
    from llmtrace.pipeline.assembler import TraceAssembler
    from llmtrace.pipeline.spans import wanted_keys

    records = []
    clock = [0.0]
    assembler = TraceAssembler(records.append, window_s=10, clock=lambda: clock[0])
    router = [v for v in _views(_pd_request(split=True)) if wanted_keys(v.name) is not None]
    assert router and len(router) < len(_pd_request(split=True))  # EPP-internal spans skipped
    assembler.add(router)
    assert len(assembler) == 1  # held, waiting for the request
    assembler.add([_engine_root()])
    [record] = records
    assert record.routing == routing_of(router)
    assert record.routing[sc.LLMTRACE_ROUTER_ENDPOINT] == "llm-d/decode-1"
    assert len(assembler) == 0 and not assembler.dropped

    # router spans after their request are not joined: they expire, counted
    late = [v for v in _views(_pd_request(split=False), trace=OTHER_TRACE)
            if wanted_keys(v.name) is not None]
    assembler.add([_engine_root(OTHER_TRACE)])
    assembler.add(late)
    assert records[-1].routing == {}
    clock[0] = 11.0
    assembler.expire()
    assert assembler.dropped["window"] == len(late)


def test_request_is_held_for_router_spans_that_come_later():
    """router_wait_s: the router exports on its own schedule, often after the engine."""
    from llmtrace.pipeline.assembler import TraceAssembler
    from llmtrace.pipeline.spans import wanted_keys

    records = []
    clock = [0.0]
    assembler = TraceAssembler(records.append, window_s=30, router_wait_s=5,
                               clock=lambda: clock[0])
    router = [v for v in _views(_pd_request(split=False)) if wanted_keys(v.name) is not None]
    assembler.add([_engine_root()])
    assert records == []  # held
    clock[0] = 2.0
    assembler.add(router)
    [record] = records  # derived as soon as the router pass arrived
    assert record.routing == routing_of(router)
    assert len(assembler) == 0 and not assembler.dropped

    # no router spans at all: derived without routing at the deadline, nothing lost
    assembler.add([_engine_root(OTHER_TRACE)])
    clock[0] = 6.9
    assembler.expire()
    assert len(records) == 1
    clock[0] = 7.1
    assembler.expire()
    assert len(records) == 2 and records[-1].routing == {}
    # shutdown derives whatever is still held
    third = b"\x33" * 16
    assembler.add([_engine_root(third)])
    assembler.flush()
    assert len(records) == 3 and records[-1].trace_id == third.hex()
