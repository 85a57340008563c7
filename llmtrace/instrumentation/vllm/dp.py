"""The API server's data-parallel rank choice, recorded on the request it was made for.

With ``--data-parallel-size N`` (internal load balancing) vLLM's engine client
``DPLBAsyncMPClient.get_core_engine_for_request`` picks one engine core per
request from the per-rank ``[waiting, running, kv_cache_usage]`` counts its DP
coordinator publishes (about every 100 ms) and its own in-flight counts. The
hook copies exactly those inputs before the choice (the choice itself bumps
the chosen rank's waiting count) and the chosen rank after it; the scoring
formula stays vLLM's, so a release that changes it is still recorded truly.
With external or hybrid load balancing each API server drives one rank
(``DPAsyncMPClient``): the rank is recorded with reason ``external_lb``.

Serving path: a few tuples of small ints per request, attached to the
frontend's :class:`~llmtrace.instrumentation.vllm.frontend.RequestState`
(the output processor has registered the request just before the engine
client is asked). The ``llmtrace.route.dp`` span, the record's fields and the
imbalance figure are made by the builder thread (:func:`route_attributes`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmtrace import semconv as sc

if TYPE_CHECKING:
    from llmtrace.instrumentation.vllm.frontend import FrontendTracer

BALANCED = "load_balanced"
REQUESTED = "requested_rank"
AFFINITY = "session_affinity"
EXTERNAL = "external_lb"


@dataclass(slots=True)
class RankChoice:
    """One request's rank choice as the balancer made it (plain values only)."""

    start_ns: int
    end_ns: int
    rank: int
    reason: str
    ranks: tuple[int, ...] = ()
    waiting: tuple[int, ...] = ()
    running: tuple[int, ...] = ()
    kv_cache_usage: tuple[float, ...] = ()
    in_flight: tuple[int, ...] = ()

    @property
    def load_imbalance(self) -> float | None:
        """Busiest candidate's waiting+running over the mean (1.0 when all are idle);
        only for a balanced choice, where the loads decided it."""
        if self.reason != BALANCED or not self.ranks:
            return None
        loads = [w + r for w, r in zip(self.waiting, self.running, strict=True)]
        mean = sum(loads) / len(loads)
        return max(loads) / mean if mean else 1.0


def _rank(identity: bytes) -> int:
    """vLLM names each engine core by its rank as two little-endian bytes."""
    return int.from_bytes(identity, "little")


class DPRouting:
    """Hook bodies for the engine client's rank choice (see the hook table)."""

    def __init__(self, frontend: FrontendTracer) -> None:
        self.frontend = frontend

    def before_balanced(self, instance, args, kwargs) -> tuple[Any, ...] | None:
        request = args[0] if args else kwargs["request"]
        rec = self.frontend.records.get(request.request_id)
        if rec is None:  # not followed (suppressed, or a streaming-input update)
            return None
        if request.request_id in instance.reqs_in_flight:
            reason = AFFINITY
        elif getattr(request, "data_parallel_rank", None) is not None:
            reason = REQUESTED
        else:
            reason = BALANCED
        counts = instance.lb_engines
        engines = instance.core_engines
        inflight = getattr(instance, "engine_inflight", None)  # vLLM >= 0.32
        return (rec, reason, time.time_ns(), tuple(engines),
                tuple(int(c[0]) for c in counts), tuple(int(c[1]) for c in counts),
                tuple(float(c[2]) for c in counts if len(c) > 2),
                tuple(int(inflight[e]) for e in engines) if inflight is not None else ())

    def after_balanced(self, instance, args, kwargs, chosen, token) -> None:
        if token is None:
            return
        rec, reason, start_ns, engines, waiting, running, kv, inflight = token
        rec.dp = RankChoice(start_ns, time.time_ns(), _rank(chosen), reason,
                            tuple(_rank(e) for e in engines), waiting, running, kv, inflight)

    def after_single(self, instance, args, kwargs, chosen, token) -> None:
        request = args[0] if args else kwargs["request"]
        rec = self.frontend.records.get(request.request_id)
        if rec is not None and chosen is not None:
            now = time.time_ns()
            rec.dp = RankChoice(now, now, _rank(chosen), EXTERNAL)


def route_attributes(choice: RankChoice) -> dict[str, Any]:
    """The ``llmtrace.route.dp`` span's attributes (builder thread)."""
    attrs: dict[str, Any] = {sc.LLMTRACE_ENGINE_INDEX: choice.rank,
                             sc.LLMTRACE_DP_REASON: choice.reason}
    if choice.ranks:
        attrs[sc.LLMTRACE_DP_CANDIDATE_RANKS] = choice.ranks
        attrs[sc.LLMTRACE_DP_CANDIDATE_WAITING] = choice.waiting
        attrs[sc.LLMTRACE_DP_CANDIDATE_RUNNING] = choice.running
        if choice.in_flight:
            attrs[sc.LLMTRACE_DP_CANDIDATE_IN_FLIGHT] = choice.in_flight
        if choice.kv_cache_usage:
            attrs[sc.LLMTRACE_DP_CANDIDATE_KV_CACHE_USAGE] = choice.kv_cache_usage
    imbalance = choice.load_imbalance
    if imbalance is not None:
        attrs[sc.LLMTRACE_DP_LOAD_IMBALANCE] = imbalance
    return attrs
