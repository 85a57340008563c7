"""Session-scoped test bed: tiny models, real vLLM servers, a real OTLP receiver.

Expensive things start once per pytest session and are always stopped. Every
server's caches and temporary files live under one scratch directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmtrace.testing.models import DENSE, MOE, TinyModels, ensure_models
from llmtrace.testing.otlp_receiver import OTLPReceiver
from llmtrace.testing.vllm_server import ServerConfig, ServerPool, VLLMServer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def scratch_dir() -> Iterator[Path]:
    """One scratch root for the session; vLLM's caches and temp files go here."""
    root = Path(tempfile.mkdtemp(prefix="llmtrace-tests-"))
    yield root
    if not os.environ.get("LLMTRACE_KEEP_SCRATCH"):
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_models() -> TinyModels:
    cache = Path(os.environ.get("LLMTRACE_MODEL_DIR", REPO / ".cache" / "models"))
    return ensure_models(cache)


@pytest.fixture(scope="session")
def server_pool(scratch_dir: Path) -> Iterator[ServerPool]:
    pool = ServerPool(scratch_dir / "servers")
    yield pool
    pool.stop_all()


def dense_config(models: TinyModels, *args: str, **kw) -> ServerConfig:
    return ServerConfig(model_dir=models.dense, served_name=DENSE, args=tuple(args), **kw)


def moe_config(models: TinyModels, *args: str, **kw) -> ServerConfig:
    return ServerConfig(model_dir=models.moe, served_name=MOE, args=tuple(args), **kw)


@pytest.fixture(scope="session")
def vllm_servers(server_pool: ServerPool, tiny_models: TinyModels) -> dict[str, VLLMServer]:
    """Plain dense and MoE servers, started together so their start-ups overlap."""
    dense, moe = server_pool.get_many([dense_config(tiny_models), moe_config(tiny_models)])
    return {DENSE: dense, MOE: moe}


@pytest.fixture(scope="session")
def otlp_receiver() -> Iterator[OTLPReceiver]:
    with OTLPReceiver() as receiver:
        yield receiver
