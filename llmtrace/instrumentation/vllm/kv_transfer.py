"""KV transfer through vLLM's KV connectors: P/D disaggregation and external KV caches.

vLLM creates its KV connectors through ``KVConnectorFactory.create_connector``,
one on the scheduler side (engine core) and one per worker, of whatever class
the user configured (NixlConnector, LMCache, the shared-storage example, a
MultiConnector). The factory hook wraps the interface methods on each connector
object it returns (an instance attribute, since every class overrides them), so
no connector class is named here and a new one is followed as it is.

Scheduler side, per request (the engine core's busy loop; timestamps and ids only):

- **load** (consumer, a decode instance): ``get_num_new_matched_tokens`` says
  how many prompt tokens the connector will provide and whether asynchronously;
  ``update_state_after_alloc`` allocates their blocks, the load's start (an
  asynchronous load then waits outside the batch, ``WAITING_FOR_REMOTE_KVS``).
  It ends when ``update_connector_output`` reports the request in
  ``finished_recving`` (or a synchronous load's step ends), or fails with
  ``failed_recving`` / ``invalid_block_ids`` (read from the step's output as the
  scheduler gets it, ``vllm.scheduler.update_from_output``: vLLM frees a failed
  request before it tells the connector), or the request is freed first.
- **save** (producer, a prefill instance): ``request_finished`` (or its
  all-groups form) returning ``delay_free`` hands the request's blocks to the
  connector when the request ends; they are held for the peer until
  ``finished_sending``.

Only blocks the engine does not already hold move: a load counts the blocks
allocated without a prefix-cache hash (what NIXL reads into), a save the
blocks it hands over. Bytes are those blocks times the bytes one block holds
over all layers (``page_size_bytes`` x layers per KV-cache group), which is
what the connector moves (NIXL's own byte count agrees).

Joining the two sides: a save puts the producer's request-span context in the
``kv_transfer_params`` it returns (:data:`CONTEXT_PARAM`), which the proxy
passes to the decode instance; the consumer's engine and transfer spans link to
it. Both record ``llmtrace.kv_transfer.peer_request_id`` (NIXL's
``remote_request_id``), so the two are joined even where the proxy drops the
parameter. Worker side, per step: the time of ``start_load_kv``,
``wait_for_save`` and ``get_finished``, summed into observable counters.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Status,
    StatusCode,
    get_current_span,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from llmtrace import semconv as sc
from llmtrace.config import Config
from llmtrace.instrumentation._patching import Hook, install_on, method_of
from llmtrace.instrumentation.vllm.frontend import CONTEXT_HEADER
from llmtrace.record import TransferRecord
from llmtrace.telemetry import Telemetry
from llmtrace.telemetry.guard import DISABLED_HOOKS

if TYPE_CHECKING:
    from llmtrace.instrumentation.vllm.engine import EngineTracer

#: key of the producer's request-span context (W3C traceparent) in ``kv_transfer_params``
CONTEXT_PARAM = "llmtrace_traceparent"
LOAD, SAVE = "load", "save"
LOAD_FAILED, INVALID_BLOCKS, ABORTED = "load_failed", "invalid_blocks", "aborted"
_PROPAGATOR = TraceContextTextMapPropagator()
#: connector hook name -> the connector role whose objects get it
SCHEDULER_HOOKS = ("vllm.kv.matched_tokens", "vllm.kv.update_state_after_alloc",
                   "vllm.kv.request_finished", "vllm.kv.request_finished_all_groups",
                   "vllm.kv.update_connector_output")
WORKER_HOOKS = ("vllm.kv.start_load_kv", "vllm.kv.wait_for_save", "vllm.kv.get_finished")


def link_to(traceparent: str | None) -> tuple[Link, ...]:
    """A span link to the span a W3C traceparent names (none when it is unusable)."""
    if not traceparent:
        return ()
    ctx = get_current_span(_PROPAGATOR.extract({"traceparent": traceparent})).get_span_context()
    return (Link(ctx),) if ctx.is_valid else ()


@dataclass(frozen=True, slots=True)
class Connector:
    """What llmtrace needs of one KV connector object."""

    name: str  # the connector the user configured (``kv_connector``), else its class
    #: per KV-cache group: bytes one block of that group holds over all its layers
    block_bytes: tuple[int, ...]
    layers: int
    failure_policy: str | None

    def bytes_of(self, blocks: Sequence[int]) -> int:
        """Bytes of ``blocks[g]`` blocks of each group ``g``."""
        if len(self.block_bytes) == 1:
            return sum(blocks) * self.block_bytes[0]
        return sum(n * b for n, b in zip(blocks, self.block_bytes, strict=False))

    @classmethod
    def of(cls, obj: Any, config: Any, kv_cache_config: Any) -> Connector:
        block_bytes, layers = [], 0
        for group in getattr(kv_cache_config, "kv_cache_groups", None) or ():
            n = len(group.layer_names)
            block_bytes.append(int(group.kv_cache_spec.page_size_bytes) * n)
            layers += n
        transfer = getattr(config, "kv_transfer_config", None)
        policy = getattr(transfer, "kv_load_failure_policy", None)
        # the name the user configured (NixlConnector), not the class it resolved to
        # (NixlPullConnector): what dashboards and alerts are written against
        name = getattr(transfer, "kv_connector", None) or type(obj).__name__
        return cls(str(name), tuple(block_bytes) or (0,), layers,
                   str(policy) if policy is not None else None)


@dataclass(eq=False, slots=True)
class Transfer:
    """One request's load or save, from its start to its end (plain values only)."""

    request_id: str
    direction: str
    start_ns: int
    blocks: int
    bytes: int
    tokens: int
    is_async: bool
    #: the request span's context as the API server sent it (sampled requests only)
    traceparent: str | None
    peer_request_id: str | None = None
    remote_engine: str | None = None
    #: the producer's request-span context, from ``kv_transfer_params`` (loads)
    producer_context: str | None = None
    block_ids: frozenset[int] = frozenset()
    end_ns: int = 0
    failure: str | None = None


def _blocks_per_group(block_ids: Any) -> list[int]:
    """Block counts per group from ``request_finished``'s list or the all-groups tuple."""
    if block_ids and isinstance(block_ids[0], (list, tuple)):
        return [len(group) for group in block_ids]
    return [len(block_ids or ())]


def _unhashed(blocks: Any) -> tuple[list[int], frozenset[int]]:
    """Per group, the allocated blocks without a prefix-cache hash (the ones a load fills)."""
    try:
        groups = blocks.get_unhashed_block_ids_all_groups()
    except AttributeError:  # a release without it: the same rule by hand
        groups = [[b.block_id for b in g if b.block_hash is None] for g in blocks.blocks]
    return [len(g) for g in groups], frozenset(groups[0]) if groups else frozenset()


@dataclass
class KVTransferTracer:
    """Per-process KV-connector state; scheduler-side bodies run on the engine loop."""

    config: Config
    telemetry: Telemetry
    engine: EngineTracer
    #: the scheduler-side connector of this engine core (None: no KV connector here)
    connector: Connector | None = None
    loads: dict[str, Transfer] = field(default_factory=dict)
    saves: dict[str, Transfer] = field(default_factory=dict)
    #: request id -> the connector said it loads asynchronously (until its blocks come)
    matched: dict[str, bool] = field(default_factory=dict)
    #: (connector, worker call) -> [seconds, calls]
    worker_totals: dict[tuple[str, str], list] = field(default_factory=dict)
    #: per-connector hooks with their bodies, installed on each connector created
    instance_hooks: dict[str, Hook] = field(default_factory=dict)
    _depth: int = 0
    _sync_loads: int = 0  # open synchronous loads (they end with the step's output)

    # -- the factory ------------------------------------------------------------------
    def before_create(self, instance, args, kwargs) -> None:
        self._depth += 1

    def after_create(self, instance, args, kwargs, connector, token) -> None:
        self._depth -= 1
        if self._depth > 0:
            return  # a connector a MultiConnector builds inside its own: follow the outer one
        config = args[0] if args else kwargs["config"]
        role = args[1] if len(args) > 1 else kwargs["role"]
        kv_cache_config = args[2] if len(args) > 2 else kwargs.get("kv_cache_config")
        info = Connector.of(connector, config, kv_cache_config)
        role_name = str(getattr(role, "name", role)).lower()
        names = WORKER_HOOKS if role_name == "worker" else SCHEDULER_HOOKS
        if role_name == "worker" and not self.config.measure_overhead:
            self._time_worker_calls(connector, info.name)  # runs every step: no guard
        else:
            hooks = [self._worker_hook(self.instance_hooks[n], info.name)
                     if role_name == "worker" else self.instance_hooks[n]
                     for n in names if n in self.instance_hooks]
            install_on(connector, hooks, measure=self.config.measure_overhead)
        if role_name == "worker":
            if self.config.metrics_enabled:
                self.telemetry.instruments.kv_worker_totals = self._worker_view
        else:
            self.connector = info
            self.engine.keep_span_contexts = True

    def _worker_hook(self, hook: Hook, connector: str) -> Hook:
        """``hook`` timing its call into :attr:`worker_totals` under its operation."""
        totals = self.worker_totals.setdefault(
            (connector, hook.name.removeprefix("vllm.kv.")), [0.0, 0])

        def after(instance, args, kwargs, result, start_ns) -> None:
            totals[0] += (time.perf_counter_ns() - start_ns) / 1e9
            totals[1] += 1

        return Hook(hook.name, hook.targets, before=_perf_now, after=after)

    def _time_worker_calls(self, connector: Any, name: str) -> None:
        """The worker calls run every engine step, empty ones included (about 1 kHz while
        KV is held or awaited): a bare timer per call, two clock reads and two adds
        that cannot raise, instead of the guarded hook (which benchmark mode keeps, to
        charge its time). The signature check is :func:`install_on`'s."""
        for hook_name in WORKER_HOOKS:
            hook = self.instance_hooks.get(hook_name)
            if hook is None or hook.name in DISABLED_HOOKS:
                continue
            leaf, bound = method_of(connector, hook)
            if bound is None:
                continue
            totals = self.worker_totals.setdefault(
                (name, hook_name.removeprefix("vllm.kv.")), [0.0, 0])
            setattr(connector, leaf, timed_call(bound, totals))

    def _worker_view(self) -> dict[tuple[str, str], list]:
        return self.worker_totals

    # -- scheduler side (engine loop) ---------------------------------------------------
    def after_matched(self, instance, args, kwargs, result, token) -> None:
        request = args[0] if args else kwargs["request"]
        n, is_async = result
        if n:
            self.matched[request.request_id] = bool(is_async)

    def after_alloc(self, instance, args, kwargs, result, token) -> None:
        request = args[0] if args else kwargs["request"]
        n = args[2] if len(args) > 2 else kwargs["num_external_tokens"]
        rid = request.request_id
        is_async = self.matched.pop(rid, True)
        if not n or rid in self.loads or self.connector is None:
            return
        blocks = args[1] if len(args) > 1 else kwargs["blocks"]
        counts, ids = _unhashed(blocks)
        params = request.kv_transfer_params or {}
        headers = request.trace_headers
        if not is_async:
            self._sync_loads += 1
        self.loads[rid] = Transfer(
            rid, LOAD, time.time_ns(), sum(counts), self.connector.bytes_of(counts), n,
            is_async, headers.get(CONTEXT_HEADER) if headers else None,
            _str(params.get("remote_request_id")), _str(params.get("remote_engine_id")),
            _str(params.get(CONTEXT_PARAM)), ids)

    def after_finished(self, instance, args, kwargs, result, token) -> None:
        delay_free, params = result
        request = args[0] if args else kwargs["request"]
        rid = request.request_id
        if not delay_free or rid in self.saves or self.connector is None:
            return
        counts = _blocks_per_group(args[1] if len(args) > 1 else kwargs["block_ids"])
        headers = request.trace_headers
        traceparent = headers.get(CONTEXT_HEADER) if headers else None
        if traceparent and isinstance(params, dict):
            params[CONTEXT_PARAM] = traceparent  # the consumer links its spans to it
        self.saves[rid] = Transfer(
            rid, SAVE, time.time_ns(), sum(counts), self.connector.bytes_of(counts),
            request.num_computed_tokens, True, traceparent, peer_request_id=rid)

    def on_failures(self, out: Any) -> None:
        """A step's worker output, before vLLM handles it: loads that failed end here (with
        ``kv_load_failure_policy=fail`` vLLM frees their requests before it tells the
        connector, which would read as aborted)."""
        if out is None:
            return
        now = time.time_ns()
        loads = self.loads
        for rid in getattr(out, "failed_recving", None) or ():
            if (t := loads.pop(rid, None)) is not None:
                self._close(t, now, LOAD_FAILED)
        invalid = getattr(out, "invalid_block_ids", None)
        if invalid and loads:
            for rid in [r for r, t in loads.items() if t.block_ids & invalid]:
                self._close(loads.pop(rid), now, INVALID_BLOCKS)

    def after_output(self, instance, args, kwargs, result, token) -> None:
        out = args[0] if args else kwargs["connector_output"]
        # While blocks are held or awaited the engine steps about every millisecond with
        # nothing finished: keep that path to a few attribute reads.
        if not (out.finished_recving or out.finished_sending or self._sync_loads
                or getattr(out, "failed_recving", None) or out.invalid_block_ids):
            return
        self.on_failures(out)  # where the hook above is not installed: seen here, or aborted
        now = time.time_ns()
        loads, saves = self.loads, self.saves
        for rid in out.finished_recving or ():
            if (t := loads.pop(rid, None)) is not None:
                self._close(t, now, None)
        for rid in out.finished_sending or ():
            if (t := saves.pop(rid, None)) is not None:
                self._close(t, now, None)
        if self._sync_loads:  # synchronous loads ran in the step that just ended
            for rid in [r for r, t in loads.items() if not t.is_async]:
                self._close(loads.pop(rid), now, None)
            self._sync_loads = 0

    def on_free(self, request_id: str) -> None:
        """The engine frees a request (before its save, if any, opens)."""
        self.matched.pop(request_id, None)
        t = self.loads.pop(request_id, None)
        if t is not None:
            self._close(t, time.time_ns(), ABORTED)

    def has_open(self) -> bool:
        return bool(self.loads or self.saves)

    def _close(self, t: Transfer, end_ns: int, failure: str | None) -> None:
        t.end_ns, t.failure = end_ns, failure
        if t.direction == LOAD and t.traceparent:
            rec = self.engine.records.get(t.request_id)
            if rec is not None:  # built as a child of the engine span when it is freed
                rec.transfers.append(t)
                self.telemetry.builder.submit(self.build, (t, False))
                return
        self.telemetry.builder.submit(self.build, (t, bool(t.traceparent)))

    # -- building (the builder thread) ----------------------------------------------------
    def build(self, item: tuple[Transfer, bool]) -> None:
        """One ended transfer -> its metric updates and (sampled, not built by the engine
        span) its span, under the engine span where that is known."""
        t, span = item
        connector = self.connector
        name = connector.name if connector else "unknown"
        if self.config.metrics_enabled:
            self.telemetry.instruments.record_transfer(TransferRecord(
                trace_id="", model=self.engine.model, version=self.config.deployment_version,
                connector=name, direction=t.direction,
                duration_s=max(0, t.end_ns - t.start_ns) / 1e9, blocks=t.blocks,
                bytes=t.bytes, tokens=t.tokens, error_type=t.failure))
        if span and t.traceparent:
            engine_span = self.engine.span_context_of(t.request_id)
            parent = NonRecordingSpan(engine_span) if engine_span is not None else \
                _PROPAGATOR.extract({"traceparent": t.traceparent})
            self.span(t, parent)

    def span(self, t: Transfer, parent: Any) -> None:
        """The ``llmtrace.kv_transfer`` span of ``t`` under ``parent``."""
        connector = self.connector
        attrs: dict[str, Any] = {
            sc.LLMTRACE_KV_TRANSFER_CONNECTOR: connector.name if connector else "unknown",
            sc.LLMTRACE_KV_TRANSFER_DIRECTION: t.direction,
            sc.LLMTRACE_KV_TRANSFER_BLOCKS: t.blocks,
            sc.LLMTRACE_KV_TRANSFER_BYTES: t.bytes,
            sc.LLMTRACE_KV_TRANSFER_TOKENS: t.tokens,
            sc.LLMTRACE_KV_TRANSFER_ASYNC: t.is_async,
            sc.GEN_AI_REQUEST_MODEL: self.engine.model,
            sc.LLMTRACE_DEPLOYMENT_VERSION: self.config.deployment_version,
        }
        if connector is not None:
            attrs[sc.LLMTRACE_KV_TRANSFER_LAYERS] = connector.layers
            if t.direction == LOAD and connector.failure_policy:
                attrs[sc.LLMTRACE_KV_TRANSFER_FAILURE_POLICY] = connector.failure_policy
        if t.peer_request_id:
            attrs[sc.LLMTRACE_KV_TRANSFER_PEER_REQUEST_ID] = t.peer_request_id
        if t.remote_engine:
            attrs[sc.LLMTRACE_KV_TRANSFER_REMOTE_ENGINE] = t.remote_engine
        if self.engine.dp_rank is not None:
            attrs[sc.LLMTRACE_ENGINE_INDEX] = self.engine.dp_rank
        if t.failure:
            attrs[sc.LLMTRACE_KV_TRANSFER_FAILURE] = t.failure
            attrs[sc.ERROR_TYPE] = t.failure
        span = self.telemetry.child_span(sc.SPAN_LLMTRACE_KV_TRANSFER, parent, t.start_ns,
                                         attrs, link_to(t.producer_context))
        if t.failure:
            span.set_status(Status(StatusCode.ERROR, t.failure))
        span.end(end_time=t.end_ns)


def timed_call(bound: Any, totals: list) -> Any:
    """``bound`` with its wall time and calls added to ``totals`` ([seconds, calls])."""
    clock = time.perf_counter

    def timed(*args, **kwargs):
        start = clock()
        try:
            return bound(*args, **kwargs)
        finally:
            totals[0] += clock() - start
            totals[1] += 1

    return timed


def _perf_now(instance, args, kwargs) -> int:
    return time.perf_counter_ns()


def _str(value: Any) -> str | None:
    return None if value is None else str(value)
