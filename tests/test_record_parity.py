"""The SDK path and the collector path publish identical series for the same requests.

One instrumented ``vllm serve`` (100% sampling) records metrics at the source
(its API server's series join vLLM's ``/metrics``; its engine core serves its
own port) and sends its spans to the real ``llmtrace collector``, which derives
the same records from them. For one tenant's requests of every kind the server
sees here (normal, prefix-cached, chunked prefill, preempted, aborted by a
client disconnect) both expositions must hold the same series: names, label
sets, bucket bounds, counts, ITL histograms; sums equal up to float rounding
(the two sides add the same values in a different order).

Not covered: an engine failure (``error.type=engine_error``) cannot be caused
on purpose without killing the shared server; the availability SLO test feeds
collector-derived error series instead (tests/test_slo_collector.py).
"""

from __future__ import annotations

import secrets
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmtrace import schema
from testbed.models import DENSE
from testbed.stream_client import run_load

pytestmark = pytest.mark.vllm

TENANT = "parity"
LONG = " ".join(f"Topic {i} concerns the scheduler and the prefix cache." for i in range(24))
#: Prometheus base names published by both outputs from records
SHARED = {m.prometheus_base: m for m in schema.METRICS
          if m.feeds and m.outputs >= {"sdk", "collector"}}


def _series(text: str) -> dict[tuple[str, frozenset], float]:
    """tenant=parity samples of shared metrics; empty labels dropped (PromQL treats an
    empty label as absent) and the SDK's scope labels dropped (the collector has none)."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            base = s.name.removesuffix("_total")
            for suffix in ("_bucket", "_count", "_sum"):
                if base.endswith(suffix) and base.removesuffix(suffix) in SHARED:
                    base = base.removesuffix(suffix)
            if base not in SHARED or s.name.endswith("_created"):
                continue
            labels = {k: v for k, v in s.labels.items()
                      if v != "" and not k.startswith("otel_scope")}
            if labels.get("llmtrace_tenant") != TENANT:
                continue
            out[(s.name, frozenset(labels.items()))] = s.value
    return out


def _request(content: str, max_tokens: int) -> dict:
    headers = {"traceparent": f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01",
               "x-tenant-id": TENANT}
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "headers": headers}


def _disconnect(base_url: str) -> None:
    """A client that hangs up mid-stream: vLLM aborts the request (or runs it on)."""
    body = {"model": DENSE, "prompt": "never finish " * 4, "max_tokens": 900, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=60) as client, client.stream(
            "POST", f"{base_url}/v1/completions", json=body,
            headers={"x-tenant-id": TENANT}) as resp:
        next(resp.iter_lines())  # the first event, then hang up


def test_sdk_and_collector_publish_identical_series(instrumented_servers, collector,
                                                   engine_metrics_port):
    server = instrumented_servers["dense"]
    before = len([r for r in list(collector.records) if r.tenant == TENANT])
    before_usage = len([u for u in list(collector.usage) if u.tenant == TENANT])
    normal = [_request(f"parity {i}: " + "word " * (4 + 5 * i), 6 + 4 * i) for i in range(4)]
    cached = [_request("Cached prefix. " + LONG[:1200], 4)] * 2  # the second hits the cache
    chunked = [_request(LONG + " " + LONG[:600], 5)]  # > 256 tokens: chunked prefill
    with ThreadPoolExecutor(1) as pool:
        disconnect = pool.submit(_disconnect, server.base_url)
        timings = run_load(server.base_url, DENSE, normal + cached + chunked, 1)
        disconnect.result()
    sent = len(timings) + 1

    def derived() -> list:
        return [r for r in list(collector.records) if r.tenant == TENANT][before:]

    def wait_derived(n: int) -> None:
        deadline = time.monotonic() + 60
        while len(derived()) < n and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(derived()) == n

    for _ in range(3):  # 8 x 330 tokens in 12 KV blocks (1,536 tokens) preempt, usually
        preempted = [_request(f"Preempt {i}. " + "long context " * 30, 300) for i in range(8)]
        timings += run_load(server.base_url, DENSE, preempted, 8)
        sent += len(preempted)
        wait_derived(sent)
        if any(r.preemptions for r in derived()):
            break
    assert all(t.ok for t in timings), [t.error for t in timings]
    for _ in range(3):
        # a slow client thread on a loaded machine can read the whole stream from the
        # socket buffer before it hangs up; then nothing was lost and nothing is marked
        if any(r.error_type for r in derived()):
            break
        _disconnect(server.base_url)
        sent += 1
        wait_derived(sent)
    # the engine core's usage spans export on their own schedule: one per request
    usage_before = before_usage
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(
            [u for u in list(collector.usage) if u.tenant == TENANT]) - usage_before < sent:
        time.sleep(0.2)
    assert len([u for u in list(collector.usage) if u.tenant == TENANT]) - usage_before == sent

    records = derived()
    assert any(r.preemptions for r in records), "the preemption case did not preempt"
    assert any(r.cached_tokens for r in records)
    assert any(r.error_type for r in records)  # the disconnect (aborted or ran on)

    sdk_text = httpx.get(f"{server.base_url}/metrics", timeout=30).text + \
        httpx.get(f"http://127.0.0.1:{engine_metrics_port}/metrics", timeout=30).text
    col_text = httpx.get(f"http://127.0.0.1:{collector.ports['admin']}/metrics",
                         timeout=30).text
    sdk, col = _series(sdk_text), _series(col_text)
    assert sdk and set(sdk) == set(col), (
        f"only SDK: {sorted(set(sdk) - set(col))[:5]}\nonly collector: "
        f"{sorted(set(col) - set(sdk))[:5]}")
    names = {name for name, _ in sdk}
    for spec in SHARED.values():  # every shared metric is there (request- and usage-fed)
        if spec.name.endswith(("unpriced_requests",)):
            continue  # the example price table prices this model and the cpu instance
        if spec.name.startswith("llmtrace.dp."):
            continue  # one rank here; data parallelism: tests/test_vllm_dp.py
        if spec.name.startswith("llmtrace.kv_transfer."):
            continue  # no KV connector here; tests/test_vllm_pd.py checks SDK against spans
        if spec.name.startswith("llmtrace.generation."):
            continue  # no chunked generation here; tests/test_vllm_time_slices.py has one
        assert any(n.startswith(spec.prometheus_base) for n in names), spec.name
    for key, value in sdk.items():
        if key[0].endswith("_sum") or key[0].startswith(("llmtrace_cost_",)):
            assert col[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
        else:
            assert col[key] == value, key
