"""Test bed for llmtrace: tiny offline models, a real vLLM server, an OTLP
receiver and a streaming client. Used by the test suite, the benchmarks and
``make demo``.

It lives beside the ``llmtrace`` package, not inside it, so the wheel ships
only the SDK; run it from a checkout (pytest puts the repository root on
``sys.path``; the scripts in ``benchmarks/`` and ``examples/`` do it themselves).
"""
