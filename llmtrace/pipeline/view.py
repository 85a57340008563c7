"""The span shape the derivation reads, whichever way spans arrived (OTLP or SDK)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)  # not frozen: frozen __init__ costs ~10% of pipeline throughput
class SpanView:
    name: str
    trace_id: bytes
    span_id: bytes
    parent_span_id: bytes
    start_ns: int
    end_ns: int
    status_code: int
    attributes: dict[str, Any]
    resource: dict[str, Any]
