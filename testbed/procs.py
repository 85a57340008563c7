"""The processes under a server's root process, and their CPU time, read from /proc (Linux)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import NamedTuple

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU of one process so far, its exited threads included
    (``/proc/<pid>/stat``, in clock ticks: 10 ms here)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


class Proc(NamedTuple):
    parent: int
    name: str  # the kernel's short name (vLLM renames its processes, e.g. VLLM::EngineCore)
    command: str  # the full command line, arguments space-separated


def descendants(root: int) -> dict[int, Proc]:
    """Every live process under ``root``, ``root`` included."""
    procs: dict[int, Proc] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        procs[int(entry.name)] = Proc(int(stat.rsplit(")", 1)[1].split()[1]),
                                      stat[stat.index("(") + 1:stat.rindex(")")], command)

    def under_root(pid: int) -> bool:
        while pid > 1:
            if pid == root:
                return True
            pid = procs[pid].parent if pid in procs else 0
        return False

    return {pid: proc for pid, proc in procs.items() if under_root(pid)}


def console_script(name: str) -> str:
    """A console script installed beside this interpreter (the virtualenv's), else on PATH."""
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed (run `make install`)")
    return found
