"""The LLMOps quality loop: drift, judge, regenerations, canary gates.

Each module consumes finished-request records (``llmtrace.record``) the same way in
the SDK and in the collector, and returns plain values; wiring them to metrics is
the telemetry step's job, so importing this package changes nothing global.
"""
