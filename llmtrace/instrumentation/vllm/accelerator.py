"""vLLM's side of the accelerator telemetry: which processes to watch, which settings to name.

The engine core is the one vLLM process that always exists beside the model
and already exports llmtrace's metrics, so it watches itself, its workers
(children titled ``VLLM::Worker...``; the CPU backend always runs them as
separate processes) and the GPUs its ``CUDA_VISIBLE_DEVICES`` names. Workers
therefore start no exporter and open no port. Sampling starts when the
scheduler is built (``vllm.scheduler.init``, engine core only), after the
workers exist; the readings themselves are taken by the metric reader
(:mod:`llmtrace.telemetry.hardware`).

vLLM's CPU-backend settings become resource attributes (:func:`cpu_settings`):
they describe the deployment, not a series, and cost no label.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

from llmtrace import semconv as sc
from llmtrace.config import Config
from llmtrace.telemetry import Telemetry

#: vLLM's process title (``set_process_title``: ``<prefix>::<name>``); the prefix is
#: VLLM_PROCESS_NAME_PREFIX, ``VLLM`` by default
_TITLE = re.compile(r"^\S*::(\S+)")

#: environment variable -> (resource attribute, type); read by vLLM's CPU backend
#: (vllm/envs.py, vllm/platforms/cpu.py, vllm/v1/worker/cpu_worker.py)
CPU_SETTINGS: dict[str, tuple[str, type]] = {
    "VLLM_CPU_OMP_THREADS_BIND": (sc.LLMTRACE_VLLM_CPU_OMP_THREADS_BIND, str),
    "VLLM_CPU_KVCACHE_SPACE": (sc.LLMTRACE_VLLM_CPU_KVCACHE_SPACE, int),
    "VLLM_CPU_NUM_OF_RESERVED_CPU": (sc.LLMTRACE_VLLM_CPU_RESERVED_CPUS, int),
    "VLLM_CPU_ATTN_SPLIT_KV": (sc.LLMTRACE_VLLM_CPU_ATTN_SPLIT_KV, bool),
    "VLLM_CPU_MOE_PREPACK": (sc.LLMTRACE_VLLM_CPU_MOE_PREPACK, bool),
    "VLLM_CPU_INT4_W4A8": (sc.LLMTRACE_VLLM_CPU_INT4_W4A8, bool),
    "OMP_NUM_THREADS": (sc.LLMTRACE_VLLM_CPU_OMP_NUM_THREADS, int),
}


def cpu_settings(environ: Mapping[str, str]) -> dict[str, Any]:
    """Resource attributes for vLLM's CPU settings that are set in ``environ``.

    Only what is set: an unset variable means vLLM's default, which belongs to
    the vLLM version, and a GPU host sets none of them. A value vLLM would
    reject (a non-number) is passed on as the string it is, so the attribute
    still shows what the operator wrote.
    """
    out: dict[str, Any] = {}
    for var, (attribute, kind) in CPU_SETTINGS.items():
        raw = environ.get(var, "").strip()
        if not raw:
            continue
        try:
            out[attribute] = bool(int(raw)) if kind is bool else kind(raw)
        except ValueError:
            out[attribute] = raw
    preload = [os.path.basename(p) for p in re.split(r"[:\s]+", environ.get("LD_PRELOAD", ""))
               if p]
    if preload:
        out[sc.LLMTRACE_VLLM_CPU_LD_PRELOAD] = ":".join(preload)
    return out


def _title(proc: Any) -> str | None:
    try:
        cmdline = proc.cmdline()
    except Exception:  # noqa: BLE001 - gone or not ours to read
        return None
    m = _TITLE.match(cmdline[0]) if cmdline else None
    return m.group(1) if m else None


def engine_processes() -> Iterator[tuple[str, str, int]]:
    """(role, name, pid) of this engine core and of its worker processes."""
    import psutil

    me = psutil.Process()
    yield sc.LlmtraceProcessRoleValues.ENGINE_CORE.value, _title(me) or "EngineCore", me.pid
    for child in me.children(recursive=True):
        name = _title(child)
        if name and name.startswith("Worker"):
            yield sc.LlmtraceProcessRoleValues.WORKER.value, name, child.pid


class AcceleratorTelemetry:
    """Starts the engine core's hardware sampling; the hook body of ``vllm.scheduler.init``."""

    def __init__(self, config: Config, telemetry: Telemetry) -> None:
        self.config = config
        self.telemetry = telemetry

    def after_scheduler_init(self, instance, args, kwargs, result, token) -> None:
        if not self.config.metrics_enabled:
            return
        instruments = self.telemetry.instruments
        if getattr(instruments, "hardware", False) is not None:
            return  # already sampling (a second scheduler in one process), or no slot
        from llmtrace.telemetry.hardware import NVML, HardwareSampler

        instruments.hardware = HardwareSampler(
            engine_processes, NVML.open(os.environ.get("CUDA_VISIBLE_DEVICES")))


__all__ = ["CPU_SETTINGS", "AcceleratorTelemetry", "cpu_settings", "engine_processes"]
