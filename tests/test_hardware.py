"""Accelerator telemetry: NVML readings, process metrics and vLLM's CPU settings.

No GPU can run here: the NVML path is driven by a stand-in ``pynvml`` module
whose API names and struct fields are checked against the real ``nvidia-ml-py``
bindings, and the real bindings are run too (without a driver they must fail
softly; on a GPU machine they must give plausible readings). Process metrics
are measured for real on this process and a child it starts.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time
import types

import psutil
import pytest
from conftest import metric_points
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource

from llmtrace import semconv as sc
from llmtrace.config import load_config
from llmtrace.instrumentation.vllm.accelerator import cpu_settings, engine_processes
from llmtrace.telemetry import hardware
from llmtrace.telemetry.hardware import NVML, HardwareSampler
from llmtrace.telemetry.metrics import build_instruments
from testbed.registry import assert_in_registry

ROLE = sc.LlmtraceProcessRoleValues
GPU_METRICS = {sc.METRIC_HW_GPU_UTILIZATION, sc.METRIC_HW_GPU_MEMORY_USAGE,
               sc.METRIC_HW_GPU_MEMORY_LIMIT, sc.METRIC_HW_GPU_MEMORY_UTILIZATION,
               sc.METRIC_HW_GPU_POWER, sc.METRIC_HW_TEMPERATURE}


class _NVMLError(Exception):
    pass


class _NotSupported(_NVMLError):
    pass


def fake_pynvml(gpus: list[dict]) -> types.ModuleType:
    """A stand-in for ``pynvml`` (a mock: no GPU can run here), one dict per GPU.

    Only calls the sampler makes exist, with the real module's names, argument
    order, units (percent, bytes, milliwatts, degrees C) and struct field names;
    ``test_fake_pynvml_matches_the_real_bindings`` holds it to that. A key set
    to None makes that call raise NVML's "not supported" error.
    """
    m = types.ModuleType("pynvml")
    m.NVMLError = _NVMLError
    m.NVML_TEMPERATURE_GPU = 0

    def reading(key: str, make=lambda v: v):
        def call(handle, *args):
            value = gpus[handle][key]
            if value is None:
                raise _NotSupported(f"{key}: not supported")
            return make(value)
        return call

    m.nvmlInit = lambda: None
    m.nvmlDeviceGetCount = lambda: len(gpus)
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetUUID = reading("uuid")
    m.nvmlDeviceGetName = reading("name", str.encode)  # older bindings return bytes
    m.nvmlDeviceGetUtilizationRates = reading(
        "util_pct", lambda v: types.SimpleNamespace(gpu=v, memory=0))
    m.nvmlDeviceGetMemoryInfo = reading(
        "mem", lambda v: types.SimpleNamespace(total=v[1], used=v[0], free=v[1] - v[0]))
    m.nvmlDeviceGetPowerUsage = reading("power_mw")
    m.nvmlDeviceGetTemperature = reading("temp_c")
    return m


def _gpu(i: int, **over) -> dict:
    return {"uuid": f"GPU-{i:08x}-aaaa", "name": "NVIDIA H200", "util_pct": 10 * i + 7,
            "mem": ((i + 1) * 2**30, 141 * 2**30), "power_mw": 100_000 + 1000 * i,
            "temp_c": 40 + i, **over}


def _instruments():
    reader = InMemoryMetricReader()
    _, instruments = build_instruments(load_config(), Resource.create({}), "llmtrace.t",
                                       [reader])
    return reader, instruments


def test_nvml_readings_become_hw_metrics_per_visible_gpu(monkeypatch):
    """GPUs 2 and 0 of three are visible; GPU 2's board has no power sensor: its power
    is left out, every other reading of both is published, none of GPU 1."""
    gpus = [_gpu(0), _gpu(1), _gpu(2, power_mw=None)]
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(gpus))
    reader, instruments = _instruments()
    instruments.hardware = HardwareSampler(lambda: [], NVML.open("2,0"))
    points = metric_points(reader)

    visible = {gpus[0]["uuid"]: gpus[0], gpus[2]["uuid"]: gpus[2]}

    def by_gpu(metric: str) -> dict[str, object]:
        return {p.attributes[sc.HW_ID]: p for p in points.get(metric, [])}

    util = by_gpu(sc.METRIC_HW_GPU_UTILIZATION)
    assert util.keys() == visible.keys()
    for uuid, g in visible.items():
        assert util[uuid].value == pytest.approx(g["util_pct"] / 100)
        assert dict(util[uuid].attributes) == {sc.HW_ID: uuid, sc.HW_MODEL: g["name"],
                                               sc.HW_GPU_TASK: "general"}
        used, total = g["mem"]
        assert by_gpu(sc.METRIC_HW_GPU_MEMORY_USAGE)[uuid].value == used
        assert by_gpu(sc.METRIC_HW_GPU_MEMORY_LIMIT)[uuid].value == total
        assert by_gpu(sc.METRIC_HW_GPU_MEMORY_UTILIZATION)[uuid].value == \
            pytest.approx(used / total)
        temp = by_gpu(sc.METRIC_HW_TEMPERATURE)[uuid]
        assert temp.value == g["temp_c"] and temp.attributes[sc.HW_TYPE] == "gpu"
    power = by_gpu(sc.METRIC_HW_GPU_POWER)
    assert power.keys() == {gpus[0]["uuid"]}  # GPU 2 refused: left out, not zero
    assert power[gpus[0]["uuid"]].value == pytest.approx(gpus[0]["power_mw"] / 1000)


@pytest.mark.parametrize("visible, expected", [
    (None, [0, 1, 2]), ("1", [1]), ("", []), ("7", []), ("GPU-00000002", [2]),
    ("MIG-abc", [0, 1, 2])])
def test_cuda_visible_devices_selects_the_watched_gpus(monkeypatch, caplog, visible, expected):
    """Indices and UUID prefixes select GPUs; none visible is the one INFO line; a MIG id
    cannot be mapped here, so every GPU is reported rather than a guess."""
    gpus = [_gpu(0), _gpu(1), _gpu(2)]
    caplog.set_level(logging.INFO, logger="llmtrace")
    nvml = NVML.open(visible, fake_pynvml(gpus))
    got = [] if nvml is None else [uuid for uuid, _, _ in nvml.handles]
    assert got == [gpus[i]["uuid"] for i in expected]
    if not expected:
        [line] = [r for r in caplog.records if "no GPU telemetry" in r.getMessage()]
        assert line.levelno == logging.INFO


def test_without_nvml_one_info_line_and_process_metrics_still_flow(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    caplog.set_level(logging.DEBUG, logger="llmtrace")
    reader, instruments = _instruments()
    instruments.hardware = HardwareSampler(
        lambda: [(ROLE.ENGINE_CORE.value, "EngineCore", os.getpid())], NVML.open(None))
    points = metric_points(reader)
    notes = [r for r in caplog.records if r.name == "llmtrace" and r.levelno >= logging.INFO]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO
    assert "nvidia-ml-py is not installed" in notes[0].getMessage()
    assert not GPU_METRICS & points.keys()
    [rss] = points[sc.METRIC_PROCESS_MEMORY_USAGE]
    assert rss.attributes[sc.LLMTRACE_PROCESS_ROLE] == ROLE.ENGINE_CORE
    assert 10 * 2**20 < rss.value <= psutil.Process().memory_info().rss * 1.5


def test_fake_pynvml_matches_the_real_bindings(caplog):
    """The stand-in's names exist in the real ``pynvml`` with the same struct fields; the
    real bindings, run here, either fail softly (no driver: one INFO line) or, on a GPU
    machine, give readings in range."""
    real = pytest.importorskip("pynvml", reason="pip install 'llmtrace-otel[nvidia]'")
    fake = fake_pynvml([_gpu(0)])
    for name in vars(fake):
        if not name.startswith("__"):
            assert hasattr(real, name), name
    assert issubclass(real.NVMLError, Exception)
    assert {"gpu"} <= {f for f, _ in real.c_nvmlUtilization_t._fields_}
    assert {"total", "used"} <= {f for f, _ in real.c_nvmlMemory_t._fields_}

    caplog.set_level(logging.INFO, logger="llmtrace")
    nvml = NVML.open(os.environ.get("CUDA_VISIBLE_DEVICES"))
    if nvml is None:
        [line] = [r for r in caplog.records if "no GPU telemetry" in r.getMessage()]
        assert line.levelno == logging.INFO
        return
    for g in nvml.read():  # a GPU machine: the real readings
        assert g.uuid.startswith(("GPU-", "MIG-")) and g.model
        assert g.utilization is None or 0 <= g.utilization <= 1
        assert g.memory_total is None or 0 < g.memory_used <= g.memory_total
        assert g.power_w is None or 0 < g.power_w < 2000
        assert g.temperature_c is None or 0 < g.temperature_c < 120


_SPIN = textwrap.dedent("""
    import sys, time
    import setproctitle
    setproctitle.setproctitle(sys.argv[1])
    print("ready", flush=True)
    end = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < end:
        pass
""")


def _spinner(title: str, seconds: float) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", _SPIN, title, str(seconds)],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    return child


def test_process_metrics_measure_the_engine_and_a_busy_worker():
    """A child spinning on one core reads as busy against the CPUs it may use; this
    (idle) process reads far less; memory, threads and CPUs are the OS's own figures;
    when the child exits its series go."""
    child = _spinner("VLLM::Worker_TP0", 4.0)
    try:
        reader, instruments = _instruments()
        watched = [(ROLE.ENGINE_CORE.value, "EngineCore", os.getpid()),
                   (ROLE.WORKER.value, "Worker_TP0", child.pid)]
        instruments.hardware = HardwareSampler(lambda: list(watched))
        first = metric_points(reader)
        t0 = time.monotonic()
        time.sleep(hardware.MIN_INTERVAL_S + 0.2)
        second = metric_points(reader)
        wall = time.monotonic() - t0
    finally:
        child.kill()
        child.wait()

    def by_role(points: dict, metric: str) -> dict[str, float]:
        return {p.attributes[sc.LLMTRACE_PROCESS_ROLE]: p.value for p in points[metric]}

    assert sc.METRIC_PROCESS_CPU_UTILIZATION not in first  # no previous sample yet
    util = by_role(second, sc.METRIC_PROCESS_CPU_UTILIZATION)
    cpus = by_role(second, sc.METRIC_LLMTRACE_PROCESS_CPU_AVAILABLE)
    worker_cpus = len(psutil.Process().cpu_affinity())  # the child inherits ours
    assert cpus == {"engine_core": worker_cpus, "worker": worker_cpus}
    # utilisation is the CPU time the OS gave the process over the interval, per CPU it
    # may use (how much the spinner got depends on the machine's load: no threshold)
    cpu_time = [by_role(p, sc.METRIC_PROCESS_CPU_TIME) for p in (first, second)]
    spun = cpu_time[1]["worker"] - cpu_time[0]["worker"]
    assert spun > 0 and 0.0 < util["worker"] <= 1.0
    assert util["worker"] == pytest.approx(spun / (wall * worker_cpus), rel=0.25)
    assert 0.0 <= util["engine_core"] < util["worker"]
    rss = by_role(second, sc.METRIC_PROCESS_MEMORY_USAGE)
    threads = by_role(second, sc.METRIC_PROCESS_THREAD_COUNT)
    assert 1 * 2**20 < rss["worker"] < rss["engine_core"]  # a bare python vs pytest
    assert threads["worker"] >= 1 and threads["engine_core"] >= threads["worker"]
    points = [p for m in (sc.METRIC_PROCESS_CPU_UTILIZATION, sc.METRIC_PROCESS_MEMORY_USAGE)
              for p in second[m]]
    assert {p.attributes[sc.LLMTRACE_PROCESS_NAME] for p in points} == {"EngineCore",
                                                                        "Worker_TP0"}
    time.sleep(hardware.MIN_INTERVAL_S + 0.1)
    watched.pop()  # the worker is gone and no longer listed
    after = metric_points(reader)
    assert set(by_role(after, sc.METRIC_PROCESS_MEMORY_USAGE)) == {"engine_core"}


def test_engine_processes_finds_workers_by_vllm_title():
    """vLLM titles its workers ``VLLM::Worker...``; other children (compile pools, the
    multiprocessing resource tracker) are not workers."""
    workers = [_spinner("VLLM::Worker_TP1", 30), _spinner("VLLM::Worker_TP0", 30)]
    other = _spinner("python-helper", 30)
    try:
        found = list(engine_processes())
    finally:
        for child in (*workers, other):
            child.kill()
            child.wait()
    assert found[0][0] == ROLE.ENGINE_CORE and found[0][2] == os.getpid()
    # the test session's own vLLM servers are descendants too (their real workers)
    ours = {w.pid for w in workers} | {other.pid}
    assert sorted(f for f in found[1:] if f[2] in ours) == sorted(
        [(ROLE.WORKER.value, "Worker_TP1", workers[0].pid),
         (ROLE.WORKER.value, "Worker_TP0", workers[1].pid)])
    assert all(f[0] == ROLE.WORKER.value and f[1].startswith("Worker") for f in found[1:])


def test_cpu_settings_name_what_is_set():
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0-3|4-7", "VLLM_CPU_KVCACHE_SPACE": "40",
           "VLLM_CPU_NUM_OF_RESERVED_CPU": "1", "VLLM_CPU_MOE_PREPACK": "0",
           "VLLM_CPU_INT4_W4A8": "", "OMP_NUM_THREADS": "four",
           "LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4:/opt/intel/libiomp5.so",
           "VLLM_CPU_SOMETHING_NEW": "1"}
    assert cpu_settings(env) == {
        sc.LLMTRACE_VLLM_CPU_OMP_THREADS_BIND: "0-3|4-7",
        sc.LLMTRACE_VLLM_CPU_KVCACHE_SPACE: 40,
        sc.LLMTRACE_VLLM_CPU_RESERVED_CPUS: 1,
        sc.LLMTRACE_VLLM_CPU_MOE_PREPACK: False,
        sc.LLMTRACE_VLLM_CPU_OMP_NUM_THREADS: "four",  # what was written, not dropped
        sc.LLMTRACE_VLLM_CPU_LD_PRELOAD: "libtcmalloc_minimal.so.4:libiomp5.so",
    }
    assert cpu_settings({}) == {}  # a GPU host: nothing


def test_hardware_points_are_in_the_registry(monkeypatch):
    """Every hardware metric, unit and attribute the sampler emits is registered."""
    from testbed.otlp_receiver import ReceivedPoint

    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([_gpu(0)]))
    reader, instruments = _instruments()
    instruments.hardware = HardwareSampler(
        lambda: [(ROLE.ENGINE_CORE.value, "EngineCore", os.getpid())], NVML.open(None))
    metric_points(reader)
    time.sleep(hardware.MIN_INTERVAL_S + 0.1)
    received = []
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                for p in m.data.data_points:
                    received.append(ReceivedPoint(
                        m.name, m.unit, "", dict(p.attributes), getattr(p, "value", None),
                        None, None, (), (), {}, sm.scope.name, 0))
    names = {p.metric for p in received}
    assert names >= GPU_METRICS and sc.METRIC_PROCESS_CPU_UTILIZATION in names
    assert_in_registry(points=received)
