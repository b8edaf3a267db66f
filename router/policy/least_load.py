"""``least_load``: SGLang router (SMG)'s formula, as a baseline. Lower score wins:

    score(w) = (waiting_uncached_tokens + in_flight_tokens) / max(gen_throughput, min_throughput)
               + lam * k / (1 - k),        k = min(token_usage, max_usage)

``waiting_uncached_tokens``, ``gen_throughput`` (tokens/s) and ``token_usage`` come from the last
``/v1/loads`` poll; ``in_flight_tokens`` is the router's own credit for what it dispatched
(prompt + requested completion tokens), so bursts between polls do not all land on one worker.
The first term estimates seconds of queued work; the second grows without bound as the KV pool
fills. Ties are broken at random.

Parameters: ``lam`` (1.0), ``min_throughput`` (tokens/s floor, 1.0), ``max_usage`` (0.99),
``seed`` (none).
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


def smg_score(worker: WorkerView, lam: float, min_throughput: float, max_usage: float) -> float:
    load = worker.load
    work = load.num_waiting_uncached_tokens + worker.in_flight_tokens
    usage = min(max(load.token_usage, 0.0), max_usage)
    return work / max(load.gen_throughput, min_throughput) + lam * usage / (1.0 - usage)


class SMGScorer:
    """Parameters and scoring shared by ``least_load`` and ``power_of_two``."""

    def __init__(self, name: str, params: dict[str, str]) -> None:
        params = dict(params)
        self.lam = take_float(params, "lam", 1.0)
        self.min_throughput = take_float(params, "min_throughput", 1.0, minimum=1e-6)
        self.max_usage = take_float(params, "max_usage", 0.99)
        if self.max_usage >= 1.0:
            raise ValueError(f"policy parameter max_usage={self.max_usage} must be < 1")
        seed = take_seed(params)
        reject_unknown(name, params)
        self.rng = random.Random(seed)

    def score(self, worker: WorkerView) -> float:
        return smg_score(worker, self.lam, self.min_throughput, self.max_usage)

    def best(self, candidates: Sequence[WorkerView]) -> WorkerView:
        scores = [self.score(w) for w in candidates]
        low = min(scores)
        tied = [w for w, s in zip(candidates, scores, strict=True) if s - low <= 1e-12]
        return tied[0] if len(tied) == 1 else self.rng.choice(tied)


@register("least_load")
class LeastLoad:
    name: str

    def __init__(self, params: dict[str, str]) -> None:
        self.scorer = SMGScorer("least_load", params)

    def pick(self, candidates: Sequence[WorkerView], request: RequestFeatures) -> WorkerView:
        return self.scorer.best(candidates)
