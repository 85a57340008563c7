"""A real torch profile converts to spans in the traces its tagged regions name.

The profile is captured here with torch.profiler on CPU around a small model,
its regions entered under names built with ``llmtrace.profiling.tags.tag``, as
llmtrace's regions do while a profiler runs. The converted spans go through the
real OTLP exporters to the test bed's receiver (or to an OTLP JSON file), and
every expectation is derived from the captured file or the wall clock, never
written down in advance.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from llmtrace import semconv
from llmtrace.cli import main
from llmtrace.profiling.tags import parse, tag
from testbed.otlp_receiver import OTLPReceiver, ReceivedSpan

#: slack between the profiler's clock and time.time_ns() for one region's bounds
CLOCK_SLACK_NS = 1_000_000


@dataclass(frozen=True)
class Region:
    name: str
    trace_id: int
    span_id: int
    #: wall clock read just before entering and just after leaving the region
    before_ns: int
    after_ns: int

    @property
    def ids(self) -> tuple[str, str]:
        return f"{self.trace_id:032x}", f"{self.span_id:016x}"


@dataclass(frozen=True)
class Capture:
    path: Path
    start_ns: int
    end_ns: int
    #: step (trace A) encloses forward (trace A, nested tagged); sample is trace B
    regions: dict[str, Region]


def _ids() -> tuple[int, int]:
    return random.getrandbits(128) | 1, random.getrandbits(64) | 1


@pytest.fixture(scope="module")
def capture(tmp_path_factory) -> Capture:
    """One real profile: tagged regions of two traces, a nested tagged region, untagged
    annotations inside and outside them, and the model's operators everywhere."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 32))
    x = torch.randn(64, 128)
    trace_a, step_span = _ids()
    _, forward_span = _ids()
    trace_b, sample_span = _ids()
    regions: dict[str, Region] = {}
    start_ns = time.time_ns()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("untagged outside"):
            model(x)
        before = time.time_ns()
        with record_function(tag("step", trace_a, step_span)):
            before_fwd = time.time_ns()
            with record_function(tag("forward", trace_a, forward_span)):
                with record_function("untagged inside"):
                    model(x)
                model(x)
            regions["forward"] = Region("forward", trace_a, forward_span, before_fwd,
                                        time.time_ns())
        regions["step"] = Region("step", trace_a, step_span, before, time.time_ns())
        before = time.time_ns()
        with record_function(tag("sample", trace_b, sample_span)):
            torch.softmax(model(x), dim=-1)
        regions["sample"] = Region("sample", trace_b, sample_span, before, time.time_ns())
    end_ns = time.time_ns()
    path = tmp_path_factory.mktemp("profile") / "rank0.test.pt.trace.json"
    prof.export_chrome_trace(str(path))
    return Capture(path, start_ns, end_ns, regions)


@pytest.fixture(scope="module")
def received(capture: Capture, otlp_receiver: OTLPReceiver) -> dict[str, list[ReceivedSpan]]:
    """The capture converted by the CLI over OTLP/gRPC; spans by trace id (hex)."""
    assert main(["profile", "convert", str(capture.path),
                 "--endpoint", otlp_receiver.grpc_endpoint]) == 0
    root = _wait_for_root(otlp_receiver, str(capture.path), "grpc")
    wanted = {root.trace_id} | {r.ids[0] for r in capture.regions.values()}
    expected = root.attributes[semconv.LLMTRACE_PROFILE_EVENTS_CONVERTED] + 1
    assert otlp_receiver.wait_for(
        lambda rx: len(_from_file(rx, str(capture.path), "grpc")) >= expected)
    spans = [s for s in _from_file(otlp_receiver, str(capture.path), "grpc")
             if s.trace_id in wanted]
    out: dict[str, list[ReceivedSpan]] = {}
    for s in spans:
        out.setdefault(s.trace_id, []).append(s)
    return out


def _from_file(rx: OTLPReceiver, path: str, transport: str) -> list[ReceivedSpan]:
    """Spans of one conversion: its root's trace plus spans whose resource came with it."""
    roots = [s for s in rx.spans() if s.name == semconv.SPAN_LLMTRACE_PROFILE
             and s.attributes.get(semconv.LLMTRACE_PROFILE_FILE) == path
             and s.transport == transport]
    if not roots:
        return []
    instance = roots[0].resource.get("service.instance.id")
    return [s for s in rx.spans() if s.transport == transport
            and s.resource.get("service.instance.id") == instance]


def _wait_for_root(rx: OTLPReceiver, path: str, transport: str) -> ReceivedSpan:
    assert rx.wait_for(lambda r: _from_file(r, path, transport))
    return next(s for s in _from_file(rx, path, transport)
                if s.name == semconv.SPAN_LLMTRACE_PROFILE)


def _chrome_events(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def _excerpt(spans: list[ReceivedSpan], region: Region) -> ReceivedSpan:
    matches = [s for s in spans if s.name == semconv.SPAN_LLMTRACE_PROFILE_EXCERPT
               and s.attributes[semconv.LLMTRACE_PROFILE_REGION] == region.name]
    assert len(matches) == 1, matches
    return matches[0]


def _descendants(spans: list[ReceivedSpan], top: ReceivedSpan) -> list[ReceivedSpan]:
    by_parent: dict[str, list[ReceivedSpan]] = {}
    for s in spans:
        by_parent.setdefault(s.parent_span_id, []).append(s)
    out, todo = [], [top.span_id]
    while todo:
        for child in by_parent.get(todo.pop(), []):
            out.append(child)
            todo.append(child.span_id)
    return out


# -- the tag --------------------------------------------------------------------------

def test_tag_round_trips_ids_and_keeps_the_region_name():
    for name in ("gpu_model_runner: forward", "a [b] c", ""):
        trace_id, span_id = _ids()
        assert parse(tag(name, trace_id, span_id)) == (name, trace_id, span_id)


def test_untagged_and_malformed_names_parse_to_none():
    trace_id, span_id = _ids()
    good = tag("x", trace_id, span_id)
    for name in ("aten::addmm", "x [llmtrace:]", good.upper(), good[:-1], good + " ",
                 tag("x", 0, span_id), tag("x", trace_id, 0)):
        assert parse(name) is None, name


# -- the join -------------------------------------------------------------------------

def test_region_events_land_in_the_tagged_trace_under_the_tagged_span(capture, received):
    step, forward = capture.regions["step"], capture.regions["forward"]
    spans = received[step.ids[0]]
    step_excerpt, forward_excerpt = _excerpt(spans, step), _excerpt(spans, forward)
    # each excerpt is a child of the span llmtrace exported for its own region
    assert step_excerpt.parent_span_id == step.ids[1]
    assert forward_excerpt.parent_span_id == forward.ids[1]
    # what ran in forward hangs under forward's excerpt, nesting preserved
    inside = _descendants(spans, forward_excerpt)
    names = [s.name for s in inside]
    assert "untagged inside" in names and "aten::linear" in names
    annotation = next(s for s in inside if s.name == "untagged inside")
    assert annotation.parent_span_id == forward_excerpt.span_id
    assert any(s.parent_span_id == annotation.span_id and s.name == "aten::linear"
               for s in inside)
    # the model call directly in forward: its operators are children of the excerpt
    assert any(s.parent_span_id == forward_excerpt.span_id and s.name == "aten::linear"
               for s in inside)
    # nothing of forward leaked into step's excerpt (it only encloses forward)
    assert not _descendants(spans, step_excerpt)
    by_id = {s.span_id: s for s in spans}
    for s in inside:
        parent = by_id[s.parent_span_id]
        assert parent.start_ns <= s.start_ns <= s.end_ns <= parent.end_ns, (s.name, parent.name)
    # the tagged events were not emitted again under their own names
    assert not any(s.name in ("step", "forward") or parse(s.name) for s in spans)


def test_timestamps_fall_inside_the_measured_wall_clock(capture, received):
    everything = [s for spans in received.values() for s in spans]
    assert everything
    for s in everything:
        assert capture.start_ns <= s.start_ns <= s.end_ns <= capture.end_ns, s.name
    for region in capture.regions.values():
        excerpt = _excerpt(received[region.ids[0]], region)
        assert region.before_ns - CLOCK_SLACK_NS <= excerpt.start_ns
        assert excerpt.end_ns <= region.after_ns + CLOCK_SLACK_NS


def test_untagged_events_go_under_the_file_root_which_links_every_tagged_trace(
        capture, received):
    roots = [s for spans in received.values() for s in spans
             if s.name == semconv.SPAN_LLMTRACE_PROFILE]
    assert len(roots) == 1
    root = roots[0]
    assert root.parent_span_id == "" and root.trace_id not in {
        r.ids[0] for r in capture.regions.values()}
    # one link per tagged trace, to that trace's first tagged region
    assert set(root.links) == {capture.regions["step"].ids, capture.regions["sample"].ids}
    own = received[root.trace_id]
    outside = next(s for s in own if s.name == "untagged outside")
    assert outside.parent_span_id == root.span_id
    assert any(s.parent_span_id == outside.span_id for s in own)
    assert not any(s.name.startswith("untagged inside") for s in own)
    # every excerpt links back to the root: the profile opens from the trace
    for region in capture.regions.values():
        assert _excerpt(received[region.ids[0]], region).links == (
            (root.trace_id, root.span_id),)
    events = _chrome_events(capture.path)
    assert root.attributes[semconv.LLMTRACE_PROFILE_EVENTS_READ] == len(events)
    assert root.attributes[semconv.LLMTRACE_PROFILE_EVENTS_DROPPED] == 0
    assert root.attributes[semconv.LLMTRACE_PROFILE_TRACES] == 2
    assert root.attributes[semconv.LLMTRACE_PROFILE_PID] == os.getpid()
    converted = sum(len(v) for v in received.values()) - 1
    assert root.attributes[semconv.LLMTRACE_PROFILE_EVENTS_CONVERTED] == converted
    assert root.start_ns == min(s.start_ns for v in received.values() for s in v)


def _shape(spans: list[ReceivedSpan]) -> list[tuple]:
    """The tree without its random ids: each span by name and interval, under its parent's
    name (or the tagged span id it hangs under)."""
    by_id = {s.span_id: s for s in spans}
    return sorted((s.name, s.start_ns, s.end_ns,
                   by_id[s.parent_span_id].name if s.parent_span_id in by_id
                   else s.parent_span_id) for s in spans)


def test_http_protobuf_endpoint_and_gzip_input_give_the_same_tree(
        capture, received, otlp_receiver, tmp_path):
    gz = tmp_path / (capture.path.name + ".gz")
    gz.write_bytes(gzip.compress(capture.path.read_bytes()))
    assert main(["profile", "convert", str(gz), "--protocol", "http/protobuf",
                 "--endpoint", otlp_receiver.http_endpoint]) == 0
    root = _wait_for_root(otlp_receiver, str(gz), "http")
    expected = root.attributes[semconv.LLMTRACE_PROFILE_EVENTS_CONVERTED] + 1
    assert otlp_receiver.wait_for(
        lambda rx: len(_from_file(rx, str(gz), "http")) >= expected)
    over_grpc = [s for spans in received.values() for s in spans]
    assert _shape(_from_file(otlp_receiver, str(gz), "http")) == _shape(over_grpc)


# -- bounds ---------------------------------------------------------------------------

def _convert_to_json(path: Path, out: Path, *flags: str) -> list[dict]:
    assert main(["profile", "convert", str(path), "--out", str(out), *flags]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 1
    doc = json.loads(lines[0])
    return [s for rs in doc["resourceSpans"] for ss in rs["scopeSpans"] for s in ss["spans"]]


def _attr(span: dict, key: str):
    value = next(a["value"] for a in span["attributes"] if a["key"] == key)
    return int(value["intValue"]) if "intValue" in value else value.get("stringValue")


def test_max_events_keeps_regions_first_and_counts_what_it_dropped(capture, tmp_path):
    everything = _convert_to_json(capture.path, tmp_path / "all.json")
    selected = len(everything) - 1
    bounded = _convert_to_json(capture.path, tmp_path / "bounded.json",
                               "--max-events", str(len(capture.regions)))
    root = next(s for s in bounded if s["name"] == semconv.SPAN_LLMTRACE_PROFILE)
    rest = [s for s in bounded if s is not root]
    assert len(rest) == len(capture.regions)
    assert {s["name"] for s in rest} == {semconv.SPAN_LLMTRACE_PROFILE_EXCERPT}
    assert _attr(root, semconv.LLMTRACE_PROFILE_EVENTS_CONVERTED) == len(capture.regions)
    assert _attr(root, semconv.LLMTRACE_PROFILE_EVENTS_DROPPED) == selected - len(
        capture.regions)
    # OTLP JSON carries the ids in hex: the excerpts' parents are the tagged span ids
    assert {(s["traceId"], s["parentSpanId"]) for s in rest} == {
        r.ids for r in capture.regions.values()}


def test_min_duration_leaves_out_short_operators_but_not_annotations(capture, tmp_path):
    events = _chrome_events(capture.path)
    longest_op_us = max(e["dur"] for e in events if e["cat"] == "cpu_op")
    spans = _convert_to_json(capture.path, tmp_path / "long.json",
                             "--min-duration-us", str(longest_op_us + 1))
    cats = {_attr(s, semconv.LLMTRACE_PROFILE_CATEGORY) for s in spans
            if s["name"] != semconv.SPAN_LLMTRACE_PROFILE}
    assert cats == {"user_annotation"}
    annotations = [e for e in events if e["cat"] == "user_annotation"]
    assert len(spans) - 1 == len(annotations)  # each region's excerpt stands for its event
    every = _convert_to_json(capture.path, tmp_path / "every.json", "--all-events",
                             "--min-duration-us", "0")
    assert len(every) - 1 == len(events)  # a region's excerpt stands for its event


# -- device work ----------------------------------------------------------------------

def test_kernels_hang_under_the_operator_that_launched_them(capture, tmp_path):
    """Kineto's CUDA event shape (a cuda_runtime launch inside the operator, a kernel on
    a device stream, one ``correlation`` id), added to the real CPU trace: this machine
    has no GPU to record one."""
    doc = json.loads(capture.path.read_text())
    forward = capture.regions["forward"]
    tagged = next(e for e in doc["traceEvents"] if e.get("name", "").startswith("forward ["))
    ops = [e for e in doc["traceEvents"] if e.get("cat") == "cpu_op"
           and e["name"] == "aten::addmm" and e["tid"] == tagged["tid"]
           and tagged["ts"] <= e["ts"] <= tagged["ts"] + tagged["dur"]]
    assert ops
    for n, op in enumerate(ops):
        corr = 900_000 + n
        launch_ts = op["ts"] + op["dur"] / 2
        doc["traceEvents"].append({
            "ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "pid": op["pid"],
            "tid": op["tid"], "ts": launch_ts, "dur": 0.001,
            "args": {"External id": op["args"]["External id"], "correlation": corr}})
        doc["traceEvents"].append({
            "ph": "X", "cat": "kernel", "name": f"gemm_kernel_{n}", "pid": 0, "tid": 7,
            "ts": launch_ts + 1, "dur": 10.0,
            "args": {"External id": op["args"]["External id"], "correlation": corr,
                     "device": 0, "stream": 7}})
    gpu = tmp_path / "gpu.pt.trace.json"
    gpu.write_text(json.dumps(doc))
    spans = _convert_to_json(gpu, tmp_path / "gpu.json")
    by_id = {s["spanId"]: s for s in spans}
    kernels = [s for s in spans if s["name"].startswith("gemm_kernel_")]
    assert len(kernels) == len(ops)
    for k in kernels:
        assert k["traceId"] == forward.ids[0]
        launcher = by_id[k["parentSpanId"]]
        # addmm is nested in aten::linear (not outermost): the kernel joins the outermost
        # operator that is a span, inside the forward region
        assert launcher["name"] == "aten::linear"
        assert _attr(k, semconv.LLMTRACE_PROFILE_DEVICE) == 0
        assert _attr(k, semconv.LLMTRACE_PROFILE_STREAM) == 7


# -- bad input ------------------------------------------------------------------------

def test_bad_inputs_exit_2_naming_the_problem(capture, tmp_path, capsys):
    raw = capture.path.read_bytes()
    doc = json.loads(raw)
    no_base = dict(doc)
    del no_base["baseTimeNanoseconds"]
    cases = {
        "not JSON": b"\x00\x01 not json",
        "not a Chrome trace": json.dumps({"schemaVersion": 1, "events": []}).encode(),
        "truncated gzip": gzip.compress(raw)[: len(gzip.compress(raw)) // 2],
        "no `baseTimeNanoseconds`": json.dumps(no_base).encode(),
        "without timed events": json.dumps({"traceEvents": [], "baseTimeNanoseconds": 1}).encode(),
    }
    for problem, content in cases.items():
        bad = tmp_path / "bad.pt.trace.json.gz"
        bad.write_bytes(content)
        assert main(["profile", "convert", str(bad), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert problem in err and str(bad) in err, (problem, err)
    # with the base stated, the file without one converts onto the same clock
    fixed = tmp_path / "fixed.json"
    fixed.write_text(json.dumps(no_base))
    spans = _convert_to_json(fixed, tmp_path / "fixed.out", "--base-time-ns",
                             str(doc["baseTimeNanoseconds"]))
    assert all(capture.start_ns <= int(s["startTimeUnixNano"]) <= capture.end_ns
               for s in spans)


def test_truncated_gzip_from_the_command_line_is_one_line_no_traceback(capture, tmp_path):
    bad = tmp_path / "rank0.cut.pt.trace.json.gz"
    whole = gzip.compress(capture.path.read_bytes())
    bad.write_bytes(whole[:-64])
    run = subprocess.run([sys.executable, "-m", "llmtrace.cli", "profile", "convert", str(bad),
                          "--out", str(tmp_path / "o.json")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr and "truncated gzip" in run.stderr
    assert not (tmp_path / "o.json").exists()


def test_an_endpoint_that_does_not_answer_exits_1(capture, monkeypatch, capsys):
    from testbed.ports import free_port

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "1")
    endpoint = f"http://127.0.0.1:{free_port()}"
    assert main(["profile", "convert", str(capture.path), "--protocol", "http/protobuf",
                 "--endpoint", endpoint]) == 1
    err = capsys.readouterr().err
    assert f"{endpoint}/v1/traces did not take the spans" in err
