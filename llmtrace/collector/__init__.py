"""The standalone ``llmtrace collector`` service (OTLP in, Prometheus out, spans forwarded)."""

from llmtrace.collector.config import CollectorConfig, load_collector_config
from llmtrace.collector.service import CollectorService, Refused

__all__ = ["CollectorConfig", "CollectorService", "Refused", "load_collector_config"]
