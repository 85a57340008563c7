"""OpenTelemetry instrumentation for LiteLLM's ``Router``: the route decision, as a span.

A Python application (or LiteLLM's proxy) that balances requests over several
vLLM deployments with ``litellm.Router`` decides per request which deployment
serves it. The decision is made by the routing strategy's selector, whose
``(async_)get_available_deployments(model_group, healthy_deployments, ...)``
gets the candidates (the deployments that passed LiteLLM's health, cooldown and
pre-call filters) and returns the chosen one. Those selector classes have kept
that interface across LiteLLM releases, including the ones whose router core is
written in Rust (which calls back into them), so llmtrace wraps them and nothing
of the router core.

Each decision becomes an ``llmtrace.router.route`` span, a child of the span
current when the router was called (the application's request span, when it
has one), with the candidates, the figure the strategy ranks them by where it
keeps one (least-busy: requests in flight, this worker's view; latency-based:
its mean recorded latency), and the chosen deployment. The selector call only
records plain values; the span is made by llmtrace's builder thread.

Not seen: ``simple-shuffle`` (LiteLLM's default) picks inside the router core
without a Python selector in releases with the Rust core; those requests get
no decision span. The span's trace reaches the vLLM deployment only if the
application forwards ``traceparent`` (``extra_headers``, or an HTTP client
instrumentation).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import wrapt
from opentelemetry import context as otel_context
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor
from opentelemetry.instrumentation.utils import unwrap
from opentelemetry.trace import get_current_span

from llmtrace import semconv as sc
from llmtrace.config import load_config, switched_off
from llmtrace.instrumentation._patching import Hook, guarded
from llmtrace.telemetry import Telemetry
from llmtrace.telemetry.guard import disable_hook

logger = logging.getLogger("llmtrace")
_STRATEGIES = "litellm.router_strategy"


@dataclass(frozen=True)
class Selector:
    """One routing strategy's selector class, and how to read its ranking figure."""

    hook: str  # hook name, for warnings and the disabled-hooks gauge
    module: str
    cls: str
    strategy: str  # LiteLLM's ``routing_strategy`` value
    score_name: str | None = None


SELECTORS = (
    Selector("litellm.router.least_busy", f"{_STRATEGIES}.least_busy",
             "LeastBusyLoggingHandler", "least-busy", "in_flight_requests"),
    Selector("litellm.router.lowest_latency", f"{_STRATEGIES}.lowest_latency",
             "LowestLatencyLoggingHandler", "latency-based-routing", "mean_latency"),
    Selector("litellm.router.usage_based_v2", f"{_STRATEGIES}.lowest_tpm_rpm_v2",
             "LowestTPMLoggingHandler_v2", "usage-based-routing-v2"),
    Selector("litellm.router.cost_based", f"{_STRATEGIES}.lowest_cost",
             "LowestCostLoggingHandler", "cost-based-routing"),
)
METHODS = ("async_get_available_deployments", "get_available_deployments")


@dataclass(slots=True)
class Decision:
    """One route decision as the selector saw it (plain values only)."""

    start_ns: int
    end_ns: int
    strategy: str
    model_group: str
    ids: tuple[str, ...]
    endpoints: tuple[str, ...]
    scores: tuple[float, ...]
    score_name: str | None
    chosen_id: str | None
    chosen_endpoint: str | None
    parent: Any  # the OpenTelemetry context current at the call


def _id(deployment: Mapping[str, Any]) -> str:
    info = deployment.get("model_info") or {}
    return str(info.get("id", "")) if isinstance(info, Mapping) else ""


def _endpoint(deployment: Mapping[str, Any]) -> str:
    params = deployment.get("litellm_params") or {}
    if not isinstance(params, Mapping):
        return ""
    return str(params.get("api_base") or params.get("model") or "")


def _scores(selector: Selector, instance: Any, model_group: str,
            ids: Sequence[str]) -> tuple[float, ...]:
    """The strategy's ranking figure per candidate, read as the selector reads it; empty
    where the strategy keeps none llmtrace knows how to read (never raises)."""
    try:
        cache = instance.router_cache
        if selector.strategy == "least-busy":
            module = inspect.getmodule(type(instance))
            key_of = getattr(module, "_request_count_key", None)
            if key_of is not None and hasattr(instance, "_this_workers_counts"):
                # newer releases: this worker's in-flight count plus its live reservations,
                # the sum the selector takes the least of
                counts = instance._this_workers_counts(tuple(key_of(model_group, i)
                                                             for i in ids))
                live = [0] * len(ids)
                if hasattr(instance, "_live_reservations"):
                    now = instance._clock()
                    live = [len(instance._live_reservations(i, now)) for i in ids]
                return tuple(float(c + r) for c, r in zip(counts, live, strict=True))
            counts = cache.get_cache(key=f"{model_group}_request_count") or {}  # older ones
            return tuple(float(counts.get(i, 0) or 0) for i in ids)
        if selector.strategy == "latency-based-routing":
            table = cache.get_cache(key=f"{model_group}_map") or {}
            out = []
            for i in ids:
                latencies = (table.get(i) or {}).get("latency") or []
                out.append(sum(latencies) / len(latencies) if latencies else 0.0)
            return tuple(out)
    except Exception:  # noqa: BLE001 - a figure we cannot read is left out, nothing else
        return ()
    return ()


class RouteTracer:
    """Wraps the selectors; decisions go to the builder thread as plain values."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry

    def wrapper(self, selector: Selector) -> Callable:
        """The guarded wrapt wrapper recording ``selector``'s decisions (its
        ``async_`` method returns a coroutine: the choice is read when awaited)."""
        tracer = self

        def before(instance, args, kwargs) -> tuple | None:
            parent = otel_context.get_current()
            current = get_current_span(parent).get_span_context()
            if current.is_valid and not current.trace_flags.sampled:
                return None  # the request is not traced: its decision would be dropped
            model_group = kwargs.get("model_group", args[0] if args else "")
            candidates = kwargs.get("healthy_deployments", args[1] if len(args) > 1 else ())
            candidates = [d for d in candidates or () if isinstance(d, Mapping)]
            ids = tuple(_id(d) for d in candidates)
            return (time.time_ns(), str(model_group), ids, tuple(_endpoint(d) for d in candidates),
                    _scores(selector, instance, str(model_group), ids), parent)

        def after(instance, args, kwargs, picked: Any, token: tuple | None) -> None:
            if token is None:
                return
            start, group, ids, endpoints, scores, parent = token
            chosen = picked if isinstance(picked, Mapping) else None
            tracer.telemetry.builder.submit(tracer.build, Decision(
                start, time.time_ns(), selector.strategy, group, ids, endpoints, scores,
                selector.score_name, _id(chosen) if chosen else None,
                _endpoint(chosen) if chosen else None, parent))

        return guarded(Hook(selector.hook, (), before=before, after=after), awaitable=True)

    def build(self, d: Decision) -> None:
        attrs: dict[str, Any] = {
            sc.LLMTRACE_ROUTER_STRATEGY: d.strategy,
            sc.LLMTRACE_ROUTER_MODEL_GROUP: d.model_group,
            sc.LLMTRACE_ROUTER_CANDIDATE_IDS: list(d.ids),
            sc.LLMTRACE_ROUTER_CANDIDATE_ENDPOINTS: list(d.endpoints),
            sc.LLMTRACE_ROUTER_DECISION: d.strategy,
        }
        if d.scores and len(d.scores) == len(d.ids):
            attrs[sc.LLMTRACE_ROUTER_CANDIDATE_SCORES] = list(d.scores)
            if d.score_name:
                attrs[sc.LLMTRACE_ROUTER_SCORE_NAME] = d.score_name
        if d.chosen_id is not None:
            attrs[sc.LLMTRACE_ROUTER_DEPLOYMENT] = d.chosen_id
        attrs[sc.LLMTRACE_ROUTER_ENDPOINT] = d.chosen_endpoint or ""
        span = self.telemetry.child_span(sc.SPAN_LLMTRACE_ROUTER_ROUTE, d.parent, d.start_ns,
                                         attrs)
        span.end(end_time=d.end_ns)


class LiteLLMRouterInstrumentor(BaseInstrumentor):
    """``LiteLLMRouterInstrumentor().instrument(**config)`` wraps LiteLLM's route selectors."""

    _wrapped: list[tuple[type, str]] = []
    _active = False
    telemetry: Telemetry | None = None

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("litellm >= 1.40",)

    def _instrument(self, **kwargs: Any) -> None:
        telemetry = kwargs.pop("telemetry", None)
        providers = {k: kwargs.pop(k, None) for k in ("tracer_provider", "meter_provider")}
        kwargs.pop("skip_dep_check", None)
        config = kwargs.pop("config", None) or load_config(lenient_env=True, **kwargs)
        off = switched_off(config)
        if off:
            logger.info("llmtrace: LiteLLM not instrumented: %s", off)
            return
        self.telemetry = telemetry or Telemetry(config, **providers)
        tracer = RouteTracer(self.telemetry)
        self._wrapped = []
        self._active = True
        # wrapped when the application imports them: LiteLLM is slow to import, and a
        # process that never uses it (a vLLM server under opentelemetry-instrument) must
        # not pay for it
        for selector in SELECTORS:
            wrapt.register_post_import_hook(
                lambda module, selector=selector: self._wrap(module, selector, tracer),
                selector.module)
        logger.info("llmtrace: LiteLLM router selectors will be instrumented on import")

    def _wrap(self, module: Any, selector: Selector, tracer: RouteTracer) -> None:
        if not self._active:
            return
        cls = getattr(module, selector.cls, None)
        if cls is None:
            disable_hook(selector.hook, f"{selector.module}.{selector.cls} not found")
            return
        for method in METHODS:
            if not hasattr(cls, method) or isinstance(
                    inspect.getattr_static(cls, method), wrapt.FunctionWrapper):
                continue
            try:
                wrapt.wrap_function_wrapper(cls, method, tracer.wrapper(selector))
            except Exception as exc:  # noqa: BLE001 - a hook we cannot install is skipped
                disable_hook(selector.hook, f"cannot wrap {selector.cls}.{method}: {exc}")
                continue
            self._wrapped.append((cls, method))

    def _uninstrument(self, **kwargs: Any) -> None:
        self._active = False  # post-import hooks cannot be removed: they go quiet
        for cls, method in self._wrapped:
            unwrap(cls, method)
        self._wrapped = []
        if self.telemetry is not None:
            self.telemetry.flush()
