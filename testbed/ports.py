"""A free loopback TCP port for test servers (vLLM, OTLP receiver, Prometheus, exporters).

The port is bound later by another process (a vLLM server starts tens of
seconds after its port is chosen). A port from the kernel's ephemeral range
could be handed meanwhile to any outgoing connection or to a port-0 bind
(torch's process group, gRPC channels), so ports are drawn below that range
and checked free; only if none is found does the kernel pick one.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_RANDOM = random.SystemRandom()


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    floor = _ephemeral_floor()
    for _ in range(50):
        port = _RANDOM.randrange(max(1024, floor - 12000), floor)
        if _bindable(port):
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
