"""Collector service settings: YAML file, then environment, then flags (last wins)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmtrace.config import ConfigError
from llmtrace.record.labels import MAX_LABEL_LENGTH


class CollectorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: OTLP/gRPC listen address; empty disables
    grpc_endpoint: str = "0.0.0.0:4317"
    #: OTLP/HTTP (protobuf and JSON) listen address; empty disables
    http_endpoint: str = "0.0.0.0:4318"
    #: Prometheus ``/metrics`` and ``/healthz``
    admin_endpoint: str = "0.0.0.0:8889"
    #: downstream OTLP/gRPC ``host:port`` that receives the original spans (a trace store)
    forward_endpoint: str | None = None
    forward_insecure: bool = True
    forward_headers: dict[str, str] = Field(default_factory=dict)
    forward_timeout_s: float = Field(default=10.0, gt=0)
    forward_retries: int = Field(default=3, ge=0)
    #: spans waiting for the forwarder before new payloads are dropped (counted)
    forward_queue_spans: int = Field(default=200_000, ge=1)
    #: spans accepted but not yet derived; beyond this, senders are told to retry
    queue_spans: int = Field(default=100_000, ge=1)
    #: largest request body accepted, compressed or not
    max_payload_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    #: how long spans wait for their request span, and how many traces may wait
    window_s: float = Field(default=60.0, gt=0)
    max_traces: int = Field(default=50_000, ge=1)
    #: hold a request's derivation this long for its router (llm-d) spans; 0: no wait
    router_wait_s: float = Field(default=0.0, ge=0)
    #: require ``Authorization: Bearer <token>`` on ingest (env LLMTRACE_COLLECTOR_TOKEN)
    bearer_token: str | None = None
    #: price table (YAML) for USD cost; without it only accelerator-seconds are counted
    prices: Path | None = None
    max_label_values: int = Field(default=100, ge=1)
    #: longest model, tenant or version value, in characters, taken from a span into
    #: a label; longer ones are cut, ending in an ellipsis, and counted (the SDK's rule)
    max_label_length: int = Field(default=MAX_LABEL_LENGTH, ge=8, le=4096)
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    #: an HTTP request whose body has not fully arrived after this long (a body shorter
    #: than its Content-Length, a stalled sender) is answered 408, counted
    read_timeout_s: float = Field(default=30.0, gt=0)
    #: HTTP ingest requests in progress at once; more are answered 503 with Retry-After,
    #: counted (open connections, idle keep-alive ones included, are capped at 4x this)
    max_connections: int = Field(default=256, ge=1)
    #: connections the kernel queues before the receiver accepts them (listen backlog)
    listen_backlog: int = Field(default=1024, ge=1)
    #: drift baseline (``pinned``, ``file:PATH``, ``version:STABLE``), window and minimum
    #: requests per window, as the SDK's LLMTRACE_DRIFT_* settings
    drift_baseline: str = "pinned"
    drift_window_s: float = Field(default=1800.0, gt=0)
    drift_min_samples: int = Field(default=100, ge=1)


_ENV = {"bearer_token": "LLMTRACE_COLLECTOR_TOKEN", "forward_endpoint": "LLMTRACE_FORWARD_ENDPOINT",
        "drift_baseline": "LLMTRACE_DRIFT_BASELINE"}


def load_collector_config(path: str | Path | None = None, **overrides: Any) -> CollectorConfig:
    """Merge file, environment and explicit overrides; errors name the file and key."""
    values: dict[str, Any] = {}
    source = str(path) if path else "<flags>"
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of settings")
        values.update(loaded or {})
    for field, var in _ENV.items():
        if os.environ.get(var):
            values[field] = os.environ[var]
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return CollectorConfig(**values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                             for e in exc.errors())
        raise ConfigError(f"{source}: {problems}") from exc
