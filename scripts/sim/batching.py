"""Router-side SLO-aware batching in simulation, mirroring ``router/batcher.py``.

Who calls what: ``scripts.sim.engine.Engine`` calls ``hold(req, now)`` for every arriving
request when batching is configured, ``release(i)`` when a request leaves instance ``i``, and
``dispatch(now)`` at the end of each batching window; ``dispatch`` returns (request, instance)
pairs to send. As in the router, each instance gets at most ``slots_per_worker`` requests at
once; the REAL ``router.batching.slo_odbs.form_batches`` (FCFS, SPF, S3 or SLO-ODBS) forms
batches of everything waiting, and the first batch goes to the instance with the most free
slots (split if larger than its free slots). This module owns the held requests.
"""

from __future__ import annotations

from router.batching.config import BatcherConfig
from router.batching.slo_odbs import Job, form_batches
from scripts.sim.request import SimRequest


class SimBatcher:
    def __init__(self, cfg: BatcherConfig, num_instances: int) -> None:
        self.cfg = cfg
        self.running = [0] * num_instances
        self.waiting: dict[str, tuple[Job, SimRequest]] = {}
        self.order: list[int] = []
        """Request indexes in the order they were dispatched."""

    def hold(self, req: SimRequest) -> None:
        job = Job(id=str(req.index), arrival_s=req.arrival_s, slo_s=req.slo_s,
                  predicted_len=req.output_tokens, prompt_len=req.prompt_tokens)
        self.waiting[job.id] = (job, req)

    def release(self, index: int) -> None:
        self.running[index] = max(0, self.running[index] - 1)

    def window_end(self) -> float | None:
        """When the oldest held request's batching window closes (None: nothing held)."""
        if not self.waiting:
            return None
        return min(j.arrival_s for j, _ in self.waiting.values()) + self.cfg.window_ms / 1000.0

    def dispatch(self, now: float) -> list[tuple[SimRequest, int]]:
        out: list[tuple[SimRequest, int]] = []
        while self.waiting:
            free = [self.cfg.slots_per_worker - r for r in self.running]
            index = max(range(len(free)), key=lambda i: (free[i], -self.running[i]))
            if free[index] <= 0:
                break
            batches = form_batches([j for j, _ in self.waiting.values()], now,
                                   self.cfg.batching)
            for job in batches[0][:free[index]]:
                _, req = self.waiting.pop(job.id)
                self.running[index] += 1
                self.order.append(req.index)
                out.append((req, index))
        return out
