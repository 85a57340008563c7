"""A streaming OpenAI-API client that timestamps every token on arrival.

This is the independent reference for TTFT and inter-token latency: the server's
own telemetry is checked against what a client actually saw. Each request asks
vLLM for ``return_token_ids`` so a chunk's token count is exact even when random
weights produce tokens that decode to empty text.
"""

from __future__ import annotations

import http.client
import json
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


@dataclass
class StreamTiming:
    """What one streamed request looked like from the client (wall-clock ns)."""

    request_id: str = ""
    started_ns: int = 0  # before the client library touched the request
    sent_ns: int = 0  # the request body was written to the socket
    done_ns: int = 0
    chunk_ns: list[int] = field(default_factory=list)  # arrival of each token-bearing chunk
    chunk_tokens: list[int] = field(default_factory=list)  # tokens carried by that chunk
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    finish_reason: str | None = None
    status: int = 0
    error: str | None = None
    text: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    @property
    def tokens(self) -> int:
        return sum(self.chunk_tokens)

    @property
    def ttft_s(self) -> float | None:
        return (self.chunk_ns[0] - self.sent_ns) / 1e9 if self.chunk_ns else None

    @property
    def e2e_s(self) -> float:
        return (self.done_ns - self.sent_ns) / 1e9

    @property
    def itl_s(self) -> list[float]:
        """Gaps between consecutive token-bearing chunks (one token each when unbatched)."""
        return [(b - a) / 1e9 for a, b in zip(self.chunk_ns, self.chunk_ns[1:], strict=False)]


def _chunk_tokens(choice: dict[str, Any]) -> int:
    ids = choice.get("token_ids")
    if ids is not None:
        return len(ids)
    delta = choice.get("delta") or {}
    text = delta.get("content") if "delta" in choice else choice.get("text")
    return 1 if text else 0


def stream_request(
    base_url: str,
    model: str,
    *,
    messages: list[dict[str, str]] | None = None,
    prompt: str | None = None,
    max_tokens: int = 32,
    ignore_eos: bool = True,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
    timeout: float = 120.0,
) -> StreamTiming:
    """Stream one chat (``messages``) or completion (``prompt``) request and time it.

    A plain blocking socket (``http.client``) keeps the client's own overhead out
    of the measurement: ``sent_ns`` is taken when the request is on the wire and
    each chunk's time as soon as ``readline`` returns it.
    """
    chat = messages is not None
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": ignore_eos,
        "return_token_ids": True,
        **(extra or {}),
    }
    if chat:
        body["messages"] = messages
    else:
        body["prompt"] = prompt
    url = urlsplit(base_url)
    path = f"{url.path.rstrip('/')}/v1/{'chat/completions' if chat else 'completions'}"
    payload = json.dumps(body).encode()
    t = StreamTiming()
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    try:
        t.started_ns = time.time_ns()
        conn.putrequest("POST", path, skip_accept_encoding=True)
        for key, value in {"Content-Type": "application/json", "Accept": "text/event-stream",
                           "Content-Length": str(len(payload)), **(headers or {})}.items():
            conn.putheader(key, value)
        conn.endheaders(payload)
        t.sent_ns = time.time_ns()
        resp = conn.getresponse()
        t.status = resp.status
        if resp.status != 200:
            t.error = resp.read().decode(errors="replace")[:500]
            return t
        while True:
            line = resp.readline()
            now = time.time_ns()
            if not line:
                break
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            payload_obj = json.loads(data)
            if "error" in payload_obj:
                t.error = str(payload_obj["error"])[:500]
                break
            _absorb(t, payload_obj, now, chat)
    except (OSError, http.client.HTTPException, json.JSONDecodeError) as exc:
        t.error = f"{type(exc).__name__}: {exc}"
    finally:
        t.done_ns = time.time_ns()
        conn.close()
    return t


def _absorb(t: StreamTiming, payload: dict[str, Any], now: int, chat: bool) -> None:
    t.request_id = t.request_id or payload.get("id", "")
    usage = payload.get("usage")
    if usage:
        t.prompt_tokens = usage.get("prompt_tokens")
        t.completion_tokens = usage.get("completion_tokens")
        details = usage.get("prompt_tokens_details") or {}
        t.cached_tokens = details.get("cached_tokens")
    for choice in payload.get("choices") or []:
        n = _chunk_tokens(choice)
        if n:
            t.chunk_ns.append(now)
            t.chunk_tokens.append(n)
        delta = choice.get("delta") or {}
        t.text += (delta.get("content") if chat else choice.get("text")) or ""
        if choice.get("finish_reason"):
            t.finish_reason = choice["finish_reason"]


def run_load(
    base_url: str,
    model: str,
    requests: Sequence[dict[str, Any]],
    concurrency: int,
    on_done: Callable[[StreamTiming], None] | None = None,
) -> list[StreamTiming]:
    """Send ``requests`` (kwargs for :func:`stream_request`) with bounded concurrency.

    One thread per concurrent stream: threads spend their time blocked in
    ``recv``, so timestamps are taken the moment data arrives.
    """

    def one(kwargs: dict[str, Any]) -> StreamTiming:
        timing = stream_request(base_url, model, **kwargs)
        if on_done:
            on_done(timing)
        return timing

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="stream") as pool:
        return list(pool.map(one, requests))


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); NaN for no data."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(frozen=True)
class LoadSummary:
    requests: int
    errors: int
    ttft_p50_s: float
    ttft_p99_s: float
    itl_p50_s: float
    itl_p99_s: float
    output_tokens: int
    wall_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else math.nan


def summarize(timings: Sequence[StreamTiming]) -> LoadSummary:
    ok = [t for t in timings if t.ok]
    ttfts = [t.ttft_s for t in ok if t.ttft_s is not None]
    itls = [gap for t in ok for gap in t.itl_s]
    wall = (
        (max(t.done_ns for t in timings) - min(t.started_ns for t in timings)) / 1e9
        if timings else 0.0
    )
    return LoadSummary(
        requests=len(timings),
        errors=len(timings) - len(ok),
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p99_s=percentile(ttfts, 99),
        itl_p50_s=percentile(itls, 50),
        itl_p99_s=percentile(itls, 99),
        output_tokens=sum(t.tokens for t in ok),
        wall_s=wall,
    )
