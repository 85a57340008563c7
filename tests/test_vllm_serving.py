"""The test bed serves real completions from the generated models on CPU vLLM."""

from __future__ import annotations

import httpx
import pytest
from transformers import AutoTokenizer

from testbed.models import DENSE, MOE
from testbed.stream_client import run_load, summarize

pytestmark = pytest.mark.vllm


@pytest.mark.parametrize("name", [DENSE, MOE])
def test_server_streams_real_completions(vllm_servers, tiny_models, name):
    server = vllm_servers[name]
    listed = httpx.get(f"{server.base_url}/v1/models", timeout=10).json()
    assert [m["id"] for m in listed["data"]] == [name]

    content = "Please explain the prefill and decode phases."
    timings = run_load(server.base_url, name, [
        {"messages": [{"role": "user", "content": content}], "max_tokens": 24}
    ] * 3, concurrency=3)
    tok = AutoTokenizer.from_pretrained(tiny_models.path(name))
    expected_prompt = len(tok.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=True, add_generation_prompt=True,
        return_dict=False))
    for t in timings:
        assert t.ok, t.error
        assert t.tokens == 24 == t.completion_tokens  # ignore_eos: exactly max_tokens
        assert t.finish_reason == "length"
        assert t.prompt_tokens == expected_prompt
        assert t.ttft_s is not None and 0 < t.ttft_s < t.e2e_s
        assert len(t.itl_s) == len(t.chunk_ns) - 1 and all(gap >= 0 for gap in t.itl_s)
        assert t.request_id.startswith("chatcmpl-")

    # the engine really ran these: its own counters saw the generated tokens
    metrics = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    generated = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                    if line.startswith("vllm:generation_tokens_total{"))
    assert generated >= 3 * 24


def test_moe_server_runs_the_moe_architecture(vllm_servers):
    log = vllm_servers[MOE].log_path.read_text(errors="replace")
    assert "Qwen3MoeForCausalLM" in log
    assert "Qwen3MoeForCausalLM" not in vllm_servers[DENSE].log_path.read_text(errors="replace")


def test_completions_endpoint_and_concurrent_load(vllm_servers):
    server = vllm_servers[DENSE]
    done = []
    requests = [{"prompt": f"Request number {i} asks about the cache.", "max_tokens": 16}
                for i in range(8)]
    timings = run_load(server.base_url, DENSE, requests, concurrency=4,
                                   on_done=done.append)
    assert len(done) == 8 and all(t.ok for t in timings)
    assert len({t.request_id for t in timings}) == 8
    summary = summarize(timings)
    assert summary.requests == 8 and summary.errors == 0
    assert summary.output_tokens == 8 * 16
    assert 0 < summary.ttft_p50_s <= summary.ttft_p99_s
    assert 0 < summary.itl_p50_s <= summary.itl_p99_s
    assert summary.tokens_per_s > 0


def test_bad_request_is_reported_not_raised(vllm_servers):
    server = vllm_servers[DENSE]
    [t] = run_load(server.base_url, "no-such-model",
                               [{"prompt": "x", "max_tokens": 4}], concurrency=1)
    assert not t.ok and t.status == 404 and "no-such-model" in (t.error or "")
