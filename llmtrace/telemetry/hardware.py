"""Accelerator and process telemetry, sampled when a metric reader collects.

Utilisation against what is provisioned is the capacity question the busy/idle
counters answer only from the engine's side: the hardware's side is here. GPUs
come from NVML (``pynvml``, the ``nvidia-ml-py`` distribution: imported only
when sampling starts, never required); processes from psutil. Every reading is
taken in an observable instrument's callback, on the metric reader's thread,
never on the serving path, and at most once per :data:`MIN_INTERVAL_S` however
many instruments and readers (OTLP and Prometheus) ask.

Missing hardware is a normal state, not a fault: no ``pynvml``, no driver or no
GPU gives one INFO line per process and the process metrics still flow. A
reading NVML refuses for one device (power on a board without a sensor, say) is
left out; nothing is filled in.

The integration decides which processes to watch and hands their pids in
(:class:`HardwareSampler`); this module knows nothing of vLLM.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation

from llmtrace import schema
from llmtrace import semconv as sc

logger = logging.getLogger("llmtrace")

#: readings are reused for this long: one sample serves every instrument and reader
MIN_INTERVAL_S = 1.0


@dataclass(frozen=True, slots=True)
class GPUReading:
    """One GPU's sample; None where NVML refused that reading."""

    uuid: str
    model: str
    utilization: float | None  # 0..1
    memory_used: int | None  # bytes
    memory_total: int | None  # bytes
    power_w: float | None
    temperature_c: float | None


@dataclass(frozen=True, slots=True)
class ProcessReading:
    """One watched process's sample; ``utilization`` is None on its first sample."""

    role: str
    name: str
    cpu_s: float
    utilization: float | None
    rss: int
    threads: int
    cpus: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    gpus: tuple[GPUReading, ...] = ()
    processes: tuple[ProcessReading, ...] = ()


class NVML:
    """The GPUs NVML reports, filtered to those ``CUDA_VISIBLE_DEVICES`` names.

    :meth:`open` returns None (after one INFO line) when NVML cannot be used, so
    callers never handle NVML's exceptions themselves.
    """

    def __init__(self, nvml: Any, handles: list[tuple[str, str, Any]]) -> None:
        self._nvml = nvml
        #: (uuid, model, handle) per watched GPU
        self.handles = handles

    @classmethod
    def open(cls, visible: str | None, module: Any = None) -> NVML | None:
        """NVML's watched GPUs, or None with one INFO line saying why there are none.

        ``visible``: the process's ``CUDA_VISIBLE_DEVICES`` (None: every GPU).
        ``module``: ``pynvml`` itself unless a test hands in a stand-in.
        """
        if module is None:
            try:
                import pynvml as module
            except ImportError:
                logger.info("llmtrace: no GPU telemetry: nvidia-ml-py is not installed "
                            "(pip install 'llmtrace-otel[nvidia]'); process metrics only")
                return None
        try:
            module.nvmlInit()
            handles = [module.nvmlDeviceGetHandleByIndex(i)
                       for i in range(module.nvmlDeviceGetCount())]
            found = [(_text(module.nvmlDeviceGetUUID(h)), _text(module.nvmlDeviceGetName(h)), h)
                     for h in handles]
        except Exception as exc:  # noqa: BLE001 - NVMLError_* (no driver, no GPU, ...)
            logger.info("llmtrace: no GPU telemetry: NVML is unavailable (%s); process "
                        "metrics only", exc)
            return None
        chosen = _visible(found, visible)
        if not chosen:
            logger.info("llmtrace: no GPU telemetry: NVML sees %d GPU(s), none visible to "
                        "this process (CUDA_VISIBLE_DEVICES=%r); process metrics only",
                        len(found), visible)
            return None
        logger.info("llmtrace: GPU telemetry from NVML for %s",
                    ", ".join(f"{model} {uuid}" for uuid, model, _ in chosen))
        return cls(module, chosen)

    def read(self) -> tuple[GPUReading, ...]:
        nvml = self._nvml
        out = []
        for uuid, model, h in self.handles:
            rates = _try(nvml.nvmlDeviceGetUtilizationRates, h)
            memory = _try(nvml.nvmlDeviceGetMemoryInfo, h)
            power_mw = _try(nvml.nvmlDeviceGetPowerUsage, h)
            temp = _try(nvml.nvmlDeviceGetTemperature, h, nvml.NVML_TEMPERATURE_GPU)
            out.append(GPUReading(
                uuid, model,
                utilization=None if rates is None else rates.gpu / 100,
                memory_used=None if memory is None else int(memory.used),
                memory_total=None if memory is None else int(memory.total),
                power_w=None if power_mw is None else power_mw / 1000,
                temperature_c=None if temp is None else float(temp)))
        return tuple(out)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _try(call: Callable, *args: Any) -> Any:
    try:
        return call(*args)
    except Exception:  # noqa: BLE001 - NVMLError_NotSupported and friends: leave it out
        return None


def _visible(found: list[tuple[str, str, Any]], visible: str | None) -> list:
    """The GPUs ``CUDA_VISIBLE_DEVICES`` names (indices or UUID prefixes), in its order.

    Unset: all. A token that is neither (a MIG instance id) leaves the filter
    undecidable here: all GPUs are reported rather than a guess.
    """
    if visible is None:
        return found
    chosen = []
    for token in (t.strip() for t in visible.split(",") if t.strip()):
        if token.isdigit():
            if int(token) < len(found):
                chosen.append(found[int(token)])
        elif token.startswith("GPU-"):
            chosen.extend(g for g in found if g[0].startswith(token))
        else:
            return found
    return chosen


class _Watched:
    """A process and its previous CPU sample, for utilisation between two samples."""

    __slots__ = ("role", "name", "proc", "prev")

    def __init__(self, role: str, name: str, proc: Any) -> None:
        self.role, self.name, self.proc = role, name, proc
        self.prev: tuple[float, float] | None = None  # (monotonic s, cpu s)

    def read(self, now: float) -> ProcessReading:
        proc = self.proc
        with proc.oneshot():  # one /proc read for all of them
            times = proc.cpu_times()
            rss = proc.memory_info().rss
            threads = proc.num_threads()
            cpus = _cpus(proc)
        cpu_s = times.user + times.system
        utilization = None
        if self.prev is not None and now > self.prev[0]:
            busy = (cpu_s - self.prev[1]) / ((now - self.prev[0]) * cpus)
            utilization = min(1.0, max(0.0, busy))  # clock-tick rounding can overshoot
        self.prev = (now, cpu_s)
        return ProcessReading(self.role, self.name, cpu_s, utilization, rss, threads, cpus)


def _cpus(proc: Any) -> int:
    try:
        return len(proc.cpu_affinity()) or 1
    except (AttributeError, NotImplementedError):  # no affinity API on this platform
        return os.cpu_count() or 1


class HardwareSampler:
    """This process's and its workers' CPU, memory and threads, and its GPUs, on demand.

    ``processes``: () -> (role, name, pid) of every process to watch, asked
    again when a watched one is gone and every ``refresh_s`` (workers start
    after the engine core and are replaced on restart).
    """

    def __init__(self, processes: Callable[[], Iterable[tuple[str, str, int]]],
                 nvml: NVML | None = None, refresh_s: float = 30.0) -> None:
        import psutil

        self._psutil = psutil
        self._processes = processes
        self._nvml = nvml
        self._refresh_s = refresh_s
        self._watched: dict[int, _Watched] = {}
        self._listed_at = float("-inf")
        self._lock = threading.Lock()
        self._snapshot = Snapshot()
        self._taken_at = float("-inf")

    def snapshot(self) -> Snapshot:
        """The latest readings, taken now unless the last are under a second old."""
        with self._lock:
            now = time.monotonic()
            if now - self._taken_at >= MIN_INTERVAL_S:
                self._snapshot = Snapshot(self._nvml.read() if self._nvml else (),
                                          self._read_processes(now))
                self._taken_at = now
            return self._snapshot

    def _read_processes(self, now: float) -> tuple[ProcessReading, ...]:
        if now - self._listed_at >= self._refresh_s:
            self._relist(now)
        out, gone = [], False
        for watched in list(self._watched.values()):
            try:
                out.append(watched.read(now))
            except (self._psutil.NoSuchProcess, self._psutil.AccessDenied):
                gone = True
        if gone:  # a worker restarted or exited: list again next time
            self._listed_at = float("-inf")
        return tuple(out)

    def _relist(self, now: float) -> None:
        psutil = self._psutil
        watched: dict[int, _Watched] = {}
        try:
            listed = list(self._processes())
        except Exception as exc:  # noqa: BLE001 - the integration's lookup must not stop us
            logger.debug("llmtrace: listing processes to watch failed: %s", exc)
            listed = []
        for role, name, pid in listed:
            known = self._watched.get(pid)
            if known is not None and (known.role, known.name) == (role, name):
                watched[pid] = known  # keeps its previous CPU sample
                continue
            try:
                watched[pid] = _Watched(role, name, psutil.Process(pid))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        self._watched = watched
        self._listed_at = now


# -- instruments ------------------------------------------------------------------------

def _gpu_attrs(g: GPUReading) -> dict[str, str]:
    return {sc.HW_ID: g.uuid, sc.HW_MODEL: g.model}


def _process_attrs(p: ProcessReading) -> dict[str, str]:
    return {sc.LLMTRACE_PROCESS_ROLE: p.role, sc.LLMTRACE_PROCESS_NAME: p.name}


#: metric -> (readings of a snapshot, value of a reading or None, attributes of a reading)
_READINGS: dict[str, tuple[Callable, Callable, Callable]] = {
    sc.METRIC_HW_GPU_UTILIZATION: (
        lambda s: s.gpus, lambda g: g.utilization,
        lambda g: {**_gpu_attrs(g), sc.HW_GPU_TASK: "general"}),
    sc.METRIC_HW_GPU_MEMORY_USAGE: (lambda s: s.gpus, lambda g: g.memory_used, _gpu_attrs),
    sc.METRIC_HW_GPU_MEMORY_LIMIT: (lambda s: s.gpus, lambda g: g.memory_total, _gpu_attrs),
    sc.METRIC_HW_GPU_MEMORY_UTILIZATION: (
        lambda s: s.gpus,
        lambda g: g.memory_used / g.memory_total if g.memory_total else None, _gpu_attrs),
    sc.METRIC_HW_GPU_POWER: (lambda s: s.gpus, lambda g: g.power_w, _gpu_attrs),
    sc.METRIC_HW_TEMPERATURE: (
        lambda s: s.gpus, lambda g: g.temperature_c,
        lambda g: {**_gpu_attrs(g), sc.HW_TYPE: "gpu"}),
    sc.METRIC_PROCESS_CPU_TIME: (lambda s: s.processes, lambda p: p.cpu_s, _process_attrs),
    sc.METRIC_PROCESS_CPU_UTILIZATION: (
        lambda s: s.processes, lambda p: p.utilization, _process_attrs),
    sc.METRIC_PROCESS_MEMORY_USAGE: (lambda s: s.processes, lambda p: p.rss, _process_attrs),
    sc.METRIC_PROCESS_THREAD_COUNT: (
        lambda s: s.processes, lambda p: p.threads, _process_attrs),
    sc.METRIC_LLMTRACE_PROCESS_CPU_AVAILABLE: (
        lambda s: s.processes, lambda p: p.cpus, _process_attrs),
}


def register(meter, sampler: Callable[[], HardwareSampler | None]) -> None:
    """The hardware instruments on ``meter``; each observes ``sampler()``'s snapshot.

    ``sampler`` returns None in processes that watch no hardware (the API
    server), whose instruments then report nothing.
    """
    def callback(readings: Callable, value: Callable, attrs: Callable):
        def observe(_: CallbackOptions) -> list[Observation]:
            current = sampler()
            if current is None:
                return []
            out = []
            for reading in readings(current.snapshot()):
                v = value(reading)
                if v is not None:
                    out.append(Observation(v, attrs(reading)))
            return out
        return observe

    create = {"gauge": meter.create_observable_gauge,
              "updowncounter": meter.create_observable_up_down_counter,
              "counter": meter.create_observable_counter}
    for name, (readings, value, attrs) in _READINGS.items():
        spec = schema.BY_NAME[name]
        create[spec.instrument](name, [callback(readings, value, attrs)], unit=spec.unit,
                               description=spec.brief)


__all__ = ["MIN_INTERVAL_S", "NVML", "GPUReading", "HardwareSampler", "ProcessReading",
           "Snapshot", "register"]
