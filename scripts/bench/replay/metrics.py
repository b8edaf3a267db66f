"""The replay benchmark's numbers: latency percentiles, throughput, goodput, load over time.

Who calls: ``scripts.bench.replay.run``: :func:`summarise` on one run's results;
:class:`LoadSampler` runs beside the sender and reads the target's per-worker load every
``interval_s`` (BanaServe's router: ``GET /workers``; anything else: ``GET /v1/loads``).

Definitions (the field's usual ones, as in SGLang's ``bench_serving``): TTFT from sending to
the first content chunk; TPOT = (end to end - TTFT) / (output tokens - 1) per request; ITL =
every gap between content chunks; throughput = output tokens of successful requests / wall
time from the first send to the last answer; goodput = requests meeting both SLOs (TTFT and
TPOT) per second, and as a share of all requests sent (a failed request misses its SLO).
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from scripts.bench.replay.client import Result

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class SLO:
    ttft_ms: float = 2000.0
    """A request meets its SLO when its time to first token is at most this..."""
    tpot_ms: float = 200.0
    """...and its mean time per output token after the first is at most this."""

    def __post_init__(self) -> None:
        if self.ttft_ms <= 0 or self.tpot_ms <= 0:
            raise ValueError(f"SLO: ttft_ms and tpot_ms must be > 0 (got {self.ttft_ms}, "
                             f"{self.tpot_ms})")

    def met(self, r: Result) -> bool:
        return (r.ok and r.ttft is not None and r.ttft * 1000 <= self.ttft_ms
                and (r.tpot is None or r.tpot * 1000 <= self.tpot_ms))


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _stats(values: list[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {"mean": sum(values) / len(values) if values else None}
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(values, q)
    return out


def summarise(results: list[Result], wall_s: float, slo: SLO) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    good = [r for r in results if slo.met(r)]
    return {
        "requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "wall_s": wall_s, "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall_s if wall_s > 0 else None,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else None,
        "goodput_requests_per_s": len(good) / wall_s if wall_s > 0 else None,
        "goodput_share": len(good) / len(results) if results else None,
        "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms},
        "ttft_s": _stats([r.ttft for r in ok if r.ttft is not None]),
        "tpot_s": _stats([r.tpot for r in ok if r.tpot is not None]),
        "itl_s": _stats([x for r in ok for x in r.itl]),
        "e2e_s": _stats([r.e2e for r in ok if r.e2e is not None]),
    }


class LoadSampler:
    """Per-worker load over time from the target, every ``interval_s`` while running."""

    def __init__(self, url: str, interval_s: float = 1.0) -> None:
        self.url = url
        self.interval_s = interval_s
        self.samples: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        started = time.perf_counter()
        timeout = aiohttp.ClientTimeout(total=max(2.0, self.interval_s * 2))
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                at = time.perf_counter() - started
                workers = await self._read(session)
                if workers is not None:
                    self.samples.append({"t": round(at, 3), "workers": workers})
                await asyncio.sleep(max(0.0, started + at + self.interval_s
                                        - time.perf_counter()))

    async def _read(self, session: aiohttp.ClientSession) -> dict[str, Any] | None:
        try:
            async with session.get(self.url + "/workers") as resp:
                if resp.status == 200:
                    body = await resp.json()
                    return {w["url"]: {"running": w["load"]["num_running_reqs"],
                                       "waiting": w["load"]["num_waiting_reqs"],
                                       "token_usage": w["load"]["token_usage"],
                                       "in_flight": w.get("in_flight")}
                            for w in body.get("workers", [])}
            async with session.get(self.url + "/v1/loads") as resp:
                if resp.status == 200:
                    body = await resp.json()
                    return {f"{self.url}#dp{r.get('dp_rank', i)}": {
                        "running": r.get("num_running_reqs"), "waiting": r.get("num_waiting_reqs"),
                        "token_usage": r.get("token_usage")}
                        for i, r in enumerate(body.get("loads", []))}
        except (TimeoutError, aiohttp.ClientError, KeyError, ValueError, TypeError):
            return None
        return None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
