"""``llmtrace doctor``: will llmtrace work here, and with which settings?

Run in the environment that serves vLLM. It resolves every hook of the hook
table against the installed vLLM (active, or disabled and why), prints the
effective configuration and where each value came from, the activation
switches, and whether the OTLP endpoint answers. With ``--metrics-url`` it also
reads a running server's ``/metrics``: hooks disabled at run time, and drops. It
exits non-zero when
something the configuration asks for cannot work: a bad setting, no vLLM or
one outside the supported range, a disabled hook, an unreachable endpoint.
It patches nothing and starts no exporter.
"""

from __future__ import annotations

import json
import os
import socket
from importlib.metadata import version
from typing import Any
from urllib.parse import urlparse

from pydantic import SecretStr

from llmtrace.config import (
    _ENV,
    Config,
    ConfigError,
    activation_requested,
    load_config,
    switched_off,
)

_DEFAULT_OTLP = {"grpc": "http://localhost:4317", "http/protobuf": "http://localhost:4318"}


def _shown(value):
    """A setting as the report shows it: secrets only say whether they are set."""
    if isinstance(value, SecretStr):
        return "<set>" if value.get_secret_value() else ""
    return value


def _source(field: str) -> str:
    names = _ENV.get(field, ())
    if field in ("sampler", "sample_ratio") and os.environ.get("OTEL_TRACES_SAMPLER") and \
            not os.environ.get("LLMTRACE_SAMPLE_RATIO"):
        return "OTEL_TRACES_SAMPLER"
    for name in names:
        if os.environ.get(name):
            return name
    return "default"


def _traces_endpoint(cfg: Config) -> str:
    return (cfg.traces_endpoint or cfg.endpoint
            or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or _DEFAULT_OTLP[cfg.protocol])


def _reachable(endpoint: str, timeout_s: float = 2.0) -> str | None:
    """None if a TCP connection to the endpoint opens, else why not."""
    url = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "localhost", port), timeout_s):
            return None
    except OSError as exc:
        return f"{url.hostname}:{port}: {exc}"


def diagnose() -> dict[str, Any]:
    """Everything the doctor reports, as data; ``problems`` lists what cannot work."""
    from llmtrace.instrumentation._patching import resolve
    from llmtrace.instrumentation.vllm import (
        VLLMInstrumentor,
        global_sdk_providers,
        hook_table,
        vllm_distribution,
    )
    from llmtrace.instrumentation.vllm.engine import EngineTracer
    from llmtrace.instrumentation.vllm.frontend import FrontendTracer
    from llmtrace.instrumentation.vllm.kv_transfer import KVTransferTracer
    from llmtrace.telemetry import Telemetry

    report: dict[str, Any] = {"problems": []}
    problems = report["problems"]
    try:
        cfg = load_config()
    except ConfigError as exc:
        problems.append(str(exc))
        return report
    report["activation"] = {
        "requested": activation_requested(),
        "switched_off": switched_off(cfg),
    }
    report["config"] = {f: {"value": _shown(getattr(cfg, f)), "from": _source(f)}
                        for f in Config.model_fields}
    dist = vllm_distribution()
    report["vllm"] = {"distribution": dist, "version": version(dist) if dist else None}
    if dist is None:
        problems.append("vLLM is not installed in this environment")
        return report
    from opentelemetry.instrumentation.dependencies import get_dependency_conflicts

    conflict = get_dependency_conflicts(VLLMInstrumentor().instrumentation_dependencies())
    if conflict is not None:
        problems.append(str(conflict))
    if cfg.pipeline == "auto":
        adopted = global_sdk_providers()
        report["pipeline"] = {key: "global SDK provider" if signal in adopted
                              else "llmtrace's own" for key, signal in
                              (("tracers", "tracer_provider"), ("meters", "meter_provider"))}
    else:
        report["pipeline"] = {"tracers": "llmtrace's own", "meters": "llmtrace's own"}
    telemetry = Telemetry(cfg)  # providers are built lazily: nothing starts here
    hooks = {}
    engine = EngineTracer(cfg, telemetry)
    kv = KVTransferTracer(cfg, telemetry, engine)
    class_hooks = hook_table(FrontendTracer(cfg, telemetry), engine, kv)
    for hook in class_hooks + list(kv.instance_hooks.values()):
        found = resolve(hook)
        if found.target is not None:
            moved = found.target != hook.targets[0]  # an alternative target fits
            hooks[hook.name] = {"target": found.target.qualname,
                                "status": f"active via {found.target.qualname}" if moved
                                else "active"}
            if hook.name in kv.instance_hooks:  # checked on the interface, wrapped per object
                hooks[hook.name]["wrapped"] = "on each KV connector vLLM creates"
        else:
            hooks[hook.name] = {"target": " | ".join(t.qualname for t in hook.targets),
                                "status": f"disabled: {found.reason}"}
            problems.append(f"hook {hook.name} disabled: {found.reason}")
    report["hooks"] = hooks
    if "otlp" in cfg.span_exporters or "otlp" in cfg.metric_exporters:
        endpoint = _traces_endpoint(cfg)
        down = _reachable(endpoint)
        report["otlp_endpoint"] = {"endpoint": endpoint, "reachable": down is None,
                                   **({"error": down} if down else {})}
        if down and report["activation"]["requested"] and not switched_off(cfg):
            problems.append(f"OTLP endpoint {endpoint} does not answer ({down})")
    return report


def render(report: dict[str, Any]) -> str:
    lines = []
    vllm = report.get("vllm")
    if vllm:
        lines.append(f"vLLM: {vllm['distribution'] or 'not installed'} {vllm['version'] or ''}")
    act = report.get("activation")
    if act:
        state = f"off ({act['switched_off']})" if act["switched_off"] else \
            ("on" if act["requested"] else "off (no LLMTRACE_ENABLED=1 or OTLP endpoint)")
        lines.append(f"zero-code activation: {state}")
    for name, h in report.get("hooks", {}).items():
        lines.append(f"  hook {name:<40} {h['status']}")
    pipeline = report.get("pipeline")
    if pipeline:
        lines.append(f"pipeline: traces -> {pipeline['tracers']}, metrics -> {pipeline['meters']}")
    ep = report.get("otlp_endpoint")
    if ep:
        lines.append(f"OTLP endpoint {ep['endpoint']}: "
                     + ("answers" if ep["reachable"] else f"does not answer ({ep['error']})"))
    if report.get("config"):
        lines.append("configuration (value <- source):")
        for field, item in report["config"].items():
            lines.append(f"  {field:<28} {item['value']!r} <- {item['from']}")
    server = report.get("server")
    if server and "error" not in server:
        lines.append(f"running server {server['url']}: disabled hooks "
                     f"{server['disabled_hooks'] or 'none'}, drops {server['dropped'] or 'none'}")
    problems = report["problems"]
    lines.append("OK" if not problems else "problems:\n  " + "\n  ".join(problems))
    return "\n".join(lines)


def running_server(metrics_url: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """What a running server says about itself on its ``/metrics``: the hooks it has
    disabled at run time (a failure, or a group that went with one) and its drops."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from llmtrace import semconv as sc

    names = {sc.PROMETHEUS_NAMES[sc.METRIC_LLMTRACE_TELEMETRY_DISABLED_HOOKS]: "disabled_hooks",
             sc.PROMETHEUS_NAMES[sc.METRIC_LLMTRACE_TELEMETRY_DROPPED]: "dropped"}
    out: dict[str, Any] = {"url": metrics_url, "disabled_hooks": [], "dropped": {}}
    try:
        text = httpx.get(metrics_url, timeout=timeout_s).raise_for_status().text
    except httpx.HTTPError as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        return out
    hook, reason = "llmtrace_telemetry_hook", "llmtrace_telemetry_reason"
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            kind = names.get(sample.name)
            if kind == "disabled_hooks" and sample.value:
                out["disabled_hooks"].append(sample.labels.get(hook, "?"))
            elif kind == "dropped":
                key = sample.labels.get(reason, "?")
                out["dropped"][key] = out["dropped"].get(key, 0) + sample.value
    out["disabled_hooks"].sort()
    return out


def main(as_json: bool = False, metrics_url: str | None = None) -> int:
    report = diagnose()
    if metrics_url:
        server = report["server"] = running_server(metrics_url)
        if "error" in server:
            report["problems"].append(f"cannot read {metrics_url}: {server['error']}")
        elif server["disabled_hooks"]:
            report["problems"].append(
                f"the server at {metrics_url} runs with hooks disabled (their telemetry is "
                f"missing): {', '.join(server['disabled_hooks'])}; see its log for why")
    print(json.dumps(report, default=str, indent=2) if as_json else render(report))
    return 1 if report["problems"] else 0
