"""The simulated router: polled loads, in-flight counts and the REAL dispatch policies.

Who calls what: ``scripts.sim.engine.Engine`` calls ``poll(i, load)`` whenever instance ``i``'s
``/v1/loads`` reading is due (every ``poll_interval_s``, each worker on its own phase, as
``router.workers.WorkerPool`` polls), ``pick(request, pool)`` once per request (the policy built
by ``router.policy.build`` sees ``router.policy.views.WorkerView`` snapshots made of the last polled
reading plus this router's exact in-flight counts, exactly what the real handlers hand it), and
``finished(i, request)`` when a request leaves instance ``i``.
This module owns the router-side view of the workers; instances own their true state.
"""

from __future__ import annotations

from collections.abc import Sequence

from router.policy import build
from router.policy.base import Policy, RequestFeatures
from router.policy.views import WorkerLoad, WorkerView
from scripts.sim.request import SimRequest


class Frontend:
    def __init__(self, num_instances: int, policy: str, decode_policy: str | None = None) -> None:
        self.policy: Policy = build(policy)
        self.decode_policy: Policy = build(decode_policy or policy)
        self.loads = [WorkerLoad() for _ in range(num_instances)]
        self.in_flight = [0] * num_instances
        self.in_flight_tokens = [0] * num_instances
        self.total = [0] * num_instances

    def poll(self, index: int, load: WorkerLoad) -> None:
        self.loads[index] = load

    def view(self, index: int) -> WorkerView:
        return WorkerView(url=f"http://sim-{index}", healthy=True, in_flight=self.in_flight[index],
                          load=self.loads[index], total_requests=self.total[index],
                          in_flight_tokens=self.in_flight_tokens[index])

    def views(self) -> list[WorkerView]:
        return [self.view(i) for i in range(len(self.loads))]

    @staticmethod
    def features(req: SimRequest) -> RequestFeatures:
        return RequestFeatures(route="chat", max_tokens=req.output_tokens,
                               prompt_text=req.prompt_text, prompt_tokens=req.prompt_tokens)

    def pick(self, req: SimRequest, pool: Sequence[int], decode: bool = False) -> int:
        """The instance (one of ``pool``) the real policy chooses; counts it as in flight."""
        policy = self.decode_policy if decode else self.policy
        chosen = policy.pick([self.view(i) for i in pool], self.features(req))
        index = int(chosen.url.rsplit("-", 1)[1])
        self.sent(index, req)
        return index

    def sent(self, index: int, req: SimRequest) -> None:
        self.in_flight[index] += 1
        self.in_flight_tokens[index] += req.prompt_tokens + req.output_tokens
        self.total[index] += 1

    def finished(self, index: int, req: SimRequest) -> None:
        self.in_flight[index] -= 1
        self.in_flight_tokens[index] -= req.prompt_tokens + req.output_tokens
