"""Start and stop a real ``vllm serve`` process on loopback.

The server runs the CPU build of vLLM through :mod:`testbed.vllm_cli`, with
every cache and temporary directory pointed at a scratch directory so a test
run leaves nothing behind in ``$HOME`` or ``/tmp``. It is started in its own
process group so stopping it also stops the engine-core and worker children.

``testbed`` is not installed (the wheel ships only ``llmtrace``), so the server
gets the repository root on ``PYTHONPATH``: ``-m testbed.vllm_cli`` runs from the
scratch directory, and vLLM's *spawn* children re-import the main module.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from testbed.ports import free_port

#: the checkout holding ``testbed/`` (and ``llmtrace/``)
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ServerConfig:
    """One server configuration; equal configs share one running server."""

    model_dir: Path
    served_name: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    enforce_eager: bool = True
    max_model_len: int = 2048
    kv_cache_gib: int = 1
    #: how to start the CLI: the module or script given to ``python``
    launcher: tuple[str, ...] = ("-m", "testbed.vllm_cli")


@dataclass
class VLLMServer:
    config: ServerConfig
    workdir: Path
    python: str = sys.executable
    #: a loopback address of its own (127.0.0.2, ...) makes replicas on one machine
    #: look like separate hosts to Prometheus's host-only ``instance`` label
    host: str = "127.0.0.1"
    port: int = 0
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    ready_s: float | None = None
    _log: object = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    def environment(self) -> dict[str, str]:
        scratch = self.workdir / "tmp"
        for sub in ("tmp", "vllm-cache", "inductor-cache"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(
            VLLM_CPU_KVCACHE_SPACE=str(self.config.kv_cache_gib),
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
            VLLM_CACHE_ROOT=str(self.workdir / "vllm-cache"),
            TORCHINDUCTOR_CACHE_DIR=str(self.workdir / "inductor-cache"),
            TMPDIR=str(scratch),
            PYTHONUNBUFFERED="1",
            PYTHONPATH=os.pathsep.join(
                p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p),
        )
        env.update(dict(self.config.env))
        return env

    def command(self) -> list[str]:
        cmd = [
            self.python, *self.config.launcher, "serve", str(self.config.model_dir),
            "--host", self.host, "--port", str(self.port),
            "--served-model-name", self.config.served_name,
            "--max-model-len", str(self.config.max_model_len),
        ]
        if self.config.enforce_eager:
            cmd.append("--enforce-eager")
        cmd.extend(self.config.args)
        return cmd

    def start(self) -> VLLMServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            self.command(), env=self.environment(), cwd=self.workdir,
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        return self

    def log_tail(self, lines: int = 80) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"

    def wait_ready(self, timeout: float = 300.0) -> VLLMServer:
        """Poll ``/health`` until it answers 200; raise with the log tail on death or deadline."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise RuntimeError(
                    f"vllm serve exited with code {code} before becoming ready; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    self.ready_s = time.monotonic() - self.started_at
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(
            f"vllm serve not ready after {timeout:.0f} s; log {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self, grace: float = 20.0) -> None:
        """Stop the whole process group (API server, engine core, workers)."""
        if self.proc is not None and self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                _signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self.proc is not None:  # children may outlive a leader that exited first
            _signal_group(self.proc.pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class ServerPool:
    """Starts each distinct :class:`ServerConfig` once and stops them all at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._servers: dict[ServerConfig, VLLMServer] = {}

    def get(self, config: ServerConfig, timeout: float = 300.0) -> VLLMServer:
        return self.get_many([config], timeout)[0]

    def get_many(self, configs: Sequence[ServerConfig], timeout: float = 300.0) -> list[VLLMServer]:
        """Start the missing servers together (start-up overlaps), then wait for each."""
        fresh = []
        for cfg in configs:
            if cfg not in self._servers:
                workdir = self.root / f"{cfg.served_name}-{len(self._servers)}"
                self._servers[cfg] = VLLMServer(cfg, workdir).start()
                fresh.append(self._servers[cfg])
        for server in fresh:
            try:
                server.wait_ready(timeout)
            except Exception:
                del self._servers[server.config]
                server.stop()
                raise
        return [self._servers[c] for c in configs]

    def stop(self, config: ServerConfig) -> None:
        server = self._servers.pop(config, None)
        if server is not None:
            server.stop()

    def stop_all(self) -> None:
        for server in self._servers.values():
            server.stop()
        self._servers.clear()


def chat(base_url: str, model: str, content: str, max_tokens: int = 16,
         extra: Mapping[str, object] | None = None) -> dict:
    """One non-streaming chat completion; raises on a non-200 answer."""
    resp = httpx.post(
        f"{base_url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": content}],
              "max_tokens": max_tokens, **(extra or {})},
        timeout=120,
    )
    resp.raise_for_status()
    return resp.json()
