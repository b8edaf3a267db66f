"""The replay benchmark's sender: open loop, OpenAI streaming API, one timestamp per chunk.

Who calls: ``scripts.bench.replay.run`` calls :func:`send_all` once per run with the workload's
requests; each request is sent at its ``at_s`` whether or not earlier ones have finished (open
loop), streamed (``stream_options.include_usage`` for the exact token count), and timed: time
to first token, the gap between content chunks (inter-token latency), end to end. A request
that fails (HTTP error, error event, stream cut) is recorded with why, never retried.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from scripts.bench.replay.workload import RequestSpec


@dataclass
class Result:
    index: int
    sent_at: float
    """Seconds after the start of the run."""
    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    """Gaps between content chunks after the first (one chunk is one token for SGLang)."""
    output_tokens: int = 0
    prompt_tokens: int | None = None

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "sent_at": round(self.sent_at, 4), "ok": self.ok,
                "error": self.error, "ttft": self.ttft, "e2e": self.e2e, "tpot": self.tpot,
                "output_tokens": self.output_tokens, "prompt_tokens": self.prompt_tokens,
                "itl": [round(x, 5) for x in self.itl]}


def request_body(spec: RequestSpec, model: str, api: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": spec.output_tokens, "temperature": 0,
                            "ignore_eos": True, "stream": True,
                            "stream_options": {"include_usage": True}}
    if api == "chat":
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    return body


async def send_one(session: aiohttp.ClientSession, url: str, spec: RequestSpec, model: str,
                   api: str, started: float) -> Result:
    path = "/v1/chat/completions" if api == "chat" else "/v1/completions"
    result = Result(spec.index, time.perf_counter() - started)
    t0 = time.perf_counter()
    last: float | None = None
    chunks = 0
    try:
        async with session.post(url + path, json=request_body(spec, model, api)) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return result
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    result.ok = result.error is None
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = str(event["error"])[:200]
                    continue
                usage = event.get("usage")
                if usage:
                    result.output_tokens = int(usage.get("completion_tokens") or 0)
                    result.prompt_tokens = usage.get("prompt_tokens")
                if not _has_content(event):
                    continue
                now = time.perf_counter()
                if result.ttft is None:
                    result.ttft = now - t0
                elif last is not None:
                    result.itl.append(now - last)
                last = now
                chunks += 1
            else:
                result.error = result.error or "the stream ended without [DONE]"
    except (TimeoutError, aiohttp.ClientError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:200]
        return result
    result.e2e = time.perf_counter() - t0
    if not result.output_tokens:
        result.output_tokens = chunks
    return result


def _has_content(event: dict[str, Any]) -> bool:
    for choice in event.get("choices") or []:
        delta = choice.get("delta") or {}
        if choice.get("text") or delta.get("content") or delta.get("reasoning_content"):
            return True
    return False


async def send_all(url: str, model: str, api: str, requests: list[RequestSpec],
                   timeout_s: float, on_done: Callable[[Result], None] | None = None,
                   ) -> tuple[list[Result], float]:
    """Send every request at its time; returns the results (in request order) and the run's
    wall time (start to the last answer)."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        started = time.perf_counter()

        async def at_time(spec: RequestSpec) -> Result:
            await asyncio.sleep(max(0.0, started + spec.at_s - time.perf_counter()))
            result = await send_one(session, url, spec, model, api, started)
            if on_done is not None:
                on_done(result)
            return result

        results = await asyncio.gather(*(at_time(spec) for spec in requests))
        return list(results), time.perf_counter() - started
