"""Simulated requests from the replay benchmark's traces or from a measured run.

Who calls: ``scripts.sim.experiment`` (``from_trace``: the trace readers, Poisson arrivals and
length scaling of ``scripts.bench.replay.workload``, so a simulated run asks exactly what a
real replay of the same ``WorkloadConfig`` asks, without building prompt text) and
``scripts.sim.calibrate`` (``from_measured``: the requests a real run sent, at the times it
sent them, with the token counts SGLang reported).
"""

from __future__ import annotations

import os
from typing import Any

from scripts.bench.replay.workload import (
    MOONCAKE_BLOCK_TOKENS,
    WorkloadConfig,
    WorkloadError,
    _poisson_times,
    _read_azure,
    _read_mooncake,
    _scaled,
)
from scripts.sim.request import SimRequest


def from_trace(cfg: WorkloadConfig, slo_s: float = 30.0) -> list[SimRequest]:
    """The requests of ``cfg`` (``azure_conv`` or ``mooncake``); ``WorkloadError`` if the data
    file is missing."""
    if cfg.source not in ("azure_conv", "mooncake"):
        raise WorkloadError(f"workload: the simulator replays traces (azure_conv, mooncake), "
                            f"not {cfg.source!r}")
    if not os.path.exists(cfg.file):
        raise WorkloadError(f"workload: {cfg.file} not found (the {cfg.source} trace; see "
                            "../shared/data/README.md for where to download it)")
    rows = _read_azure(cfg) if cfg.source == "azure_conv" else _read_mooncake(cfg)
    if not rows:
        raise WorkloadError(f"workload: no rows in {cfg.file} after offset {cfg.offset}")
    times = (_poisson_times(len(rows), cfg.rate, cfg.seed) if cfg.rate
             else [t * cfg.time_scale for t, *_ in rows])
    block = max(1, round(MOONCAKE_BLOCK_TOKENS * cfg.length_scale))
    out = []
    for i, ((_, n_in, n_out, ids), at) in enumerate(zip(rows, times, strict=True)):
        n_prompt = min(_scaled(n_in, cfg, 10**9), cfg.max_input_tokens)
        n_gen = _scaled(n_out, cfg, cfg.max_output_tokens, cfg.min_output_tokens)
        out.append(SimRequest(i, at, n_prompt, n_gen, tuple(ids or ()), block, slo_s))
    return out


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
