"""A real Prometheus (Debian's ``prometheus`` package) on loopback, for tests and the demo.

Started with a generated config (scrape jobs and rule files), its own TSDB
directory and a free port; stopped with its process group. Queries go through
the HTTP API exactly as Grafana sends them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from testbed.ports import free_port


class PrometheusError(RuntimeError):
    pass


def wait_until(predicate, timeout: float = 60.0, every: float = 0.5) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; a query Prometheus
    refuses while it starts (PrometheusError) counts as not yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except PrometheusError:
            pass
        time.sleep(every)
    return False


class PrometheusServer:
    def __init__(self, workdir: Path, scrape_configs: list[dict[str, Any]],
                 rule_files: list[Path] = (), interval: str = "1s") -> None:
        self.workdir = workdir
        self.port = free_port()
        self.config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": scrape_configs,
            "rule_files": [str(p) for p in rule_files],
        }
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> PrometheusServer:
        binary = shutil.which("prometheus")
        if binary is None:
            raise PrometheusError("prometheus is not installed: run `make system` "
                                  "(Debian package `prometheus`)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.log = self.workdir / "prometheus.log"
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle"],
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PrometheusError(f"prometheus exited:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        raise PrometheusError(f"prometheus not ready in {timeout} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    def api(self, path: str, **params: str) -> Any:
        """GET an API path; returns ``data`` or raises PrometheusError with Prometheus's error."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                body = json.load(r)
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """An instant query, now or at the Unix time ``at``."""
        params = {"query": expr, **({"time": f"{at:.3f}"} if at is not None else {})}
        data = self.api("query", **params)
        result = data["result"]
        return result if data["resultType"] in ("vector", "matrix") else [result]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        """A range query (what a Grafana time-series panel sends): one series per result."""
        return self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}",
                        step=f"{step:g}")["result"]

    def targets_up(self) -> dict[str, bool]:
        active = self.api("targets")["activeTargets"]
        return {t["scrapeUrl"]: t["health"] == "up" for t in active}

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
