"""The Compose reference deployment (examples/deployment/compose/) is valid and consistent.

No container runs here (there is no Docker on the development machines), so this is
what the stack gets besides review. It proves: the compose file is valid under the
Compose Specification's JSON schema (vendored, pinned by sha256) with its variables
at their defaults; each profile starts one replica pair that the rest of the stack
finds by name, and every ``depends_on`` resolves as Docker Compose resolves it;
every host path it mounts or builds from exists in the checkout (the Dockerfiles in
examples/deployment/images/, shared with the Kubernetes manifests, take the build
args passed), and every file a command names inside a container is mounted there;
``promtool check config`` passes on the Prometheus config with its rule files
resolved through the mounts to the committed rules; the scrape jobs keep the
relabel rules of dashboards/prometheus/scrape-vllm.yml; every scrape target, OTLP
endpoint, data source URL, healthcheck and published port names a port the service
listens on;
the OpenTelemetry Collector's pipelines use only defined components, all in the
OCB manifest, with the agent's and the gateway's processors unchanged; vLLM's
environment uses only real llmtrace settings and loads through llmtrace's own
configuration loader; Grafana provisions exactly the committed dashboards.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import subprocess
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from llmtrace import semconv as sc
from llmtrace.collector.config import _ENV as COLLECTOR_ENV
from llmtrace.collector.config import load_collector_config
from llmtrace.config import _ENV as SDK_ENV
from llmtrace.config import Config, activation_requested, load_config, switched_off
from llmtrace.pricing import PriceTable

REPO = Path(__file__).resolve().parents[1]
HERE = REPO / "examples" / "deployment" / "compose"
COMPOSE = HERE / "compose.yaml"
SCHEMA = HERE / "schema" / "compose-spec.json"
SCHEMA_README = HERE / "schema" / "README.md"
README = HERE / "README.md"
SCRAPE_BASIS = REPO / "dashboards" / "prometheus" / "scrape-vllm.yml"
AGENT = REPO / "collector" / "otelcol-agent.yaml"
GATEWAY = REPO / "collector" / "otelcol-gateway.yaml"
BUILDER = REPO / "collector" / "builder-config.yaml"

PROFILES = ("cpu", "gpu")
REPLICAS = ("vllm-0", "vllm-1")
#: rule files Prometheus must load: the committed ones, by the repo's own globs
RULE_GLOBS = ("dashboards/slo/rules/*.yml", "dashboards/prometheus/*.rules.yml")
#: OpenTelemetry SDK variables vLLM's environment may set besides llmtrace's own
OTEL_SDK_VARS = {"OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"}


# -- loading: YAML, then Compose's interpolation with every variable unset -------------

_VAR = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?$")


def interpolate(value, env: dict[str, str]):
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:+alt}`` and
    ``$$``, applied to every string of a parsed document (one level: no nesting)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        if m.group("escaped"):
            return "$"
        if m.group("named"):
            return env.get(m.group("named"), "")
        parsed = _BRACED.match(m.group("braced"))
        assert parsed, f"unsupported interpolation {m.group(0)!r}"
        name, op, arg = parsed.group("name", "op", "arg")
        assert "$" not in (arg or ""), f"nested interpolation in {m.group(0)!r}"
        current = env.get(name)
        if op is None:
            return current or ""
        if op == ":-":
            return current if current else arg
        if op == "-":
            return arg if current is None else current
        if op == ":+":
            return arg if current else ""
        if op == "+":
            return "" if current is None else arg
        raise AssertionError(f"{m.group(0)!r}: required variable, the stack must run without it")

    return _VAR.sub(one, value)


@functools.cache
def compose() -> dict:
    """compose.yaml as Docker Compose sees it with no variable set: defaults only."""
    doc = interpolate(yaml.safe_load(COMPOSE.read_text()), {})
    assert isinstance(doc, dict)
    return doc


@functools.cache
def yaml_file(path: Path) -> dict:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict), f"{path}: top level is not a mapping"
    return doc


def services() -> dict[str, dict]:
    return compose()["services"]


def active(profiles: tuple[str, ...]) -> dict[str, dict]:
    """The services ``docker compose --profile P ... up`` starts: no profile, or one named."""
    return {name: s for name, s in services().items()
            if not s.get("profiles") or set(s["profiles"]) & set(profiles)}


def vllm_services(profile: str | None = None) -> dict[str, dict]:
    chosen = services() if profile is None else active((profile,))
    return {n: s for n, s in chosen.items() if n.startswith("vllm-")}


def names(svcs: dict[str, dict]) -> set[str]:
    """DNS names on the project network: service names and their aliases."""
    out = set(svcs)
    for s in svcs.values():
        for net in (s.get("networks") or {}).values():
            out.update((net or {}).get("aliases") or [])
    return out


def by_name(name: str, profile: str) -> tuple[str, dict]:
    """The active service that answers to ``name`` (service name or alias) in a profile."""
    found = [(n, s) for n, s in active((profile,)).items() if name in names({n: s})]
    assert len(found) == 1, f"{name!r} names {len(found)} services under --profile {profile}"
    return found[0]


def mounts(service: dict) -> list[tuple[str, str]]:
    """(source, container path) of each volume, short or long syntax."""
    out = []
    for v in service.get("volumes") or []:
        if isinstance(v, str):
            source, target = v.split(":")[:2]
        else:
            source, target = v.get("source", ""), v["target"]
        out.append((source, target))
    return out


def is_bind(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def host_path(service: dict, container_path: str) -> Path | None:
    """The checkout file a container path reads, through the service's bind mounts."""
    path = PurePosixPath(container_path)
    best = None
    for source, target in mounts(service):
        t = PurePosixPath(target)
        covers = is_bind(source) and (path == t or t in path.parents)
        if covers and (best is None or len(t.parts) > len(best[1].parts)):
            best = (source, t)
    if best is None:
        return None
    return (HERE / best[0] / path.relative_to(best[1])).resolve()


def env_of(service: dict) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def argv(service: dict) -> list[str]:
    def words(v):
        return v.split() if isinstance(v, str) else list(v or [])
    return [str(w) for w in words(service.get("entrypoint")) + words(service.get("command"))]


def flag(service: dict, name: str) -> str | None:
    """``--name=value`` or ``--name value`` from a service's entrypoint and command."""
    args = argv(service)
    for i, a in enumerate(args):
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
        if a == name and i + 1 < len(args):
            return args[i + 1]
    return None


def port_of(address: str) -> int:
    """The port of ``host:port``, ``scheme://host:port/...`` or ``0.0.0.0:port``."""
    if "://" in address:
        port = urlsplit(address).port
        assert port, f"{address}: no explicit port"
        return port
    return int(address.rsplit(":", 1)[1])


def host_of(address: str) -> str:
    if "://" in address:
        return urlsplit(address).hostname or ""
    return address.rsplit(":", 1)[0]


def listens(service: dict) -> set[int]:
    """Container ports a service declares: ``expose`` and the container side of ``ports``."""
    out = {int(p) for p in service.get("expose") or []}
    for p in service.get("ports") or []:
        target = p.rsplit(":", 1)[-1] if isinstance(p, str) else p["target"]
        out.add(int(str(target).split("/")[0]))
    return out


def healthcheck_url(service: dict) -> str:
    test = " ".join(service["healthcheck"]["test"])
    m = re.search(r"https?://[^\s'\"]+", test)
    assert m, f"healthcheck without a URL: {test}"
    return m.group(0)


# -- the file itself ---------------------------------------------------------------------


def test_vendored_schema_is_the_pinned_upstream_file():
    digest = hashlib.sha256(SCHEMA.read_bytes()).hexdigest()
    assert digest in SCHEMA_README.read_text(), (
        f"schema/compose-spec.json (sha256 {digest}) differs from the version "
        "schema/README.md pins: update the README with the source commit")


def test_compose_file_validates_against_the_compose_specification():
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


def test_values_the_schema_leaves_to_compose_are_valid():
    """compose-go checks these when it loads the file; the schema takes any string."""
    for name, service in services().items():
        restart = service.get("restart", "no")
        assert re.fullmatch(r"no|always|unless-stopped|on-failure(:\d+)?", restart), name
        if "healthcheck" in service:
            assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL", "NONE"), name


def test_each_profile_starts_one_replica_pair_that_the_stack_finds_by_name():
    observability = set(active(()))
    assert not vllm_services(None).keys() & observability, "a vLLM replica runs without profile"
    assert "router" not in observability, "the router would start with no replica"
    for profile in PROFILES:
        replicas = vllm_services(profile)
        assert len(replicas) == 2, f"--profile {profile}: {sorted(replicas)}"
        assert names(replicas) - set(replicas) == set(REPLICAS), (
            f"--profile {profile}: the replicas must answer to {REPLICAS}")
        for alias in REPLICAS:
            by_name(alias, profile)  # exactly one
        assert "router" in active((profile,))


@pytest.mark.parametrize("profiles", [(), ("cpu",), ("gpu",)], ids=["none", "cpu", "gpu"])
def test_depends_on_resolves_as_compose_resolves_it(profiles):
    """compose-go's rule: a dependency outside the active profiles is an error unless it is
    ``required: false``; a ``service_healthy`` dependency needs a healthcheck."""
    enabled = active(profiles)
    for name, service in enabled.items():
        deps = service.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started", "required": True} for d in deps}
        for dep, cond in deps.items():
            assert dep in services(), f"{name} depends on undefined service {dep}"
            if dep not in enabled:
                assert cond.get("required", True) is False, (
                    f"{name} depends on {dep}, which {profiles or 'no profile'} disables")
                continue
            if cond.get("condition") == "service_healthy":
                assert "healthcheck" in services()[dep], f"{name} waits for {dep}'s health"


def test_the_router_waits_for_every_replica_it_routes_to():
    router = services()["router"]
    for profile in PROFILES:
        for alias in REPLICAS:
            replica, _ = by_name(alias, profile)
            assert router["depends_on"][replica]["condition"] == "service_healthy"


def test_every_mounted_host_path_exists_in_the_checkout():
    declared = set(compose().get("volumes") or {})
    for name, service in services().items():
        for source, target in mounts(service):
            if is_bind(source):
                assert (HERE / source).exists(), f"{name}: {source} -> {target} does not exist"
                assert (HERE / source).resolve().is_relative_to(REPO), f"{name}: {source}"
            else:
                assert source in declared, f"{name}: named volume {source} is not declared"


def dockerfile(service: dict) -> str:
    """The Dockerfile a service builds from: inline, or a file in the build context."""
    build = service["build"]
    if "dockerfile_inline" in build:
        return build["dockerfile_inline"]
    return (HERE / build["context"] / build.get("dockerfile", "Dockerfile")).read_text()


def arg_defaults(text: str) -> dict[str, str]:
    return dict(re.findall(r"^\s*ARG\s+(\w+)=(\S+)", text, re.M))


def base_image(service: dict) -> str:
    """The first FROM of a service's Dockerfile, its ARGs at the build args or defaults."""
    text = dockerfile(service)
    args = {**arg_defaults(text), **(service["build"].get("args") or {})}
    image = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)


def test_every_build_context_and_dockerfile_exists():
    """The images are built from examples/deployment/images/ (shared with the Kubernetes
    manifests); every build arg passed is an ARG there."""
    for name, service in services().items():
        build = service.get("build")
        if build is None:
            continue
        context = (HERE / build["context"]).resolve()
        assert context.is_dir(), f"{name}: build context {build['context']}"
        if "dockerfile_inline" not in build:
            path = context / build.get("dockerfile", "Dockerfile")
            assert path.is_file(), f"{name}: {path.relative_to(REPO)} does not exist"
        for arg in build.get("args") or {}:
            assert re.search(rf"^\s*ARG\s+{arg}\b", dockerfile(service), re.M), (
                f"{name}: build arg {arg} is not an ARG of its Dockerfile")


def test_every_file_a_container_reads_is_mounted_from_the_checkout():
    """Config files, price tables and dashboards named in commands and environment."""
    for name, service in services().items():
        words = argv(service) + [v for v in env_of(service).values() if v]
        paths = {m.group(0) for w in words for m in re.finditer(r"/etc/[\w./-]+", w)}
        for path in paths:
            host = host_path(service, path)
            assert host is not None and host.is_file(), (
                f"{name}: {path} is read in the container but not mounted from a file")


# -- Prometheus ---------------------------------------------------------------------------


def prometheus_config() -> dict:
    return yaml_file(HERE / "prometheus.yml")


def test_prometheus_config_passes_promtool_with_the_committed_rules(promtool, tmp_path):
    """promtool resolves rule_files on this machine: rewrite each container glob through
    the Prometheus service's mounts to the checkout, then check config and rules."""
    prom = services()["prometheus"]
    config = prometheus_config()
    config_in_container = flag(prom, "--config.file")
    assert host_path(prom, config_in_container) == (HERE / "prometheus.yml").resolve()
    rewritten = []
    for pattern in config["rule_files"]:
        directory = host_path(prom, str(PurePosixPath(pattern).parent))
        assert directory is not None, f"rule_files {pattern} is not under a mount"
        rewritten.append(str(directory / PurePosixPath(pattern).name))
    loaded = {Path(f).resolve() for g in rewritten for f in Path("/").glob(g.lstrip("/"))}
    expected = {f.resolve() for g in RULE_GLOBS for f in REPO.glob(g)}
    assert expected and loaded == expected, (
        f"rule files loaded {sorted(map(str, loaded))}, committed {sorted(map(str, expected))}")
    checked = tmp_path / "prometheus.yml"
    checked.write_text(yaml.safe_dump({**config, "rule_files": rewritten}, sort_keys=False))
    run = subprocess.run([promtool, "check", "config", str(checked)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"SUCCESS: {len(expected)} rule files found" in run.stdout, run.stdout


def test_scrape_jobs_keep_the_rules_of_the_committed_scrape_config():
    ours = {j["job_name"]: j for j in prometheus_config()["scrape_configs"]}
    for job in yaml_file(SCRAPE_BASIS)["scrape_configs"]:
        mine = ours.get(job["job_name"])
        assert mine is not None, f"job {job['job_name']} of scrape-vllm.yml is missing"
        for key in ("metrics_path", "relabel_configs", "metric_relabel_configs"):
            assert mine.get(key) == job.get(key), f"job {job['job_name']}: {key} differs"


def targets(job: str) -> list[str]:
    jobs = {j["job_name"]: j for j in prometheus_config()["scrape_configs"]}
    return [t for sc_ in jobs[job]["static_configs"] for t in sc_["targets"]]


@pytest.mark.parametrize("profile", PROFILES)
def test_scrape_targets_are_the_ports_the_services_listen_on(profile):
    def expect(job: str, want: dict[str, int]):
        got = {host_of(t): port_of(t) for t in targets(job)}
        assert got == want, f"job {job}: targets {got}, services listen on {want}"
        for host, port in want.items():
            _, service = by_name(host, profile)
            assert port in listens(service), f"job {job}: {host} does not expose {port}"

    vllm_ports, engine_ports = {}, {}
    for alias in REPLICAS:
        _, replica = by_name(alias, profile)
        vllm_ports[alias] = int(flag(replica, "--port"))
        env = env_of(replica)
        assert env["OTEL_EXPORTER_PROMETHEUS_HOST"] == "0.0.0.0"
        engine_ports[alias] = int(env["OTEL_EXPORTER_PROMETHEUS_PORT"])
    expect("vllm", vllm_ports)
    expect("llmtrace-engine", engine_ports)
    assert set(vllm_ports.values()).isdisjoint(engine_ports.values())

    admin = collector_config().admin_endpoint
    assert host_of(admin) == "0.0.0.0"
    expect("llmtrace-collector", {"llmtrace-collector": port_of(admin)})

    router = services()["router"]
    assert flag(router, "--prometheus-host") == "0.0.0.0"
    expect("vllm-router", {"router": int(flag(router, "--prometheus-port"))})

    reader = otelcol()["service"]["telemetry"]["metrics"]["readers"][0]["pull"]["exporter"]
    assert reader["prometheus"]["host"] == "0.0.0.0"
    expect("otelcol", {"otelcol": reader["prometheus"]["port"]})


# -- the OpenTelemetry Collector ----------------------------------------------------------


def otelcol() -> dict:
    return yaml_file(HERE / "otelcol.yaml")


def test_otelcol_mounts_this_config():
    svc = services()["otelcol"]
    assert host_path(svc, flag(svc, "--config")) == (HERE / "otelcol.yaml").resolve()


def test_otelcol_pipelines_reference_defined_components():
    cfg = otelcol()
    used: dict[str, set[str]] = {"receivers": set(), "processors": set(), "exporters": set()}
    for pname, pipeline in cfg["service"]["pipelines"].items():
        for kind in used:
            for component in pipeline.get(kind) or []:
                assert component in (cfg.get(kind) or {}), (
                    f"pipeline {pname}: {kind[:-1]} {component} is not defined")
                used[kind].add(component)
        processors = pipeline.get("processors") or []
        assert processors[0] == "memory_limiter" and processors[-1] == "batch", pname
        assert pipeline.get("receivers") and pipeline.get("exporters"), pname
    for kind, ids in used.items():
        assert set(cfg.get(kind) or {}) == ids, f"{kind} defined but unused: " \
            f"{sorted(set(cfg.get(kind) or {}) - ids)}"
    assert set(cfg["service"].get("extensions") or []) == set(cfg.get("extensions") or {})
    assert "connectors" not in cfg


def test_otelcol_components_are_all_in_the_builder_manifest():
    """The manifest is the contrib distribution's component set at the pinned release, so
    the image in compose.yaml has every component the config names."""
    manifest = yaml_file(BUILDER)
    cfg = otelcol()
    for kind in ("receivers", "processors", "exporters", "extensions"):
        modules = {m["gomod"].split()[0].rsplit("/", 1)[1] for m in manifest.get(kind) or []}
        for component in cfg.get(kind) or {}:
            module = component.split("/")[0].replace("_", "") + kind[:-1]
            assert module in modules, f"{kind[:-1]} {component}: {module} is not in the manifest"
    image = services()["otelcol"]["image"]
    version = re.search(r"(\d+)\.(\d+)\.\d+$", image).groups()
    for m in manifest["receivers"] + manifest["processors"] + manifest["exporters"]:
        assert m["gomod"].split()[1].startswith(f"v{version[0]}.{version[1]}."), (
            f"{image} and the manifest's {m['gomod']} are different releases")


def test_otelcol_processing_is_the_agents_and_the_gateways():
    cfg, agent, gateway = otelcol(), yaml_file(AGENT), yaml_file(GATEWAY)
    for name in ("memory_limiter", "filter/health", "filter/content_events",
                 "attributes/strip_content"):
        assert cfg["processors"][name] == agent["processors"][name], name
    ours, theirs = cfg["processors"]["tail_sampling"], gateway["processors"]["tail_sampling"]
    for key in ("decision_wait", "policies"):
        assert ours[key] == theirs[key], f"tail_sampling.{key} differs from the gateway's"
    assert cfg["receivers"]["otlp"] == agent["receivers"]["otlp"]
    pipelines = cfg["service"]["pipelines"]
    content = ["filter/health", "filter/content_events", "attributes/strip_content"]
    for pname in ("traces/derive", "traces/sample"):
        assert [p for p in pipelines[pname]["processors"] if p in content] == content, pname
    assert "tail_sampling" not in pipelines["traces/derive"]["processors"], (
        "the derive step must see every span")
    assert pipelines["traces/derive"]["exporters"] == ["otlp/llmtrace"]
    assert pipelines["traces/sample"]["exporters"] == ["otlp/tempo"]


# -- endpoints between services -----------------------------------------------------------


@functools.cache
def collector_config():
    svc = services()["llmtrace-collector"]
    path = host_path(svc, flag(svc, "--config"))
    assert path == (HERE / "llmtrace-collector.yaml").resolve()
    return load_collector_config(path)


def tempo() -> dict:
    svc = services()["tempo"]
    path = host_path(svc, flag(svc, "-config.file"))
    assert path == (HERE / "tempo.yaml").resolve()
    return yaml_file(path)


@pytest.mark.parametrize("profile", PROFILES)
def test_otlp_flows_to_ports_that_listen(profile):
    receiver = otelcol()["receivers"]["otlp"]["protocols"]
    for alias in REPLICAS:
        _, replica = by_name(alias, profile)
        endpoint = env_of(replica)["LLMTRACE_OTLP_ENDPOINT"]
        name, otel_svc = by_name(host_of(endpoint), profile)
        assert name == "otelcol"
        assert port_of(endpoint) == port_of(receiver["grpc"]["endpoint"])  # grpc: the default
        assert port_of(endpoint) in listens(otel_svc)

    exporters = otelcol()["exporters"]
    llmtrace_ep = exporters["otlp/llmtrace"]["endpoint"]
    tempo_ep = exporters["otlp/tempo"]["endpoint"]
    assert host_of(llmtrace_ep) == "llmtrace-collector"
    assert port_of(llmtrace_ep) == port_of(collector_config().grpc_endpoint)
    assert host_of(tempo_ep) == "tempo"
    assert port_of(tempo_ep) == port_of(tempo()["distributor"]["receivers"]["otlp"]
                                        ["protocols"]["grpc"]["endpoint"])
    for ep in (llmtrace_ep, tempo_ep):
        assert port_of(ep) in listens(services()[host_of(ep)]), ep
    assert collector_config().forward_endpoint is None, (
        "otelcol already sends the spans to Tempo: forwarding too would store them twice")

    remote_write = exporters["prometheusremotewrite"]["endpoint"]
    assert host_of(remote_write) == "prometheus" and port_of(remote_write) == 9090
    assert "--web.enable-remote-write-receiver" in argv(services()["prometheus"])


@pytest.mark.parametrize("profile", PROFILES)
def test_router_forwards_to_the_replicas_vllm_ports(profile):
    router = services()["router"]
    args = argv(router)
    workers = []
    for a in args[args.index("--worker-urls") + 1:]:
        if a.startswith("--"):
            break
        workers.append(a)
    got = {host_of(w): port_of(w) for w in workers}
    want = {alias: int(flag(by_name(alias, profile)[1], "--port")) for alias in REPLICAS}
    assert got == want
    assert flag(router, "--policy") == "round_robin", "cache_aware needs an opt-in on vLLM"


def test_healthchecks_and_published_ports_use_the_services_ports():
    listening = {
        "router": int(flag(services()["router"], "--port")),
        "llmtrace-collector": port_of(collector_config().admin_endpoint),
        "tempo": tempo()["server"]["http_listen_port"],
        "prometheus": 9090,
        "grafana": 3000,
    }
    for name, replica in vllm_services().items():
        listening[name] = int(flag(replica, "--port"))
    for name, service in services().items():
        if "healthcheck" in service:
            url = healthcheck_url(service)
            assert host_of(url) == "localhost" and port_of(url) == listening[name], name
        for p in service.get("ports") or []:
            assert int(str(p).rsplit(":", 1)[1]) == listening[name], f"{name}: {p}"
            assert str(p).startswith("127.0.0.1:"), f"{name}: {p} is published on every interface"
    assert services()["router"]["ports"], "the router is the clients' entry point"


# -- vLLM and llmtrace settings ------------------------------------------------------------


def test_llmtrace_variables_are_real_settings():
    sdk_vars = {v for names_ in SDK_ENV.values() for v in names_}
    known = sdk_vars | set(COLLECTOR_ENV.values())
    assert set(SDK_ENV) <= set(Config.model_fields)
    for name, service in services().items():
        for var in env_of(service):
            if var.startswith("LLMTRACE_"):
                assert var in known, f"{name}: {var} is not an llmtrace setting"
            if var.startswith("OTEL_"):
                assert var in sdk_vars | OTEL_SDK_VARS, f"{name}: {var} is not read by anyone"


@pytest.mark.parametrize("replica", sorted(vllm_services()))
def test_vllm_environment_switches_llmtrace_on_through_its_own_loader(replica, monkeypatch):
    service = services()[replica]
    env = {k: v for k, v in env_of(service).items() if v is not None}
    for var in list(os.environ):
        if var.startswith(("LLMTRACE_", "OTEL_")):
            monkeypatch.delenv(var)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert activation_requested(env)
    config = load_config()  # strict: any bad value raises, naming the variable
    assert switched_off(config, env) is None
    assert config.endpoint and config.endpoint.startswith("http://otelcol:")
    assert config.span_exporters == {"otlp"}
    assert config.metric_exporters == {"prometheus"}
    assert config.prometheus_port == int(env["OTEL_EXPORTER_PROMETHEUS_PORT"])
    assert config.deployment_version not in ("", "unknown")
    assert config.prices is not None
    table = PriceTable.load(host_path(service, config.prices))
    assert config.instance_type in table.instances, (
        f"{replica}: instance type {config.instance_type} has no price")


def test_collector_price_table_is_the_one_vllm_uses():
    svc = services()["llmtrace-collector"]
    prices = host_path(svc, str(collector_config().prices))
    PriceTable.load(prices)
    for replica in vllm_services().values():
        assert host_path(replica, env_of(replica)["LLMTRACE_PRICES"]) == prices


def test_cpu_replicas_avoid_the_cpu_backends_traps():
    for name, replica in vllm_services("cpu").items():
        env = env_of(replica)
        assert int(env["VLLM_CPU_KVCACHE_SPACE"]) > 0, name
        block = flag(replica, "--block-size")
        assert block is None or int(block) % 32 == 0, f"{name}: block size {block}"
        assert "deploy" not in replica or "reservations" not in replica["deploy"]["resources"]
        assert base_image(replica).startswith("public.ecr.aws/q9t5s3a7/vllm-cpu-release-repo:")
        assert argv(replica)[:2] == ["vllm", "serve"]


def test_cpu_image_recipe_keeps_in_step_with_the_gpu_dockerfile():
    """The CPU variant's inline Dockerfile repeats vllm-llmtrace.Dockerfile on vLLM's CPU
    image: same vLLM and llmtrace versions, the version pyproject.toml declares."""
    import tomllib
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    [cpu, *_] = vllm_services("cpu").values()
    [gpu, *_] = vllm_services("gpu").values()
    ours, theirs = arg_defaults(dockerfile(cpu)), arg_defaults(dockerfile(gpu))
    assert ours["LLMTRACE_VERSION"] == theirs["LLMTRACE_VERSION"] == version
    assert ours["VLLM_VERSION"] == theirs["VLLM_VERSION"]
    assert cpu["build"]["args"]["VLLM_VERSION"] == gpu["build"]["args"]["VLLM_VERSION"]
    assert '"llmtrace-otel==${LLMTRACE_VERSION}"' in dockerfile(cpu)
    assert "vllm.general_plugins" in dockerfile(cpu)


def test_gpu_replicas_reserve_one_nvidia_gpu_each():
    seen = []
    for name, replica in vllm_services("gpu").items():
        devices = replica["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1 and devices[0]["driver"] == "nvidia", name
        assert "gpu" in devices[0]["capabilities"], name
        seen += devices[0]["device_ids"]
        assert base_image(replica).startswith("vllm/vllm-openai:")
        assert argv(replica)[:2] == ["vllm", "serve"]
    assert len(seen) == len(set(seen)) == 2, f"both replicas default to GPU {seen}"


# -- Grafana -------------------------------------------------------------------------------


def grafana_file(name: str) -> dict:
    # Grafana expands $VAR in provisioning files; $$ is a literal $
    return yaml.safe_load((HERE / "grafana" / name).read_text().replace("$$", "$"))


def test_grafana_provisions_exactly_the_committed_dashboards():
    grafana = services()["grafana"]
    provisioning = {t: s for s, t in mounts(grafana)}
    assert any(t.startswith("/etc/grafana/provisioning/dashboards/") and
               (HERE / s).resolve() == (HERE / "grafana" / "dashboards.yaml").resolve()
               for t, s in provisioning.items())
    [provider] = grafana_file("dashboards.yaml")["providers"]
    assert provider["type"] == "file"
    folder = PurePosixPath(provider["options"]["path"])
    mounted = {(HERE / s).resolve() for s, t in mounts(grafana)
               if PurePosixPath(t).parent == folder}
    committed = {p.resolve() for p in REPO.glob("dashboards/llmtrace-*.json")}
    assert committed and mounted == committed, (
        f"mounted {sorted(map(str, mounted))}, committed {sorted(map(str, committed))}")
    for source, target in mounts(grafana):
        if PurePosixPath(target).parent == folder:
            assert PurePosixPath(target).name == Path(source).name, target
    home = env_of(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert PurePosixPath(home).parent == folder


def test_grafana_datasources_reach_prometheus_and_tempo():
    grafana = services()["grafana"]
    assert any(t.startswith("/etc/grafana/provisioning/datasources/") and
               (HERE / s).resolve() == (HERE / "grafana" / "datasources.yaml").resolve()
               for s, t in mounts(grafana))
    sources = {d["type"]: d for d in grafana_file("datasources.yaml")["datasources"]}
    prom, tempo_ds = sources["prometheus"], sources["tempo"]
    assert prom["isDefault"] is True
    assert (host_of(prom["url"]), port_of(prom["url"])) == ("prometheus", 9090)
    assert (host_of(tempo_ds["url"]), port_of(tempo_ds["url"])) == (
        "tempo", tempo()["server"]["http_listen_port"])
    for ds in (prom, tempo_ds):
        assert port_of(ds["url"]) in listens(services()[host_of(ds["url"])])
    for dashboard in REPO.glob("dashboards/llmtrace-*.json"):
        variables = json.loads(dashboard.read_text())["templating"]["list"]
        for v in variables:
            if v["type"] == "datasource":
                assert v["query"] in sources, f"{dashboard.name}: no {v['query']} data source"

    links = tempo_ds["jsonData"]["tracesToMetrics"]
    assert links["datasourceUid"] == prom["uid"]
    attributes = {v for n, v in vars(sc).items() if n.isupper() and isinstance(v, str)}
    for tag in links["tags"]:
        assert tag["key"] in attributes, f"{tag['key']} is not a semconv attribute"
        assert tag["value"] == tag["key"].replace(".", "_")
    metric_names = set(sc.PROMETHEUS_NAMES.values())
    for q in links["queries"]:
        assert "$__tags" in q["query"], q["name"]
        for metric in re.findall(r"([a-z_:]+)\{", q["query"]):
            base = re.sub(r"_(bucket|count|sum)$", "", metric)
            assert base in metric_names, f"{q['name']}: {metric} is not an llmtrace metric"


def test_readme_says_how_to_run_it():
    text = README.read_text()
    assert "docker compose --profile cpu up" in text
    for name in services():
        assert name in text, f"README.md does not mention the {name} service"
