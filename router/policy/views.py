"""The policy seam's inputs: read-only snapshots of one worker and its last load reading.

Who makes what:
- ``router.workers.WorkerPool`` parses each ``/v1/loads`` answer with ``WorkerLoad.from_loads``
  and hands out ``WorkerView`` snapshots (``snapshot()``, ``healthy()``); it owns the state they
  are copied from.
- Policies (``router.policy``), the rebalancer's signals (``router.rebalance.signals``), the
  ``/workers`` route (``view.as_dict``) and the simulator (``scripts/sim``) only read them.

Pure: no I/O, no clock, nothing of aiohttp or the worker pool.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from router.breaker import BreakerState


@dataclass(frozen=True)
class WorkerLoad:
    """One reading of a worker's ``/v1/loads`` (summed over its data-parallel ranks)."""

    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    num_waiting_uncached_tokens: int = 0
    token_usage: float = 0.0
    max_running_requests: int = 0
    max_total_num_tokens: int = 0
    num_total_tokens: int = 0
    """KV tokens in use plus the prompts of waiting requests (SGLang's ``num_total_tokens``)."""
    gen_throughput: float = 0.0
    at: float = 0.0
    """``time.monotonic()`` of the reading (0: never read)."""

    @staticmethod
    def from_loads(payload: dict[str, Any], at: float) -> WorkerLoad:
        ranks = payload.get("loads") or []
        if not ranks:
            return WorkerLoad(at=at)

        def total(key: str) -> float:
            return float(sum(r.get(key) or 0 for r in ranks))

        return WorkerLoad(
            num_running_reqs=int(total("num_running_reqs")),
            num_waiting_reqs=int(total("num_waiting_reqs")),
            num_waiting_uncached_tokens=int(total("num_waiting_uncached_tokens")),
            token_usage=max(float(r.get("token_usage") or 0.0) for r in ranks),
            max_running_requests=int(total("max_running_requests")),
            max_total_num_tokens=int(total("max_total_num_tokens")),
            num_total_tokens=int(total("num_total_tokens")),
            gen_throughput=total("gen_throughput"),
            at=at,
        )


@dataclass(frozen=True)
class WorkerView:
    """A read-only snapshot of one worker, handed to policies and ``/workers``."""

    url: str
    healthy: bool
    in_flight: int
    load: WorkerLoad
    total_requests: int
    in_flight_tokens: int = 0
    """Prompt + completion tokens of the requests in flight (the router's own estimate)."""
    breaker: BreakerState = BreakerState.CLOSED
    draining: bool = False
    """Removed from the pool; finishing its in-flight requests."""
    prefill_since_load: int = 0
    """Uncached prompt tokens of requests the router dispatched here after ``load`` was read
    (the poll does not show them yet) and that are still in flight."""
    finished_since_load: int = 0
    """Requests the router sent here that finished after ``load`` was read: each freed a
    running slot that a request waiting in that reading has taken since."""

    def as_dict(self, now: float) -> dict[str, Any]:
        return {
            "url": self.url, "healthy": self.healthy, "in_flight": self.in_flight,
            "in_flight_tokens": self.in_flight_tokens, "total_requests": self.total_requests,
            "breaker": self.breaker.name.lower(), "draining": self.draining,
            "prefill_since_load": self.prefill_since_load,
            "finished_since_load": self.finished_since_load,
            "load": {
                "num_running_reqs": self.load.num_running_reqs,
                "num_waiting_reqs": self.load.num_waiting_reqs,
                "token_usage": self.load.token_usage,
                "max_running_requests": self.load.max_running_requests,
                "gen_throughput": self.load.gen_throughput,
                "age_s": round(now - self.load.at, 3) if self.load.at else None,
            },
        }
