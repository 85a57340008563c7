"""Prefill/decode disaggregation on CPU: vLLM instances with NixlConnector over UCX.

What it takes here (docs/design/kv-transfer.md has the study): ``kv_buffer_device:
cpu``, block sizes that are multiples of 32, a NIXL side channel per instance on
loopback, one core per instance, one UCX progress thread that pauses between polls
(``LLMTRACE_TESTBED_NIXL_PROGRESS_DELAY_US``; NIXL's default busy-polls), and vLLM's
vector attention kernel instead of the AMX one (``LLMTRACE_TESTBED_NO_AMX``); the
last two are applied by :mod:`testbed.vllm_cli`.
"""

from __future__ import annotations

import json

from testbed.models import DENSE, TinyModels
from testbed.ports import free_port
from testbed.vllm_server import ServerConfig

BLOCK = 32
NIXL_THREADS = 1
PRODUCER, CONSUMER = "kv_producer", "kv_consumer"


def nixl_config(models: TinyModels, role: str, core: int, env: tuple = (),
                policy: str | None = None) -> ServerConfig:
    """The dense model as a NIXL ``role`` instance bound to CPU ``core``; ``env`` as
    (name, value) pairs (llmtrace's settings)."""
    transfer = {"kv_connector": "NixlConnector", "kv_role": role, "kv_buffer_device": "cpu",
                # NIXL's default is 4 UCX progress threads per agent, which spin: on a
                # 2-core machine they starve the engines (transfers then outlive their
                # 30 s lease). One is enough on loopback.
                "kv_connector_extra_config": {"num_threads": NIXL_THREADS}}
    if policy is not None:
        transfer["kv_load_failure_policy"] = policy
    pd_env = {"VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
              "VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port()),
              "VLLM_CPU_OMP_THREADS_BIND": str(core),
              "LLMTRACE_TESTBED_NO_AMX": "1",
              # NIXL's progress thread polls without pause (testbed.vllm_cli): 100 us
              "LLMTRACE_TESTBED_NIXL_PROGRESS_DELAY_US": "100",
              # what vLLM sets when it imports NIXL itself (the launcher imports it first)
              "UCX_RCACHE_MAX_UNRELEASED": "1024"}
    return ServerConfig(model_dir=models.dense, served_name=DENSE, max_model_len=1024,
                        args=("--block-size", str(BLOCK), "--kv-transfer-config",
                              json.dumps(transfer)),
                        env=tuple(sorted({**dict(env), **pd_env}.items())))


def pd_router_args(prefill_url: str, decode_url: str) -> tuple[str, ...]:
    """``vllm-router`` PD mode in front of one prefill and one decode instance."""
    return ("--vllm-pd-disaggregation", "--prefill", prefill_url, "--decode", decode_url,
            "--policy", "round_robin")
