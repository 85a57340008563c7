"""Headless Chromium (Debian's ``chromium`` package) for pages a person would look at.

``render_dom`` loads a page, lets its scripts run (virtual time, so a chart
library finishes drawing without a fixed sleep) and returns the DOM as the
browser built it; ``screenshot`` writes what it drew. The flags keep Chromium
off the network: this machine's closed network refuses its background calls.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage")


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _run(page: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    binary = chromium()
    if binary is None:
        raise FileNotFoundError("chromium is not installed: run `make system`")
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        return subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}",
                               "--virtual-time-budget=30000", *args, page.resolve().as_uri()],
                              capture_output=True, text=True, timeout=timeout, check=True)


def render_dom(page: Path, timeout: float = 120.0) -> str:
    return _run(page, "--dump-dom", timeout=timeout).stdout


def screenshot(page: Path, out: Path, width: int = 1400, height: int = 4000,
               timeout: float = 120.0) -> Path:
    _run(page, f"--screenshot={out.resolve()}", f"--window-size={width},{height}",
         timeout=timeout)
    return out
