"""Prefill/decode disaggregation on CPU: the KV transfer in one trace, against real processes.

Two ``vllm serve`` instances of the dense model with NixlConnector over UCX
(``kv_buffer_device: cpu``), one ``kv_producer`` (prefill) and one
``kv_consumer`` (decode), both instrumented, with ``vllm-router`` (PyPI) in PD
mode in front: it calls the prefill instance (``max_tokens: 1``,
``do_remote_decode``), then the decode instance with the ``kv_transfer_params``
the prefill answered, both with the client's ``traceparent``. The decode
instance's NIXL worker reads the blocks from the prefill instance's memory.

Checked against what the processes did, not against llmtrace alone: bytes per
block come from the model's config (K and V x block size x KV heads x head dim x
dtype bytes x layers), block counts from the prompt's token count (the usage the
prefill instance returned), the join from NIXL's own ``remote_request_id``.

The pair is started once for this module and stopped after it: idle NIXL
workers spin, which the rest of the suite should not pay for.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import REPO, instrumented_env

from llmtrace import semconv as sc
from llmtrace.dashboards.generate import panel_queries, substitute
from testbed.models import DENSE
from testbed.otlp_receiver import OTLPReceiver, ReceivedSpan
from testbed.pd import BLOCK, CONSUMER, PRODUCER, nixl_config, pd_router_args
from testbed.ports import free_port
from testbed.prometheus import PrometheusServer
from testbed.router import Router
from testbed.stream_client import stream_request
from testbed.vllm_server import VLLMServer

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

PREFILL, DECODE = "llmtrace-prefill", "llmtrace-decode"


def nixl_server(models, workdir: Path, role: str, service: str, core: int,
                receiver: OTLPReceiver, collector) -> VLLMServer:
    env = instrumented_env(receiver, service,
                           traces_to=f"http://127.0.0.1:{collector.ports['grpc']}")
    return VLLMServer(nixl_config(models, role, core, env), workdir)


@pytest.fixture(scope="module")
def breakdowns(collector) -> Iterator[list]:
    """The disaggregated TTFT breakdowns the session's collector joins from the spans."""
    out: list = []
    collector.on_disaggregated = out.append
    yield out
    collector.on_disaggregated = None


@pytest.fixture(scope="module")
def pd(tiny_models, otlp_receiver: OTLPReceiver, collector, scratch_dir: Path
       ) -> Iterator[tuple[VLLMServer, VLLMServer, Router]]:
    work = scratch_dir / "pd"
    prefill = nixl_server(tiny_models, work / "prefill", PRODUCER, PREFILL, 0,
                          otlp_receiver, collector).start()
    decode = nixl_server(tiny_models, work / "decode", CONSUMER, DECODE, 1,
                         otlp_receiver, collector).start()
    router = None
    try:
        prefill.wait_ready(420)
        decode.wait_ready(420)
        router = Router([], work / "router",
                        args=pd_router_args(prefill.base_url, decode.base_url)).start()
        yield prefill, decode, router
    finally:
        if router is not None:
            router.stop()
        decode.stop()
        prefill.stop()


def bytes_per_block(model_dir: Path) -> int:
    """K and V for one block of every layer, from the model's own config."""
    cfg = json.loads((model_dir / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    dtype_bytes = {"bfloat16": 2, "float16": 2, "float32": 4}[
        cfg.get("torch_dtype") or cfg.get("dtype")]
    return (2 * BLOCK * cfg["num_key_value_heads"] * head_dim * dtype_bytes
            * cfg["num_hidden_layers"])


def prompt(words: int) -> str:
    # the nonce comes first: no block of this prompt is in either prefix cache
    return f"{secrets.token_hex(8)} " + " ".join(f"w{i % 97}" for i in range(words))


def _by_trace(receiver: OTLPReceiver, trace_ids: set[str]) -> dict[str, list[ReceivedSpan]]:
    out: dict[str, list[ReceivedSpan]] = {t: [] for t in trace_ids}
    for s in receiver.spans():
        if s.trace_id in out:
            out[s.trace_id].append(s)
    return out


def _missing(receiver: OTLPReceiver, trace_ids: set[str], *servers: VLLMServer) -> str:
    """What arrived per trace, and what the servers logged about KV: a failure report."""
    lines = []
    for trace_id, spans in _by_trace(receiver, trace_ids).items():
        names = Counter((s.resource.get("service.name"), s.name) for s in spans)
        lines.append(f"trace {trace_id}: " + ", ".join(
            f"{service}/{name} x{n}" for (service, name), n in sorted(names.items())))
    for server in servers:
        text = server.log_path.read_text(errors="replace").splitlines()
        kv = [line for line in text if "expired" in line.lower() or "nixl" in line.lower()
              and ("error" in line.lower() or "fail" in line.lower())]
        lines.append(f"{server.log_path}: {len(kv)} KV warnings; last: {kv[-3:]}")
    return "\n".join(lines)


def _wait(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _one(spans: list[ReceivedSpan], name: str, service: str, **attrs) -> ReceivedSpan:
    found = [s for s in spans if s.name == name and s.resource.get("service.name") == service
             and all(s.attributes.get(k) == v for k, v in attrs.items())]
    assert len(found) == 1, (name, service, attrs, [(s.name, s.resource) for s in spans])
    return found[0]


def test_router_prefill_transfer_and_decode_in_one_trace_with_bytes_from_the_model(
        pd, tiny_models, otlp_receiver: OTLPReceiver, breakdowns: list):
    prefill, decode, router = pd
    per_block = bytes_per_block(tiny_models.dense)
    sent: dict[str, tuple[str, object]] = {}  # trace id -> (client span id, timing)
    for words in (90, 180, 300, 30):
        trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
        timing = stream_request(router.base_url, DENSE, messages=[
            {"role": "user", "content": prompt(words)}], max_tokens=8,
            headers={"traceparent": f"00-{trace_id}-{span_id}-01"})
        assert timing.ok, timing.error
        sent[trace_id] = (span_id, timing)

    def complete(r: OTLPReceiver) -> bool:
        for spans in _by_trace(r, set(sent)).values():
            names = [s.name for s in spans]
            if names.count(sc.SPAN_LLMTRACE_KV_TRANSFER) < 2 or \
                    names.count(sc.SPAN_LLMTRACE_ENGINE_REQUEST) < 2 or \
                    names.count(sc.SPAN_LLMTRACE_REQUEST) < 2:
                return False
        return True

    if not otlp_receiver.wait_for(complete, timeout=180):
        pytest.fail(_missing(otlp_receiver, set(sent), prefill, decode), pytrace=False)
    for trace_id, spans in _by_trace(otlp_receiver, set(sent)).items():
        client_span, timing = sent[trace_id]
        p_req = _one(spans, sc.SPAN_LLMTRACE_REQUEST, PREFILL)
        d_req = _one(spans, sc.SPAN_LLMTRACE_REQUEST, DECODE)
        # one trace: both instances' request spans are children of the client's span
        assert p_req.parent_span_id == client_span and d_req.parent_span_id == client_span
        p_eng = _one(spans, sc.SPAN_LLMTRACE_ENGINE_REQUEST, PREFILL)
        d_eng = _one(spans, sc.SPAN_LLMTRACE_ENGINE_REQUEST, DECODE)
        save = _one(spans, sc.SPAN_LLMTRACE_KV_TRANSFER, PREFILL)
        load = _one(spans, sc.SPAN_LLMTRACE_KV_TRANSFER, DECODE)
        assert save.parent_span_id == p_eng.span_id and load.parent_span_id == d_eng.span_id
        sa, la = save.attributes, load.attributes
        assert sa[sc.LLMTRACE_KV_TRANSFER_DIRECTION] == "save"
        assert la[sc.LLMTRACE_KV_TRANSFER_DIRECTION] == "load"
        assert sa[sc.LLMTRACE_KV_TRANSFER_CONNECTOR] == la[sc.LLMTRACE_KV_TRANSFER_CONNECTOR] \
            == "NixlConnector"
        assert la[sc.LLMTRACE_KV_TRANSFER_ASYNC] is True
        assert save.status_code != 2 and load.status_code != 2  # not ERROR
        # blocks from the prompt the prefill instance computed; bytes from the model
        prompt_tokens = p_req.attributes[sc.GEN_AI_USAGE_INPUT_TOKENS]
        assert d_req.attributes[sc.GEN_AI_USAGE_INPUT_TOKENS] == prompt_tokens
        blocks = math.ceil(prompt_tokens / BLOCK)
        assert sa[sc.LLMTRACE_KV_TRANSFER_BLOCKS] == blocks
        assert la[sc.LLMTRACE_KV_TRANSFER_BLOCKS] == blocks  # no local prefix hit: all move
        assert sa[sc.LLMTRACE_KV_TRANSFER_BYTES] == la[sc.LLMTRACE_KV_TRANSFER_BYTES] \
            == blocks * per_block
        assert la[sc.LLMTRACE_KV_TRANSFER_TOKENS] == prompt_tokens
        assert sa[sc.LLMTRACE_KV_TRANSFER_LAYERS] == 2
        # the join: NIXL's remote_request_id on the load is the producer's request id
        assert la[sc.LLMTRACE_KV_TRANSFER_PEER_REQUEST_ID] == \
            sa[sc.LLMTRACE_KV_TRANSFER_PEER_REQUEST_ID]
        # links from the consumer's spans to the producer's request span
        assert (trace_id, p_req.span_id) in load.links
        assert (trace_id, p_req.span_id) in d_eng.links
        # the load sits inside the decode request's queue phase (API server's clock
        # and the engine core's, both wall time on one host)
        d_attrs = d_req.attributes
        queue_start = d_req.start_ns + d_attrs[sc.LLMTRACE_LATENCY_PREPROCESS] * 1e9
        queue_end = queue_start + d_attrs[sc.LLMTRACE_LATENCY_QUEUE] * 1e9
        assert queue_start - 1e6 <= load.start_ns <= load.end_ns <= queue_end + 1e6
        # the producer held its blocks from its request's end until the decode read them
        assert p_eng.end_ns - 1e6 <= save.start_ns and save.end_ns >= load.start_ns - 1e6
        # the client waited at least for the prefill, the transfer and the decode's first
        # token, one after the other. Measured from before the client wrote the request:
        # its sent_ns is read after the write returns, and on a busy host the router and
        # the prefill instance can take the request before the client thread runs again
        first_token_ns = d_req.start_ns + d_attrs[sc.LLMTRACE_LATENCY_TIME_TO_FIRST_TOKEN] * 1e9
        assert p_req.end_ns <= d_req.start_ns + 1e6
        client_wait_s = (timing.chunk_ns[0] - timing.started_ns) / 1e9
        assert client_wait_s >= (first_token_ns - p_req.start_ns) / 1e9 - 1e-3
        # the collector's breakdown: each part is its own span's, and they tile the TTFT
        # from the prefill request's start to the decode instance's first token
        assert _wait(lambda t=trace_id: any(b.trace_id == t for b in breakdowns)), trace_id
        b = next(b for b in breakdowns if b.trace_id == trace_id)
        assert b.remote_prefill_s == pytest.approx((p_req.end_ns - p_req.start_ns) / 1e9,
                                                   abs=1e-6)
        assert b.kv_transfer_s == pytest.approx(load.duration_s, abs=1e-6)
        assert b.handoff_s == pytest.approx(max(0, d_req.start_ns - p_req.end_ns) / 1e9,
                                            abs=1e-6)
        parts = b.remote_prefill_s + b.handoff_s + b.kv_transfer_s + b.local_s
        assert abs(parts - (first_token_ns - p_req.start_ns) / 1e9) < 1e-3
        assert abs(b.ttft_s - parts) < 1e-3
        assert b.connector == "NixlConnector" and b.local_s > 0


def test_a_failed_load_is_an_error_span_and_a_counted_failure_and_serving_goes_on(
        pd, otlp_receiver: OTLPReceiver):
    prefill, decode, router = pd
    # real parameters from the prefill instance, pointed at a producer that is not there
    answer = httpx.post(f"{prefill.base_url}/v1/completions", timeout=120, json={
        "model": DENSE, "prompt": prompt(80), "max_tokens": 1,
        "kv_transfer_params": {"do_remote_decode": True}}).json()
    params = dict(answer["kv_transfer_params"])
    params.update(remote_engine_id=f"gone-{secrets.token_hex(4)}", remote_port=free_port())
    trace_id = secrets.token_hex(16)
    started = time.monotonic()
    resp = httpx.post(f"{decode.base_url}/v1/completions", timeout=120, json={
        "model": DENSE, "prompt": prompt(80), "max_tokens": 4, "kv_transfer_params": params},
        headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"})
    assert resp.status_code >= 500, resp.text  # kv_load_failure_policy "fail" (the default)
    waited = time.monotonic() - started

    def failed(r: OTLPReceiver) -> list[ReceivedSpan]:
        return [s for s in r.spans() if s.trace_id == trace_id
                and s.name == sc.SPAN_LLMTRACE_KV_TRANSFER]

    assert otlp_receiver.wait_for(lambda r: bool(failed(r)), timeout=60)
    span = failed(otlp_receiver)[0]
    assert span.status_code == 2  # ERROR
    assert span.attributes[sc.LLMTRACE_KV_TRANSFER_FAILURE] == "load_failed"
    assert span.attributes[sc.ERROR_TYPE] == "load_failed"
    assert span.attributes[sc.LLMTRACE_KV_TRANSFER_FAILURE_POLICY] == "fail"
    assert span.duration_s <= waited  # the span ended before the client had its answer

    def counted(r: OTLPReceiver) -> bool:
        return any(p.metric == sc.METRIC_LLMTRACE_KV_TRANSFER_FAILURES and p.value
                   and p.attributes.get(sc.ERROR_TYPE) == "load_failed"
                   and p.resource.get("service.name") == DECODE for p in r.points())

    assert otlp_receiver.wait_for(counted, timeout=30)
    # the decode instance still serves disaggregated requests
    timing = stream_request(router.base_url, DENSE, messages=[
        {"role": "user", "content": prompt(60)}], max_tokens=4)
    assert timing.ok, timing.error


def _cumulative(points, field: str) -> float:
    """Sum over series of each series' latest cumulative value (the largest)."""
    latest: dict[frozenset, float] = {}
    for p in points:
        key = frozenset(p.attributes.items())
        latest[key] = max(latest.get(key, 0), getattr(p, field) or 0)
    return sum(latest.values())


def test_transfer_metrics_agree_with_the_spans(pd, otlp_receiver: OTLPReceiver):
    """Every ended transfer is one histogram observation, and the bytes counter sums the
    successful transfers' span bytes, per instance and direction."""
    for service, direction in ((PREFILL, "save"), (DECODE, "load")):
        def agrees(r: OTLPReceiver, service=service, direction=direction) -> bool:
            spans = [s for s in r.spans() if s.name == sc.SPAN_LLMTRACE_KV_TRANSFER
                     and s.resource.get("service.name") == service]
            points = [p for p in r.points() if p.resource.get("service.name") == service
                      and p.attributes.get(sc.LLMTRACE_KV_TRANSFER_DIRECTION) == direction]
            count = _cumulative([p for p in points
                                 if p.metric == sc.METRIC_LLMTRACE_KV_TRANSFER_DURATION],
                                "count")
            moved = _cumulative([p for p in points
                                 if p.metric == sc.METRIC_LLMTRACE_KV_TRANSFER_BYTES], "value")
            ok_bytes = sum(s.attributes[sc.LLMTRACE_KV_TRANSFER_BYTES] for s in spans
                           if s.status_code != 2)
            return bool(spans) and count == len(spans) and moved == ok_bytes

        assert otlp_receiver.wait_for(agrees, timeout=90), (service, direction)


def test_the_kv_transfer_panels_return_data_from_a_real_prometheus(
        pd, collector, tmp_path_factory):
    """L1's disaggregated-serving row, evaluated by Debian's Prometheus scraping the
    collector that derived the transfer and breakdown series from these instances' spans."""
    _, _, router = pd
    prom = PrometheusServer(tmp_path_factory.mktemp("prometheus-pd"), [
        {"job_name": "llmtrace-collector", "scrape_interval": "1s",
         "static_configs": [{"targets": [f"127.0.0.1:{collector.ports['admin']}"]}]}])
    prom.start()
    try:
        for _ in range(2):  # two waves a few scrapes apart: rates see increments
            for words in (40, 120):
                assert stream_request(router.base_url, DENSE, messages=[
                    {"role": "user", "content": prompt(words)}], max_tokens=4).ok
            time.sleep(4)
        assert _wait(lambda: prom.query("llmtrace_pd_time_to_first_token_seconds_count"), 60)
        dashboard = json.loads((REPO / "dashboards" / "llmtrace-l1-oncall.json").read_text())
        queries = [(title, substitute(expr)) for title, expr in panel_queries(dashboard)
                   if "kv_transfer" in expr or "llmtrace_pd_" in expr]
        assert len(queries) >= 5
        empty = [title for title, query in queries
                 if "failures" not in query and not _wait(lambda q=query: prom.query(q), 20)]
        assert not empty, empty
        # the failure panel has the failure the previous test caused
        failures = [q for _, q in queries if "failures" in q]
        assert failures and _wait(lambda: prom.query(failures[0]), 20)
    finally:
        prom.stop()
