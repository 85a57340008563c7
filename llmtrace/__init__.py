"""llmtrace: OpenTelemetry observability for LLM serving stacks.

The data path: hook (``llmtrace.instrumentation.<integration>``) -> span/metric
-> OTLP -> derivation (``llmtrace.pipeline``) -> Prometheus / trace store ->
dashboards. Names come from :mod:`llmtrace.semconv`, generated from ``semconv/``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("llmtrace")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
