"""Every dashboard query against a real Prometheus scraping a real instrumented vLLM.

Prometheus (Debian's 2.42) scrapes vLLM's own /metrics (vLLM's ``vllm:*``
series plus the API server's llmtrace metrics, which join vLLM's registry),
the engine core's llmtrace port (accelerator-seconds, busy and idle time, USD)
and the llmtrace collector (pipeline health only: the SDK already exports the
latency and cost series at the source, for every request, so the collector's
copies are dropped, as the shipped scrape config does). The SLO rules are loaded, so the SLO panels'
recording rules exist. Every panel query of every dashboard must parse, and
every panel whose producer exists must return data.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml

from llmtrace.dashboards.generate import panel_queries, substitute
from testbed.models import DENSE
from testbed.prometheus import PrometheusError, PrometheusServer, wait_until
from testbed.stream_client import run_load

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[1]
DASHBOARDS = sorted((REPO / "dashboards").glob("llmtrace-*.json"))
RULES = sorted((REPO / "dashboards" / "slo" / "rules").glob("*.yml"))
#: metrics whose producers come in later features (or need hardware / flags this
#: test bed does not run): their panels must parse but may be empty. Data parallelism
#: has its own server and test (tests/test_vllm_dp.py), not the scraped test bed
NO_PRODUCER = re.compile(
    r"vllm:spec_decode_|llmtrace_dp_"
    # produced by the prefill/decode test bed, whose own test evaluates these panels
    r"|llmtrace_kv_transfer_|llmtrace_pd_"
    # need llm-d router spans (tests/test_router_prefix_prediction.py sends some)
    r"|llmtrace_router_prefix_cache_"
    # need NVML and a GPU (tests/test_hardware.py drives the NVML path with a stand-in);
    # the utilisation gauge's CPU fallback is checked on its own below
    r"|hw_gpu_"
    # MoE models and chunked generations have their own servers and tests
    # (tests/test_vllm_steps.py, tests/test_vllm_time_slices.py)
    r"|llmtrace_moe_|llmtrace_generation_")
NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def _scrape_configs(vllm_url: str, engine_port: int, collector_port: int,
                    router_port: int) -> list[dict]:
    """The shipped scrape fragment, pointed at this test bed's ports."""
    shipped = yaml.safe_load((REPO / "dashboards" / "prometheus" / "scrape-vllm.yml").read_text())
    jobs = shipped["scrape_configs"] if isinstance(shipped, dict) else shipped
    targets = {"vllm": vllm_url, "llmtrace-engine": f"127.0.0.1:{engine_port}",
               "llmtrace-collector": f"127.0.0.1:{collector_port}",
               "vllm-router": f"127.0.0.1:{router_port}"}
    out = []
    for job in jobs:
        name = job["job_name"]
        assert name in targets, f"unexpected job {name} in the shipped scrape config"
        out.append({**job, "scrape_interval": "1s",
                    "static_configs": [{"targets": [targets[name]]}]})
    return out


@pytest.fixture(scope="module")
def prometheus(instrumented_servers, collector, engine_metrics_port, vllm_router,
               tmp_path_factory):
    server = instrumented_servers["dense"]
    vllm = server.base_url.removeprefix("http://")
    prom = PrometheusServer(tmp_path_factory.mktemp("prometheus"),
                            _scrape_configs(vllm, engine_metrics_port, collector.ports["admin"],
                                            vllm_router.metrics_port),
                            rule_files=RULES)
    prom.start()
    try:
        yield prom
    finally:
        prom.stop()


def _wait(predicate, timeout: float = 60.0) -> bool:
    return wait_until(predicate, timeout, every=0.5)


def test_every_panel_query_parses_and_returns_data(prometheus: PrometheusServer,
                                                   instrumented_servers, vllm_router):
    assert DASHBOARDS and RULES, "generated dashboards and SLO rules must be committed"
    server = instrumented_servers["dense"]
    assert _wait(lambda: all(prometheus.targets_up().values())
                 and len(prometheus.targets_up()) == 4), prometheus.targets_up()
    # load in two waves a few seconds apart, so rates see increments between scrapes
    for wave in range(2):
        bodies = [{"messages": [{"role": "user", "content": f"dashboards {wave} {i} " * (i + 1)}],
                   "max_tokens": 8 + 4 * i, "headers": {"x-tenant-id": f"dash-{i % 2}"}}
                  for i in range(6)]
        assert all(t.ok for t in run_load(server.base_url, DENSE, bodies, 3))
        # and through the router in front (its panels)
        assert all(t.ok for t in run_load(vllm_router.base_url, DENSE, bodies[:4], 2))
        time.sleep(3)
    # a user asking the same thing again (the regeneration panels)
    again = {"messages": [{"role": "user", "content": "dashboards again"}], "max_tokens": 4,
             "headers": {"x-tenant-id": "dash-0"}}
    assert all(t.ok for t in run_load(server.base_url, DENSE, [again, again], 1))
    # the engine core's cost series and the collector's USD series have arrived
    for probe in ("llmtrace_cost_accelerator_seconds_total", "llmtrace_cost_usd_total",
                  "vllm:num_requests_running", "gen_ai_server_time_to_first_token_seconds_count",
                  "slo:sli_error:ratio_rate5m",
                  # the quality loop: the judge (a second vLLM), regenerations, drift
                  "llmtrace_quality_evaluations_total", "llmtrace_judge_duration_seconds_count",
                  "llmtrace_user_regenerations_total", "llmtrace_output_entropy_count",
                  "llmtrace_drift_psi"):
        assert _wait(lambda p=probe: prometheus.query(p), timeout=120), \
            f"{probe} never appeared"

    parse_errors, empty, checked = [], [], 0
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        for title, expr in panel_queries(dashboard):
            query = substitute(expr)
            checked += 1
            try:
                result = prometheus.query(query)
            except PrometheusError as exc:
                parse_errors.append(f"{path.name} / {title}: {exc}\n  {query}")
                continue
            if not result and not NO_PRODUCER.search(expr):
                empty.append(f"{path.name} / {title}: {query}")
    assert not parse_errors, "\n".join(parse_errors)
    assert not empty, "panels with a producer returned no data:\n" + "\n".join(empty)
    assert checked >= 30, checked


def test_vllm_colon_names_survive_the_openmetrics_rewrite(prometheus: PrometheusServer):
    """prometheus_client 0.26 writes ``vllm_*`` under OpenMetrics; the relabel restores it."""
    assert _wait(lambda: prometheus.query("vllm:num_requests_waiting"))
    assert not prometheus.query('{__name__=~"vllm_num_requests_waiting"}')


def test_utilisation_gauge_falls_back_to_the_engine_busy_share_without_gpus(
        prometheus: PrometheusServer, instrumented_servers):
    """On a host without GPU series the L1 gauge shows the engine's busy share, per
    instance, within [0, 1] (its GPU branch is exempt from the data check above)."""
    from llmtrace.dashboards.common import busy_share

    dashboard = json.loads((REPO / "dashboards" / "llmtrace-l1-oncall.json").read_text())
    [gauge] = [expr for title, expr in panel_queries(dashboard)
               if title == "Utilisation vs target band"]
    server = instrumented_servers["dense"]
    bodies = [{"prompt": f"gauge {i} " * 8, "max_tokens": 8} for i in range(3)]
    assert all(t.ok for t in run_load(server.base_url, DENSE, bodies, 3))
    assert _wait(lambda: prometheus.query(substitute(gauge)))
    shown = prometheus.query(substitute(gauge))
    assert shown and all(0 <= float(r["value"][1]) <= 1 for r in shown), shown
    # one query, one evaluation time: the gauge minus the busy share is zero everywhere
    diff = prometheus.query(substitute(f"({gauge})\n-\n({busy_share(('instance',))})"))
    assert {r["metric"]["instance"] for r in diff} == \
        {r["metric"]["instance"] for r in shown}
    assert all(abs(float(r["value"][1])) < 1e-9 for r in diff), diff
