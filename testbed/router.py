"""``vllm-router`` (PyPI, the vLLM project's Rust router) in front of test-bed servers.

The real router process, started from the virtualenv's console script: the
test bed checks what it forwards (``traceparent``, tenant headers) and scrapes
its own Prometheus metrics, as a deployment would.
"""

from __future__ import annotations

import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from testbed.ports import free_port
from testbed.procs import console_script


@dataclass
class Router:
    """One ``vllm-router`` process; ``args`` choose the policy or the PD mode (no
    ``workers`` then: ``--vllm-pd-disaggregation --prefill URL --decode URL``)."""

    workers: list[str]
    workdir: Path
    args: tuple[str, ...] = ("--policy", "round_robin")
    port: int = 0
    metrics_port: int = 0
    proc: subprocess.Popen | None = None
    _log: object = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def log_path(self) -> Path:
        return self.workdir / "router.log"

    def start(self, timeout: float = 60.0) -> Router:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.metrics_port = self.metrics_port or free_port()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [console_script("vllm-router"), "--host", "127.0.0.1", "--port", str(self.port),
             *(("--worker-urls", *self.workers) if self.workers else ()),
             "--prometheus-host", "127.0.0.1",
             "--prometheus-port", str(self.metrics_port), *self.args],
            cwd=self.workdir, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm-router exited with {self.proc.returncode}:\n"
                                   f"{self.log_path.read_text(errors='replace')[-3000:]}")
            try:
                if httpx.get(f"{self.base_url}/readiness", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"vllm-router not ready after {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None
