"""The Collector configurations in collector/ are complete, consistent and keep their promises.

otelcol cannot be built on the development machines (no Go module proxy), so
besides review this is the only check the files get. It proves structure and
intent: every component a pipeline names is defined and is in the OCB
manifest at one coherent release; memory_limiter comes first and batch last;
the agent deletes exactly the attributes the semconv registry marks as
content; traces reach the gateways only by trace ID; the derive step sees
every span while Tempo gets the tail-sampled ones; the TTFT policy uses the
registry's names and works on doubles; the timing knobs agree with each
other; every ``${env:...}`` has a default and is documented. Go regexp
semantics (unanchored ``MatchString``) are modelled with ``re.search``; the
patterns use only syntax that RE2 and Python share.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import yaml

from llmtrace import semconv as sc

REPO = Path(__file__).resolve().parents[1]
COLLECTOR = REPO / "collector"
CONFIGS = ("otelcol-agent.yaml", "otelcol-gateway.yaml")
AGENT, GATEWAY = CONFIGS
BUILDER = COLLECTOR / "builder-config.yaml"
README = COLLECTOR / "README.md"

KINDS = ("receivers", "processors", "exporters", "connectors", "extensions")
CORE = "go.opentelemetry.io/collector"
CONTRIB = "github.com/open-telemetry/opentelemetry-collector-contrib"

# Component type as written in a config (the part before any "/name") -> Go module.
MODULES: dict[str, dict[str, str]] = {
    "receivers": {
        "otlp": f"{CORE}/receiver/otlpreceiver",
    },
    "processors": {
        "memory_limiter": f"{CORE}/processor/memorylimiterprocessor",
        "batch": f"{CORE}/processor/batchprocessor",
        "filter": f"{CONTRIB}/processor/filterprocessor",
        "attributes": f"{CONTRIB}/processor/attributesprocessor",
        "redaction": f"{CONTRIB}/processor/redactionprocessor",
        "transform": f"{CONTRIB}/processor/transformprocessor",
        "tail_sampling": f"{CONTRIB}/processor/tailsamplingprocessor",
    },
    "exporters": {
        "otlp": f"{CORE}/exporter/otlpexporter",
        "otlphttp": f"{CORE}/exporter/otlphttpexporter",
        "debug": f"{CORE}/exporter/debugexporter",
        "loadbalancing": f"{CONTRIB}/exporter/loadbalancingexporter",
        "prometheusremotewrite": f"{CONTRIB}/exporter/prometheusremotewriteexporter",
    },
    "connectors": {
        "forward": f"{CORE}/connector/forwardconnector",
        "routing": f"{CONTRIB}/connector/routingconnector",
    },
    "extensions": {
        "health_check": f"{CONTRIB}/extension/healthcheckextension",
        "pprof": f"{CONTRIB}/extension/pprofextension",
        "zpages": f"{CORE}/extension/zpagesextension",
    },
}

ENV_REF = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# Upper bound of the SDK-to-gateway delay: BatchSpanProcessor schedule delay
# (5 s default) plus the agent's batch timeout and the network.
EXPORT_DELAY_S = 6.0


# -- loading ---------------------------------------------------------------------


@functools.cache
def raw(name: str) -> str:
    return (COLLECTOR / name).read_text()


@functools.cache
def config(name: str) -> dict:
    doc = yaml.safe_load(raw(name))
    assert isinstance(doc, dict), f"{name}: top level is not a mapping"
    return doc


def resolve(value):
    """Replace ``${env:NAME:-default}`` by its default, recursively."""
    if isinstance(value, str):
        return ENV_REF.sub(lambda m: m.group(2) or "", value)
    if isinstance(value, dict):
        return {k: resolve(v) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v) for v in value]
    return value


def strings(value):
    """Every string key and value in a parsed YAML document."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


def ctype(component_id: str) -> str:
    return component_id.split("/", 1)[0]


def pipelines(name: str) -> dict[str, dict]:
    return config(name)["service"]["pipelines"]


def processors_of(name: str, pipeline: str) -> list[str]:
    return pipelines(name)[pipeline].get("processors") or []


@functools.cache
def builder() -> dict[str, dict[str, str]]:
    """Kind -> {Go module: version} from the OCB manifest."""
    doc = yaml.safe_load(BUILDER.read_text())
    out: dict[str, dict[str, str]] = {}
    for kind in (*KINDS, "providers"):
        mods: dict[str, str] = {}
        for entry in doc.get(kind) or []:
            module, version = entry["gomod"].split()
            assert module not in mods, f"builder-config.yaml lists {module} twice"
            mods[module] = version
        out[kind] = mods
    return out


@functools.cache
def registry_attributes() -> dict[str, dict]:
    """Every attribute the semconv registry defines or references -> its YAML entry."""
    attrs: dict[str, dict] = {}
    for f in sorted((REPO / "semconv" / "registry").glob("*.yaml")):
        for group in yaml.safe_load(f.read_text()).get("groups", []):
            if group.get("type") != "attribute_group":
                continue
            for a in group.get("attributes") or []:
                attrs[a.get("id") or a["ref"]] = a
    return attrs


def content_attributes() -> set[str]:
    """Attributes the registry marks as text content (recorded only on content-capture opt-in)."""
    return {name for name, a in registry_attributes().items()
            if "content capture" in str(a.get("brief", "")).lower()}


def ottl_string_args(condition: str, function: str) -> list[tuple[str, str]]:
    """(first argument, unescaped string literal) of each ``function(x, "...")`` call."""
    calls = re.finditer(rf'{function}\(\s*([^,]+?)\s*,\s*"((?:[^"\\]|\\.)*)"\s*\)', condition)
    return [(m.group(1), re.sub(r"\\(.)", r"\1", m.group(2))) for m in calls]


def go_duration_s(text: str) -> float:
    units = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", str(text))
    assert parts and "".join(n + u for n, u in parts) == str(text), f"not a Go duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def tail_sampling() -> dict:
    return resolve(config(GATEWAY)["processors"]["tail_sampling"])


def policies_by_type(kind: str) -> list[dict]:
    return [p for p in tail_sampling()["policies"] if p["type"] == kind]


def all_policies(policies: list[dict]):
    """Policies including those nested in and/composite/drop sub-policies."""
    for p in policies:
        yield p
        for value in p.values():
            if isinstance(value, dict):
                for key, sub in value.items():
                    if key.endswith("sub_policy"):
                        yield from all_policies(sub if isinstance(sub, list) else [sub])


# -- structure ---------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_every_component_a_pipeline_names_is_defined_and_every_defined_one_is_used(name):
    cfg = config(name)
    defined = {kind: set(cfg.get(kind) or {}) for kind in KINDS}
    used: dict[str, set[str]] = {kind: set() for kind in KINDS}
    assert pipelines(name), f"{name}: no pipelines"
    for pname, p in pipelines(name).items():
        assert ctype(pname) in {"traces", "metrics", "logs"}, f"{name}: pipeline {pname!r}"
        assert p.get("receivers") and p.get("exporters"), f"{name}: {pname} is not wired"
        for role, kind in (("receivers", "receivers"), ("processors", "processors"),
                           ("exporters", "exporters")):
            for cid in p.get(role) or []:
                if cid in defined["connectors"] and role != "processors":
                    used["connectors"].add(cid)
                    continue
                assert cid in defined[kind], f"{name}: {pname} names undefined {kind[:-1]} {cid!r}"
                used[kind].add(cid)
    for cid in cfg["service"].get("extensions") or []:
        assert cid in defined["extensions"], f"{name}: service uses undefined extension {cid!r}"
        used["extensions"].add(cid)
    for kind in KINDS:
        assert defined[kind] == used[kind], (
            f"{name}: {kind} defined but not used: {sorted(defined[kind] - used[kind])}")


def used_types() -> dict[str, set[str]]:
    types: dict[str, set[str]] = {kind: set() for kind in KINDS}
    for name in CONFIGS:
        for kind in KINDS:
            types[kind] |= {ctype(cid) for cid in config(name).get(kind) or {}}
    return types


def test_builder_manifest_lists_exactly_the_components_the_configs_use():
    for kind, types in used_types().items():
        unknown = types - MODULES[kind].keys()
        assert not unknown, f"map {kind} {sorted(unknown)} to their Go modules in MODULES"
        wanted = {MODULES[kind][t] for t in types}
        listed = set(builder()[kind])
        assert wanted <= listed, f"builder-config.yaml lacks {kind}: {sorted(wanted - listed)}"
        assert listed <= wanted, (
            f"builder-config.yaml lists unused {kind}: {sorted(listed - wanted)}")


def test_builder_versions_form_one_release_set():
    modules = {m: v for kind in KINDS for m, v in builder()[kind].items()}
    core = {v for m, v in modules.items() if m.startswith(CORE + "/")}
    contrib = {v for m, v in modules.items() if m.startswith(CONTRIB + "/")}
    providers = set(builder()["providers"].values())
    assert len(core) == 1, f"core components at several versions: {sorted(core)}"
    assert len(contrib) == 1, f"contrib components at several versions: {sorted(contrib)}"
    assert len(providers) == 1, f"confmap providers at several versions: {sorted(providers)}"
    (core_v,), (contrib_v,), (prov_v,) = core, contrib, providers
    core_minor = re.fullmatch(r"v0\.(\d+)\.\d+", core_v)
    contrib_minor = re.fullmatch(r"v0\.(\d+)\.\d+", contrib_v)
    assert core_minor and contrib_minor and core_minor[1] == contrib_minor[1], (
        f"core {core_v} and contrib {contrib_v} are not from the same release")
    assert int(core_minor[1]) >= 120, "pin otelcol v0.120 or newer"
    assert re.fullmatch(r"v1\.\d+\.\d+", prov_v), f"providers are stable v1 modules, not {prov_v}"
    assert f"{CORE}/confmap/provider/envprovider" in builder()["providers"], (
        "the configs use ${env:...}: the env provider must be built in")
    assert f"{CORE}/confmap/provider/fileprovider" in builder()["providers"]
    # The configs' headers and the README name the same versions as the manifest.
    for name in CONFIGS:
        assert f"core {core_v}, contrib {contrib_v}" in raw(name), (
            f"{name}: header does not name core {core_v}, contrib {contrib_v}")
    readme = README.read_text()
    for version in (core_v, contrib_v, prov_v):
        assert version in readme, f"collector/README.md does not mention {version}"


@pytest.mark.parametrize("name", CONFIGS)
def test_memory_limiter_is_first_and_batch_last_in_every_pipeline(name):
    for pname in pipelines(name):
        procs = [ctype(p) for p in processors_of(name, pname)]
        assert procs and procs[0] == "memory_limiter", f"{name}: {pname} starts with {procs[:1]}"
        assert procs[-1] == "batch" and procs.count("batch") == 1, (
            f"{name}: {pname} must end with one batch processor, has {procs}")
        assert procs.count("memory_limiter") == 1, f"{name}: {pname} {procs}"
    for cid, cfg in (config(name).get("processors") or {}).items():
        if ctype(cid) == "memory_limiter":
            assert go_duration_s(cfg["check_interval"]) > 0, "memory_limiter never checks"
            assert cfg.get("limit_mib") or cfg.get("limit_percentage"), "no memory limit"


# -- agent: content, noise, routing -----------------------------------------------


def deleted_by_agent(key: str) -> bool:
    """Whether any delete action of any attributes processor in the agent removes ``key``."""
    for cid, cfg in config(AGENT)["processors"].items():
        if ctype(cid) != "attributes":
            continue
        for action in cfg["actions"]:
            if action["action"] != "delete":
                continue
            if action.get("key") == key:
                return True
            if action.get("pattern") and re.search(action["pattern"], key):
                return True
    return False


def test_agent_deletes_every_attribute_the_registry_marks_as_content():
    content = content_attributes()
    # The marker must find the attributes llmtrace itself records on opt-in.
    assert {sc.GEN_AI_INPUT_MESSAGES, sc.GEN_AI_OUTPUT_MESSAGES} <= content
    extra = {"gen_ai.system_instructions", "gen_ai.prompt", "gen_ai.completion",
             "gen_ai.prompt.0.content", "gen_ai.completion.1.content",
             "llm.input_messages.0.message.content", "input.value", "output.value"}
    kept = sorted(k for k in content | extra if not deleted_by_agent(k))
    assert not kept, f"the agent forwards content attributes: {kept}"
    stripping = {cid for cid in config(AGENT)["processors"] if ctype(cid) == "attributes"}
    for pname in pipelines(AGENT):
        if ctype(pname) == "traces":
            assert stripping & set(processors_of(AGENT, pname)), (
                f"agent pipeline {pname} does not run the content-stripping processor")


def test_agent_keeps_every_other_registry_attribute():
    content = content_attributes()
    lost = sorted(k for k in registry_attributes() if k not in content and deleted_by_agent(k))
    assert not lost, f"the agent deletes non-content attributes the pipeline needs: {lost}"
    for must_keep in (sc.GEN_AI_USAGE_PROMPT_TOKENS, sc.GEN_AI_USAGE_INPUT_TOKENS,
                      sc.GEN_AI_USAGE_OUTPUT_TOKENS, sc.LLMTRACE_LATENCY_TIME_TO_FIRST_TOKEN):
        assert not deleted_by_agent(must_keep), must_keep


def spanevent_conditions() -> list[str]:
    out = []
    for cid, cfg in config(AGENT)["processors"].items():
        if ctype(cid) == "filter":
            out += (cfg.get("traces") or {}).get("spanevent") or []
    return out


def test_agent_drops_content_events_and_no_llmtrace_event():
    conds = spanevent_conditions()
    name_patterns = [p for c in conds for target, p in ottl_string_args(c, "IsMatch")
                     if target == "name"]
    assert name_patterns, "no span-event name filter"

    def dropped(event: str) -> bool:
        return any(re.search(p, event) for p in name_patterns)

    for event in ("gen_ai.client.inference.operation.details", "gen_ai.content.prompt",
                  "gen_ai.content.completion", "gen_ai.user.message", "gen_ai.choice"):
        assert dropped(event), event
    assert not [e for e in sc.EVENTS if dropped(e)], "the agent would drop llmtrace's own events"
    present = {m.group(1) for c in conds
               for m in re.finditer(r'attributes\["([^"]+)"\]\s*!=\s*nil', c)}
    missing = sorted(content_attributes() - present)
    assert not missing, f"events carrying {missing} are not dropped"


def test_agent_health_filter_drops_probe_and_scrape_spans_only():
    span_conds = []
    for cid, cfg in config(AGENT)["processors"].items():
        if ctype(cid) == "filter":
            span_conds += (cfg.get("traces") or {}).get("span") or []
    calls = [(target, p) for c in span_conds for target, p in ottl_string_args(c, "IsMatch")]
    path_patterns = [p for target, p in calls if target.startswith("attributes[")]
    name_patterns = [p for target, p in calls if target == "name"]
    assert path_patterns and name_patterns
    for path in ("/health", "/metrics", "/ping", "/readyz"):
        assert all(re.search(p, path) for p in path_patterns), path
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/metrics/extra",
                 "/v1/health"):
        assert not any(re.search(p, path) for p in path_patterns), path
    for span in ("GET /metrics", "GET /health http send", "HEAD /ping"):
        assert any(re.search(p, span) for p in name_patterns), span
    for span in (*sc.SPAN_KINDS, "POST /v1/chat/completions", "GET /metrics_archive"):
        assert not any(re.search(p, span) for p in name_patterns), span


def test_agent_sends_traces_only_by_trace_id_and_metrics_straight_to_prometheus():
    exporters = resolve(config(AGENT)["exporters"])
    for pname, p in pipelines(AGENT).items():
        kinds = {ctype(e) for e in p["exporters"]}
        if ctype(pname) == "traces":
            assert kinds == {"loadbalancing"}, f"traces leave the agent unsharded via {kinds}"
        else:
            assert "loadbalancing" not in kinds, f"{pname} must not be sharded by trace ID"
    lb = [cfg for cid, cfg in exporters.items() if ctype(cid) == "loadbalancing"]
    assert len(lb) == 1
    (lb,) = lb
    assert lb["routing_key"] == "traceID"
    assert "endpoint" not in lb["protocol"]["otlp"], "the resolver supplies the endpoints"
    dns = lb["resolver"]["dns"]
    assert dns["hostname"] and dns["port"] == 4317
    # The static-list alternative is documented next to it, commented out.
    block = raw(AGENT).split("resolver:", 1)[1].split("\n  prometheusremotewrite", 1)[0]
    assert re.search(r"#\s+static:\s*\n\s*#\s+hostnames:\s*\n(\s*#\s+- \S+:4317\s*\n){2,}", block)
    prw = [cfg for cid, cfg in exporters.items() if ctype(cid) == "prometheusremotewrite"]
    assert len(prw) == 1 and prw[0]["endpoint"].startswith("http")
    # Registry PROMETHEUS_NAMES assume the suffixing translation.
    assert prw[0].get("add_metric_suffixes", True) is True
    assert sc.PROMETHEUS_NAMES[sc.METRIC_GEN_AI_SERVER_TIME_TO_FIRST_TOKEN].endswith("_seconds")


# -- gateway: derive everything, sample for storage --------------------------------


def gateway_pipelines_exporting_to(endpoint: str) -> list[str]:
    exporters = resolve(config(GATEWAY)["exporters"])
    targets = {cid for cid, cfg in exporters.items() if cfg.get("endpoint") == endpoint}
    assert targets, f"no gateway exporter sends to {endpoint}"
    return [pname for pname, p in pipelines(GATEWAY).items() if targets & set(p["exporters"])]


def test_gateway_sends_all_spans_to_llmtrace_collector_and_sampled_ones_to_tempo():
    derive = gateway_pipelines_exporting_to("llmtrace-collector:4317")
    store = gateway_pipelines_exporting_to("tempo:4317")
    assert derive and store and not set(derive) & set(store)
    for pname in derive:
        procs = {ctype(p) for p in processors_of(GATEWAY, pname)}
        assert not procs & {"tail_sampling", "probabilistic_sampler", "filter"}, (
            f"{pname} drops spans before the derive step: {procs}")
    for pname in store:
        assert "tail_sampling" in processors_of(GATEWAY, pname), pname
    # Both branches are fed by the same receivers, so the derive step sees every span.
    receivers = {tuple(sorted(pipelines(GATEWAY)[p]["receivers"])) for p in derive + store}
    assert len(receivers) == 1, f"derive and sample branches read different inputs: {receivers}"
    exporters = resolve(config(GATEWAY)["exporters"])
    for cid, cfg in exporters.items():
        if cfg.get("endpoint") == "llmtrace-collector:4317":
            assert cfg.get("balancer_name") == "pick_first", (
                f"{cid}: round_robin would split one trace over several llmtrace collectors")


def test_slow_ttft_policy_reads_registry_ttft_attributes_as_doubles():
    comparisons = []
    for policy in all_policies(tail_sampling()["policies"]):
        if policy["type"] == "ottl_condition":
            for cond in policy["ottl_condition"].get("span") or []:
                comparisons += re.findall(r'attributes\["([^"]+)"\]\s*>\s*([0-9.]+)', cond)
    keys = {k for k, _ in comparisons}
    assert sc.LLMTRACE_LATENCY_TIME_TO_FIRST_TOKEN in keys
    assert sc.GEN_AI_LATENCY_TIME_TO_FIRST_TOKEN in keys, "vLLM's built-in llm_request span"
    thresholds = {float(v) for k, v in comparisons if "time_to_first_token" in k}
    assert len(thresholds) == 1 and 0 < thresholds.pop() <= 10, "TTFT threshold in seconds"
    unknown = keys - set(registry_attributes())
    assert not unknown, f"tail sampling reads attributes outside the registry: {unknown}"
    # numeric_attribute compares pcommon Value.Int(), which is 0 for a double attribute.
    doubles = {k for k, a in registry_attributes().items() if a.get("type") == "double"}
    assert registry_attributes()[sc.LLMTRACE_LATENCY_TIME_TO_FIRST_TOKEN]["type"] == "double"
    for policy in all_policies(tail_sampling()["policies"]):
        if policy["type"] == "numeric_attribute":
            assert policy["numeric_attribute"]["key"] not in doubles, (
                f"{policy['name']}: numeric_attribute never matches a double attribute")


def test_tail_sampling_keeps_errors_long_requests_and_a_baseline():
    (errors,) = policies_by_type("status_code")
    assert errors["status_code"]["status_codes"] == ["ERROR"]
    (latency,) = policies_by_type("latency")
    assert latency["latency"]["threshold_ms"] > 0
    (baseline,) = policies_by_type("probabilistic")
    assert 0 < baseline["probabilistic"]["sampling_percentage"] < 100
    assert not policies_by_type("always_sample"), "always_sample would make the rest pointless"
    names = [p["name"] for p in tail_sampling()["policies"]]
    assert len(names) == len(set(names)), f"duplicate policy names: {names}"


def test_tail_sampling_timings_fit_llm_request_lengths():
    ts = tail_sampling()
    wait = go_duration_s(ts["decision_wait"])
    (latency,) = policies_by_type("latency")
    long_e2e = latency["latency"]["threshold_ms"] / 1000
    ttft = max(float(v) for p in policies_by_type("ottl_condition")
               for c in p["ottl_condition"].get("span") or []
               for v in re.findall(r"time_to_first_token\"\]\s*>\s*([0-9.]+)", c))
    assert ttft < long_e2e, "a slow-TTFT request must be judged before it counts as long"
    # A request still running at decision time has decode-chunk spans covering
    # about (decision_wait - export delay): that must already exceed the
    # long-e2e threshold, or long requests would be judged on partial data.
    assert long_e2e + EXPORT_DELAY_S < wait, (
        f"long-e2e {long_e2e}s + export delay {EXPORT_DELAY_S}s must be < decision_wait {wait}s")
    assert ts["num_traces"] >= ts["expected_new_traces_per_sec"] * wait, (
        "num_traces below traces in flight: traces would be evicted before their decision")
    cache = ts["decision_cache"]
    assert cache["sampled_cache_size"] >= ts["num_traces"]
    assert cache["non_sampled_cache_size"] >= ts["num_traces"]


# -- environment --------------------------------------------------------------------


def test_every_env_reference_has_a_default_and_is_documented():
    readme = README.read_text()
    seen = set()
    for name in CONFIGS:
        # The Collector expands references in values only (comments are gone by then).
        text = "\n".join(strings(config(name)))
        bare = re.findall(r"\$\{(?!env:)[^}]*\}|\$[A-Za-z_]\w*", text)
        assert not bare, f"{name}: use the explicit ${{env:NAME:-default}} form, not {bare}"
        header = raw(name).split("\nextensions:", 1)[0]
        for m in ENV_REF.finditer(text):
            var, default = m.group(1), m.group(2)
            seen.add(var)
            assert default or f"`{var}`" in readme, (
                f"{name}: ${{env:{var}}} has neither a default nor documentation")
            assert f"`{var}`" in readme, f"{name}: {var} is not in collector/README.md"
            assert var in header, f"{name}: the header comment does not list {var}"
    assert seen, "the configs take their endpoints from the environment"
