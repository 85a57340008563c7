"""A streaming OpenAI-API client that timestamps every token on arrival.

This is the independent reference for TTFT and inter-token latency: the server's
own telemetry is checked against what a client actually saw. Each request asks
vLLM for ``return_token_ids`` so a chunk's token count is exact even when random
weights produce tokens that decode to empty text.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class StreamTiming:
    """What one streamed request looked like from the client (wall-clock ns)."""

    request_id: str = ""
    sent_ns: int = 0
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


async def stream_request(
    client: httpx.AsyncClient,
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
    """Stream one chat (``messages``) or completion (``prompt``) request and time it."""
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
    url = f"{base_url}/v1/{'chat/completions' if chat else 'completions'}"
    t = StreamTiming()
    t.sent_ns = time.time_ns()
    try:
        async with client.stream("POST", url, json=body, headers=headers,
                                 timeout=timeout) as resp:
            t.status = resp.status_code
            if resp.status_code != 200:
                t.error = (await resp.aread()).decode(errors="replace")[:500]
                return t
            async for line in resp.aiter_lines():
                now = time.time_ns()
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                payload = json.loads(data)
                if "error" in payload:
                    t.error = str(payload["error"])[:500]
                    break
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
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        t.error = f"{type(exc).__name__}: {exc}"
    finally:
        t.done_ns = time.time_ns()
    return t


async def run_load(
    base_url: str,
    model: str,
    requests: Sequence[dict[str, Any]],
    concurrency: int,
    on_done: Callable[[StreamTiming], None] | None = None,
) -> list[StreamTiming]:
    """Send ``requests`` (kwargs for :func:`stream_request`) with bounded concurrency."""
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits) as client:

        async def one(kwargs: dict[str, Any]) -> StreamTiming:
            async with sem:
                timing = await stream_request(client, base_url, model, **kwargs)
            if on_done:
                on_done(timing)
            return timing

        return list(await asyncio.gather(*(one(r) for r in requests)))


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
        (max(t.done_ns for t in timings) - min(t.sent_ns for t in timings)) / 1e9
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
