"""The one place a request's durations are computed from its timestamps.

Every duration in the registry's ``llmtrace.latency.*`` group is computed here
and nowhere else; the request span's attributes, the phase spans and the
duration histograms all read the :class:`Phases` this returns.

Definitions (wall-clock nanoseconds, one host):

- ``read``: the HTTP server read the request's bytes;
- ``engine_arrival``: the API server handed the request to the engine client
  (after parsing, chat template, tokenisation and input processing);
- ``scheduled`` / ``preempted``: the engine core's scheduler events (vLLM's
  ``EngineCoreEvent`` timestamps, converted from the shared monotonic clock);
- ``prompt_done``: the engine output that carried the first token;
- ``first_token``: the first response byte written (streaming), or the first
  token's output for a non-streaming response;
- ``last_token`` and ``end``.

The phases before the first token **tile** [read, first_token]: boundaries
are clamped into order, so preprocess + queue + prefill + first-token delivery
equals TTFT exactly, whatever clock jitter or missing events do. A
preemption before the first token splits prefill; its re-queue counts as
queue. Decode-time preemptions stay inside decode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SCHEDULED, PREEMPTED = "scheduled", "preempted"


@dataclass(slots=True)
class Timeline:
    """A request's timestamps as the hooks saw them (0: not seen)."""

    read_ns: int
    engine_arrival_ns: int = 0
    prompt_done_ns: int = 0
    first_token_ns: int = 0
    last_token_ns: int = 0
    end_ns: int = 0
    #: (kind, wall ns) scheduler events in arrival order: SCHEDULED or PREEMPTED
    events: list[tuple[str, int]] = field(default_factory=list)


@dataclass(slots=True)
class Segment:
    """One tile of [read, first token], or a preemption interval."""

    phase: str  # preprocess | queue | prefill | first_token_delivery | preemption
    start_ns: int
    end_ns: int
    reason: str = ""  # queue: arrival | preemption


@dataclass(slots=True)
class Phases:
    """Durations in seconds (None: not known for this request) and the intervals behind them."""

    ttft_s: float | None
    e2e_s: float
    preprocess_s: float | None
    queue_s: float | None
    prefill_s: float | None
    first_token_delivery_s: float | None
    decode_s: float | None
    #: the tiles of [read, first token], in order (rendered as phase spans)
    tiles: list[Segment]
    #: every preemption, [preempted, scheduled again] (or the end, if never resumed)
    preemptions: list[Segment]


def _seconds(ns: int) -> float:
    return ns / 1e9


def phases(t: Timeline) -> Phases:
    read = t.read_ns
    end = max(t.end_ns, read)
    first = t.first_token_ns if t.first_token_ns >= read else 0
    preemptions = _preemptions(t.events, end)
    decode = None
    if first:
        last = max(t.last_token_ns, first)
        decode = _seconds(min(last, max(end, first)) - first)
    tiles = _tiles(t, first or end) if (first or t.engine_arrival_ns) else []
    totals: dict[str, int] = {}
    for seg in tiles:
        totals[seg.phase] = totals.get(seg.phase, 0) + seg.end_ns - seg.start_ns
    known = {seg.phase for seg in tiles}
    engine_known = "prefill" in known  # the scheduler's events reached us

    def total(phase: str, needs_engine: bool = True) -> float | None:
        if phase not in known or (needs_engine and not engine_known) or not first:
            return None
        return _seconds(totals[phase])

    return Phases(
        ttft_s=_seconds(first - read) if first else None,
        e2e_s=_seconds(end - read),
        preprocess_s=_seconds(totals["preprocess"]) if "preprocess" in known else None,
        queue_s=total("queue"), prefill_s=total("prefill"),
        first_token_delivery_s=total("first_token_delivery", needs_engine=False),
        decode_s=decode, tiles=tiles if first else tiles[:1], preemptions=preemptions)


def _tiles(t: Timeline, first: int) -> list[Segment]:
    """Contiguous segments from read to ``first``; every boundary clamped into order."""
    read = t.read_ns

    def clamp(ns: int, low: int) -> int:
        return min(max(ns, low), first)

    arrival = clamp(t.engine_arrival_ns or read, read)
    tiles = [Segment("preprocess", read, arrival)]
    done = clamp(t.prompt_done_ns or first, arrival)
    has_scheduled = any(kind == SCHEDULED for kind, _ in t.events)
    if not has_scheduled:
        # no scheduler events (vLLM's request stats are off): [arrival, prompt done]
        # stays unsplit, and queue and prefill are reported as unknown
        tiles.append(Segment("first_token_delivery", done, first))
        return tiles
    cursor, state, reason = arrival, "queue", "arrival"
    for kind, ns in t.events:
        ns = clamp(ns, cursor)
        if ns > done:
            break
        if kind == SCHEDULED and state == "queue":
            tiles.append(Segment("queue", cursor, ns, reason))
            cursor, state = ns, "prefill"
        elif kind == PREEMPTED and state == "prefill":
            tiles.append(Segment("prefill", cursor, ns))
            cursor, state, reason = ns, "queue", "preemption"
    tiles.append(Segment(state, cursor, done, reason if state == "queue" else ""))
    tiles.append(Segment("first_token_delivery", done, first))
    return tiles


def _preemptions(events: list[tuple[str, int]], end: int) -> list[Segment]:
    out: list[Segment] = []
    start = 0
    for kind, ns in events:
        if kind == PREEMPTED and not start:
            start = ns
        elif kind == SCHEDULED and start:
            out.append(Segment("preemption", start, max(ns, start)))
            start = 0
    if start:
        out.append(Segment("preemption", start, max(end, start)))
    return out
