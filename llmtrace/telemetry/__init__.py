"""Per-process OpenTelemetry plumbing: a tracer, instruments and the builder thread.

llmtrace never sets the global OpenTelemetry providers. It emits through the
providers it is given, a global SDK provider set before it was instrumented
(see ``llmtrace.instrumentation.vllm.global_sdk_providers``), or its own. Each
process that actually emits (API server, engine core) builds what it needs on
first use; processes that never emit (workers, vLLM's model-inspection
subprocess) start no exporter or builder threads.

Spans whose ids the serving path must know before the span is built (the
request span, whose context rides to the engine core) get them from
:meth:`Telemetry.new_root`: ids drawn and the sampler asked on the serving
path, the span built later, off it, with exactly those ids
(:class:`PresetIdGenerator`).
"""

from __future__ import annotations

import importlib
import itertools
import json
import logging
import os
import threading
import time
import uuid
import weakref
from collections import Counter
from pathlib import Path
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.environment_variables import (
    OTEL_BSP_MAX_EXPORT_BATCH_SIZE,
    OTEL_BSP_MAX_QUEUE_SIZE,
    OTEL_BSP_SCHEDULE_DELAY,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    INVALID_SPAN_ID,
    INVALID_TRACE_ID,
    Span,
    SpanKind,
    Tracer,
    get_current_span,
    set_span_in_context,
)

from llmtrace import __version__, semconv
from llmtrace.config import Config
from llmtrace.telemetry.guard import HOOK_CPU_S
from llmtrace.telemetry.spans import DirectSpan, SpanSink, direct_spans_allowed

logger = logging.getLogger("llmtrace")

#: reason -> spans dropped in this process (queue full, export failed).
DROPPED: Counter[str] = Counter()
#: a drop reason is logged when first seen, then at most this often (seconds)
DROP_LOG_EVERY_S = 60.0
_drop_logged: dict[str, float] = {}


def log_drop(reason: str, detail: str, what: str = "spans") -> None:
    """Say that spans are being dropped: the first time per reason, then once a minute.

    The counter (``llmtrace.telemetry.dropped``) is the record; the log line is for
    whoever reads the server's log during an outage. Called only when a drop happens.
    """
    now = time.monotonic()
    last = _drop_logged.get(reason)
    if last is not None and now - last < DROP_LOG_EVERY_S:
        return
    _drop_logged[reason] = now
    logger.warning("llmtrace: dropping %s (%s): %s; %d so far in this process, counted "
                   "in llmtrace.telemetry.dropped{reason=%r}", what, reason, detail,
                   DROPPED[reason], reason)


class _CountingExporter(SpanExporter):
    """Delegates to the real exporter and counts spans lost to failed exports.

    It also counts every span it is handed (``received``), which the batch
    processor needs to estimate its queue length. In benchmark mode it charges
    the export thread's CPU time to llmtrace.
    """

    def __init__(self, inner: SpanExporter, measure: bool = False) -> None:
        self._inner = inner
        self._measure = measure
        #: spans handed to export() so far; one writer (the SDK serializes exports)
        self.received = 0

    def export(self, spans) -> SpanExportResult:
        self.received += len(spans)  # first: these spans have left the batch queue
        t0 = time.thread_time() if self._measure else 0.0
        try:
            result = self._inner.export(spans)
        except Exception as exc:  # noqa: BLE001 - an exporter bug must not kill the thread
            logger.warning("llmtrace: span export raised %s", exc)
            result = SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            DROPPED["export_failed"] += len(spans)
            log_drop("export_failed", f"export to {_endpoint_of(self._inner)} failed")
        if self._measure:
            HOOK_CPU_S["export.spans"] += time.thread_time() - t0
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


def _endpoint_of(exporter: SpanExporter) -> str:
    """Where an exporter sends (the SDK's OTLP exporters keep it in ``_endpoint``)."""
    return str(getattr(exporter, "_endpoint", None) or type(exporter).__name__)


class PresetIdGenerator(IdGenerator):
    """Random ids, except for the next span started on a thread that preset them.

    Set on llmtrace's own tracer only (never on a provider someone else shares),
    so spans built off the serving path keep the ids the serving path handed out.
    """

    def __init__(self, inner: IdGenerator | None = None) -> None:
        self.inner = inner or RandomIdGenerator()
        self._local = threading.local()

    def preset(self, trace_id: int, span_id: int) -> None:
        self._local.ids = (trace_id, span_id)

    def clear(self) -> None:
        self._local.ids = None

    def generate_trace_id(self) -> int:
        ids = getattr(self._local, "ids", None)
        return ids[0] if ids else self.inner.generate_trace_id()

    def generate_span_id(self) -> int:
        ids = getattr(self._local, "ids", None)
        if ids:
            self._local.ids = None  # the preset applies to one span
            return ids[1]
        return self.inner.generate_span_id()


_DEFAULT_MAX_QUEUE_SIZE = 2048  # the SDK's default for OTEL_BSP_MAX_QUEUE_SIZE


def _bsp_setting(name: str, default: int) -> int:
    """An OTEL_BSP_* integer as the SDK reads it, with a warning for a bad value."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        logger.warning("llmtrace: %s=%r is not an integer; using %d", name, raw, default)
        return default


def _max_queue_size(given: int | None) -> int:
    """The batch queue's size as the SDK resolves it: argument, OTEL_BSP_MAX_QUEUE_SIZE, 2048."""
    if given is not None:
        return given
    return _bsp_setting(OTEL_BSP_MAX_QUEUE_SIZE, _DEFAULT_MAX_QUEUE_SIZE)


class _CountingBatchSpanProcessor(BatchSpanProcessor):
    """The SDK's batch processor, plus a count of spans dropped on a full queue.

    Memory stays bounded by ``OTEL_BSP_MAX_QUEUE_SIZE``; the engine thread never
    waits for the exporter. The SDK does not say when it drops a span (its queue
    evicts the oldest when full), and its queue is private, so the queue length
    is estimated from public calls only: spans handed to :meth:`on_end`, minus
    spans the exporter received, minus spans already counted as dropped. A span
    that arrives while that estimate is at ``max_queue_size`` is counted as
    dropped (``DROPPED["queue_full"]``). The estimate is exact except for the
    moment between the SDK taking a batch off the queue and calling export.

    Per span this costs one ``itertools.count`` step and a comparison: no lock
    (``next()`` on a count is atomic under the GIL; ``received`` has one writer).
    """

    def __init__(self, span_exporter: _CountingExporter, max_queue_size: int | None = None,
                 *args, **kwargs) -> None:
        self._max_queue = _max_queue_size(max_queue_size)
        # the same size for both, so the estimate and the real queue agree on "full"
        super().__init__(span_exporter, self._max_queue, *args, **kwargs)
        self._exporter = span_exporter
        self._closed = False
        self._reset_counts()
        if hasattr(os, "register_at_fork"):  # the SDK empties its queue in a forked child
            ref = weakref.WeakMethod(self._reset_counts)

            def after_fork_in_child() -> None:
                if (reset := ref()) is not None:
                    reset()

            os.register_at_fork(after_in_child=after_fork_in_child)

    def _reset_counts(self) -> None:
        self._handed = itertools.count()  # next() -> spans handed before this one
        self._drops = itertools.count(1)  # next() -> drops so far, this one included
        self._dropped = 0
        self._exporter.received = 0

    def on_end(self, span: ReadableSpan) -> None:
        # the condition under which the SDK queues a span (unsampled ones are not)
        if not self._closed and span.context and span.context.trace_flags.sampled:
            queued = next(self._handed) - self._exporter.received - self._dropped
            if queued >= self._max_queue:
                # a racing drop may store a smaller total; the next drop stores the true one
                self._dropped = next(self._drops)
                DROPPED["queue_full"] += 1
                log_drop("queue_full", f"the export queue is full ({self._max_queue} spans, "
                                       "OTEL_BSP_MAX_QUEUE_SIZE): the backend is slow or down")
        super().on_end(span)

    def shutdown(self) -> None:
        self._closed = True  # the SDK ignores spans after shutdown: not queue drops
        super().shutdown()


_EXPORTERS = {
    ("grpc", "traces"): ("opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
                         "OTLPSpanExporter"),
    ("grpc", "metrics"): ("opentelemetry.exporter.otlp.proto.grpc.metric_exporter",
                          "OTLPMetricExporter"),
    ("http/protobuf", "traces"): ("opentelemetry.exporter.otlp.proto.http.trace_exporter",
                                  "OTLPSpanExporter"),
    ("http/protobuf", "metrics"): ("opentelemetry.exporter.otlp.proto.http.metric_exporter",
                                   "OTLPMetricExporter"),
}


def make_sampler(config: Config):
    """The SDK sampler the configuration names (OTEL_TRACES_SAMPLER semantics)."""
    name = config.sampler
    if name.endswith("always_on"):
        root = ALWAYS_ON
    elif name.endswith("always_off"):
        root = ALWAYS_OFF
    else:
        root = TraceIdRatioBased(config.sample_ratio)
    return ParentBased(root) if name.startswith("parentbased_") else root


def _otlp_exporter(config: Config, signal: str):
    """The SDK's OTLP exporter for ``signal``; without an endpoint it reads OTEL_* itself."""
    protocol = config.protocol if signal == "traces" else config.metrics_protocol
    module, name = _EXPORTERS[(protocol, signal)]
    cls = getattr(importlib.import_module(module), name)
    specific = config.traces_endpoint if signal == "traces" else config.metrics_endpoint
    if specific:  # a per-signal endpoint is used as given, like OTEL_EXPORTER_OTLP_*_ENDPOINT
        return cls(endpoint=specific)
    if not config.endpoint:
        return cls()
    if protocol == "grpc":
        return cls(endpoint=config.endpoint)
    return cls(endpoint=f"{config.endpoint.rstrip('/')}/v1/{signal}")


class FrozenResource(Resource):
    """A resource whose hash is computed once.

    The SDK's OTLP encoder groups every span by its resource, and ``Resource``
    hashes by serialising its attributes to JSON each time: about a tenth of the
    encoder's CPU per span. A resource's attributes are immutable, so the hash
    is too. Used for llmtrace's own providers only.
    """

    def __init__(self, attributes, schema_url: str | None = None) -> None:
        super().__init__(attributes, schema_url)
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return super().__eq__(other)


_INSTANCE: dict[int, str] = {}


def _instance_id() -> str:
    """A random id per process (OpenTelemetry's advice for ``service.instance.id``),
    drawn again in a forked child."""
    pid = os.getpid()
    if pid not in _INSTANCE:
        _INSTANCE[pid] = str(uuid.uuid4())
    return _INSTANCE[pid]


class Telemetry:
    """This process's tracer and metric instruments for one instrumentation scope."""

    def __init__(self, config: Config, scope: str = "llmtrace.vllm",
                 span_exporter: SpanExporter | None = None, metric_reader=None,
                 tracer_provider=None, meter_provider=None) -> None:
        self.config = config
        self.scope = scope
        self._span_exporter = span_exporter
        self._metric_reader = metric_reader
        #: the user's providers (``instrument(tracer_provider=, meter_provider=)``): used
        #: as given, their samplers, processors and readers included, never shut down here
        self._user_tracer_provider = tracer_provider
        self._user_meter_provider = meter_provider
        self._lock = threading.Lock()
        self._tracer: Tracer | None = None
        self._ids: PresetIdGenerator | None = None  # on llmtrace's own tracer, if SDK
        self._sampler = None
        self._sink: SpanSink | None = None  # llmtrace's own provider: spans go direct
        self._builder = None
        self._tracer_provider: TracerProvider | None = None
        self._instruments = None
        self._meter_provider = None
        #: the host already serves prometheus_client's REGISTRY (vLLM's API server
        #: /metrics): the Prometheus reader joins it and no extra port is opened
        self.metrics_served_by_host = False
        self._prices = False  # not loaded yet
        #: attributes an integration adds to llmtrace's own resource (vLLM's CPU
        #: settings); set before the first span or metric builds a provider
        self.resource_attributes: dict[str, Any] = {}

    def resource(self) -> Resource:
        attrs = dict(self.resource_attributes)
        if self.config.service_name:
            attrs["service.name"] = self.config.service_name
        if self.config.instance_type != "unknown":  # prices this engine's accelerator time
            attrs[semconv.LLMTRACE_COST_INSTANCE_TYPE] = self.config.instance_type
        # Resource.create honours OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME.
        created = Resource.create(attrs)
        if "service.instance.id" not in created.attributes:
            # vLLM runs several emitting processes with the same service name (API
            # servers with --api-server-count or data parallelism, engine cores): their
            # cumulative metric streams must not be taken for one, which would
            # interleave two counters into nonsense downstream
            created = created.merge(Resource({"service.instance.id": _instance_id()}))
        return FrozenResource(created.attributes, created.schema_url)

    @property
    def tracer(self) -> Tracer:
        if self._tracer is None:
            with self._lock:
                if self._tracer is None and self._user_tracer_provider is not None:
                    tracer = self._user_tracer_provider.get_tracer(
                        self.scope, __version__, schema_url=None)
                    self._adopt_ids(tracer)
                    self._tracer = tracer
                if self._tracer is None:
                    provider = TracerProvider(resource=self.resource(),
                                              sampler=make_sampler(self.config))
                    scope = InstrumentationScope(self.scope, __version__)
                    pipe = self._span_pipe(provider.resource, scope)
                    processors = [pipe] if pipe is not None else []
                    for exporter in self._span_exporters() if pipe is None else ():
                        processors.append(_CountingBatchSpanProcessor(
                            _CountingExporter(exporter, self.config.measure_overhead)))
                    for processor in processors:
                        provider.add_span_processor(processor)
                    if direct_spans_allowed():  # finished spans straight to the processors
                        self._sink = SpanSink(provider.resource, scope, processors, pipe)
                    self._tracer_provider = provider
                    tracer = provider.get_tracer(self.scope, __version__, schema_url=None)
                    self._adopt_ids(tracer)
                    self._tracer = tracer
        return self._tracer

    def _adopt_ids(self, tracer: Tracer) -> None:
        """Give llmtrace's own tracer object a :class:`PresetIdGenerator`, if it is an SDK one.

        Only this tracer (llmtrace's scope) is changed, never the provider. A
        tracer of another SDK cannot take preset ids: the request span is then
        started on the serving path (:meth:`new_root`), the rest is still built off it.
        """
        inner = getattr(tracer, "id_generator", None)
        sampler = getattr(tracer, "sampler", None)
        if isinstance(inner, IdGenerator) and sampler is not None:
            self._ids = PresetIdGenerator(inner)
            tracer.id_generator = self._ids
            self._sampler = sampler

    def new_root(self, name: str, parent: Context,
                 start_ns: int) -> tuple[int, int, bool, Span | None]:
        """Ids and the sampling decision of a span to be built later: (trace, span, sampled, span).

        With an SDK tracer, only ids are drawn and the tracer's own sampler asked
        (as ``start_span`` would, before attributes exist), and ``span`` is None:
        :meth:`build_root` builds it later, off the serving path, with those ids.
        Otherwise the span is started here, without attributes. ``parent``: an
        explicit context (the caller's current one when there is no remote parent),
        so the decision here and the span built later see the same parent.
        """
        tracer = self.tracer
        ids = self._ids
        if ids is None:
            span = tracer.start_span(name, context=parent, kind=SpanKind.SERVER,
                                     start_time=start_ns)
            ctx = span.get_span_context()
            return ctx.trace_id, ctx.span_id, ctx.trace_flags.sampled, span
        parent_ctx = get_current_span(parent).get_span_context()
        inner = ids.inner
        trace_id = parent_ctx.trace_id if parent_ctx.is_valid else inner.generate_trace_id()
        span_id = inner.generate_span_id()
        if trace_id == INVALID_TRACE_ID or span_id == INVALID_SPAN_ID:
            return trace_id, span_id, False, None
        sampled = self._sampler.should_sample(parent, trace_id, name,
                                              SpanKind.SERVER).decision.is_sampled()
        return trace_id, span_id, sampled, None

    def build_root(self, name: str, parent: Context, trace_id: int, span_id: int,
                   start_ns: int, attributes: dict[str, Any], links: tuple = (),
                   kind: SpanKind = SpanKind.SERVER) -> Span:
        """Start, off the serving path, the span :meth:`new_root` gave ids to."""
        sink = self._sink
        if sink is not None:
            parent_ctx = get_current_span(parent).get_span_context()
            return sink.start(name, parent_ctx if parent_ctx.is_valid else None, trace_id,
                              span_id, start_ns, attributes, kind, links)
        if self._ids is None:  # a tracer that takes no preset ids: its own
            return self.tracer.start_span(name, context=parent, kind=kind,
                                          attributes=attributes, start_time=start_ns,
                                          links=links or None)
        self._ids.preset(trace_id, span_id)
        try:
            return self.tracer.start_span(name, context=parent, kind=kind,
                                          attributes=attributes, start_time=start_ns,
                                          links=links or None)
        finally:
            self._ids.clear()

    @property
    def builder(self):
        """This process's builder thread (started on first use)."""
        if self._builder is None:
            with self._lock:
                if self._builder is None:
                    from llmtrace.telemetry.builder import Builder

                    builder = Builder(DROPPED, capacity=self.config.build_queue_size,
                                      measure=self.config.measure_overhead)
                    builder.after_batch.append(self._flush_metrics)  # batched updates
                    self._builder = builder
        return self._builder

    def _span_pipe(self, resource: Resource, scope: InstrumentationScope):
        """The span export process's processor, when configured and applicable.

        Only for exporters llmtrace builds from its configuration: an exporter
        object passed in (tests, ``span_exporter=``) cannot cross a process boundary.
        """
        if self.config.span_export != "process" or self._span_exporter is not None \
                or not self.config.span_exporters:
            return None
        from llmtrace.telemetry.span_pipe import PipeSpanProcessor, plain_attributes

        handshake = {"config": self.config.model_dump_json(),
                     "resource": plain_attributes(resource.attributes) or {},
                     "schema_url": resource.schema_url or "",
                     "scope": (scope.name, scope.version or "")}
        # batched as the SDK's batch processor would: the same OTEL_BSP_* settings
        return PipeSpanProcessor(
            handshake, DROPPED, _max_queue_size(None),
            batch=_bsp_setting(OTEL_BSP_MAX_EXPORT_BATCH_SIZE, 512),
            interval_s=_bsp_setting(OTEL_BSP_SCHEDULE_DELAY, 5000) / 1000)

    def _span_exporters(self) -> list[SpanExporter]:
        if self._span_exporter is not None:
            return [self._span_exporter]
        names = self.config.span_exporters
        out: list[SpanExporter] = []
        if "otlp" in names:
            out.append(_otlp_exporter(self.config, "traces"))
        if "console" in names:
            out.append(ConsoleSpanExporter())
        return out

    @property
    def prices(self):
        """The configured price table, loaded once; None without one or if it is bad."""
        if self._prices is False:
            self._prices = None
            if self.config.prices:
                from llmtrace.pricing import PriceTable, PriceTableError

                try:
                    self._prices = PriceTable.load(self.config.prices)
                except PriceTableError as exc:  # never break the host: no USD, one warning
                    logger.warning("llmtrace: price table not used: %s", exc)
        return self._prices

    def child_span(self, name: str, parent: Context | Span, start_ns: int,
                   attributes: dict[str, Any] | None = None, links: tuple = (),
                   span_id: int = 0) -> Span:
        """Start ``name`` at ``start_ns`` under ``parent`` (a span, or an extracted context);
        ``links``: :class:`opentelemetry.trace.Link` s to spans of other requests;
        ``span_id``: an id the serving path already handed out (a profiler region's
        tag), kept where the tracer takes preset ids."""
        tracer = self.tracer
        sink = self._sink
        if sink is not None:
            if isinstance(parent, DirectSpan):
                return sink.child(name, parent.get_span_context(), start_ns, attributes, links,
                                  span_id)
            span_ctx = get_current_span(parent).get_span_context() \
                if isinstance(parent, Context) else parent.get_span_context()
            if span_ctx.is_valid and span_ctx.trace_flags.sampled:
                return sink.child(name, span_ctx, start_ns, attributes, links, span_id)
        ctx = parent if isinstance(parent, Context) else set_span_in_context(parent)
        ids = self._ids
        if span_id and ids is not None:
            span_ctx = get_current_span(ctx).get_span_context()
            ids.preset(span_ctx.trace_id, span_id)
            try:
                return tracer.start_span(name, context=ctx, start_time=start_ns,
                                         attributes=attributes, links=links or None)
            finally:
                ids.clear()
        return tracer.start_span(name, context=ctx, start_time=start_ns, attributes=attributes,
                                 links=links or None)

    @property
    def instruments(self):
        if self._instruments is None:
            with self._lock:
                if self._instruments is None and self._user_meter_provider is not None:
                    from llmtrace.telemetry.metrics import instruments_on

                    self._instruments = instruments_on(
                        self._user_meter_provider.get_meter(self.scope, __version__),
                        self.config)
                if self._instruments is None:
                    from llmtrace.telemetry.metrics import build_instruments

                    readers = [self._metric_reader] if self._metric_reader else \
                        self._default_readers()
                    self._meter_provider, self._instruments = build_instruments(
                        self.config, self.resource(), self.scope, readers)
        return self._instruments

    def _flush_metrics(self) -> None:
        """Hand the histogram updates summed so far to the SDK (after each builder batch)."""
        if self._instruments is not None:
            self._instruments.flush_pending()

    def _default_readers(self) -> list:
        readers = []
        exporters = self.config.metric_exporters
        if "otlp" in exporters:
            readers.append(self._otlp_reader())
        if "prometheus" in exporters:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader
            from prometheus_client import start_http_server

            readers.append(PrometheusMetricReader())  # joins prometheus_client's REGISTRY
            if self.metrics_served_by_host:
                logger.info("llmtrace: Prometheus metrics on the host's own /metrics")
                return readers
            try:
                start_http_server(self.config.prometheus_port, self.config.prometheus_host)
            except OSError as exc:
                logger.warning("llmtrace: cannot serve Prometheus metrics on %s:%d (%s); "
                               "they stay in this process's registry only",
                               self.config.prometheus_host, self.config.prometheus_port, exc)
            else:
                logger.info("llmtrace: Prometheus metrics on %s:%d/metrics",
                            self.config.prometheus_host, self.config.prometheus_port)
        return readers

    def _otlp_reader(self):
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        exporter = _otlp_exporter(self.config, "metrics")
        if self.config.measure_overhead:
            export = exporter.export

            def measured_export(*args, **kwargs):
                t0 = time.thread_time()
                try:
                    return export(*args, **kwargs)
                finally:
                    HOOK_CPU_S["export.metrics"] += time.thread_time() - t0

            exporter.export = measured_export
        return PeriodicExportingMetricReader(
            exporter, export_interval_millis=self.config.metric_export_interval_ms)

    def flush(self, timeout_ms: int = 10_000) -> bool:
        """Build what is queued and export it; True when every stage finished in time."""
        ok = True
        if self._builder is not None:
            ok = self._builder.flush(timeout_ms / 1000)
        self._flush_metrics()  # updates summed outside a builder batch
        if self._tracer_provider is not None:
            ok = self._tracer_provider.force_flush(timeout_ms) and ok
        if self._meter_provider is not None:
            ok = self._meter_provider.force_flush(timeout_ms) and ok
        return ok

    def stop_builder(self) -> None:
        """Build what is queued and end the builder thread (a later use starts one)."""
        if self._builder is not None:
            self._builder.shutdown()
            self._builder = None

    def shutdown(self) -> None:
        self.stop_builder()
        if self._tracer_provider is not None:
            self._tracer_provider.shutdown()
        if self._meter_provider is not None:
            self._meter_provider.shutdown()
        self._tracer = self._tracer_provider = None
        self._instruments = self._meter_provider = None


_REPORTER_LOCK = threading.Lock()
_REPORTER_STARTED = False


def start_overhead_reporter(directory: str | None = None, interval_s: float = 0.5,
                            role: str | None = None) -> None:
    """Benchmark mode: write this process's llmtrace CPU seconds to a JSON file.

    ``benchmarks/overhead.py`` sums the files of a server's processes to get the
    CPU llmtrace spent, against the CPU the whole server spent for the same work.
    ``role``: a process that is all llmtrace's (the span export process) reports
    its whole CPU time under that name.
    """
    global _REPORTER_STARTED
    with _REPORTER_LOCK:  # one per process, however often it is instrumented
        if _REPORTER_STARTED:
            return
        _REPORTER_STARTED = True
    target = Path(directory or os.environ.get("LLMTRACE_OVERHEAD_DIR", "/tmp"))
    target.mkdir(parents=True, exist_ok=True)
    path = target / f"llmtrace-{os.getpid()}.json"

    def loop() -> None:
        while True:
            tmp = path.with_suffix(".tmp")
            cpu = {role: time.process_time()} if role else dict(HOOK_CPU_S)
            tmp.write_text(json.dumps({"pid": os.getpid(), "role": role or "vllm",
                                       "cpu_s": cpu, "dropped": dict(DROPPED)}))
            tmp.replace(path)
            time.sleep(interval_s)

    threading.Thread(target=loop, name="llmtrace-overhead", daemon=True).start()


__all__ = ["DROPPED", "Telemetry", "semconv", "start_overhead_reporter"]
