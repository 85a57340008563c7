"""The demo's multi-tenant load, sent from a process of its own.

The client is the independent reference for every latency the dashboards show,
so its timestamps must not wait for anything else the demo does: the trace
store decoding spans, report building and Prometheus queries all share the
demo's interpreter lock. ``run_in_child`` sends the load from a spawned process
and reports each finished request back for the progress bar.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import secrets
from collections.abc import Callable

from testbed.models import DENSE
from testbed.stream_client import StreamTiming, run_load, stream_request

#: tenant -> (prompt words, output tokens): a chat app, a RAG app over one shared
#: document (its prefix is cached), a summariser
TENANTS = {"acme": ((8, 40), (48, 64)), "globex": ((60, 120), (8, 16)),
           "initech": ((60, 140), (24, 32))}
TOPICS = ["the prefix cache", "chunked prefill", "the decode loop", "expert routing",
          "request queues", "KV transfer", "batch scheduling", "token latency"]
DOCUMENT = " ".join(f"Section {i}: how {TOPICS[i % len(TOPICS)]} shapes serving cost."
                    for i in range(8))  # about 230 tokens


def make_requests(n: int, seed: int = 0) -> list[dict]:
    """``n`` streaming chat requests, tenants interleaved, each with its own trace."""
    rng = random.Random(seed)
    names = list(TENANTS)
    requests = []
    for i in range(n):
        tenant = names[rng.randrange(len(names))]
        (lo, hi), (out_lo, out_hi) = TENANTS[tenant]
        words = " ".join(rng.choice(TOPICS) for _ in range(rng.randint(lo, hi)))
        prefix = f"{DOCUMENT}\n\n" if tenant == "globex" else ""
        content = f"{prefix}Request {i}: please explain {rng.choice(TOPICS)}. {words}"
        requests.append({"messages": [{"role": "user", "content": content}],
                         "max_tokens": rng.randint(out_lo, out_hi),
                         "headers": {"x-tenant-id": tenant,
                                     "traceparent": f"00-{secrets.token_hex(16)}-"
                                                    f"{secrets.token_hex(8)}-01"}})
    return requests


def trace_id(request: dict) -> str:
    return request["headers"]["traceparent"].split("-")[1]


def tenant(request: dict) -> str:
    return request["headers"]["x-tenant-id"]


def split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def warm_up(url: str, replicas: int) -> None:
    """Each tenant's series on each replica before the measured window: Prometheus's
    rate() cannot see a counter's first increment, which creates the series."""
    for name in TENANTS:
        for _ in range(replicas):  # round robin: consecutive requests go to each replica
            t = stream_request(url, DENSE, messages=[{"role": "user", "content": "hi"}],
                               max_tokens=2, headers={"x-tenant-id": name})
            if not t.ok:
                raise RuntimeError(f"warm-up request failed: {t.status} {t.error}")


def drive(url: str, requests: list[dict], levels: list[int],
          on_level: Callable[[int], None] = lambda _c: None,
          on_done: Callable[[StreamTiming], None] = lambda _t: None) -> list[StreamTiming]:
    """The requests in equal parts, one part per concurrency level, in turn."""
    timings: list[StreamTiming] = []
    done = 0
    for conc, count in zip(levels, split(len(requests), len(levels)), strict=True):
        on_level(conc)
        timings += run_load(url, DENSE, requests[done:done + count], conc, on_done=on_done)
        done += count
    return timings


def _child(url: str, requests: list[dict], levels: list[int], events) -> None:
    try:
        timings = drive(url, requests, levels, on_level=lambda c: events.put(("level", c)),
                        on_done=lambda _t: events.put(("done", 1)))
        events.put(("result", timings))
    except BaseException as exc:  # reported to the parent, which raises it
        events.put(("error", f"{type(exc).__name__}: {exc}"))


def run_in_child(url: str, requests: list[dict], levels: list[int],
                 on_level: Callable[[int], None], on_done: Callable[[], None],
                 timeout: float = 900.0) -> list[StreamTiming]:
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    child = ctx.Process(target=_child, args=(url, requests, levels, events),
                        name="demo-client", daemon=True)
    child.start()
    try:
        while True:
            kind, value = events.get(timeout=timeout)
            if kind == "level":
                on_level(value)
            elif kind == "done":
                on_done()
            elif kind == "result":
                return value
            else:
                raise RuntimeError(f"the load client failed: {value}")
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
