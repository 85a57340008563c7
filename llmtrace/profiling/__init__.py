"""torch profiler integration: regions that name their trace, and a converter.

While a torch profiler runs, llmtrace's regions enter
``torch.profiler.record_function`` under a name tagged with the trace and span
ids of the span llmtrace exports for the same region (:mod:`.tags`). A captured
Chrome/Perfetto trace then converts to OTLP spans in those traces
(:mod:`.convert`, ``llmtrace profile convert``), so a profile and a trace can be
opened from each other.
"""
