"""Simulated requests from the replay benchmark's traces or from a measured run.

Who calls: ``scripts.sim.experiment`` (``from_trace``: the trace readers, Poisson arrivals and
length scaling of ``scripts.bench.replay.workload``, so a simulated run asks exactly what a
real replay of the same ``WorkloadConfig`` asks, without building prompt text) and
``scripts.sim.calibrate`` (``from_measured``: the requests a real run sent, at the times it
sent them, with the token counts SGLang reported).
"""

from __future__ import annotations

from typing import Any

from scripts.bench.replay.workload import (
    MOONCAKE_BLOCK_TOKENS,
    WorkloadConfig,
    WorkloadError,
    trace_rows,
)
from scripts.sim.request import SimRequest


def from_trace(cfg: WorkloadConfig, slo_s: float = 30.0) -> list[SimRequest]:
    """The requests of ``cfg`` (``azure_conv`` or ``mooncake``); ``WorkloadError`` if the data
    file is missing."""
    if cfg.source not in ("azure_conv", "mooncake"):
        raise WorkloadError(f"workload: the simulator replays traces (azure_conv, mooncake), "
                            f"not {cfg.source!r}")
    block = max(1, round(MOONCAKE_BLOCK_TOKENS * cfg.length_scale))
    return [SimRequest(i, row.at_s, row.prompt_tokens, row.output_tokens, row.hash_ids, block,
                       slo_s) for i, row in enumerate(trace_rows(cfg))]


def from_measured(run: dict[str, Any], workload: dict[str, Any] | None = None,
                  shared_prefix_tokens: int = 0) -> list[SimRequest]:
    """The requests of one run of a replay-benchmark result JSON (``runs[i]``): sent at their
    ``sent_at`` with their measured prompt and output token counts. With the result's
    ``config.workload`` and its trace at hand, Mooncake requests get their prefix blocks.
    ``shared_prefix_tokens``: leading tokens every request shares (the chat template)."""
    blocks: dict[int, tuple[tuple[int, ...], int]] = {}
    if workload and workload.get("source") == "mooncake":
        try:
            cfg = WorkloadConfig(**{**workload, "rate": None})
            blocks = {r.index: (r.block_hashes, r.block_tokens) for r in from_trace(cfg)}
        except WorkloadError:
            blocks = {}
    out = []
    for rec in run["requests"]:
        if rec.get("prompt_tokens") is None:
            raise ValueError(f"measured request {rec.get('index')}: no prompt_tokens")
        index = int(rec["index"])
        ids, size = blocks.get(index, ((), MOONCAKE_BLOCK_TOKENS))
        out.append(SimRequest(index, float(rec["sent_at"]), int(rec["prompt_tokens"]),
                              max(1, int(rec["output_tokens"])), ids, size,
                              shared_prefix_tokens=shared_prefix_tokens))
    return out
