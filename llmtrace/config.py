"""llmtrace configuration: keyword arguments, then ``LLMTRACE_*``, then ``OTEL_*``.

Exporter endpoints, headers, protocols and resource attributes follow the
standard OpenTelemetry variables (the SDK's exporters read them), so an
existing OpenTelemetry deployment needs no llmtrace-specific settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from llmtrace.record.labels import MAX_LABEL_LENGTH

logger = logging.getLogger("llmtrace")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the setting."""


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    service_name: str | None = None
    #: OTLP endpoint for traces and metrics; None leaves it to OTEL_EXPORTER_OTLP_* variables.
    endpoint: str | None = None
    #: per-signal endpoints (e.g. traces to an llmtrace collector, metrics elsewhere)
    traces_endpoint: str | None = None
    metrics_endpoint: str | None = None
    #: OTLP protocol of traces (OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, then _PROTOCOL)
    protocol: Literal["grpc", "http/protobuf"] = "grpc"
    #: ... and of metrics (OTEL_EXPORTER_OTLP_METRICS_PROTOCOL, then _PROTOCOL)
    metrics_protocol: Literal["grpc", "http/protobuf"] = "grpc"
    #: Span exporters, as OTEL_TRACES_EXPORTER: any of otlp, console, none.
    traces_exporter: str = "otlp"
    #: Head sampler, as OTEL_TRACES_SAMPLER (the SDK's built-in samplers). The default
    #: samples 10% of new traces and follows an incoming decision: a deliberate
    #: choice, since spans cost the serving process CPU while metrics stay at 100%.
    sampler: Literal["always_on", "always_off", "traceidratio", "parentbased_always_on",
                     "parentbased_always_off", "parentbased_traceidratio"] = \
        "parentbased_traceidratio"
    #: Ratio of the traceidratio samplers (LLMTRACE_SAMPLE_RATIO, OTEL_TRACES_SAMPLER_ARG).
    sample_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    #: A decode-chunk span closes after this many tokens ...
    decode_chunk_tokens: int = Field(default=32, ge=1)
    #: ... or after this many milliseconds, whichever comes first.
    decode_chunk_ms: float = Field(default=500.0, gt=0)
    tenant_header: str = "x-tenant-id"
    #: sha256(API key) hex digest -> tenant, for tenants identified by bearer key.
    tenant_api_keys: dict[str, str] = Field(default_factory=dict)
    deployment_version: str = "unknown"
    #: Record prompt and completion text on spans (off unless explicitly enabled).
    capture_content: bool = False
    #: Distinct values kept per metric label before values collapse to ``__overflow__``.
    max_label_values: int = Field(default=100, ge=1)
    #: Longest value, in characters, a label or span attribute takes from a request
    #: (the tenant header): longer ones are cut, ending in an ellipsis, and counted.
    max_label_length: int = Field(default=MAX_LABEL_LENGTH, ge=8, le=4096)
    metrics_enabled: bool = True
    #: Metric exporters, as OTEL_METRICS_EXPORTER: any of otlp, prometheus, none.
    metrics_exporter: str = "otlp"
    prometheus_host: str = "0.0.0.0"
    prometheus_port: int = Field(default=9464, ge=0, le=65535)
    metric_export_interval_ms: int = Field(default=10_000, ge=100)
    #: Batch-share weights: a step's time is split by weight x scheduled tokens.
    cost_prefill_weight: float = Field(default=1.0, ge=0.0)
    cost_decode_weight: float = Field(default=1.0, ge=0.0)
    #: Instance type whose $/accelerator-hour prices this engine's time (price tables).
    instance_type: str = "unknown"
    #: Price table (YAML, see examples/prices.yaml): USD cost at the source, every request.
    prices: str | None = None
    #: Benchmark mode: measure llmtrace's own CPU time per hook with thread CPU clocks.
    measure_overhead: bool = False
    #: Exemplars: each sampled request's latencies are recorded with its trace context,
    #: so histogram buckets link to traces (the L1 heatmap to a waterfall); those
    #: values skip the per-batch summing. Off by default.
    exemplars: bool = False
    #: Finished requests waiting for their spans and metrics to be built, per process;
    #: beyond this they are dropped and counted, never waited for.
    build_queue_size: int = Field(default=2048, ge=1)
    #: Where llmtrace's own spans are encoded and exported: ``thread``, the SDK's batch
    #: processor in the emitting process; ``process``, a separate span export process
    #: fed through a pipe, which takes OTLP encoding and network work out of vLLM's
    #: processes (see ``llmtrace.telemetry.span_pipe``).
    span_export: Literal["thread", "process"] = "thread"
    #: Which providers llmtrace emits through. ``auto``: a global OpenTelemetry SDK
    #: provider already set when llmtrace is instrumented (by your code or a distro)
    #: is used, per signal; otherwise llmtrace builds its own. ``private``: always its
    #: own, exporting per the LLMTRACE_*/OTEL_* exporter settings.
    pipeline: Literal["auto", "private"] = "auto"
    #: One engine step in this many gets a step span (phases, profiling regions, MoE
    #: expert counts); 0 switches step sampling off. Sampled steps cost the worker a
    #: few reads; the others a counter check.
    step_sample_every: int = Field(default=128, ge=0)
    #: Count MoE expert routing (a tensor copy per MoE layer per step in the forward,
    #: read on sampled steps). Off: the model's routers are left untouched.
    moe_counts: bool = True
    #: Per-expert assignment counters (labels layer and expert): off by default, since
    #: layers x experts series can run to tens of thousands ...
    moe_expert_metrics: bool = False
    #: ... and capped at this many series per engine when on (the rest counted as dropped).
    moe_expert_series: int = Field(default=1024, ge=1)
    #: Judge model: an OpenAI-compatible base URL (``http://judge:8000/v1``); empty: no
    #: judge. A sample of traced requests is scored off the serving path.
    judge_endpoint: str = ""
    #: Served model name at the judge endpoint.
    judge_model: str = ""
    #: Share of requests judged, chosen by trace id like the ratio sampler (so judged
    #: requests are traced ones whenever this is at most the trace sample ratio).
    judge_sample_ratio: float = Field(default=0.05, ge=0.0, le=1.0)
    judge_timeout_s: float = Field(default=10.0, gt=0)
    #: Judge calls per second at most, and at once at most ...
    judge_max_rate: float = Field(default=2.0, gt=0)
    judge_concurrency: int = Field(default=2, ge=1, le=64)
    #: ... and requests waiting for the judge; beyond this they are dropped and counted.
    judge_queue_size: int = Field(default=64, ge=1)
    #: A file holding the judge's rubric (system prompt); empty: the built-in rubric.
    judge_rubric: str = ""
    #: Bearer token for the judge endpoint (LLMTRACE_JUDGE_API_KEY); shown masked.
    judge_api_key: SecretStr = SecretStr("")
    #: Share of requests, by trace id, whose sampler logprobs llmtrace asks for to measure
    #: output entropy (requests that ask for logprobs themselves are always measured).
    #: Off by default: vLLM compiles its logprob-rank kernel (torch.compile) on the first
    #: request with logprobs, stalling the engine for seconds (14 s on a 2-core CPU).
    entropy_sample_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    #: Top-k logprobs llmtrace asks for on those requests (capped by vLLM's max_logprobs).
    entropy_top_k: int = Field(default=8, ge=1, le=64)
    #: The same tenant sending the same prompt within this many seconds is a regeneration.
    regeneration_window_s: float = Field(default=600.0, ge=0)
    #: Drift baseline: ``pinned`` (the first full window), ``file:PATH`` (a reference
    #: file) or ``version:STABLE`` (the stable version's live window; collector only).
    drift_baseline: str = "pinned"
    #: Sliding current window of the drift detector, seconds ...
    drift_window_s: float = Field(default=1800.0, gt=0)
    #: ... and requests each window needs before a feature's statistics are reported.
    drift_min_samples: int = Field(default=100, ge=1)

    @field_validator("metrics_exporter")
    @classmethod
    def _exporters(cls, v: str) -> str:
        return _exporter_list(v, {"otlp", "prometheus", "none"}, "metrics")

    @field_validator("traces_exporter")
    @classmethod
    def _span_exporters(cls, v: str) -> str:
        return _exporter_list(v, {"otlp", "console", "none"}, "traces")

    @property
    def span_exporters(self) -> set[str]:
        return set(self.traces_exporter.split(",")) - {"none"}

    @property
    def metric_exporters(self) -> set[str]:
        return set(self.metrics_exporter.split(",")) - {"none"}

    @field_validator("tenant_header")
    @classmethod
    def _lower(cls, v: str) -> str:
        return v.lower()

    def tenant_for_api_key(self, key: str) -> str | None:
        if not self.tenant_api_keys:
            return None
        return self.tenant_api_keys.get(hashlib.sha256(key.encode()).hexdigest())


def _exporter_list(v: str, known: set[str], signal: str) -> str:
    names = {n.strip() for n in v.split(",") if n.strip()}
    unknown = names - known
    if unknown:
        raise ValueError(f"unknown {signal} exporter(s) {sorted(unknown)}; "
                         f"use {', '.join(sorted(known))}")
    return ",".join(sorted(names))


# field -> environment variables consulted in order (first set wins)
_ENV: dict[str, tuple[str, ...]] = {
    "enabled": ("LLMTRACE_ENABLED",),
    "service_name": ("OTEL_SERVICE_NAME",),
    "endpoint": ("LLMTRACE_OTLP_ENDPOINT",),
    "traces_endpoint": ("LLMTRACE_OTLP_TRACES_ENDPOINT",),
    "metrics_endpoint": ("LLMTRACE_OTLP_METRICS_ENDPOINT",),
    "protocol": ("LLMTRACE_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                 "OTEL_EXPORTER_OTLP_PROTOCOL"),
    "metrics_protocol": ("LLMTRACE_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
                         "OTEL_EXPORTER_OTLP_PROTOCOL"),
    "traces_exporter": ("LLMTRACE_TRACES_EXPORTER", "OTEL_TRACES_EXPORTER"),
    "sample_ratio": ("LLMTRACE_SAMPLE_RATIO",),
    "decode_chunk_tokens": ("LLMTRACE_DECODE_CHUNK_TOKENS",),
    "decode_chunk_ms": ("LLMTRACE_DECODE_CHUNK_MS",),
    "tenant_header": ("LLMTRACE_TENANT_HEADER",),
    "tenant_api_keys": ("LLMTRACE_TENANT_API_KEYS",),
    "deployment_version": ("LLMTRACE_DEPLOYMENT_VERSION",),
    "capture_content": ("LLMTRACE_CAPTURE_CONTENT",),
    "max_label_values": ("LLMTRACE_MAX_LABEL_VALUES",),
    "max_label_length": ("LLMTRACE_MAX_LABEL_LENGTH",),
    "metrics_enabled": ("LLMTRACE_METRICS_ENABLED",),
    "metrics_exporter": ("LLMTRACE_METRICS_EXPORTER", "OTEL_METRICS_EXPORTER"),
    "prometheus_host": ("OTEL_EXPORTER_PROMETHEUS_HOST",),
    "prometheus_port": ("OTEL_EXPORTER_PROMETHEUS_PORT",),
    "metric_export_interval_ms": ("LLMTRACE_METRIC_EXPORT_INTERVAL_MS",
                                  "OTEL_METRIC_EXPORT_INTERVAL"),
    "measure_overhead": ("LLMTRACE_MEASURE_OVERHEAD",),
    "cost_prefill_weight": ("LLMTRACE_COST_PREFILL_WEIGHT",),
    "cost_decode_weight": ("LLMTRACE_COST_DECODE_WEIGHT",),
    "instance_type": ("LLMTRACE_INSTANCE_TYPE",),
    "prices": ("LLMTRACE_PRICES",),
    "pipeline": ("LLMTRACE_PIPELINE",),
    "build_queue_size": ("LLMTRACE_BUILD_QUEUE_SIZE",),
    "exemplars": ("LLMTRACE_EXEMPLARS",),
    "span_export": ("LLMTRACE_SPAN_EXPORT",),
    "step_sample_every": ("LLMTRACE_STEP_SAMPLE_EVERY",),
    "moe_counts": ("LLMTRACE_MOE_COUNTS",),
    "moe_expert_metrics": ("LLMTRACE_MOE_EXPERT_METRICS",),
    "moe_expert_series": ("LLMTRACE_MOE_EXPERT_SERIES",),
    "judge_endpoint": ("LLMTRACE_JUDGE_ENDPOINT",),
    "judge_model": ("LLMTRACE_JUDGE_MODEL",),
    "judge_sample_ratio": ("LLMTRACE_JUDGE_SAMPLE_RATIO",),
    "judge_timeout_s": ("LLMTRACE_JUDGE_TIMEOUT_S",),
    "judge_max_rate": ("LLMTRACE_JUDGE_MAX_RATE",),
    "judge_concurrency": ("LLMTRACE_JUDGE_CONCURRENCY",),
    "judge_queue_size": ("LLMTRACE_JUDGE_QUEUE_SIZE",),
    "judge_rubric": ("LLMTRACE_JUDGE_RUBRIC",),
    "judge_api_key": ("LLMTRACE_JUDGE_API_KEY",),
    "entropy_sample_ratio": ("LLMTRACE_ENTROPY_SAMPLE_RATIO",),
    "entropy_top_k": ("LLMTRACE_ENTROPY_TOP_K",),
    "regeneration_window_s": ("LLMTRACE_REGENERATION_WINDOW_S",),
    "drift_baseline": ("LLMTRACE_DRIFT_BASELINE",),
    "drift_window_s": ("LLMTRACE_DRIFT_WINDOW_S",),
    "drift_min_samples": ("LLMTRACE_DRIFT_MIN_SAMPLES",),
}


def _parse(field: str, raw: str) -> Any:
    """An environment value as the field takes it; a ConfigError says what is wrong with
    it (the caller names the variable and the value)."""
    if field in ("enabled", "capture_content", "metrics_enabled", "measure_overhead",
                 "moe_counts", "moe_expert_metrics"):
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"expected a boolean, got {raw!r}")
    if field == "tenant_api_keys":
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"not JSON: {exc}") from exc
        return value
    if field == "sample_ratio" and raw.strip() == "":
        return None
    return raw


_SAMPLERS = ("always_on", "always_off", "traceidratio", "parentbased_always_on",
             "parentbased_always_off", "parentbased_traceidratio")


def _sampler_from_otel() -> dict[str, Any]:
    """OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG as the SDK documents them.

    A sampler the SDK loads from a plug-in (jaeger_remote, xray, ...) is refused
    with its name: configure it on a tracer provider and pass ``tracer_provider=``.
    """
    name = os.environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if not name:
        return {}
    if name not in _SAMPLERS:
        raise ConfigError(f"OTEL_TRACES_SAMPLER={name!r} is not a built-in sampler "
                          f"({', '.join(_SAMPLERS)}); configure it on a TracerProvider and "
                          "pass llmtrace.instrument(tracer_provider=...)")
    out: dict[str, Any] = {"sampler": name}
    if name.endswith("always_on"):
        out["sample_ratio"] = 1.0
    elif name.endswith("always_off"):
        out["sample_ratio"] = 0.0
    else:
        try:
            out["sample_ratio"] = float(os.environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))
        except ValueError as exc:
            raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG: not a number: {exc}") from exc
    return out


#: what an invalid environment setting falls back to, where not its default: the
#: smallest safe choice, so a bad value disables only what it configures
_FALLBACK: dict[str, Any] = {"enabled": False, "traces_exporter": "none",
                             "metrics_exporter": "none", "capture_content": False}

_warned_env: set[str] = set()


def load_config(*, lenient_env: bool = False, **overrides: Any) -> Config:
    """Build the configuration from ``overrides``, ``LLMTRACE_*`` and ``OTEL_*``.

    Every bad setting is found, not only the first, and named as it was given
    (the environment variable, or the keyword). A bad keyword raises
    :class:`ConfigError` listing them all. A bad environment setting does too,
    unless ``lenient_env`` (the activation paths: zero-code must never cost all
    telemetry for one typo): then that setting alone falls back (exporters to
    ``none``, ``LLMTRACE_ENABLED`` to off, the rest to their defaults), with one
    warning per process listing every problem.
    """
    values: dict[str, Any] = {}
    source: dict[str, str] = {}  # field -> the environment variable that set it
    problems: dict[str, str] = {}  # field -> problem, named as given
    try:
        values.update(_sampler_from_otel())
        source.update(dict.fromkeys(values, "OTEL_TRACES_SAMPLER"))
    except ConfigError as exc:
        problems["sampler"] = str(exc)
    if os.environ.get("LLMTRACE_SAMPLE_RATIO", "").strip() or "sample_ratio" in overrides:
        values["sampler"] = "parentbased_traceidratio"  # llmtrace's own ratio wins
        problems.pop("sampler", None)
    for field, names in _ENV.items():
        for name in names:
            raw = os.environ.get(name)
            if raw is not None and raw != "":
                try:
                    parsed = _parse(field, raw)
                except ConfigError as exc:
                    problems[field] = f"{name}={raw!r}: {exc}"
                    break
                if parsed is not None:
                    values[field] = parsed
                    source[field] = name
                break
    given = {k: v for k, v in overrides.items() if v is not None}
    values.update(given)
    for k in given:
        source.pop(k, None)
    if overrides.get("protocol") and not overrides.get("metrics_protocol"):
        values["metrics_protocol"] = overrides["protocol"]  # one protocol= sets both signals
    try:
        config = Config(**values)
    except ValidationError as exc:
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "?"
            name = source.get(field)
            shown = f"{name}={os.environ.get(name)!r}" if name else field
            problems.setdefault(field, f"{shown}: {error['msg']}")
        config = None
    if not problems:
        return config
    listed = "; ".join(problems.values())
    if not lenient_env or any(f in given for f in problems):
        raise ConfigError(f"invalid llmtrace configuration: {listed}")
    for field in problems:  # each bad environment setting falls back on its own
        values.pop(field, None)
        if field in _FALLBACK:
            values[field] = _FALLBACK[field]
    if "sampler" in problems:
        values.pop("sample_ratio", None)
    config = Config(**values)
    if listed not in _warned_env:  # once per process for the same problems
        _warned_env.add(listed)
        logger.warning("llmtrace: ignored invalid settings, each falls back on its own "
                       "(exporters to none, LLMTRACE_ENABLED to off, the rest to defaults); "
                       "the rest of the telemetry works: %s", listed)
    return config


def switched_off(config: Config, env: dict[str, str] | None = None) -> str | None:
    """Why llmtrace must not patch anything, whatever path activated it; None: go ahead.

    ``LLMTRACE_ENABLED=0`` (or ``enabled=False``) wins on every path; so do the
    OpenTelemetry switches as the SDK documents them: ``OTEL_SDK_DISABLED=true``
    (the SDK is a no-op) and ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS`` naming
    ``vllm`` (this instrumentor's entry point) or ``llmtrace``.
    """
    env = os.environ if env is None else env
    if not config.enabled:
        return "LLMTRACE_ENABLED is off"
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return "OTEL_SDK_DISABLED=true"
    disabled = {n.strip() for n in env.get("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", "").split(",")}
    if disabled & {"vllm", "llmtrace"}:
        return "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS names it"
    return None


def activation_requested(env: dict[str, str] | None = None) -> bool:
    """Zero-code activation rule: an explicit switch, or an OTLP endpoint, turns llmtrace on.

    ``LLMTRACE_ENABLED=0`` always wins; installing llmtrace alone changes nothing.
    """
    env = os.environ if env is None else env
    flag = env.get("LLMTRACE_ENABLED", "").strip().lower()
    if flag in _FALSE:
        return False
    if flag in _TRUE:
        return True
    return any(env.get(v) for v in ("LLMTRACE_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT",
                                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
