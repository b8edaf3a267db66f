"""``random``: a uniformly random healthy worker. Parameter: ``seed`` (none)."""

from __future__ import annotations

import random as _random
from collections.abc import Sequence

from router.policy.base import RequestFeatures, register, reject_unknown, take_seed
from router.policy.views import WorkerView


@register("random")
class Random:
    name: str

    def __init__(self, params: dict[str, str]) -> None:
        params = dict(params)
        seed = take_seed(params)
        reject_unknown("random", params)
        self._rng = _random.Random(seed)

    def pick(self, candidates: Sequence[WorkerView], request: RequestFeatures) -> WorkerView:
        return self._rng.choice(list(candidates))
