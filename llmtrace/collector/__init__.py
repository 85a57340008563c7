"""The standalone ``llmtrace collector`` service (OTLP in, Prometheus out, spans forwarded).

Modules by job: :mod:`.receivers` (OTLP/gRPC and OTLP/HTTP in), :mod:`.service`
(ingest queue, derivation worker, lifecycle, admin endpoint), :mod:`.forwarder`
(spans out to the downstream), :mod:`.otlp` (payload decoding), :mod:`.config`.
"""

from llmtrace.collector.config import CollectorConfig, load_collector_config
from llmtrace.collector.receivers import Refused
from llmtrace.collector.service import CollectorService

__all__ = ["CollectorConfig", "CollectorService", "Refused", "load_collector_config"]
