"""``load_aware`` (the BanaServe paper's policy): send each request to the least loaded worker.

No prefix affinity: with the global KV store any instance can reuse any prefix, so the only
thing that matters is load. Score of worker ``w`` (lower is better):

    compute(w) = (max(polled_reqs, in_flight) + waiting_tokens / chunk) / capacity
    memory(w)  = max(token_usage, in_flight_tokens / pool)
    score(w)   = w_compute * compute(w) + w_memory * memory(w)

where ``polled_reqs`` = running + waiting requests from the last ``/v1/loads`` poll,
``in_flight`` = requests this router has sent to ``w`` and not yet finished (exact and fresh
between polls), ``waiting_tokens`` = the worker's waiting uncached prompt tokens,
``capacity`` = the worker's ``max_running_requests`` (``default_capacity`` before the first poll),
``token_usage`` = the KV pool in use from the last poll, ``in_flight_tokens`` = prompt + requested
completion tokens of this router's requests in flight there, ``pool`` = its
``max_total_num_tokens``. The second term keeps ``memory`` fresh between polls: without it, at
GPU scale (256 slots, so one request adds 1/256 to ``compute``) every request between two polls
went to the instance whose stale ``token_usage`` was lowest (found in simulation, 64 instances:
TTFT p50 0.56 s against round robin's 0.21 s; ``docs/benchmarks.md``, "Cluster simulator").
``compute`` is 1.0 at a full batch and keeps growing with the queue beyond it (so saturated
workers stay ordered); ``memory`` is in [0, 1]. Ties (within ``tie_epsilon``) are broken
uniformly at random.

Parameters: ``w_compute`` (default 1.0), ``w_memory`` (0.5), ``chunk`` (prompt tokens that count
as one request, 512), ``default_capacity`` (8), ``tie_epsilon`` (1e-9), ``seed`` (none).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from router.policy.base import (
    RequestFeatures,
    register,
    reject_unknown,
    take_float,
    take_seed,
)
from router.policy.views import WorkerView


@register("load_aware")
class LoadAware:
    name: str

    def __init__(self, params: dict[str, str]) -> None:
        params = dict(params)
        self.w_compute = take_float(params, "w_compute", 1.0)
        self.w_memory = take_float(params, "w_memory", 0.5)
        self.chunk = take_float(params, "chunk", 512.0, minimum=1.0)
        self.default_capacity = take_float(params, "default_capacity", 8.0, minimum=1.0)
        self.tie_epsilon = take_float(params, "tie_epsilon", 1e-9)
        seed = take_seed(params)
        reject_unknown("load_aware", params)
        self._rng = random.Random(seed)

    def score(self, worker: WorkerView) -> float:
        load = worker.load
        polled = load.num_running_reqs + load.num_waiting_reqs
        capacity = load.max_running_requests or self.default_capacity
        reqs = max(polled, worker.in_flight) + load.num_waiting_uncached_tokens / self.chunk
        compute = reqs / capacity
        memory = load.token_usage
        if load.max_total_num_tokens:
            memory = max(memory, worker.in_flight_tokens / load.max_total_num_tokens)
        memory = min(1.0, max(0.0, memory))
        return self.w_compute * compute + self.w_memory * memory

    def pick(self, candidates: Sequence[WorkerView], request: RequestFeatures) -> WorkerView:
        scores = [self.score(w) for w in candidates]
        best = min(scores)
        tied = [w for w, s in zip(candidates, scores, strict=True) if s - best <= self.tie_epsilon]
        return tied[0] if len(tied) == 1 else self._rng.choice(tied)
