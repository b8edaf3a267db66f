"""The event loop: arrivals, instance steps, load polls, KV transfers, rebalancing periods.

Who calls what: ``scripts.sim.experiment`` and ``scripts.sim.calibrate`` build one ``Engine``
per simulated run with a ``ClusterConfig``, a ``CostModel`` and the run's ``SimRequest``s, and
call ``run()`` once. The engine owns the clock and the event heap; it moves requests between
the simulated router (``Frontend`` and its real policy, or ``SimBatcher`` and the real
SLO-ODBS), the instances (``Instance``) and, with a PD split, the KV transfers between them;
``SimRebalancer`` runs the real planner every period.

Events (time, sequence number, kind): ``arrive`` (a client sends a request), ``step`` (an
instance's step ends), ``poll`` (the router reads one instance's ``/v1/loads``), ``kv`` (a
prompt's KV reaches its decode instance), ``batch`` (a batching window closes), ``rebalance``,
``enqueue`` (a request leaves an instance's front end for its scheduler), ``wake`` (an idle
instance looks at its queue, after the other events of the same instant).
Ties run in the order they were scheduled, so a run is a pure function of its inputs and seed.
"""

from __future__ import annotations

import heapq
import logging
import random
from dataclasses import dataclass, field
from typing import Any

from router.batching.config import BatcherConfig
from router.rebalance.config import RebalanceConfig
from scripts.sim.batching import SimBatcher
from scripts.sim.costs import CostModel
from scripts.sim.frontend import Frontend
from scripts.sim.instance import BlockCache, Instance
from scripts.sim.rebalance import SimRebalancer
from scripts.sim.request import SimRequest

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class ClusterConfig:
    """One simulated serving system."""

    num_instances: int
    """Model replicas (with a PD split: prefill plus decode instances)."""
    policy: str = "load_aware"
    """Router dispatch policy spec for ``router.policy.build`` (``load_aware``, ``round_robin``,
    ``cache_aware:cache_threshold=0.3``...)."""
    num_prefill: int = 0
    """0: every instance is colocated; n > 0: a static PD split, n prefill instances and the
    rest decode (DistServe-like), each prompt's KV sent over the link after its prefill."""
    decode_policy: str | None = None
    """Policy that picks the decode instance of a PD split (default: ``policy``)."""
    global_store: bool = False
    """A global KV store shared by all instances (prefix blocks written after prefill, loaded
    layer-wise on a local miss)."""
    store_capacity_tokens: int = 50_000_000
    """Capacity of the global store in tokens (LRU)."""
    rebalance: RebalanceConfig | None = None
    """Run the real rebalancer (layer migration, head offload) with this config."""
    batching: BatcherConfig | None = None
    """Hold requests in the router and dispatch them in batches (router/batcher.py)."""
    poll_interval_s: float = 0.5
    """Seconds between the router's polls of each instance's load (``RouterConfig``'s default)."""
    seed: int = 0
    """Seeds the poll phases and the policies' tie-breaking."""
    stall_s: float = 3600.0
    """Simulated seconds without a finished request (after the last arrival) before the run
    stops and counts what is left as failed."""

    def __post_init__(self) -> None:
        if self.num_instances < 1:
            raise ValueError(f"ClusterConfig.num_instances: must be >= 1 "
                             f"(got {self.num_instances})")
        if not 0 <= self.num_prefill < self.num_instances:
            raise ValueError(f"ClusterConfig.num_prefill: must be in [0, num_instances="
                             f"{self.num_instances}) (got {self.num_prefill})")
        if self.poll_interval_s <= 0:
            raise ValueError(f"ClusterConfig.poll_interval_s: must be > 0 "
                             f"(got {self.poll_interval_s})")
        if self.stall_s <= 0:
            raise ValueError(f"ClusterConfig.stall_s: must be > 0 (got {self.stall_s})")
        if self.store_capacity_tokens < 1:
            raise ValueError(f"ClusterConfig.store_capacity_tokens: must be >= 1 "
                             f"(got {self.store_capacity_tokens})")
        if self.num_prefill and (self.rebalance or self.batching):
            raise ValueError("ClusterConfig.num_prefill: a PD split is simulated without the "
                             "rebalancer and router batching")


@dataclass
class SimResult:
    requests: list[SimRequest]
    rejected: list[SimRequest]
    instances: list[dict[str, Any]]
    stalled: list[SimRequest] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    dispatch_order: list[int] = field(default_factory=list)
    end_s: float = 0.0


def _seeded(spec: str, seed: int) -> str:
    """Add ``seed`` to a policy spec that takes one and has none."""
    name = spec.split(":", 1)[0]
    if name in ("round_robin",) or "seed=" in spec:
        return spec
    return f"{spec}{',' if ':' in spec else ':'}seed={seed}"


class Engine:
    def __init__(self, cfg: ClusterConfig, costs: CostModel, requests: list[SimRequest]) -> None:
        self.cfg = cfg
        self.costs = costs
        self.requests = sorted(requests, key=lambda r: (r.arrival_s, r.index))
        store = BlockCache(cfg.store_capacity_tokens) if cfg.global_store else None
        n, npf = cfg.num_instances, cfg.num_prefill
        roles = (["prefill"] * npf + ["decode"] * (n - npf)) if npf else ["colocated"] * n
        self.instances = [Instance(i, costs, roles[i], store) for i in range(n)]  # type: ignore[arg-type]
        self.prefill_pool = list(range(npf)) if npf else list(range(n))
        self.decode_pool = list(range(npf, n)) if npf else []
        self.frontend = Frontend(n, _seeded(cfg.policy, cfg.seed),
                                 _seeded(cfg.decode_policy or cfg.policy, cfg.seed + 1))
        self.batcher = SimBatcher(cfg.batching, n) if cfg.batching else None
        self.rebalancer = SimRebalancer(cfg.rebalance, self.instances) if cfg.rebalance else None
        self.rng = random.Random(cfg.seed)
        self.heap: list[tuple[float, int, str, Any]] = []
        self.seq = 0
        self.now = 0.0
        self.remaining = 0
        self.rejected: list[SimRequest] = []
        self.wake_pending: set[int] = set()
        self.stalled: list[SimRequest] = []
        self.last_arrival = max((r.arrival_s for r in self.requests), default=0.0)
        self.frontend_free = [0.0] * cfg.num_instances
        self.held: list[list[tuple[SimRequest, str, int]]] = [[] for _ in range(cfg.num_instances)]

    def push(self, at: float, kind: str, data: Any = None) -> None:
        heapq.heappush(self.heap, (at, self.seq, kind, data))
        self.seq += 1

    # -- the loop -------------------------------------------------------------------------------
    def run(self, progress: Any = None) -> SimResult:
        for req in self.requests:
            self.push(req.arrival_s, "arrive", req)
        self.remaining = len(self.requests)
        for i in range(self.cfg.num_instances):
            self.push(self.rng.uniform(0, self.cfg.poll_interval_s), "poll", i)
        if self.rebalancer is not None:
            assert self.cfg.rebalance is not None
            self.push(self.cfg.rebalance.period_s, "rebalance")
        handlers = {"arrive": self._arrive, "step": self._step, "poll": self._poll,
                    "kv": self._kv, "batch": self._batch, "rebalance": self._rebalance,
                    "wake": self._wake_event, "enqueue": self._enqueue}
        last_progress = 0.0
        while self.heap and self.remaining > 0:
            self.now, _, kind, data = heapq.heappop(self.heap)
            before = self.remaining
            handlers[kind](data)
            if self.remaining < before:
                last_progress = self.now
                if progress is not None:
                    progress.update(before - self.remaining)
            elif self.now - last_progress > self.cfg.stall_s and self.now > self.last_arrival:
                self._give_up()
                break
        return SimResult(
            requests=[r for r in self.requests if r.finish_s is not None],
            rejected=self.rejected, stalled=self.stalled,
            instances=[{"index": x.index, "role": x.role, "busy_s": round(x.busy_s, 3),
                        "steps": x.num_steps, "served": self.frontend.total[x.index]}
                       for x in self.instances],
            decisions=self.rebalancer.decisions if self.rebalancer else [],
            dispatch_order=self.batcher.order if self.batcher else [], end_s=self.now)

    # -- handlers -------------------------------------------------------------------------------
    def _arrive(self, req: SimRequest) -> None:
        req.extra_latency_s = self.costs.request_overhead_s
        if req.prompt_tokens + req.output_tokens > self.costs.kv_pool_tokens:
            self.rejected.append(req)  # SGLang answers 400: longer than the KV pool
            self.remaining -= 1
            return
        if self.batcher is not None:
            self.batcher.hold(req)
            end = self.batcher.window_end()
            self.push(max(self.now, end if end is not None else self.now), "batch")
            return
        target = self.frontend.pick(req, self.prefill_pool)
        if self.decode_pool:
            req.decode_instance = self.frontend.pick(req, self.decode_pool, decode=True)
        self._send(req, target)

    def _send(self, req: SimRequest, index: int) -> None:
        """Hand ``req`` to instance ``index``: through its front end (FIFO; on a CPU worker on
        the instance's own core, delaying its next step), then into its scheduler's queue."""
        req.dispatched_s = self.now
        c = self.costs
        work = c.frontend_s + c.frontend_per_token_s * req.prompt_tokens
        if work <= 0 or self.instances[index].role == "decode":
            self._enqueue((req, index))
            return
        start = max(self.now, self.frontend_free[index])
        self.frontend_free[index] = start + work
        if c.frontend_shares_core:
            self.instances[index].add_work(self.now, work)
        self.push(start + work, "enqueue", (req, index))

    def _enqueue(self, item: tuple[SimRequest, int]) -> None:
        """The request reaches the scheduler; the instance wakes after every other event of
        this instant, so requests that arrive together are scheduled together."""
        req, index = item
        self.instances[index].enqueue(req, self.now)
        if index not in self.wake_pending:
            self.wake_pending.add(index)
            self.push(self.now, "wake", index)

    def _wake_event(self, index: int) -> None:
        self.wake_pending.discard(index)
        self._wake(index)

    def _wake(self, index: int) -> float | None:
        """Start instance ``index``'s next step if it is idle and has work; when it ends."""
        inst = self.instances[index]
        if inst.busy or not inst.has_work:
            return None
        duration = inst.start_step(self.now)
        if duration is None:
            return None
        attention = self.rebalancer.attention_helpers(index) if self.rebalancer else {}
        for peer, seconds in inst.helper_work(attention).items():
            self.instances[peer].add_work(self.now, seconds)
        self.push(self.now + duration, "step", index)
        return self.now + duration

    def _step(self, index: int) -> None:
        inst = self.instances[index]
        prefilled, done = inst.finish_step(self.now)
        if self.costs.delivery_lag_steps:
            self._deliver_late(index, prefilled, done)
        if inst.role == "prefill":
            for req in prefilled:
                self.frontend.finished(index, req)
                if req.output_tokens <= 1:
                    req.finish_s = self.now
                    self._done(req, req.decode_instance)
                else:
                    kv = self.costs.kv_bytes(req.prompt_tokens)
                    self.push(self.now + self.costs.transfer_s(kv), "kv", req)
        for req in done:
            self._done(req, index)
        self._wake(index)

    def _deliver_late(self, index: int, prefilled: list[SimRequest],
                      done: list[SimRequest]) -> None:
        """Hold this step's tokens until ``delivery_lag_steps`` more steps have run back to
        back on the instance (at once when it goes idle)."""
        held = self.held[index]
        lag = self.costs.delivery_lag_steps
        for req in prefilled:
            if req.first_token_s == self.now:
                held.append((req, "first", lag))
        for req in done:
            if req.finish_s == self.now:
                held.append((req, "finish", lag))
        self._wake(index)
        busy = self.instances[index].busy
        keep = []
        for req, kind, left in held:
            if busy and left > 0:
                keep.append((req, kind, left - 1))
            elif kind == "first":
                req.first_token_s = self.now
            else:
                req.finish_s = self.now
        self.held[index] = keep

    def _give_up(self) -> None:
        """Nothing finished for ``stall_s``: what is left can never run (a request larger than
        what its instance's pool has become); count it as failed rather than loop forever."""
        finished = {id(r) for r in self.requests if r.finish_s is not None}
        rejected = {id(r) for r in self.rejected}
        stuck = [r for r in self.requests if id(r) not in finished | rejected]
        logger.warning("simulation stalled at t=%.1f s: %d requests cannot run", self.now,
                       len(stuck))
        self.stalled = stuck
        self.remaining = 0

    def _done(self, req: SimRequest, index: int | None) -> None:
        if index is not None:
            self.frontend.finished(index, req)
            if self.batcher is not None:
                self.batcher.release(index)
                self.push(self.now, "batch")
        self.remaining -= 1

    def _kv(self, req: SimRequest) -> None:
        assert req.decode_instance is not None
        req.instance = req.decode_instance
        self._send(req, req.decode_instance)

    def _poll(self, index: int) -> None:
        self.frontend.poll(index, self.instances[index].load(self.now))
        self.push(self.now + self.cfg.poll_interval_s, "poll", index)

    def _batch(self, _: Any) -> None:
        assert self.batcher is not None
        end = self.batcher.window_end()
        if end is None:
            return
        if end > self.now + 1e-12:
            self.push(end, "batch")
            return
        for req, index in self.batcher.dispatch(self.now):
            self.frontend.sent(index, req)
            self._send(req, index)

    def _rebalance(self, _: Any) -> None:
        assert self.rebalancer is not None and self.cfg.rebalance is not None
        self.rebalancer.period(self.now, self.frontend.loads)
        self.push(self.now + self.cfg.rebalance.period_s, "rebalance")
