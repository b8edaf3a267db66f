"""One simulated SGLang instance: waiting queue, admission, prefix cache, one step at a time.

Who calls what (``scripts.sim.engine.Engine`` is the only caller):
- ``enqueue(req, now)`` when the router (or, for a decode instance, a finished KV transfer) hands it
  a request; ``start_step(now)`` when the instance is idle and has work: it admits what fits,
  plans one step and returns its duration (None: nothing to do); ``finish_step(now)`` when that
  step ends: it applies the step and returns the requests whose prefill completed and those that
  finished; ``load()`` for the router's ``/v1/loads`` poll; ``add_work(now, s)`` when a peer's
  migrated layers or offloaded heads run here, or a migration pauses it.
This module owns the instance's queues, KV accounting and local prefix cache.

The scheduler mirrors SGLang's (``scheduler.py`` event loop, ``schedule_policy.PrefillAdder``):
- a request is admitted in FCFS order while ``running < max_running_requests`` and its
  uncached prompt plus its whole reserved output fit the free KV pool; the first that does not
  fit stops admission (no overtaking);
- prefill has priority: if any admitted request still has prompt tokens to compute, the step
  is a prefill of up to ``chunked_prefill_tokens`` new tokens (chunked prefill: a long prompt
  takes several steps), else it is one decode step of every running request (no mixed chunks,
  SGLang's default);
- the prefill step produces each finished prompt's first token; each decode step one more;
- with the GPU overlap scheduler (``CostModel.overlap_schedule``, SGLang's default) the step
  that follows a running step is decided when that step starts: a request that arrives while
  the instance is busy is admitted to the step after next (an idle instance starts it at once);
- with ``CostModel.delivery_lag_steps`` a step's tokens reach the client only after that many
  further steps have run back to back (``Engine._deliver_late`` holds them; 0 in the shipped
  profiles, see docs/simulator.md).
Prefix cache: a radix tree over ``block_tokens``-token blocks, as an LRU of block-hash chains
(a hash stands for its whole prefix), holding what the running requests leave of the KV pool
(SGLang evicts cached blocks when an allocation needs the room). With a global KV store,
blocks missing locally but held in the store are loaded, layer-wise pipelined with the prefill
compute (``CostModel.store_load_s``).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Literal

from router.policy.views import WorkerLoad
from scripts.sim.costs import CostModel
from scripts.sim.request import SimRequest

Role = Literal["colocated", "prefill", "decode"]
ROLES = ("colocated", "prefill", "decode")
SHARED_PREFIX_KEY = -1
"""Cache key of the prefix every request shares (``SimRequest.shared_prefix_tokens``)."""


class BlockCache:
    """An LRU set of prefix-block chain keys holding at most ``capacity_tokens`` tokens (an
    instance's prefix cache, whose blocks SGLang evicts when the pool needs room, or the
    global store)."""

    def __init__(self, capacity_tokens: int) -> None:
        self.capacity_tokens = max(1, capacity_tokens)
        self.num_tokens = 0
        self._keys: OrderedDict[int, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def match(self, keys: list[int], start: int = 0) -> int:
        """How many of ``keys[start:]`` are present, leading ones only (touches them)."""
        count = 0
        for key in keys[start:]:
            if key not in self._keys:
                break
            self._keys.move_to_end(key)
            count += 1
        return count

    def insert(self, keys: list[int], block_tokens: int) -> None:
        for key in keys:
            if key not in self._keys:
                self._keys[key] = block_tokens
                self.num_tokens += block_tokens
            self._keys.move_to_end(key)
        self.evict(self.capacity_tokens)

    def evict(self, room_tokens: int) -> None:
        """Drop least recently used blocks until at most ``room_tokens`` tokens are held."""
        while self.num_tokens > max(0, room_tokens) and self._keys:
            _, size = self._keys.popitem(last=False)
            self.num_tokens -= size


def chain_keys(req: SimRequest) -> list[int]:
    """One key per full prompt block, each standing for the whole prefix up to it."""
    keys, running = [], 0
    full = req.prompt_tokens // req.block_tokens
    for h in req.block_hashes[:full]:
        running = hash((running, h))
        keys.append(running)
    return keys


@dataclass
class _Plan:
    kind: str
    """``prefill`` or ``decode``."""
    chunks: list[tuple[SimRequest, int]]
    """Prefill: (request, new tokens) per request; decode: (request, 1)."""
    compute_s: float
    attn_s: float = 0.0
    """Decode: the attention (KV read) part of ``compute_s`` before head offloads."""


class Instance:
    def __init__(self, index: int, costs: CostModel, role: Role = "colocated",
                 store: BlockCache | None = None) -> None:
        if role not in ROLES:
            raise ValueError(f"Instance.role: {role!r} is not one of {ROLES}")
        self.index = index
        self.url = f"http://sim-{index}"
        self.costs = costs
        self.role = role
        self.store = store
        self.pool_tokens = costs.kv_pool_tokens
        self.cache = BlockCache(costs.kv_pool_tokens)
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.reserved_tokens = 0
        self.busy = False
        self.free_at = 0.0
        """Work others put here (peer layers, a migration pause) keeps it busy until then."""
        self.plan: _Plan | None = None
        self.step_started_at = -1.0
        self.last_end = -1.0
        # rebalancing state (written by scripts.sim.rebalance)
        self.local_fraction = 1.0
        """Share of the model's layers computed here (1 - migrated out / L)."""
        self.attn_fraction = 1.0
        """Share of the KV heads attended here (1 - offloaded share)."""
        self.helpers: dict[int, float] = {}
        """Peer index -> share of this instance's step it computes (migrated layers, heads)."""
        self.busy_s = 0.0
        self.num_steps = 0

    # -- the router's view ----------------------------------------------------------------------
    def kv_used(self) -> int:
        return sum(r.prompt_tokens + r.generated for r in self.running)

    def load(self, now: float) -> WorkerLoad:
        waiting_tokens = sum(r.prompt_tokens for r in self.waiting)
        used = self.kv_used()
        return WorkerLoad(
            num_running_reqs=len(self.running), num_waiting_reqs=len(self.waiting),
            num_waiting_uncached_tokens=waiting_tokens,
            token_usage=min(1.0, used / self.pool_tokens),
            max_running_requests=self.costs.max_running_requests,
            max_total_num_tokens=self.pool_tokens, num_total_tokens=used + waiting_tokens,
            at=max(now, 1e-9))

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- admission ------------------------------------------------------------------------------
    def enqueue(self, req: SimRequest, now: float) -> None:
        req.instance = self.index if self.role != "decode" else req.instance
        req.queued_s = now
        self.waiting.append(req)

    def _need(self, req: SimRequest) -> int:
        if self.role == "decode":
            return req.prompt_tokens + req.output_tokens
        return req.prompt_tokens + (req.output_tokens if self.role == "colocated" else 1)

    def can_admit(self, req: SimRequest) -> bool:
        return (len(self.running) < self.costs.max_running_requests
                and self.reserved_tokens + self._need(req) <= self.pool_tokens)

    def _lookup_prefix(self, req: SimRequest) -> None:
        keys = chain_keys(req)
        local = self.cache.match(keys)
        remote = self.store.match(keys, local) if self.store is not None else 0
        cap = req.prompt_tokens - 1  # SGLang always computes at least the last prompt token
        shared = req.shared_prefix_tokens if self.cache.match([SHARED_PREFIX_KEY]) else 0
        req.cached_tokens = min(cap, shared + local * req.block_tokens)
        req.store_tokens = min(cap - req.cached_tokens, remote * req.block_tokens)
        req.prefilled = req.cached_tokens + req.store_tokens

    def admit(self, cutoff: float = float("inf")) -> None:
        """Admit waiting requests queued by ``cutoff`` in FCFS order while they fit."""
        while (self.waiting and self.waiting[0].queued_s <= cutoff
               and self.can_admit(self.waiting[0])):
            req = self.waiting.popleft()
            self.reserved_tokens += self._need(req)
            if self.role != "decode":
                self._lookup_prefix(req)
            self.running.append(req)
            self.cache.evict(self.pool_tokens - self.kv_used() - req.prompt_tokens)

    # -- steps ----------------------------------------------------------------------------------
    def _plan_prefill(self) -> _Plan | None:
        budget = self.costs.chunked_prefill_tokens
        chunks: list[tuple[SimRequest, int]] = []
        for req in self.running:
            left = req.prompt_tokens - req.prefilled
            if left <= 0 or budget <= 0:
                continue
            n = min(left, budget)
            budget -= n
            chunks.append((req, n))
        if not chunks:
            return None
        news = [n for _, n in chunks]
        ctx = [r.prefilled + n for r, n in chunks]
        compute = self.costs.prefill_s(news, ctx)
        loaded = sum(r.store_tokens for r, _ in chunks if r.prefilled == r.cached_tokens
                     + r.store_tokens)
        compute += self.costs.store_load_s(loaded, compute)
        return _Plan("prefill", chunks, compute)

    def _plan_decode(self) -> _Plan | None:
        batch = [r for r in self.running if r.prefilled >= r.prompt_tokens]
        if not batch:
            return None
        kv = sum(r.prompt_tokens + r.generated for r in batch)
        c = self.costs
        attn = c.decode_per_kv_token_s * kv
        compute = c.decode_overhead_s + c.decode_per_seq_s * len(batch) + attn * self.attn_fraction
        return _Plan("decode", [(r, 1) for r in batch], compute, attn)

    def _plan(self) -> _Plan | None:
        plan = self._plan_prefill() if self.role != "decode" else None
        return plan or self._plan_decode()

    def step_tokens(self) -> int:
        return sum(n for _, n in self.plan.chunks) if self.plan else 0

    def start_step(self, now: float) -> float | None:
        """Plan the next step; its duration from ``now`` (including waiting for ``free_at``)."""
        assert not self.busy
        back_to_back = self.costs.overlap_schedule and self.last_end == now
        self.admit(self.step_started_at if back_to_back else now)
        plan = self._plan()
        if plan is None and back_to_back and self.waiting:  # the decided step was empty
            self.admit(now)
            plan = self._plan()
        if plan is None:
            return None
        self.plan = plan
        self.busy = True
        self.step_started_at = now
        own = plan.compute_s * self.local_fraction
        if self.helpers:  # activations to the layer host and back, every step
            own += 2 * self.step_tokens() * self.costs.activation_bytes_per_token \
                / self.costs.link_bytes_per_s
        wait = max(0.0, self.free_at - now)
        self.busy_s += own
        self.num_steps += 1
        return wait + own

    def helper_work(self, attention: dict[int, float]) -> dict[int, float]:
        """Seconds of the current step each peer computes: ``helpers`` (migrated layers) share
        the whole step, ``attention`` (head offloads: peer -> share) the decode attention."""
        if self.plan is None:
            return {}
        out = {peer: self.plan.compute_s * share for peer, share in self.helpers.items()}
        for peer, share in attention.items():
            out[peer] = out.get(peer, 0.0) + self.plan.attn_s * share
        return out

    def add_work(self, now: float, seconds: float) -> None:
        self.free_at = max(self.free_at, now) + seconds

    def finish_step(self, now: float) -> tuple[list[SimRequest], list[SimRequest]]:
        """Apply the step that ends now: (requests whose prefill completed, requests done)."""
        plan, self.plan, self.busy = self.plan, None, False
        self.last_end = now
        assert plan is not None
        prefilled: list[SimRequest] = []
        done: list[SimRequest] = []
        for req, n in plan.chunks:
            if plan.kind == "prefill":
                req.prefilled += n
                if req.prefilled < req.prompt_tokens:
                    continue
                req.first_token_s = now
                req.generated = 1
                self._remember(req)
                prefilled.append(req)
                if self.role == "prefill" or req.generated >= req.output_tokens:
                    self._release(req)
                    if self.role != "prefill":
                        req.finish_s = now
                        done.append(req)
            else:
                req.generated += 1
                if req.generated >= req.output_tokens:
                    req.finish_s = now
                    self._release(req)
                    done.append(req)
        return prefilled, done

    def _remember(self, req: SimRequest) -> None:
        keys = chain_keys(req)
        self.cache.capacity_tokens = max(1, self.pool_tokens - self.kv_used())
        self.cache.insert(keys, req.block_tokens)
        if req.shared_prefix_tokens:
            self.cache.insert([SHARED_PREFIX_KEY], req.shared_prefix_tokens)
        if self.store is not None:
            self.store.insert(keys, req.block_tokens)

    def _release(self, req: SimRequest) -> None:
        self.running.remove(req)
        self.reserved_tokens -= self._need(req)
