"""instrument()/uninstrument(), configuration and the guards, in-process."""

from __future__ import annotations

import inspect
import logging
from importlib.metadata import version

import pytest

import llmtrace
from llmtrace.config import ConfigError, activation_requested, load_config
from llmtrace.instrumentation._patching import Hook, install, is_wrapped, uninstall
from llmtrace.instrumentation.targets import Target as T
from llmtrace.instrumentation.vllm import VLLMInstrumentor, hook_table
from llmtrace.instrumentation.vllm.engine import EngineTracer
from llmtrace.instrumentation.vllm.frontend import FrontendTracer
from llmtrace.record.labels import (
    CLEANED,
    CUT_MARK,
    MAX_LABEL_LENGTH,
    TOO_LONG,
    UNPRINTABLE,
    clean_label,
)
from llmtrace.telemetry import Telemetry
from llmtrace.telemetry.guard import DISABLED_HOOKS, HOOK_ERRORS, HookGuard
from llmtrace.telemetry.metrics import OVERFLOW, LabelLimiter


def test_uninstrument_restores_every_patched_callable():
    from llmtrace.instrumentation._patching import resolve

    originals = {}
    cfg = load_config()
    for hook in hook_table(FrontendTracer(cfg, Telemetry(cfg)), EngineTracer(cfg, Telemetry(cfg))):
        found = resolve(hook)
        assert found.target is not None, found.reason
        # static lookup: a classmethod's getattr is a new bound method each time
        originals[hook.name] = (found.owner, found.attr,
                                inspect.getattr_static(found.owner, found.attr))
    assert not llmtrace.is_instrumented()
    llmtrace.instrument(sample_ratio=1.0, metrics_enabled=False)
    try:
        llmtrace.instrument()  # idempotent
        installed = VLLMInstrumentor().installed_hooks
        assert sorted(installed) == sorted(originals)
        for owner, leaf, _ in originals.values():
            assert is_wrapped(owner, leaf)
    finally:
        llmtrace.uninstrument()
    assert not llmtrace.is_instrumented()
    for name, (owner, leaf, original) in originals.items():
        assert inspect.getattr_static(owner, leaf) is original, name
    llmtrace.uninstrument()  # no-op when not instrumented


def test_missing_or_changed_target_disables_only_that_hook(caplog):
    class Target:
        def good(self, request):
            return request

        def changed(self, *args):
            return args

        def new_name(self, request):
            return request

    import sys
    import types

    module = types.ModuleType("llmtrace_fake_vllm")
    module.Target = Target
    sys.modules[module.__name__] = module
    calls = []

    def body(instance, args, kwargs):
        calls.append(args)

    hooks = [
        Hook("fake.good", (T(module.__name__, "Target.good", ("request",)),), before=body),
        Hook("fake.changed", (T(module.__name__, "Target.changed", ("request",)),), before=body),
        Hook("fake.missing", (T(module.__name__, "Target.gone"),), before=body),
        Hook("fake.nomodule", (T("llmtrace_no_such_module", "X.y"),), before=body),
        # a moved target: the first is gone, the alternative fits and is wrapped
        Hook("fake.moved", (T(module.__name__, "Target.old_name", ("request",)),
                            T(module.__name__, "Target.new_name", ("request",))), before=body),
        Hook("fake.none_fit", (T(module.__name__, "Target.gone2"),
                               T(module.__name__, "Target.changed", ("request",))), before=body),
    ]
    with caplog.at_level(logging.WARNING, logger="llmtrace"):
        installed = install(hooks)
    try:
        assert [i.hook.name for i in installed] == ["fake.good", "fake.moved"]
        assert installed[1].target.attr == "Target.new_name"
        assert "Target.changed takes (nothing) where llmtrace reads (request)" in \
            DISABLED_HOOKS["fake.changed"]
        assert "not found" in DISABLED_HOOKS["fake.missing"]
        assert "not found" in DISABLED_HOOKS["fake.nomodule"]
        # one warning per disabled hook, naming the hook, every target tried and the
        # installed version of the package the target belongs to
        warned = [r.getMessage() for r in caplog.records if "fake.none_fit" in r.getMessage()]
        assert len(warned) == 1
        assert "Target.gone2 not found" in warned[0] and "Target.changed takes" in warned[0]
        assert "[installed: llmtrace_fake_vllm (not installed)]" in warned[0]
        assert Target().good(1) == 1 and calls == [(1,)]
        assert Target().new_name(3) == 3 and calls == [(1,), (3,)]
        assert Target().changed(2) == (2,)
    finally:
        uninstall(installed)
        for name in ("fake.changed", "fake.missing", "fake.nomodule", "fake.none_fit"):
            DISABLED_HOOKS.pop(name, None)
        del sys.modules[module.__name__]


def test_per_instance_hooks_fit_each_object_and_a_changed_method_disables_only_itself(caplog):
    """KV connectors: every class overrides the interface method, so the hooks go on each
    connector object; one whose override no longer takes the parameters read is left
    alone, with one warning naming its class."""
    from llmtrace.instrumentation._patching import install_on

    class Connector:  # a connector class someone wrote against the v1 interface
        def update_state_after_alloc(self, request, blocks, num_external_tokens):
            return num_external_tokens

        def request_finished(self, req, block_ids):  # a renamed parameter
            return False, None

    calls = []

    def after(instance, args, kwargs, result, token):
        calls.append((instance, result))

    base = "vllm.distributed.kv_transfer.kv_connector.v1.base"
    hooks = [Hook("fake.kv.alloc", (T(base, "KVConnectorBase_V1.update_state_after_alloc",
                                      ("request", "blocks", "num_external_tokens")),),
                  after=after),
             Hook("fake.kv.finished", (T(base, "KVConnectorBase_V1.request_finished",
                                         ("request", "block_ids")),), after=after),
             Hook("fake.kv.optional", (T(base, "KVConnectorBase_V1.not_on_this_class"),))]
    one, other = Connector(), Connector()
    with caplog.at_level(logging.WARNING, logger="llmtrace"):
        assert install_on(one, hooks) == ["fake.kv.alloc"]
    try:
        assert one.update_state_after_alloc("r", [], 7) == 7 and calls == [(one, 7)]
        assert other.update_state_after_alloc("r", [], 5) == 5 and len(calls) == 1  # not it
        assert one.request_finished("r", []) == (False, None)
        assert "Connector.request_finished" in DISABLED_HOOKS["fake.kv.finished"]
        assert sum("fake.kv.finished" in r.getMessage() for r in caplog.records) == 1
        assert "fake.kv.optional" not in DISABLED_HOOKS  # absent on this class: nothing to do
    finally:
        for name in ("fake.kv.alloc", "fake.kv.finished"):
            DISABLED_HOOKS.pop(name, None)


def test_disabled_hook_warning_names_the_installed_vllm(caplog):
    from llmtrace.instrumentation._patching import installed_version
    from llmtrace.instrumentation.vllm import vllm_distribution

    dist = vllm_distribution()
    assert installed_version("vllm.v1.engine") == f"{dist} {version(dist)}"
    hook = Hook("fake.vllm_gone", (T("vllm.v1.engine.output_processor", "Gone.method"),))
    with caplog.at_level(logging.WARNING, logger="llmtrace"):
        assert install([hook]) == []
    try:
        (msg,) = [r.getMessage() for r in caplog.records if "fake.vllm_gone" in r.getMessage()]
        assert f"[installed: {dist} {version(dist)}]" in msg
        assert "vllm.v1.engine.output_processor.Gone.method not found" in msg
    finally:
        DISABLED_HOOKS.pop("fake.vllm_gone", None)


def test_install_guards_each_body_by_the_tables_name(capfd):
    """A body that raises is swallowed by the guard install() put around it: the host's
    call returns normally, the error is counted under the hook's name, once."""
    import sys
    import types

    class Target:
        def run(self, request):
            return request * 2

    module = types.ModuleType("llmtrace_fake_guarded")
    module.Target = Target
    sys.modules[module.__name__] = module

    def boom(instance, args, kwargs, result, token):
        raise ValueError("bad body")

    before = HOOK_ERRORS["fake.guarded"]
    installed = install([Hook("fake.guarded", (T(module.__name__, "Target.run", ("request",)),),
                              after=boom)])
    try:
        assert [Target().run(i) for i in range(3)] == [0, 2, 4]
        assert HOOK_ERRORS["fake.guarded"] == before + 1
        assert "ValueError: bad body" in DISABLED_HOOKS["fake.guarded"]
        assert capfd.readouterr().err.count("hook fake.guarded raised ValueError") == 1
    finally:
        uninstall(installed)
        DISABLED_HOOKS.pop("fake.guarded", None)
        del sys.modules[module.__name__]


def test_hook_exception_is_swallowed_counted_and_disables_once(capfd):
    before = HOOK_ERRORS["test.boom"]
    for _ in range(3):
        guard = HookGuard("test.boom")
        with guard:
            if guard.enabled:
                raise RuntimeError("boom")
    assert HOOK_ERRORS["test.boom"] == before + 1  # later calls skipped the body
    assert "RuntimeError: boom" in DISABLED_HOOKS["test.boom"]
    err = capfd.readouterr().err
    assert err.count("hook test.boom raised RuntimeError") == 1
    DISABLED_HOOKS.pop("test.boom")


def test_config_reads_env_and_names_bad_settings(monkeypatch):
    monkeypatch.setenv("LLMTRACE_SAMPLE_RATIO", "0.25")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("LLMTRACE_TENANT_HEADER", "X-Org")
    cfg = load_config(decode_chunk_tokens=4)
    assert (cfg.sample_ratio, cfg.protocol, cfg.tenant_header, cfg.decode_chunk_tokens) == \
        (0.25, "http/protobuf", "x-org", 4)
    assert cfg.capture_content is False  # prompts are never recorded by default
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    monkeypatch.delenv("LLMTRACE_SAMPLE_RATIO")
    assert load_config().sample_ratio == 1.0
    monkeypatch.setenv("LLMTRACE_SAMPLE_RATIO", "1.5")
    with pytest.raises(ConfigError, match="LLMTRACE_SAMPLE_RATIO='1.5'"):
        load_config()
    monkeypatch.setenv("LLMTRACE_SAMPLE_RATIO", "0.5")
    monkeypatch.setenv("LLMTRACE_CAPTURE_CONTENT", "perhaps")
    with pytest.raises(ConfigError, match="LLMTRACE_CAPTURE_CONTENT='perhaps'"):
        load_config()
    monkeypatch.delenv("LLMTRACE_CAPTURE_CONTENT")
    monkeypatch.setenv("LLMTRACE_TENANT_API_KEYS", "{not json")
    with pytest.raises(ConfigError, match="LLMTRACE_TENANT_API_KEYS"):
        load_config()
    monkeypatch.delenv("LLMTRACE_TENANT_API_KEYS")
    with pytest.raises(ConfigError, match="no_such_setting"):
        load_config(no_such_setting=1)


def test_bad_environment_settings_are_all_named_and_fall_back_one_by_one(monkeypatch, caplog):
    bad = {"LLMTRACE_SAMPLE_RATIO": "1.5", "LLMTRACE_CAPTURE_CONTENT": "perhaps",
           "OTEL_TRACES_EXPORTER": "zipkin", "LLMTRACE_BUILD_QUEUE_SIZE": "-3",
           "LLMTRACE_TENANT_API_KEYS": "{not json"}
    for name, value in bad.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LLMTRACE_DECODE_CHUNK_TOKENS", "4")  # a good one among them
    with pytest.raises(ConfigError) as err:
        load_config()  # strict (the doctor): every problem at once, by variable name
    for name, value in bad.items():
        assert f"{name}={value!r}" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="llmtrace"):
        cfg = load_config(lenient_env=True)  # the activation paths
        load_config(lenient_env=True)
    # each bad setting falls back on its own; the good one and the rest still apply
    assert cfg.traces_exporter == "none" and cfg.metrics_exporter == "otlp"
    assert (cfg.sample_ratio, cfg.capture_content, cfg.build_queue_size) == (0.1, False, 2048)
    assert cfg.tenant_api_keys == {} and cfg.decode_chunk_tokens == 4 and cfg.enabled
    warnings = [r.getMessage() for r in caplog.records if "ignored invalid" in r.getMessage()]
    assert len(warnings) == 1 and all(name in warnings[0] for name in bad)
    with pytest.raises(ConfigError, match="sample_ratio"):  # a bad keyword still raises
        load_config(lenient_env=True, sample_ratio=7)
    monkeypatch.setenv("LLMTRACE_ENABLED", "maybe")
    assert load_config(lenient_env=True).enabled is False  # unsure: stay off


def test_tenant_from_api_key_mapping():
    import hashlib

    digest = hashlib.sha256(b"sk-123").hexdigest()
    cfg = load_config(tenant_api_keys={digest: "acme"})
    assert cfg.tenant_for_api_key("sk-123") == "acme"
    assert cfg.tenant_for_api_key("sk-999") is None


def test_activation_rule():
    assert not activation_requested({})
    assert activation_requested({"LLMTRACE_ENABLED": "1"})
    assert activation_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"})
    assert not activation_requested({"LLMTRACE_ENABLED": "0",
                                     "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"})


def test_label_cardinality_is_capped_and_counted():
    limit = LabelLimiter(3)
    values = [limit("tenant", f"t{i}") for i in range(5)]
    assert values == ["t0", "t1", "t2", OVERFLOW, OVERFLOW]
    assert limit("tenant", "t1") == "t1"
    assert limit.overflows == {"tenant": 2}
    assert limit("model", "m") == "m"  # caps are per label


def test_label_values_from_outside_are_cut_cleaned_and_counted():
    before = dict(CLEANED)
    assert clean_label("acme") == "acme"
    cut = clean_label("x" * 100_000)
    assert len(cut) == MAX_LABEL_LENGTH and cut.endswith(CUT_MARK)
    assert clean_label("a\nb\x07c\u200bd") == "a\ufffdb\ufffdc\ufffdd"  # line break, BEL, ZWSP
    assert clean_label("café-ü 東京") == "café-ü 東京"  # printable Unicode is kept
    assert CLEANED[TOO_LONG] - before.get(TOO_LONG, 0) == 1
    assert CLEANED[UNPRINTABLE] - before.get(UNPRINTABLE, 0) == 1
    limit = LabelLimiter(3, max_length=16)
    assert limit("tenant", "t" * 40) == "t" * 15 + CUT_MARK
    # the same long value again is the same (cut) series, not a new one each time
    assert limit("tenant", "t" * 40) == "t" * 15 + CUT_MARK and not limit.overflows


def test_llmtrace_warnings_stay_visible_when_root_logging_is_reset(capfd):
    logging.getLogger().handlers.clear()
    logging.getLogger("llmtrace").warning("visible warning")
    assert "[llmtrace] visible warning" in capfd.readouterr().err


def test_otel_sampler_exporter_and_protocol_variables(monkeypatch):
    """OTEL_TRACES_SAMPLER(_ARG), OTEL_TRACES_EXPORTER and per-signal protocols as the
    SDK documents them; a sampler llmtrace cannot build is refused by name."""
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased

    from llmtrace.telemetry import Telemetry, make_sampler

    for var in ("LLMTRACE_SAMPLE_RATIO", "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG"):
        monkeypatch.delenv(var, raising=False)
    default = make_sampler(load_config())
    assert isinstance(default, ParentBased) and "0.1" in default.get_description()
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    ratio = make_sampler(load_config())
    assert isinstance(ratio, TraceIdRatioBased) and ratio.rate == 0.25  # not parent-based
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    assert make_sampler(load_config()) is ALWAYS_OFF
    monkeypatch.setenv("LLMTRACE_SAMPLE_RATIO", "0.5")  # llmtrace's own setting wins
    assert "0.5" in make_sampler(load_config()).get_description()
    monkeypatch.delenv("LLMTRACE_SAMPLE_RATIO")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "xray")
    with pytest.raises(ConfigError, match="xray.*tracer_provider"):
        load_config()
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http/protobuf")
    cfg = load_config()
    assert (cfg.protocol, cfg.metrics_protocol) == ("grpc", "http/protobuf")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console,otlp")
    exporters = Telemetry(load_config())._span_exporters()
    assert sorted(type(e).__name__ for e in exporters) == ["ConsoleSpanExporter",
                                                          "OTLPSpanExporter"]
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert Telemetry(load_config())._span_exporters() == []
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ConfigError, match="zipkin"):
        load_config()


def test_otlp_exporter_follows_protocol_and_endpoint():
    from llmtrace.telemetry import _otlp_exporter

    http = _otlp_exporter(load_config(endpoint="http://c:4318/", protocol="http/protobuf"),
                          "metrics")
    assert type(http).__module__.startswith("opentelemetry.exporter.otlp.proto.http")
    assert http._endpoint == "http://c:4318/v1/metrics"
    grpc = _otlp_exporter(load_config(endpoint="http://c:4317", protocol="grpc"), "traces")
    assert type(grpc).__module__.startswith("opentelemetry.exporter.otlp.proto.grpc")


def test_every_setting_is_documented_in_the_readme():
    """Each environment variable the configuration reads has a row in the README."""
    import re
    from pathlib import Path

    from llmtrace import config

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    documented = set(re.findall(r"[A-Z][A-Z0-9_]{3,}", readme))
    for stem, alts, tail in re.findall(r"([A-Z_]+)\{([A-Z_,]+)\}([A-Z_]*)", readme):
        documented |= {f"{stem}{a}{tail}" for a in alts.split(",")}
    read = {n for names in config._ENV.values() for n in names}
    # and every LLMTRACE_* variable read anywhere else in the shipped package
    root = Path(llmtrace.__file__).parent
    for source in root.rglob("*.py"):
        read |= set(re.findall(r"environ(?:\.get)?[\[(]\s*\"(LLMTRACE_[A-Z_]+)\"",
                               source.read_text()))
    from llmtrace.collector import config as collector_config

    read |= set(collector_config._ENV.values())
    assert not read - documented, sorted(read - documented)
