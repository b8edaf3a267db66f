"""Prompt tokens each worker served from each cache tier, read from the workers' own counters.

SGLang counts, per worker, the prompt tokens it was sent (``sglang:prompt_tokens_total``) and
those it found cached (``sglang:cached_tokens_total``, by ``cache_source``: ``device`` for its
radix cache, ``host`` for HiCache's host tier, ``storage`` for the L3, e.g. BanaServe's kvstore).
``CacheReport`` scrapes every pool member's ``/metrics`` each ``interval_s`` and keeps the last
reading, which ``router.metrics`` exports as ``banaserve_worker_prompt_tokens`` and
``banaserve_worker_cached_tokens{tier}``: the fleet's hit rate per tier, seen from the router,
whichever router replica or client sent the traffic. The values are the workers' own counters
(they go back to 0 when a worker restarts, which Prometheus reads as a counter reset).

A worker without ``/metrics`` (started without ``--enable-metrics``) is skipped and noted in
``stats()``; one that stops answering keeps its last reading until it answers again or leaves
the pool. ``parse`` is pure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp

from router.workers import WorkerPool

log = logging.getLogger(__name__)

TIERS = ("device", "host", "storage")
_SAMPLE = re.compile(r"^sglang:(prompt_tokens_total|cached_tokens_total)(\{[^}]*\})? "
                     r"([0-9.eE+-]+)$", re.M)
_SOURCE = re.compile(r'cache_source="([^"]*)"')


@dataclass
class CacheCounters:
    """One worker's cumulative counters as last read."""

    prompt_tokens: float = 0.0
    cached_tokens: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TIERS, 0.0))


def parse(text: str) -> CacheCounters:
    """The counters in one worker's Prometheus text. Series are summed over their other labels
    (model, engine); a cached-tokens series without ``cache_source`` counts as ``device`` (older
    SGLang reported one total, all from the radix cache); unknown sources are kept by name."""
    out = CacheCounters()
    for name, labels, value in _SAMPLE.findall(text):
        if name == "prompt_tokens_total":
            out.prompt_tokens += float(value)
        else:
            source = _SOURCE.search(labels or "")
            tier = source.group(1) if source else "device"
            out.cached_tokens[tier] = out.cached_tokens.get(tier, 0.0) + float(value)
    return out


class CacheReport:
    """See the module docstring. ``running(session)`` owns the scrape loop."""

    def __init__(self, pool: WorkerPool, interval_s: float) -> None:
        if interval_s <= 0:
            raise ValueError(f"cache report interval must be > 0 s, got {interval_s}")
        self._pool = pool
        self._interval = interval_s
        self._counters: dict[str, CacheCounters] = {}
        self._unavailable: dict[str, str] = {}

    def counters(self) -> dict[str, CacheCounters]:
        """Worker URL -> its last reading (pool members only)."""
        return dict(self._counters)

    def stats(self) -> dict[str, dict[str, object]]:
        """For ``/workers``: per worker, its counters and the share served from each tier."""
        out: dict[str, dict[str, object]] = {}
        for url in self._pool.urls:
            c = self._counters.get(url)
            if c is None:
                out[url] = {"available": False, "why": self._unavailable.get(url, "not read yet")}
                continue
            out[url] = {"available": True, "prompt_tokens": c.prompt_tokens,
                        "cached_tokens": dict(c.cached_tokens),
                        "hit_rate": {t: (n / c.prompt_tokens if c.prompt_tokens else None)
                                     for t, n in c.cached_tokens.items()}}
        return out

    @contextlib.asynccontextmanager
    async def running(self, session: aiohttp.ClientSession) -> AsyncIterator[None]:
        task = asyncio.create_task(self._loop(session), name="cache-report")
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _loop(self, session: aiohttp.ClientSession) -> None:
        while True:
            try:
                await self.scrape_all(session)
            except Exception:  # one bad answer must not end the loop; logged, retried
                log.exception("cache report: scrape failed")
            await asyncio.sleep(self._interval)

    async def scrape_all(self, session: aiohttp.ClientSession) -> None:
        members = set(self._pool.urls)
        for url in [u for u in self._counters if u not in members]:
            del self._counters[url]
        for url in [u for u in self._unavailable if u not in members]:
            del self._unavailable[url]
        await asyncio.gather(*(self._scrape(session, url) for url in members))

    async def _scrape(self, session: aiohttp.ClientSession, url: str) -> None:
        timeout = aiohttp.ClientTimeout(total=max(self._interval, 2.0))
        try:
            # the session does not decompress (it proxies bytes as they are): ask for plain text
            async with session.get(url + "/metrics", timeout=timeout,
                                   headers={"Accept-Encoding": "identity"}) as resp:
                if resp.status != 200:
                    self._unavailable[url] = f"GET /metrics answered {resp.status}"
                    return
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:  # ValueError: not text
            self._unavailable[url] = f"GET /metrics failed: {type(exc).__name__}"
            return
        self._counters[url] = parse(text)
        self._unavailable.pop(url, None)
