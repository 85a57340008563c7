"""The Kubernetes reference deployment renders, validates and says what the repository says.

examples/deployment/kubernetes/ is Kustomize: every overlay (and the base) is
rendered with the real renderer (``kubectl kustomize``, or a standalone
``kustomize``), and every object is validated as an API server would: built-in
kinds against the Kubernetes JSON schemas of kubernetes-validate, strictly (no
unknown fields), for an older and a recent Kubernetes; custom resources
(OpenTelemetryCollector, PodMonitor, ServiceMonitor, PrometheusRule) against the
CRD schemas vendored in crds/, made as strict. Beyond schemas, the tests prove
that what the manifests copy or restate from the repository is the same thing:
the generated files are fresh, the PrometheusRules are the rule files, the
provisioned dashboards are the committed JSON, the ConfigMaps hold their source
files verbatim, the scrape relabelings are scrape-vllm.yml's, the plain
Prometheus configuration passes ``promtool check config``, every llmtrace setting
a pod sets exists, and every name one object uses for another resolves.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

from llmtrace import config as sdk_config
from llmtrace.collector import config as collector_config

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "examples/deployment/kubernetes"
IMAGES = REPO / "examples/deployment/images"
CRDS = DEPLOY / "crds"

#: an older and a recent Kubernetes minor; kubernetes-validate ships both schemas
K8S_VERSIONS = ("1.30", "1.35")
#: what gets rendered: the base and every overlay
TARGETS = ("base", *sorted(f"overlays/{p.parent.name}"
                           for p in (DEPLOY / "overlays").glob("*/kustomization.yaml")))
OVERLAYS = tuple(t.removeprefix("overlays/") for t in TARGETS if t != "base")
#: API groups of the custom resources (validated against crds/)
CR_GROUPS = {"opentelemetry.io", "monitoring.coreos.com"}


def _load_generator():
    spec = importlib.util.spec_from_file_location("k8s_generate", DEPLOY / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


# -- rendering --------------------------------------------------------------------------

@functools.cache
def _renderer() -> tuple[str, ...]:
    if path := shutil.which("kustomize"):
        return (path, "build")
    if path := shutil.which("kubectl"):
        return (path, "kustomize")
    # no Debian package carries a kustomize v5 (Debian's kubernetes-client is too old), so
    # a machine without one skips the rendered checks, saying why; the generated files'
    # freshness and the unrendered checks still run
    pytest.skip("neither kustomize nor kubectl (>= 1.27, bundles kustomize v5) is installed: "
                "the overlays cannot be rendered here")


@functools.cache
def render(target: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run([*_renderer(), str(DEPLOY / target)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, f"{target} does not render:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def objects(target: str, kind: str | None = None) -> list[dict[str, Any]]:
    return [d for d in render(target) if kind is None or d["kind"] == kind]


def one(target: str, kind: str, name: str) -> dict[str, Any]:
    found = [d for d in render(target) if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{target}: {len(found)} {kind}/{name}"
    return found[0]


def pod_templates(target: str) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, pod template) for every Deployment, StatefulSet and DaemonSet."""
    for d in render(target):
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
            yield d, d["spec"]["template"]


def vllm_deployments(target: str) -> list[dict[str, Any]]:
    return [d for d, t in pod_templates(target)
            if t["metadata"]["labels"].get("app.kubernetes.io/name") == "vllm"]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]["containers"][0]


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# -- schema validation ------------------------------------------------------------------

@functools.cache
def _k8s_schema_dir(version: str) -> Path:
    import kubernetes_validate

    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    path = root / f"v{version}.0-local-strict"
    assert path.is_dir(), f"kubernetes-validate has no schemas for {version}: upgrade it"
    return path


@functools.cache
def _k8s_registry(version: str) -> Registry:
    defs = json.loads((_k8s_schema_dir(version) / "_definitions.json").read_text())
    return Resource.from_contents(defs) @ Registry()


@functools.cache
def _k8s_validator(version: str, kind: str, api_version: str) -> jsonschema.Validator:
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    path = _k8s_schema_dir(version) / f"{kind.lower()}-{group_version}.json"
    assert path.is_file(), f"no Kubernetes {version} schema for {kind} {api_version}"
    schema = json.loads(path.read_text())
    return jsonschema.Draft202012Validator(schema, registry=_k8s_registry(version))


def _strict(schema: Any) -> Any:
    """A CRD schema that rejects unknown fields, as strict field validation does."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def _cr_validator(api_version: str, kind: str) -> jsonschema.Validator:
    group, version = api_version.split("/")
    matches_ = [p for p in CRDS.glob(f"{group}_*_{version}.json")
                if json.loads(p.read_text())["$comment"].startswith(f"openAPIV3Schema of {kind} ")]
    assert len(matches_) == 1, f"no vendored CRD schema for {kind} {api_version} in crds/"
    schema = _strict(json.loads(matches_[0].read_text()))
    schema.pop("$comment")
    return jsonschema.Draft202012Validator(schema)


@functools.cache
def _object_meta_validator() -> jsonschema.Validator:
    ref = {"$ref": "https://kubernetes.io/api/_definitions.json#/$defs/"
                   "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
    return jsonschema.Draft202012Validator(ref, registry=_k8s_registry(K8S_VERSIONS[-1]))


def schema_errors(doc: dict[str, Any]) -> list[str]:
    where = f"{doc['kind']}/{doc['metadata'].get('name')}"
    errors = []
    if doc["apiVersion"].split("/")[0] in CR_GROUPS:
        validators = [("CRD", _cr_validator(doc["apiVersion"], doc["kind"]), doc),
                      ("ObjectMeta", _object_meta_validator(), doc["metadata"])]
    else:
        validators = [(f"Kubernetes {v}", _k8s_validator(v, doc["kind"], doc["apiVersion"]), doc)
                      for v in K8S_VERSIONS]
    for what, validator, instance in validators:
        for error in validator.iter_errors(instance):
            path = ".".join(str(p) for p in error.absolute_path)
            errors.append(f"{where} ({what}) {path}: {error.message[:300]}")
    return errors


# -- the tests ---------------------------------------------------------------------------

def test_generated_files_are_fresh():
    assert gen.stale(DEPLOY, gen.build_all()) == [], (
        "run python examples/deployment/kubernetes/generate.py --write")


@pytest.mark.parametrize("target", TARGETS)
def test_rendered_manifests_validate_against_their_schemas(target):
    docs = render(target)
    assert docs
    errors = [e for d in docs for e in schema_errors(d)]
    assert not errors, "\n".join(errors)


def test_every_custom_resource_kind_has_a_vendored_schema():
    kinds = {(d["apiVersion"], d["kind"]) for t in TARGETS for d in render(t)
             if d["apiVersion"].split("/")[0] in CR_GROUPS}
    assert kinds == {("opentelemetry.io/v1beta1", "OpenTelemetryCollector"),
                     ("monitoring.coreos.com/v1", "PodMonitor"),
                     ("monitoring.coreos.com/v1", "ServiceMonitor"),
                     ("monitoring.coreos.com/v1", "PrometheusRule")}
    for api_version, kind in kinds:
        _cr_validator(api_version, kind)


def test_crd_validation_rejects_unknown_and_mistyped_fields():
    rule = copy.deepcopy(one("base", "PrometheusRule", "llmtrace-slo-ttft"))
    rule["spec"]["groups"][0]["rules"][0]["recrod"] = "typo"
    assert schema_errors(rule)
    monitor = copy.deepcopy(one("base", "PodMonitor", "vllm"))
    monitor["spec"]["podMetricsEndpoints"][0]["interval"] = 15
    assert schema_errors(monitor)
    deployment = copy.deepcopy(vllm_deployments("base")[0])
    container(deployment)["envv"] = []
    assert schema_errors(deployment)


def test_prometheus_rules_are_the_repository_rule_files():
    globs = ("dashboards/slo/rules/*.yml", "dashboards/prometheus/*.rules.yml")
    sources = {str(p.relative_to(REPO)) for g in globs for p in REPO.glob(g)}
    assert set(gen.RULE_FILES) == sources, "a rule file is missing from generate.RULE_FILES"
    rendered = {d["metadata"]["name"]: d for d in objects("base", "PrometheusRule")}
    assert set(rendered) == set(gen.RULE_FILES.values())
    for path, name in gen.RULE_FILES.items():
        assert rendered[name]["spec"] == yaml.safe_load((REPO / path).read_text()), path


def test_provisioned_dashboards_are_the_committed_files():
    committed = {p.name: p.read_text() for p in (REPO / "dashboards").glob("llmtrace-*.json")}
    maps = [d for d in objects("base", "ConfigMap")
            if d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    provisioned = {k: v for d in maps for k, v in d["data"].items()}
    assert provisioned == committed
    grafana = one("base", "Deployment", "grafana")
    volumes = {v["name"]: v for v in grafana["spec"]["template"]["spec"]["volumes"]}
    projected = {s["configMap"]["name"] for s in volumes["dashboards"]["projected"]["sources"]}
    assert projected == {d["metadata"]["name"] for d in maps}
    mounts = {m["name"]: m["mountPath"] for m in container(grafana)["volumeMounts"]}
    providers = yaml.safe_load(one("base", "ConfigMap", "grafana-dashboard-providers")
                               ["data"]["llmtrace.yaml"])
    assert [p["options"]["path"] for p in providers["providers"]] == [mounts["dashboards"]]


@pytest.mark.parametrize("target", TARGETS)
def test_every_object_fits_client_side_apply(target):
    """`kubectl apply` (client-side) stores each object in a 256 KiB annotation."""
    for d in render(target):
        size = len(json.dumps(d, separators=(",", ":")))
        assert size < 262144 - 4096, f"{d['kind']}/{d['metadata']['name']}: {size} bytes"


def test_grafana_has_the_prometheus_and_tempo_data_sources():
    text = one("base", "ConfigMap", "grafana-datasources")["data"]["datasources.yaml"]
    sources = {s["type"]: s for s in yaml.safe_load(text)["datasources"]}
    assert set(sources) == {"prometheus", "tempo"}
    assert sources["prometheus"]["url"] == "http://prometheus:9090"
    assert sources["tempo"]["url"] == "http://tempo:3200"
    exemplars = sources["prometheus"]["jsonData"]["exemplarTraceIdDestinations"]
    assert exemplars == [{"name": "trace_id", "datasourceUid": sources["tempo"]["uid"]}]
    services = {d["metadata"]["name"]: d for d in objects("base", "Service")}
    assert {"prometheus", "tempo"} <= set(services)
    tempo = yaml.safe_load(one("base", "ConfigMap", "tempo-config")["data"]["tempo.yaml"])
    assert tempo["server"]["http_listen_port"] == 3200
    receivers = tempo["distributor"]["receivers"]["otlp"]["protocols"]
    assert receivers["grpc"]["endpoint"] == "0.0.0.0:4317"


def test_config_maps_hold_their_sources_verbatim():
    cfg = DEPLOY / "config"
    expected = {
        ("llmtrace-prices", "prices.yaml"): REPO / "examples/prices.yaml",
        ("llmtrace-agent-config", "otelcol-agent.yaml"): REPO / "collector/otelcol-agent.yaml",
        ("llmtrace-gateway-config", "otelcol-gateway.yaml"):
            REPO / "collector/otelcol-gateway.yaml",
        ("llmtrace-gateway-config", "otelcol-gateway-kubernetes.yaml"):
            cfg / "otelcol-gateway-kubernetes.yaml",
        ("llmtrace-collector-config", "llmtrace-collector.yaml"): cfg / "llmtrace-collector.yaml",
        ("tempo-config", "tempo.yaml"): cfg / "tempo.yaml",
        ("grafana-datasources", "datasources.yaml"): cfg / "grafana-datasources.yaml",
        ("grafana-dashboard-providers", "llmtrace.yaml"): cfg / "grafana-dashboard-providers.yaml",
    }
    for (name, key), path in expected.items():
        assert one("base", "ConfigMap", name)["data"][key] == path.read_text(), (name, key)
    adapter = one("overlays/autoscaling", "ConfigMap", "adapter-config")
    assert adapter["data"]["config.yaml"] == (cfg / "prometheus-adapter.yaml").read_text()


def test_llmtrace_collector_config_is_valid_and_matches_its_pods(monkeypatch):
    for var in collector_config._ENV.values():
        monkeypatch.delenv(var, raising=False)
    config = collector_config.load_collector_config(DEPLOY / "config/llmtrace-collector.yaml")
    assert config.forward_endpoint is None, "the gateways, not the collector, feed Tempo"
    collector = one("base", "StatefulSet", "llmtrace-collector")
    ports = {p["name"]: p["containerPort"] for p in container(collector)["ports"]}
    endpoints = {"otlp-grpc": config.grpc_endpoint, "otlp-http": config.http_endpoint,
                 "admin": config.admin_endpoint}
    assert {k: int(v.rsplit(":", 1)[1]) for k, v in endpoints.items()} == ports
    mounts = {m["name"]: m["mountPath"] for m in container(collector)["volumeMounts"]}
    assert str(config.prices).startswith(mounts["prices"] + "/")
    assert f"--config={mounts['config']}/llmtrace-collector.yaml" in container(collector)["args"]
    headless = one("base", "Service", "llmtrace-collector-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert collector["spec"]["serviceName"] == "llmtrace-collector-headless"
    probe = container(collector)["readinessProbe"]["httpGet"]
    assert (probe["path"], probe["port"]) == ("/healthz", "admin")


def _builder_modules() -> set[str]:
    builder = yaml.safe_load((REPO / "collector/builder-config.yaml").read_text())
    return {m["gomod"].split()[0].rsplit("/", 1)[1]
            for kind in ("receivers", "processors", "exporters", "extensions")
            for m in builder.get(kind, [])}


def _used_components(config: dict[str, Any]) -> set[str]:
    """Go module basenames of every component the config uses."""
    out = {f"{e.split('/')[0].replace('_', '')}extension" for e in config["service"]["extensions"]}
    for pipeline in config["service"]["pipelines"].values():
        for kind in ("receivers", "processors", "exporters"):
            out |= {f"{c.split('/')[0].replace('_', '')}{kind[:-1]}" for c in pipeline[kind]}
    return out


def test_gateways_shard_the_derive_step_by_trace_id_over_the_collectors():
    merged = gen.gateway_config(REPO)
    derive = merged["service"]["pipelines"]["traces/derive"]["exporters"]
    assert derive == ["loadbalancing/llmtrace"]
    lb = merged["exporters"]["loadbalancing/llmtrace"]
    assert lb["routing_key"] == "traceID"
    service = re.fullmatch(r"\$\{env:(\w+):-([\w.-]+)\}", lb["resolver"]["k8s"]["service"])
    assert service, "the collector Service comes from an env var with a default"
    assert service[2] == f"llmtrace-collector-headless.{gen.NAMESPACE}"
    assert lb["resolver"]["k8s"]["ports"] == [4317]
    gateway = one("base", "StatefulSet", "llmtrace-gateway")
    env = env_of(container(gateway))
    assert env[service[1]]["value"] == "llmtrace-collector-headless.$(POD_NAMESPACE)"
    assert _used_components(merged) <= _builder_modules()
    # the Operator's resources run exactly the same Collector configurations
    crs = {d["metadata"]["name"]: d for d in objects("overlays/otel-operator",
                                                     "OpenTelemetryCollector")}
    assert crs["llmtrace-gateway"]["spec"]["config"] == merged
    assert crs["llmtrace-agent"]["spec"]["config"] == yaml.safe_load(
        (REPO / "collector/otelcol-agent.yaml").read_text())
    assert crs["llmtrace-gateway"]["spec"]["mode"] == "statefulset"
    assert crs["llmtrace-agent"]["spec"]["mode"] == "daemonset"
    # the plain gateway's args name both files of its ConfigMap, in merge order
    files = ("otelcol-gateway.yaml", "otelcol-gateway-kubernetes.yaml")
    assert container(gateway)["args"] == [f"--config=/conf/{f}" for f in files]
    assert set(one("base", "ConfigMap", "llmtrace-gateway-config")["data"]) == set(files)


def test_otel_operator_overlay_replaces_the_plain_tiers():
    rendered = render("overlays/otel-operator")
    kinds = {(d["kind"], d["metadata"]["name"]) for d in rendered}
    assert ("DaemonSet", "llmtrace-agent") not in kinds
    assert ("StatefulSet", "llmtrace-gateway") not in kinds
    crs = {d["metadata"]["name"]: d for d in objects("overlays/otel-operator",
                                                     "OpenTelemetryCollector")}
    agent_env = env_of(crs["llmtrace-agent"]["spec"])
    # the Operator names the gateways' headless Service <name>-collector-headless
    assert agent_env["LLMTRACE_GATEWAY_HEADLESS_SERVICE"]["value"] == \
        "llmtrace-gateway-collector-headless"
    assert crs["llmtrace-gateway"]["spec"]["serviceAccount"] in {
        d["metadata"]["name"] for d in objects("overlays/otel-operator", "ServiceAccount")}
    agent_svc = one("overlays/otel-operator", "Service", "llmtrace-agent")
    # the Operator's selector labels for an OpenTelemetryCollector's pods
    namespace = crs["llmtrace-agent"]["metadata"]["namespace"]
    assert agent_svc["spec"]["selector"] == {
        "app.kubernetes.io/component": "opentelemetry-collector",
        "app.kubernetes.io/instance": f"{namespace}.llmtrace-agent"}


def _known_llmtrace_settings() -> set[str]:
    return {name for names in sdk_config._ENV.values() for name in names}


def _pod_environment(workload: dict[str, Any]) -> dict[str, str]:
    """The vLLM container's environment as the kubelet would set it: downward-API
    labels resolved, $(VAR) expanded, optional secrets absent."""
    template = workload["spec"]["template"]
    out: dict[str, str] = {}
    for e in container(workload)["env"]:
        if "value" in e:
            out[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: out.get(m[1], m[0]), e["value"])
            continue
        field = e["valueFrom"].get("fieldRef", {}).get("fieldPath", "")
        if label := re.fullmatch(r"metadata\.labels\['([^']+)'\]", field):
            out[e["name"]] = template["metadata"]["labels"][label[1]]
        elif field:
            out[e["name"]] = {"metadata.name": "vllm-0", "metadata.namespace": "llmtrace",
                              "spec.nodeName": "gpu-node-0", "status.podIP": "10.0.0.7"}[field]
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_llmtrace_reads_the_pod_environment_as_intended(overlay, monkeypatch):
    """llmtrace's own configuration loader, strict, on each vLLM pod's environment."""
    for d in vllm_deployments(f"overlays/{overlay}"):
        env = _pod_environment(d)
        for name in _known_llmtrace_settings() | set(env):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        config = sdk_config.load_config()
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert config.enabled
        assert config.endpoint == "http://llmtrace-agent:4317"
        assert config.deployment_version == labels["app.kubernetes.io/version"]
        assert config.metric_exporters == {"prometheus"}
        assert config.prometheus_port == 9464
        assert config.sample_ratio == 1.0
        assert config.service_name == "vllm"
        assert "service.instance.id=vllm-0" in env["OTEL_RESOURCE_ATTRIBUTES"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_vllm_pods_switch_llmtrace_on_by_environment_only(overlay):
    target = f"overlays/{overlay}"
    services = {d["metadata"]["name"]: d for d in objects(target, "Service")}
    deployments = vllm_deployments(target)
    assert deployments
    for d in deployments:
        c = container(d)
        env = env_of(c)
        assert env["LLMTRACE_ENABLED"]["value"] == "1"
        assert env["LLMTRACE_OTLP_ENDPOINT"]["value"] == "http://llmtrace-agent:4317"
        agent = services["llmtrace-agent"]["spec"]
        assert agent["internalTrafficPolicy"] == "Local", "the agent must be node-local"
        assert 4317 in {p["port"] for p in agent["ports"]}
        version = env["LLMTRACE_DEPLOYMENT_VERSION"]["valueFrom"]["fieldRef"]["fieldPath"]
        label = re.fullmatch(r"metadata\.labels\['([^']+)'\]", version)[1]
        assert label in d["spec"]["template"]["metadata"]["labels"]
        assert label not in d["spec"]["selector"]["matchLabels"], "versions change; selectors can't"
        assert env["LLMTRACE_METRICS_EXPORTER"]["value"] == "prometheus"
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["http"] == 8000 and "--port=8000" in c["args"]
        assert ports["engine-metrics"] == int(env["OTEL_EXPORTER_PROMETHEUS_PORT"]["value"])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
        gpus = {c["resources"][k]["nvidia.com/gpu"] for k in ("requests", "limits")}
        assert len(gpus) == 1
        unknown = {n for n in env if n.startswith("LLMTRACE_")} - _known_llmtrace_settings()
        assert not unknown, f"not llmtrace settings: {unknown}"
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert env["LLMTRACE_PRICES"]["value"] == mounts["prices"] + "/prices.yaml"
        prices = yaml.safe_load(one(target, "ConfigMap", "llmtrace-prices")["data"]["prices.yaml"])
        assert env["LLMTRACE_INSTANCE_TYPE"]["value"] in prices["instances"]


def router_args(target: str):
    """The router Deployment's arguments as vllm-router's own parser reads them."""
    from vllm_router.launch_router import parse_router_args

    router = one(target, "Deployment", "vllm-router")
    namespace = router["metadata"]["namespace"]
    args = parse_router_args([a.replace("$(POD_NAMESPACE)", namespace)
                              for a in container(router)["args"]])
    args._validate_router_args()
    return args


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_router_discovers_the_vllm_pods(overlay):
    target = f"overlays/{overlay}"
    router = one(target, "Deployment", "vllm-router")
    args = router_args(target)
    assert args.service_discovery and args.service_discovery_port == 8000
    assert args.service_discovery_namespace == router["metadata"]["namespace"]
    pods = [d["spec"]["template"]["metadata"]["labels"] for d in vllm_deployments(target)]
    if args.vllm_pd_disaggregation:
        assert any(matches(args.prefill_selector, p) for p in pods)
        assert any(matches(args.decode_selector, p) for p in pods)
    else:
        assert args.selector and all(matches(args.selector, p) for p in pods)
    ports = {p["name"]: p["containerPort"] for p in container(router)["ports"]}
    assert (args.host, args.port) == ("0.0.0.0", ports["http"])
    assert (args.prometheus_host, args.prometheus_port) == ("0.0.0.0", ports["metrics"])
    role = one(target, "Role", "vllm-router")
    assert {"pods"} <= {r for rule in role["rules"] for r in rule["resources"]}


def test_pd_overlay_pairs_a_nixl_producer_with_a_consumer_behind_the_router():
    deployments = {d["metadata"]["name"]: d for d in vllm_deployments("overlays/pd")}
    assert set(deployments) == {"vllm-prefill", "vllm-decode"}
    roles = {}
    for name, d in deployments.items():
        args = container(d)["args"]
        (transfer,) = [a for a in args if a.startswith("--kv-transfer-config=")]
        config = json.loads(transfer.split("=", 1)[1])
        assert config["kv_connector"] == "NixlConnector"
        roles[name] = config["kv_role"]
        env = env_of(container(d))
        assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"]["value"] == "$(POD_IP)"
        assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        ports = {p["name"]: p["containerPort"] for p in container(d)["ports"]}
        assert ports["nixl"] == int(env["VLLM_NIXL_SIDE_CHANNEL_PORT"]["value"])
    assert roles == {"vllm-prefill": "kv_producer", "vllm-decode": "kv_consumer"}
    args = router_args("overlays/pd")
    assert args.vllm_pd_disaggregation and args.kv_connector == "nixl"
    labels = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in deployments.items()}
    for selector, name in ((args.prefill_selector, "vllm-prefill"),
                           (args.decode_selector, "vllm-decode")):
        assert [n for n, lab in labels.items() if matches(selector, lab)] == [name]


def test_dp_overlay_gives_each_rank_a_gpu():
    (d,) = vllm_deployments("overlays/dp")
    (size,) = [a.split("=")[1] for a in container(d)["args"]
               if a.startswith("--data-parallel-size=")]
    resources = container(d)["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == size


def test_canary_overlay_labels_two_versions_and_wires_the_rollout_analysis():
    deployments = {d["metadata"]["name"]: d for d in vllm_deployments("overlays/canary")}
    assert set(deployments) == {"vllm-stable", "vllm-canary"}
    versions = {n: d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/version"]
                for n, d in deployments.items()}
    assert versions == {"vllm-stable": "stable", "vllm-canary": "canary"}
    stable, canary = deployments["vllm-stable"], deployments["vllm-canary"]
    for a, b in ((stable, canary), (canary, stable)):
        assert not matches(a["spec"]["selector"]["matchLabels"],
                           b["spec"]["template"]["metadata"]["labels"]), "selectors overlap"
    assert stable["spec"]["replicas"] > canary["spec"]["replicas"] >= 1
    # the router round-robins over both: the split is the replica ratio
    selector = router_args("overlays/canary").selector
    assert all(matches(selector, d["spec"]["template"]["metadata"]["labels"])
               for d in deployments.values())
    # the AnalysisTemplate it points at exists and takes these versions
    text = (DEPLOY / "overlays/canary/kustomization.yaml").read_text()
    assert "examples/rollouts/argo-analysistemplate.yaml" in text
    assert "../../../../rollouts/argo-analysistemplate.yaml" in text
    assert (DEPLOY / "overlays/canary/../../../../rollouts/argo-analysistemplate.yaml").is_file()
    templates = {d["metadata"]["name"]: d for d in yaml.safe_load_all(
        (REPO / "examples/rollouts/argo-analysistemplate.yaml").read_text()) if d}
    args = {a["name"] for a in templates["llmtrace-canary"]["spec"]["args"]}
    assert {"model", "stable-version", "canary-version", "prometheus-address"} <= args
    assert "--served-model-name=qwen3-8b" in container(stable)["args"]
    assert "model=qwen3-8b, stable-version=stable, canary-version=canary" in text


def _camel(rule: dict[str, Any]) -> dict[str, Any]:
    """A Prometheus relabel config in the Prometheus Operator's spelling."""
    return {re.sub(r"_(\w)", lambda m: m[1].upper(), k): v for k, v in rule.items()}


def test_monitors_scrape_the_jobs_of_scrape_vllm_yml():
    scrape = {j["job_name"]: j for j in yaml.safe_load(
        (REPO / "dashboards/prometheus/scrape-vllm.yml").read_text())["scrape_configs"]}
    endpoints = {}
    for kind, key in (("PodMonitor", "podMetricsEndpoints"), ("ServiceMonitor", "endpoints")):
        for monitor in objects("base", kind):
            for e in monitor["spec"][key]:
                (job,) = [r["replacement"] for r in e["relabelings"]
                          if r.get("targetLabel") == "job"]
                endpoints[job] = (kind, monitor, e)
    assert set(scrape) <= set(endpoints), "every scrape-vllm.yml job has a monitor"
    for job, config in scrape.items():
        kind, monitor, e = endpoints[job]
        assert e.get("path", "/metrics") == config.get("metrics_path", "/metrics")
        assert e.get("metricRelabelings", []) == [_camel(r) for r in
                                                  config.get("metric_relabel_configs", [])], job
        # the port the endpoint names exists on what the monitor selects
        selector = monitor["spec"]["selector"]["matchLabels"]
        name, port = gen.SCRAPE_TARGETS[job]
        if kind == "PodMonitor":
            pods = [t for _, t in pod_templates("base")
                    if matches(selector, t["metadata"]["labels"])]
            assert pods and all(e["port"] in {p["name"] for c in t["spec"]["containers"]
                                              for p in c["ports"]} for t in pods), job
        else:
            services = [s for s in objects("base", "Service")
                        if matches(selector, s["metadata"].get("labels", {}))]
            assert services and all(e["port"] in {p["name"] for p in s["spec"]["ports"]}
                                    for s in services), job
        assert e["port"] == port
        assert {"sourceLabels": ["__meta_kubernetes_pod_name"], "targetLabel": "instance"} in \
            e["relabelings"]


def test_plain_prometheus_config_passes_promtool(tmp_path, promtool):
    target = "overlays/prometheus-plain"
    assert not [d for d in render(target) if d["apiVersion"].startswith("monitoring.coreos.com/")]
    service = one(target, "Service", "prometheus")
    assert service["spec"]["type"] == "ClusterIP" and "externalName" not in service["spec"]
    config_text = one(target, "ConfigMap", "prometheus-config")["data"]["prometheus.yml"]
    rules = one(target, "ConfigMap", "prometheus-rules")["data"]
    assert rules == {Path(p).name: (REPO / p).read_text() for p in gen.RULE_FILES}
    config = yaml.safe_load(config_text)
    assert config["rule_files"] == [f"{gen.PROMETHEUS_RULES_DIR}/*.yml"]
    prometheus = one(target, "Deployment", "prometheus")
    mounts = {m["name"]: m["mountPath"] for m in container(prometheus)["volumeMounts"]}
    assert mounts["rules"] == gen.PROMETHEUS_RULES_DIR
    assert "--web.enable-remote-write-receiver" in container(prometheus)["args"]
    scrape = {j["job_name"]: j for j in yaml.safe_load(
        (REPO / "dashboards/prometheus/scrape-vllm.yml").read_text())["scrape_configs"]}
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    for name, job in scrape.items():
        assert jobs[name].get("metric_relabel_configs") == job.get("metric_relabel_configs")
    (tmp_path / "rules").mkdir()
    for name, text in rules.items():
        (tmp_path / "rules" / name).write_text(text)
    config["rule_files"] = [str(tmp_path / "rules" / "*.yml")]
    out = _promtool_check_config(promtool, config, tmp_path / "prometheus.yml")
    if "field kubernetes_sd_configs not found" in out.stdout + out.stderr:
        # Debian's promtool (2.42+ds) is built without Kubernetes service discovery.
        # Check what it can (every relabeling, the rule files, the rest of the config)
        # with the discovery swapped for a static target, and the discovery itself here:
        # one pod role in this namespace, relabeled only from that role's meta labels.
        for job in config["scrape_configs"]:
            assert job["kubernetes_sd_configs"] == [
                {"role": "pod", "namespaces": {"names": [gen.NAMESPACE]}}], job["job_name"]
            for rule in job["relabel_configs"]:
                for label in rule.get("source_labels", []):
                    assert re.fullmatch(r"__meta_kubernetes_(namespace|pod_(name|phase|"
                                        r"container_port_name|label_[a-z0-9_]+))", label), label
            job["static_configs"] = [{"targets": ["pod.example:9090"]}]
            del job["kubernetes_sd_configs"]
        out = _promtool_check_config(promtool, config, tmp_path / "prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(rules)} rule files found" in out.stdout + out.stderr


def _promtool_check_config(promtool: str, config: dict[str, Any],
                           path: Path) -> subprocess.CompletedProcess:
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([promtool, "check", "config", "--lint=none", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_hpa_scales_on_metrics_the_adapter_serves():
    hpa = one("overlays/autoscaling", "HorizontalPodAutoscaler", "vllm")
    adapter = yaml.safe_load(one("overlays/autoscaling", "ConfigMap", "adapter-config")
                             ["data"]["config.yaml"])
    served = {r["name"]["as"]: re.match(r"[\w:]+", r["seriesQuery"])[0] for r in adapter["rules"]}
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    assert wanted == set(served)
    vllm_metrics = (REPO / "dashboards/vllm_metrics.txt").read_text().split()
    assert set(served.values()) <= set(vllm_metrics)
    (d,) = vllm_deployments("overlays/autoscaling")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": d["metadata"]["name"]}
    assert "replicas" not in d["spec"], "the HPA owns the replica count"


@pytest.mark.parametrize("target", TARGETS)
def test_every_reference_between_objects_resolves(target):
    """ConfigMaps, ServiceAccounts and Services that pods name exist; every Service
    selects some pod (or the Operator's); every service URL in an env var exists."""
    names = {}
    for d in render(target):
        names.setdefault(d["kind"], set()).add(d["metadata"]["name"])
    templates = [t for _, t in pod_templates(target)]
    for workload, template in pod_templates(target):
        spec = template["spec"]
        where = f"{workload['kind']}/{workload['metadata']['name']}"
        if "serviceAccountName" in spec:
            assert spec["serviceAccountName"] in names["ServiceAccount"], where
        for v in spec.get("volumes", []):
            sources = [v] + v.get("projected", {}).get("sources", [])
            for s in sources:
                if "configMap" in s:
                    assert s["configMap"]["name"] in names["ConfigMap"], (where, v["name"])
        for c in spec["containers"]:
            for e in c.get("env", []):
                for host in re.findall(r"(?:https?://)?([a-z][a-z0-9-]*):\d+", e.get("value", "")):
                    assert host in names["Service"], (where, e["name"])
    operator_pods = {f"{d['metadata']['namespace']}.{d['metadata']['name']}"
                     for d in render(target) if d["kind"] == "OpenTelemetryCollector"}
    for s in objects(target, "Service"):
        selector = s["spec"].get("selector")
        if s["spec"].get("type") == "ExternalName":
            continue
        assert selector, s["metadata"]["name"]
        assert any(matches(selector, t["metadata"]["labels"]) for t in templates) or \
            selector.get("app.kubernetes.io/instance") in operator_pods, s["metadata"]["name"]


def test_images_are_built_by_the_dockerfiles_at_the_project_version():
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    arg = re.compile(r"^ARG (\w+)=(\S+)$", re.M)
    llmtrace_df = dict(arg.findall((IMAGES / "llmtrace.Dockerfile").read_text()))
    vllm_df = dict(arg.findall((IMAGES / "vllm-llmtrace.Dockerfile").read_text()))
    router_df = dict(arg.findall((IMAGES / "vllm-router.Dockerfile").read_text()))
    assert llmtrace_df["LLMTRACE_VERSION"] == vllm_df["LLMTRACE_VERSION"] == version
    assert "FROM vllm/vllm-openai:${VLLM_VERSION}" in \
        (IMAGES / "vllm-llmtrace.Dockerfile").read_text()
    assert "FROM python:3.11-slim" in (IMAGES / "llmtrace.Dockerfile").read_text()
    images = {c["image"] for t in TARGETS for _, tpl in pod_templates(t)
              for c in tpl["spec"]["containers"]}
    assert f"ghcr.io/example/llmtrace:{version}" in images
    assert f"ghcr.io/example/vllm-llmtrace:{vllm_df['VLLM_VERSION']}-llmtrace{version}" in images
    assert f"ghcr.io/example/vllm-router:{router_df['VLLM_ROUTER_VERSION']}" in images
    ours = {i for i in images if i.startswith("ghcr.io/example/")}
    assert ours == {f"ghcr.io/example/llmtrace:{version}",
                    f"ghcr.io/example/vllm-llmtrace:{vllm_df['VLLM_VERSION']}-llmtrace{version}",
                    f"ghcr.io/example/vllm-router:{router_df['VLLM_ROUTER_VERSION']}"}
    collector = container(one("base", "StatefulSet", "llmtrace-collector"))
    assert collector["args"][0] == "collector"
    # the Collector image is the otelcol-contrib release the builder manifest pins
    builder = (REPO / "collector/builder-config.yaml").read_text()
    core = re.search(r"go\.opentelemetry\.io/collector/receiver/otlpreceiver v(\S+)", builder)[1]
    otelcol = {i for i in images if "opentelemetry-collector" in i}
    assert otelcol == {f"otel/opentelemetry-collector-contrib:{core}"}
