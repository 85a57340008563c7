"""``llmtrace collector`` as its own process, as a deployment runs it.

The console script is started with ephemeral ports; the ports it bound are read
from the line it prints once it listens, so nothing races for a pre-chosen port.
"""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from testbed.procs import console_script

_LISTENING = "llmtrace collector listening on "


@dataclass
class CollectorProcess:
    workdir: Path
    forward_endpoint: str = ""
    prices: Path | None = None
    extra_args: tuple[str, ...] = ()
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "collector.log"

    @property
    def otlp_grpc(self) -> str:
        return f"http://127.0.0.1:{self.ports['grpc']}"

    @property
    def metrics_target(self) -> str:
        return f"127.0.0.1:{self.ports['admin']}"

    def start(self, timeout: float = 60.0) -> CollectorProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [console_script("llmtrace"), "collector",
                   "--grpc-endpoint", "127.0.0.1:0", "--http-endpoint", "127.0.0.1:0",
                   "--admin-endpoint", "127.0.0.1:0", *self.extra_args]
        if self.forward_endpoint:
            command += ["--forward-endpoint", self.forward_endpoint]
        if self.prices is not None:
            command += ["--prices", str(self.prices)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLMTRACE_")}
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True,
                                     env=env, start_new_session=True)
        log.close()
        found = threading.Event()

        def read() -> None:  # keep draining stdout into the log after the first line
            with self.log_path.open("a") as out:
                for line in self.proc.stdout:
                    if line.startswith(_LISTENING) and not found.is_set():
                        self.ports = ast.literal_eval(line.removeprefix(_LISTENING).strip())
                        found.set()
                    out.write(line)
                    out.flush()

        threading.Thread(target=read, name="collector-stdout", daemon=True).start()
        deadline = time.monotonic() + timeout
        while not found.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"llmtrace collector did not start:\n"
                                   f"{self.log_path.read_text(errors='replace')[-3000:]}")
        return self

    def stop(self, grace: float = 15.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # it drains, then exits
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
