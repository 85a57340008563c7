"""llmtrace composes like an OpenTelemetry contrib instrumentation.

- Every kill switch wins on the ``opentelemetry-instrument`` path too
  (``LLMTRACE_ENABLED=0``, ``OTEL_SDK_DISABLED=true``,
  ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=vllm``): vLLM's callables stay
  unpatched. Checked in a real ``opentelemetry-instrument`` process importing
  the real vLLM modules.
- ``llmtrace.instrument(tracer_provider=, meter_provider=)``: the user's
  providers receive llmtrace's spans and metrics, from a real vLLM engine run
  in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so the engine core's hooks
  share the user's providers too).
- ``suppress_instrumentation`` is honoured; ``OTEL_TRACES_EXPORTER=console``
  prints llmtrace's spans.
- A global SDK provider set before ``instrument()`` is used by default
  (``LLMTRACE_PIPELINE=auto``); ``LLMTRACE_PIPELINE=private`` keeps llmtrace's own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmtrace import semconv as sc

CHECK_PATCHED = (
    "import llmtrace\n"
    "from llmtrace.instrumentation._patching import is_wrapped\n"
    "from vllm.v1.engine.output_processor import OutputProcessor\n"
    "from vllm.v1.core.sched.scheduler import Scheduler\n"
    "print(json.dumps({'instrumented': llmtrace.is_instrumented(),\n"
    "                  'patched': is_wrapped(OutputProcessor, 'process_outputs')\n"
    "                             or is_wrapped(Scheduler, 'schedule')}))\n")


def _opentelemetry_instrument(env_extra: dict[str, str]) -> dict:
    bindir = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMTRACE_", "OTEL_"))}
    env.update({"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none",
                "OTEL_LOGS_EXPORTER": "none", "PATH": f"{bindir}:{os.environ['PATH']}",
                **env_extra})
    out = subprocess.run([os.path.join(bindir, "opentelemetry-instrument"), sys.executable,
                          "-c", "import json\n" + CHECK_PATCHED], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("switch", [
    {"LLMTRACE_ENABLED": "0"},
    {"OTEL_SDK_DISABLED": "true"},
    {"OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "flask,vllm"},
], ids=lambda s: next(iter(s)))
def test_switches_win_under_opentelemetry_instrument(switch):
    assert _opentelemetry_instrument(switch)["patched"] is False


def test_opentelemetry_instrument_patches_vllm_without_a_switch():
    """The control for the switches above: the same process without them is patched."""
    assert _opentelemetry_instrument({})["patched"] is True


USER_PROVIDERS = r'''
import json, sys
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.instrumentation.utils import suppress_instrumentation
import llmtrace

exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
tp = TracerProvider()  # the user's sampler (always on), processor and exporter
tp.add_span_processor(SimpleSpanProcessor(exporter))
mp = MeterProvider(metric_readers=[reader])
llmtrace.instrument(tracer_provider=tp, meter_provider=mp)

from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], served_model_name=sys.argv[2], enforce_eager=True,
          max_model_len=512, disable_log_stats=False)
params = SamplingParams(max_tokens=8, ignore_eos=True)
llm.generate(["one two three four", "five six seven eight"], params, use_tqdm=False)
with suppress_instrumentation():  # not traced, not counted
    llm.generate(["nine ten eleven twelve"], params, use_tqdm=False)
llmtrace.flush()  # spans and metrics are built off the serving thread
points = {}
for rm in reader.get_metrics_data().resource_metrics:
    for sm in rm.scope_metrics:
        for m in sm.metrics:
            points[m.name] = sum(getattr(p, "count", getattr(p, "value", 0))
                                 for p in m.data.data_points)
summary = {"spans": [s.name for s in exporter.get_finished_spans()], "points": points}

# then the SDK's own exporter selection: OTEL_TRACES_EXPORTER=console prints spans
import os
llmtrace.uninstrument()
os.environ["OTEL_TRACES_EXPORTER"] = "console"
os.environ["OTEL_TRACES_SAMPLER"] = "always_on"
llmtrace.instrument()
llm.generate(["thirteen fourteen fifteen"], params, use_tqdm=False)
llmtrace.uninstrument()  # flushes

# a global SDK provider set before instrument() (your code, or a distro under
# opentelemetry-instrument) is used by default; LLMTRACE_PIPELINE=private opts out
from opentelemetry import metrics, trace
os.environ["OTEL_TRACES_EXPORTER"] = "none"
gexporter, greader = InMemorySpanExporter(), InMemoryMetricReader()
gtp = TracerProvider()
gtp.add_span_processor(SimpleSpanProcessor(gexporter))
trace.set_tracer_provider(gtp)
metrics.set_meter_provider(MeterProvider(metric_readers=[greader]))
llmtrace.instrument()
llm.generate(["sixteen seventeen"], params, use_tqdm=False)
llmtrace.flush()
llmtrace.uninstrument()
summary["global_spans"] = [s.name for s in gexporter.get_finished_spans()]
summary["global_ttft"] = sum(
    p.count for rm in greader.get_metrics_data().resource_metrics for sm in rm.scope_metrics
    for m in sm.metrics if m.name == "gen_ai.server.time_to_first_token"
    for p in m.data.data_points)
os.environ["LLMTRACE_PIPELINE"] = "private"
llmtrace.instrument()
llm.generate(["eighteen nineteen"], params, use_tqdm=False)
llmtrace.uninstrument()
summary["global_spans_after_private"] = len(gexporter.get_finished_spans())

# a builder that cannot keep up: finished requests beyond its queue are dropped and
# counted, and serving goes on (the hooks never wait for it)
import threading, time
from llmtrace.instrumentation.vllm import VLLMInstrumentor
from llmtrace.telemetry import DROPPED
os.environ["LLMTRACE_BUILD_QUEUE_SIZE"] = "1"
llmtrace.instrument()
builder = VLLMInstrumentor().telemetry.builder
gate, holding = threading.Event(), threading.Event()
builder.submit(lambda _: (holding.set(), gate.wait(120)), None)
holding.wait(10)
before = DROPPED["build_queue_full"]
outs = llm.generate(["a b c", "d e f", "g h i"], params, use_tqdm=False)
summary["served_while_blocked"] = sum(len(o.outputs[0].token_ids) for o in outs)
summary["build_drops"] = DROPPED["build_queue_full"] - before
gate.set()
llmtrace.uninstrument()

# a hook body that fails mid-request: the hooks sharing its per-request state are
# disabled with it and that state is released (nothing leaks), serving goes on, and
# the loss shows on the disabled-hooks gauge
from llmtrace.instrumentation.vllm.frontend import FrontendTracer
from llmtrace.telemetry.guard import DISABLED_HOOKS
del os.environ["LLMTRACE_BUILD_QUEUE_SIZE"]
original = FrontendTracer.on_outputs

def faulty(self, outputs, engine_ts=None):
    if self.records and any(len(o.new_token_ids) for o in outputs):
        raise RuntimeError("injected fault")
    return original(self, outputs, engine_ts)

FrontendTracer.on_outputs = faulty
freader = InMemoryMetricReader()
llmtrace.instrument(meter_provider=MeterProvider(metric_readers=[freader]))
inst = VLLMInstrumentor()
outs = llm.generate(["j k l", "m n o"], params, use_tqdm=False)
summary["served_at_fault"] = sum(len(o.outputs[0].token_ids) for o in outs)
summary["records_at_fault"] = len(inst.frontend.records)
outs = llm.generate(["p q r", "s t u"], params, use_tqdm=False)
summary["served_later"] = sum(len(o.outputs[0].token_ids) for o in outs)
summary["records_later"] = len(inst.frontend.records)
summary["engine_state_later"] = len(inst.engine.records) + len(inst.engine.usage)
summary["disabled"] = sorted(DISABLED_HOOKS)
llmtrace.flush()  # the instruments (and the gauge) exist once the builder ran a record
summary["gauge"] = sorted(
    p.attributes["llmtrace.telemetry.hook"]
    for rm in freader.get_metrics_data().resource_metrics for sm in rm.scope_metrics
    for m in sm.metrics if m.name == "llmtrace.telemetry.disabled_hooks"
    for p in m.data.data_points)
FrontendTracer.on_outputs = original
llmtrace.uninstrument()
print("SUMMARY " + json.dumps(summary))
'''


@pytest.mark.vllm
def test_user_providers_receive_spans_and_metrics(tiny_models, scratch_dir: Path):
    work = scratch_dir / "user-providers"
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMTRACE_", "OTEL_"))}
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1",
               VLLM_CACHE_ROOT=str(work / "vllm-cache"), TMPDIR=str(work),
               TORCHINDUCTOR_CACHE_DIR=str(work / "inductor-cache"))
    out = subprocess.run([sys.executable, "-c", USER_PROVIDERS, str(tiny_models.dense),
                          "tiny-llama"], capture_output=True, text=True, env=env,
                         timeout=600, cwd=work)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1].removeprefix("SUMMARY "))
    # OTEL_TRACES_EXPORTER=console: the SDK's console exporter printed the request span
    assert '"name": "llmtrace.request"' in out.stdout
    names = got["spans"]
    assert names.count(sc.SPAN_LLMTRACE_REQUEST) == 2  # the suppressed request is not traced
    for name in (sc.SPAN_LLMTRACE_QUEUE, sc.SPAN_LLMTRACE_PREFILL,
                 sc.SPAN_LLMTRACE_ENGINE_REQUEST, sc.SPAN_LLMTRACE_PREFILL_CHUNK,
                 sc.SPAN_LLMTRACE_DECODE):
        assert name in names, (name, names)
    points = got["points"]
    assert points[sc.METRIC_GEN_AI_SERVER_TIME_TO_FIRST_TOKEN] == 2
    assert points[sc.METRIC_LLMTRACE_SERVER_GENERATION_TOKENS] == 16
    assert points[sc.METRIC_LLMTRACE_SERVER_INTER_TOKEN_LATENCY] == 14
    # the global provider took the next request's spans and metrics; private did not
    assert got["global_spans"].count(sc.SPAN_LLMTRACE_REQUEST) == 1
    assert sc.SPAN_LLMTRACE_ENGINE_REQUEST in got["global_spans"]
    assert got["global_ttft"] == 1
    assert got["global_spans_after_private"] == len(got["global_spans"])
    # three requests served in full while the builder was stuck. Each hands the builder
    # two items (the API server's request, the engine core's usage: one process here),
    # and the freshly instrumented engine samples its first step, which hands one more;
    # one fits the queue, the other six are dropped and counted
    assert got["served_while_blocked"] == 3 * 8
    assert got["build_drops"] == 2 * 3 + 1 - 1
    # the failed process_outputs hook took its group with it and released its state
    group = ["vllm.output_processor.abort_requests", "vllm.output_processor.add_request",
             "vllm.output_processor.process_outputs", "vllm.output_processor.propagate_error"]
    assert got["served_at_fault"] == got["served_later"] == 2 * 8
    assert got["records_at_fault"] == got["records_later"] == 0  # nothing left to leak
    assert got["engine_state_later"] == 0  # the engine core's hooks still free theirs
    assert got["disabled"] == group and got["gauge"] == group


GLOBAL_PROVIDERS = r"""
import json
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from llmtrace.instrumentation.vllm import global_sdk_providers

before = sorted(global_sdk_providers())  # nothing set yet: the API's proxies
# what vLLM's init_tracer installs with --otlp-traces-endpoint: never adopted
trace.set_tracer_provider(TracerProvider(resource=Resource.create(
    {"vllm.instrumenting_module_name": "vllm.llm_engine"})))
metrics.set_meter_provider(MeterProvider())
print(json.dumps({"before": before, "after": sorted(global_sdk_providers())}))
"""


def test_vllms_own_global_tracer_provider_is_never_adopted():
    out = subprocess.run([sys.executable, "-c", GLOBAL_PROVIDERS], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"before": [], "after": ["meter_provider"]}


@pytest.mark.vllm
def test_llmtrace_enabled_0_wins_under_opentelemetry_instrument_vllm_serve(
        vllm_servers, otlp_receiver):
    """``opentelemetry-instrument vllm serve`` with an OTLP endpoint and LLMTRACE_ENABLED=0.

    The instrumentor ran (opentelemetry-instrument called it in the API server and
    in the engine core) and declined in both, so nothing was patched: real
    requests are served and nothing reaches the receiver under the server's name.
    """
    import time

    from testbed.models import MOE
    from testbed.vllm_server import chat

    server = vllm_servers[MOE]
    service = dict(server.config.env)["OTEL_SERVICE_NAME"]
    for i in range(3):
        chat(server.base_url, MOE, f"switched off {i}", max_tokens=4)
    time.sleep(3)  # three metric export intervals and a span batch, were anything running
    log = server.log_path.read_text(errors="replace")
    declined = log.count("llmtrace: vLLM not instrumented: LLMTRACE_ENABLED is off")
    assert declined >= 2, log[-3000:]  # the API server and the engine core at least
    assert "llmtrace: vLLM instrumented" not in log
    mine = [s for s in otlp_receiver.spans() if s.resource.get("service.name") == service]
    points = [p for p in otlp_receiver.points() if p.resource.get("service.name") == service]
    assert mine == [] and points == []
