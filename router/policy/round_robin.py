"""``round_robin``: each request goes to the next healthy worker in turn. No parameters."""

from __future__ import annotations

from collections.abc import Sequence

from router.policy.base import RequestFeatures, register, reject_unknown
from router.policy.views import WorkerView


@register("round_robin")
class RoundRobin:
    name: str

    def __init__(self, params: dict[str, str]) -> None:
        reject_unknown("round_robin", dict(params))
        self._next = 0

    def pick(self, candidates: Sequence[WorkerView], request: RequestFeatures) -> WorkerView:
        chosen = candidates[self._next % len(candidates)]
        self._next += 1
        return chosen
