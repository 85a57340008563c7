"""llmtrace's CPU per request inside one process, with vLLM's real objects. Prints figures.

One process runs vLLM's engine in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``:
the output processor's and the scheduler's hooks run on this thread, with no
busy-polling engine loop to blur the figures). Rounds of the same batch of
requests alternate between four arms: bare (llmtrace uninstrumented, vLLM's
tracing off), vLLM's own tracing (``otlp_traces_endpoint``, to a real OTLP
receiver in this process; switched per arm through the output processor's
``tracing_enabled``), llmtrace at default sampling (0.1) and llmtrace at 100%.
Per arm it reports:

- process CPU per request (``time.process_time``: every thread, the builder
  and exporters included), and the difference from bare, as the median of
  per-round differences with a bootstrap 95% interval;
- with ``LLMTRACE_MEASURE_OVERHEAD``, each hook body's and the builder's thread
  CPU per request, so the serving path (hooks) and the off-path work (builder,
  exports) are told apart;
- for vLLM's own tracing, measured the same way by this script: the thread CPU
  of ``OutputProcessor.do_tracing`` (its one span, on the serving path) and of
  its OTLP exporter's ``export`` (its batch thread), per request.

Spans go to an in-memory exporter (no network), metrics to an in-memory reader,
through llmtrace's own pipeline as a server runs it (``--user-providers``: through
providers the user owns, where llmtrace cannot add its ITL view).

    python benchmarks/hook_cost.py [--rounds 12] [--requests 32] [--tokens 32]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # testbed/ is not installed

REPO = Path(__file__).resolve().parents[1]


def bootstrap_ci(values: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--requests", type=int, default=32, help="requests per round")
    p.add_argument("--tokens", type=int, default=32, help="output tokens per request")
    p.add_argument("--user-providers", action="store_true",
                   help="emit through providers the user owns instead of llmtrace's own")
    args = p.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="llmtrace-hookcost-"))
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1",
                      HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1",
                      VLLM_CACHE_ROOT=str(scratch / "vllm"), TMPDIR=str(scratch),
                      TORCHINDUCTOR_CACHE_DIR=str(scratch / "inductor"),
                      LLMTRACE_MEASURE_OVERHEAD="1", LLMTRACE_OVERHEAD_DIR=str(scratch))
    from opentelemetry import trace as otel_trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, Sampler, TraceIdRatioBased
    from vllm import LLM, SamplingParams
    from vllm.v1.engine.output_processor import OutputProcessor

    import llmtrace
    from llmtrace.config import load_config
    from llmtrace.instrumentation._patching import install, uninstall
    from llmtrace.instrumentation.vllm import VLLMInstrumentor, hook_table
    from llmtrace.telemetry import Telemetry
    from llmtrace.telemetry.guard import HOOK_CPU_S
    from testbed.models import DENSE, ensure_models
    from testbed.otlp_receiver import OTLPReceiver

    # vLLM's own tracing, timed the way llmtrace's measure mode times llmtrace: its
    # span (do_tracing, on the serving path) and its exporter (the batch thread)
    vllm_cpu = {"do_tracing": 0.0, "export": 0.0}

    def timed(fn, key):
        def wrapper(*a, **kw):
            t0 = time.thread_time()
            try:
                return fn(*a, **kw)
            finally:
                vllm_cpu[key] += time.thread_time() - t0
        return wrapper

    OutputProcessor.do_tracing = timed(OutputProcessor.do_tracing, "do_tracing")
    OTLPSpanExporter.export = timed(OTLPSpanExporter.export, "export")
    receiver = OTLPReceiver().start()
    os.environ["OTEL_EXPORTER_OTLP_TRACES_INSECURE"] = "true"

    models = ensure_models(REPO / ".cache" / "models")
    llm = LLM(model=str(models.dense), served_model_name=DENSE, enforce_eager=True,
              max_model_len=512, disable_log_stats=False,
              otlp_traces_endpoint=receiver.grpc_endpoint)
    output_processor = llm.llm_engine.output_processor
    output_processor.tracing_enabled = False  # on in its own arm only
    vllm_provider = otel_trace.get_tracer_provider()  # vLLM's, set by its init_tracer
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True)
    rng = random.Random(0)
    prompts = [" ".join(["scheduler"] * rng.randint(4, 40)) for _ in range(args.requests)]
    llm.generate(prompts, params, use_tqdm=False)  # warm-up

    def flush() -> None:
        if hasattr(llmtrace, "flush"):  # builds off the serving path (since 0.2.0)
            llmtrace.flush()

    exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
    ratios = {"default (0.1)": ParentBased(TraceIdRatioBased(0.1)), "100%": ParentBased(ALWAYS_ON)}

    class Switch(Sampler):
        """The arms' samplers behind one object, so one instrumentation serves both."""

        current = ratios["default (0.1)"]

        def should_sample(self, *a, **kw):
            return self.current.should_sample(*a, **kw)

        def get_description(self) -> str:
            return self.current.get_description()

    switch = Switch()
    # Instrumented once: the arms differ in the sampler and in whether the hooks are
    # installed (bare: removed), so one-time set-up (providers, instruments, threads)
    # is not charged to a round.
    if args.user_providers:  # providers the user owns: no ITL view, the SDK's processor
        tp = TracerProvider(sampler=switch)
        tp.add_span_processor(BatchSpanProcessor(exporter))
        llmtrace.instrument(tracer_provider=tp,
                            meter_provider=MeterProvider(metric_readers=[reader]))
    else:  # llmtrace's own pipeline, as a server runs it, exporting to memory
        config = load_config()
        telemetry = Telemetry(config, span_exporter=exporter, metric_reader=reader)
        VLLMInstrumentor().instrument(telemetry=telemetry, config=config, skip_dep_check=True)
        telemetry.tracer.sampler = switch  # the tracer asks its sampler per span
        telemetry._sampler = switch  # ... and the serving path asks the same one
        tp = telemetry._tracer_provider
    instrumentor = VLLMInstrumentor()
    llm.generate(prompts, params, use_tqdm=False)  # warm-up, instrumented
    flush()
    vllm_arm = "vLLM's own tracing"
    arms = ["bare", vllm_arm, *ratios]
    cpu: dict[str, list[float]] = {a: [] for a in arms}
    vllm_spent = {"do_tracing": 0.0, "export": 0.0}
    vllm_spans = 0
    hooks: dict[str, dict[str, float]] = {a: {} for a in ratios}
    spans: dict[str, int] = {a: 0 for a in ratios}
    for r in range(args.rounds):
        order = arms[:]
        random.Random(r).shuffle(order)
        for arm in order:
            output_processor.tracing_enabled = arm == vllm_arm
            if arm in ("bare", vllm_arm):
                uninstall(instrumentor._installed)
            else:
                switch.current = ratios[arm]
                if not instrumentor._installed:
                    instrumentor._installed = install(
                        hook_table(instrumentor.frontend, instrumentor.engine), measure=True)
            before_hooks = dict(HOOK_CPU_S)
            before_vllm = dict(vllm_cpu)
            received = len(receiver.spans())
            exporter.clear()
            t0 = time.process_time()
            llm.generate(prompts, params, use_tqdm=False)
            flush()  # the builder's work for this round counts to this round
            tp.force_flush()
            vllm_provider.force_flush()
            cpu[arm].append((time.process_time() - t0) / args.requests)
            if arm == vllm_arm:
                for key, total in vllm_cpu.items():
                    vllm_spent[key] += total - before_vllm[key]
                want = received + args.requests
                receiver.wait_for(lambda r, want=want: len(r.spans()) >= want, 10)
                vllm_spans += len(receiver.spans()) - received
            elif arm != "bare":
                spans[arm] += len(exporter.get_finished_spans())
                for name, total in HOOK_CPU_S.items():
                    spent = total - before_hooks.get(name, 0.0)
                    hooks[arm][name] = hooks[arm].get(name, 0.0) + spent
    n = args.rounds * args.requests
    print(f"\n== in-process CPU per request: {args.rounds} rounds x {args.requests} requests x "
          f"{args.tokens} tokens, arms interleaved ==")
    bare = statistics.median(cpu["bare"])
    print(f"{'bare vLLM':>16}: {bare * 1e6:9.1f} us CPU per request (median of rounds)")
    diffs = [(a - b) * 1e6 for a, b in zip(cpu[vllm_arm], cpu["bare"], strict=True)]
    lo, hi = bootstrap_ci(diffs)
    print(f"{vllm_arm:>16}: +{statistics.median(diffs):7.1f} us per request [{lo:6.1f}, "
          f"{hi:6.1f}] over bare | do_tracing (serving path) "
          f"{vllm_spent['do_tracing'] / n * 1e6:6.1f} us, span export "
          f"{vllm_spent['export'] / n * 1e6:6.1f} us per request | "
          f"{vllm_spans / n:4.2f} spans per request")
    for arm in ratios:
        diffs = [(a - b) * 1e6 for a, b in zip(cpu[arm], cpu["bare"], strict=True)]
        lo, hi = bootstrap_ci(diffs)
        serving = sum(v for k, v in hooks[arm].items()
                      if k != "builder" and not k.startswith("export"))
        off_path = hooks[arm].get("builder", 0.0)
        print(f"{arm:>16}: +{statistics.median(diffs):7.1f} us per request [{lo:6.1f}, {hi:6.1f}] "
              f"over bare | hooks (serving path) {serving / n * 1e6:6.1f} us, builder "
              f"{off_path / n * 1e6:6.1f} us per request | {spans[arm] / n:4.2f} spans per request")
        top = sorted(hooks[arm].items(), key=lambda kv: -kv[1])
        print(f"{'':>16}  by hook, us per request: "
              + ", ".join(f"{k}={v / n * 1e6:.1f}" for k, v in top if v > 0))
    receiver.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
