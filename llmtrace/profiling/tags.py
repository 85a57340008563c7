"""The tag that joins a torch profiler event to an OpenTelemetry span.

A region entered while a torch profiler runs is named
``"{region} [llmtrace:{trace_id:032x}:{span_id:016x}]"``: the span id is the
one llmtrace itself exports for that region, so the span exists in the trace
store and the profile's converted events can hang under it. The tag rides in
the event name because a name is the one thing ``record_function`` carries
into every profiler output (Chrome trace, Perfetto, the key averages table)
without extra profiler options. The ids are lower-case hex in W3C traceparent
widths, so they can be pasted into a trace store's search as they are.

:func:`tag` runs on the serving thread while profiling: it is one f-string.
"""

from __future__ import annotations

import re

_OPEN = " [llmtrace:"
_TAG = re.compile(r" \[llmtrace:([0-9a-f]{32}):([0-9a-f]{16})\]\Z")


def tag(name: str, trace_id: int, span_id: int) -> str:
    """``name`` carrying the ids of the span exported for the same region."""
    return f"{name}{_OPEN}{trace_id:032x}:{span_id:016x}]"


def parse(name: str) -> tuple[str, int, int] | None:
    """``(name, trace_id, span_id)`` of a tagged event name, or None if it has no tag.

    All-zero ids are invalid in OpenTelemetry (no span can have them), so a tag
    carrying one is treated as no tag rather than joined to nothing.
    """
    if not name.endswith("]") or _OPEN not in name:
        return None
    m = _TAG.search(name)
    if m is None:
        return None
    trace_id, span_id = int(m.group(1), 16), int(m.group(2), 16)
    if not trace_id or not span_id:
        return None
    return name[:m.start()], trace_id, span_id
