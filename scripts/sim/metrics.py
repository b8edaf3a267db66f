"""Simulated runs summarised exactly like measured ones (``scripts.bench.replay.metrics``).

Who calls: ``scripts.sim.experiment`` and ``scripts.sim.calibrate`` after ``Engine.run``. Each
finished ``SimRequest`` becomes a replay ``Result`` and the replay benchmark's own
``summarise`` computes TTFT/TPOT/e2e percentiles, throughput and goodput, so a simulated run and
a measured one have the same keys (ITL is not simulated per token and comes out empty).
"""

from __future__ import annotations

from typing import Any

from scripts.bench.replay.client import Result
from scripts.bench.replay.metrics import SLO, summarise
from scripts.sim.engine import SimResult


def to_results(sim: SimResult) -> list[Result]:
    out = []
    for r in sim.requests:
        out.append(Result(index=r.index, sent_at=r.arrival_s, ok=True, ttft=r.ttft, e2e=r.e2e,
                          output_tokens=r.output_tokens, prompt_tokens=r.prompt_tokens))
    for r in sim.rejected:
        out.append(Result(index=r.index, sent_at=r.arrival_s, ok=False,
                          error="prompt + output longer than the KV pool",
                          prompt_tokens=r.prompt_tokens))
    for r in sim.stalled:
        out.append(Result(index=r.index, sent_at=r.arrival_s, ok=False,
                          error="never admitted (simulation stalled)",
                          prompt_tokens=r.prompt_tokens))
    return sorted(out, key=lambda x: x.index)


def summarise_sim(sim: SimResult, slo: SLO) -> dict[str, Any]:
    results = to_results(sim)
    ok = [r for r in results if r.ok and r.e2e is not None]
    if not ok:
        return summarise(results, 0.0, slo)
    start = min(r.sent_at for r in results)
    end = max(r.sent_at + (r.e2e or 0.0) for r in ok)
    out = summarise(results, end - start, slo)
    prompt = sum(r.prompt_tokens for r in sim.requests) or 1
    out["prefix_hit_share"] = sum(r.cached_tokens for r in sim.requests) / prompt
    out["store_hit_share"] = sum(r.store_tokens for r in sim.requests) / prompt
    out["instances"] = sim.instances
    out["rebalance_actions"] = len(sim.decisions)
    return out
