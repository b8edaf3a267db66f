"""``power_of_two``: sample two healthy workers at random and keep the one with the lower
``least_load`` score (same formula and parameters as ``least_load``)."""

from __future__ import annotations

from collections.abc import Sequence

from router.policy.base import RequestFeatures, register
from router.policy.least_load import SMGScorer
from router.policy.views import WorkerView


@register("power_of_two")
class PowerOfTwo:
    name: str

    def __init__(self, params: dict[str, str]) -> None:
        self.scorer = SMGScorer("power_of_two", params)

    def pick(self, candidates: Sequence[WorkerView], request: RequestFeatures) -> WorkerView:
        if len(candidates) <= 2:
            return self.scorer.best(candidates)
        return self.scorer.best(self.scorer.rng.sample(list(candidates), 2))
