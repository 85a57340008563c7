"""Read a Chrome trace as torch.profiler / Kineto writes it, onto the Unix clock.

Only complete events (``"ph": "X"``: a name, ``ts`` and ``dur``) are read: they
are what Kineto writes for operators, annotations, kernels and memory copies.
Instant, counter, flow and metadata events carry no interval to become a span;
of the metadata, process and thread names are kept.

Time: Kineto's ``ts`` and ``dur`` are microseconds (fractional, nanosecond
resolution). Since torch 2.4 ``ts`` is relative to the top-level
``baseTimeNanoseconds`` (Unix epoch nanoseconds, Kineto PRs #910/#928); before
that ``ts`` was Unix epoch microseconds itself. Nothing in an older file says
which clock it used, so a file without ``baseTimeNanoseconds`` is refused
unless the caller states the base (``base_time_ns=0`` for the older absolute
form): a profile placed at a guessed time would land outside every trace it
should join, silently.
"""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_GZIP_MAGIC = b"\x1f\x8b"


class ProfileError(ValueError):
    """The file cannot be converted; the message names the file and the problem."""


@dataclass(slots=True)
class Event:
    """One complete event, its interval in Unix epoch nanoseconds."""

    name: str
    cat: str
    pid: Any
    tid: Any
    start_ns: int
    end_ns: int
    args: dict


@dataclass
class ChromeTrace:
    path: str
    #: complete events in file order
    events: list[Event]
    #: pid -> process name (``process_name`` metadata)
    process_names: dict[Any, str] = field(default_factory=dict)
    host_name: str | None = None
    base_time_ns: int = 0


def _read_json(path: Path) -> Any:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except EOFError:
            raise ProfileError(f"{path}: truncated gzip (the file ends mid-stream; "
                               "was the profiler still writing it?)") from None
        except (gzip.BadGzipFile, zlib.error) as exc:
            raise ProfileError(f"{path}: corrupt gzip: {exc}") from None
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise ProfileError(f"{path}: not JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{path}: not JSON: {exc.msg} at line {exc.lineno} "
                           f"column {exc.colno}") from None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load(path: str | Path, base_time_ns: int | None = None) -> ChromeTrace:
    """Read ``path`` (``.json`` or gzip, detected by content) into complete events.

    ``base_time_ns`` overrides the file's ``baseTimeNanoseconds``; it is required
    when the file has none (pass 0 when its ``ts`` are Unix epoch microseconds).
    """
    path = Path(path)
    doc = _read_json(path)
    if isinstance(doc, list):  # the JSON Array Format: events only, no metadata
        doc = {"traceEvents": doc}
    if not isinstance(doc, dict) or not isinstance(doc.get("traceEvents"), list):
        raise ProfileError(f"{path}: not a Chrome trace (expected a JSON object with a "
                           "`traceEvents` list, as torch.profiler's export_chrome_trace "
                           "writes)")
    if base_time_ns is None:
        base = doc.get("baseTimeNanoseconds")
        if not isinstance(base, int) or isinstance(base, bool):
            raise ProfileError(
                f"{path}: no `baseTimeNanoseconds`, so its timestamps cannot be placed on "
                "the Unix clock (torch >= 2.4 writes it). Pass --base-time-ns N: 0 if the "
                "`ts` values are Unix epoch microseconds (torch < 2.4), else the epoch "
                "nanoseconds of ts=0")
        base_time_ns = base
    trace = ChromeTrace(str(path), [], host_name=doc.get("host_name"),
                        base_time_ns=base_time_ns)
    for ev in doc["traceEvents"]:
        if not isinstance(ev, dict):
            continue
        ph = ev.get("ph")
        if ph == "X":
            ts, dur, name = ev.get("ts"), ev.get("dur"), ev.get("name")
            if not (_number(ts) and _number(dur) and isinstance(name, str)) or dur < 0:
                continue
            start = base_time_ns + round(ts * 1000)
            args = ev.get("args")
            trace.events.append(Event(name, str(ev.get("cat", "")), ev.get("pid"),
                                      ev.get("tid"), start, start + round(dur * 1000),
                                      args if isinstance(args, dict) else {}))
        elif ph == "M" and ev.get("name") == "process_name":
            label = (ev.get("args") or {}).get("name")
            if isinstance(label, str):
                trace.process_names.setdefault(ev.get("pid"), label)
    if not trace.events:
        raise ProfileError(f"{path}: a Chrome trace without timed events (no `\"ph\": \"X\"` "
                           "event with `ts` and `dur`): nothing to convert")
    return trace
