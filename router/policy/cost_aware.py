"""``cost_aware``: send each request where it is predicted to start soonest.

The score of worker ``w`` is the prefill work that stands between the request and its first
token there, in prompt-token units (lower is better; one prefill rate divides every term, so no
rate is needed to rank workers):

    cached(w)   = leading prompt tokens in w's device cache (the router's KV index, from the
                  workers' KV events), or, for a prompt sent in the last ``recent_s`` seconds
                  whose blocks have not been reported yet, what this policy sent to w
    host(w)     = further leading tokens in w's host tier (HiCache), loaded at ``host_cost``
    store(w)    = further leading tokens the shared kvstore holds (``--kvstore``: the router
                  asks the store, ``router.store_index``), loaded at ``store_cost``
    uncached(w) = prompt_tokens - cached(w) - host(w) - store(w)
    waiting(w)  = the last /v1/loads poll's waiting requests, less the router's requests to w
                  that finished since (each freed a running slot that a waiting one took)
    queued(w)   = w's waiting uncached prompt tokens at the last poll, scaled by waiting(w)
                  over the poll's waiting requests
                  + uncached tokens the router dispatched to w since that poll
    busy(w)     = max(polled running + waiting(w), router in-flight requests)
    excess(w)   = max(0, busy(w) + 1 - w's max_running_requests): requests (this one included)
                  that find every running slot taken and wait for a running request to finish
    overflow(w) = tokens the request needs beyond w's free KV pool (it would wait for memory)
    running(w)  = min(busy(w), w's max_running_requests): the decode batch the request's
                  prefill will interrupt (the requests waiting ahead of it run by then)
    dup(w)      = leading tokens another candidate holds in its device cache (as ``cached``)
                  that w would recompute: max(0, max over v != w of cached(v) - cached(w)
                  - host(w) - store(w))
    score(w)    = queued(w) + uncached(w) + host_cost * host(w) + store_cost * store(w)
                  + decode_cost * busy(w) + slot_cost * excess(w) + overflow(w)
                  + dup_cost * (1 + running(w)) * dup(w)
                  + stall_cost * running(w) * uncached(w)

``queued`` is the herding guard within a poll interval: every request dispatched between two
polls adds its uncached prefill to that worker's queue at once, so a burst that shares one
cached prefix goes to the cache holder only while waiting there is cheaper than recomputing
the prefix elsewhere. ``dup`` is what that costs everyone else: a prefix recomputed beside
the worker that holds it is a second prefill of tokens the system had already computed, which
the request and each of w's ``running`` requests wait for (SGLang runs a prefill batch between
decode steps), and a second copy in a pool that then evicts more. Past a full batch it keeps
a group of requests that share a prefix with its holder: spreading them to level the queues
made every worker recompute and hold every prefix, which past saturation cost more throughput
and first-token time than the queues it levelled (``docs/benchmarks.md``, "Where the hits
went"). ``stall`` (off by default) charges every uncached token that way, shared or not: it
kept the groups together too, but cost the workloads with little sharing. ``excess`` is
the guard across intervals: SGLang runs at most
``--max-running-requests`` requests and the rest wait, not for a prefill but for a running
request to finish its whole decode, so a request is sent past a full batch only to save more
than ``slot_cost`` tokens of prefill per request ahead of it (``slot_cost`` is a request's
decode time divided by the batch size, in prefill tokens: about 1 s, 1,000 tokens, for
SmolLM2 on one CPU core with 32-token answers and 8 slots). ``decode_cost`` prices the decode
batch a request joins below that (prefill takes priority over decode in SGLang's scheduler, so
running requests delay a first token by little, but they share every later step). Without
token ids (no index, or no tokenizer on the router) ``cached`` and ``host`` are 0 and the
policy is load-only, like ``load_aware``. Ties (within ``tie_epsilon``) are broken at random.

Parameters: ``host_cost`` (0.25), ``store_cost`` (0.25: a 2,000-token store hit on a
SmolLM2 CPU worker took 0.11 s more than a device hit, against 1.8 s to recompute it,
``docs/benchmarks.md``; the margin covers a prefetch that is not done in time),
``decode_cost`` (16 prompt tokens per running request),
``slot_cost`` (1000 prompt tokens per request beyond the worker's running slots),
``dup_cost`` (1.0 per prompt token recomputed that another worker holds, and per request
that waits for it; 0 prices only the request's own wait), ``stall_cost`` (0: off; per
uncached token and running request),
``recent_s`` (5.0; 0 turns the policy's own memory of dispatched prefixes off), ``block`` (16
tokens per remembered block), ``max_blocks`` (65536 remembered blocks), ``tie_epsilon`` (1e-6),
``seed`` (none).
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from time import monotonic

from router.policy.base import RequestFeatures, register, reject_unknown, take_float, take_seed
from router.policy.views import WorkerView


class RecentPrefixes:
    """Prefixes recently dispatched to each worker, in blocks of ``block`` tokens, forgotten
    after ``ttl_s``; bounded to ``max_blocks`` entries (least recently used go first). A key is
    the block's whole prefix (``hash`` of the previous key and the block), like a radix node."""

    def __init__(self, block: int, ttl_s: float, max_blocks: int,
                 clock: Callable[[], float] = monotonic) -> None:
        self.block, self.ttl_s, self.max_blocks, self._clock = block, ttl_s, max_blocks, clock
        self._expiry: OrderedDict[tuple[str, int], float] = OrderedDict()

    def _keys(self, ids: Sequence[int]) -> list[int]:
        keys, key = [], 0
        for start in range(0, len(ids) - self.block + 1, self.block):
            key = hash((key, tuple(ids[start:start + self.block])))
            keys.append(key)
        return keys

    def add(self, worker: str, ids: Sequence[int]) -> None:
        if self.ttl_s <= 0:
            return
        until = self._clock() + self.ttl_s
        for key in self._keys(ids):
            self._expiry[(worker, key)] = until
            self._expiry.move_to_end((worker, key))
        while len(self._expiry) > self.max_blocks:
            self._expiry.popitem(last=False)

    def matched(self, worker: str, ids: Sequence[int]) -> int:
        """Leading tokens of ``ids`` sent to ``worker`` within ``ttl_s``."""
        if self.ttl_s <= 0:
            return 0
        now, n = self._clock(), 0
        for key in self._keys(ids):
            until = self._expiry.get((worker, key))
            if until is None or until < now:
                break
            n += self.block
        return n


@register("cost_aware")
class CostAware:
    name: str
    wants_prefix_index = True

    def __init__(self, params: dict[str, str], clock: Callable[[], float] = monotonic) -> None:
        params = dict(params)
        self.host_cost = take_float(params, "host_cost", 0.25)
        self.store_cost = take_float(params, "store_cost", 0.25)
        self.decode_cost = take_float(params, "decode_cost", 16.0)
        self.slot_cost = take_float(params, "slot_cost", 1000.0)
        self.dup_cost = take_float(params, "dup_cost", 1.0)
        self.stall_cost = take_float(params, "stall_cost", 0.0)
        recent_s = take_float(params, "recent_s", 5.0)
        block = int(take_float(params, "block", 16.0, minimum=1.0))
        max_blocks = int(take_float(params, "max_blocks", 65536.0, minimum=1.0))
        self.tie_epsilon = take_float(params, "tie_epsilon", 1e-6)
        seed = take_seed(params)
        reject_unknown("cost_aware", params)
        self._rng = random.Random(seed)
        self.recent = RecentPrefixes(block, recent_s, max_blocks, clock)

    def prefix(self, worker: WorkerView, request: RequestFeatures) -> tuple[int, int, int]:
        """(device-cached, host-tier, store) leading tokens of the prompt on ``worker``, each
        counting only what the faster tiers before it do not hold."""
        prompt = request.prompt_tokens
        device = request.cached_tokens.get(worker.url, 0) if request.cached_tokens else 0
        if request.prompt_ids:
            device = max(device, self.recent.matched(worker.url, request.prompt_ids))
        device = min(device, prompt)
        host = request.host_tokens.get(worker.url, 0) if request.host_tokens else 0
        host = max(0, min(host, prompt) - device)
        store = max(0, min(request.store_tokens, prompt) - device - host)
        return device, host, store

    def score(self, worker: WorkerView, request: RequestFeatures, elsewhere: int = 0) -> float:
        """``elsewhere``: the most leading device-cached tokens any other candidate holds."""
        return self._score(worker, request, self.prefix(worker, request), elsewhere)

    def _score(self, worker: WorkerView, request: RequestFeatures,
               tiers: tuple[int, int, int], elsewhere: int) -> float:
        load = worker.load
        device, host, store = tiers
        dup = max(0, min(elsewhere, request.prompt_tokens) - device - host - store)
        uncached = max(0, request.prompt_tokens - device - host - store)
        waiting = max(0, load.num_waiting_reqs - worker.finished_since_load)
        polled_queue = float(load.num_waiting_uncached_tokens)
        if load.num_waiting_reqs:
            polled_queue *= waiting / load.num_waiting_reqs
        queued = polled_queue + worker.prefill_since_load
        busy = max(load.num_running_reqs + waiting, worker.in_flight)
        excess = max(0, busy + 1 - load.max_running_requests) if load.max_running_requests else 0
        running = min(busy, load.max_running_requests) if load.max_running_requests else busy
        overflow = 0.0
        if load.max_total_num_tokens:
            free = (load.max_total_num_tokens * (1.0 - min(1.0, load.token_usage))
                    - worker.prefill_since_load)
            need = uncached + host + store + (request.max_tokens or 0)
            overflow = max(0.0, need - free)
        return (queued + uncached + self.host_cost * host + self.store_cost * store
                + self.decode_cost * busy
                + self.slot_cost * excess + overflow + self.dup_cost * (1 + running) * dup
                + self.stall_cost * running * uncached)

    def pick(self, candidates: Sequence[WorkerView], request: RequestFeatures) -> WorkerView:
        tiers = [self.prefix(w, request) for w in candidates]  # once each: it hashes the prompt
        held = [device for device, _, _ in tiers]
        scores = [self._score(w, request, tiers[i],
                              max((h for j, h in enumerate(held) if j != i), default=0))
                  for i, w in enumerate(candidates)]
        best = min(scores)
        tied = [w for w, s in zip(candidates, scores, strict=True) if s - best <= self.tie_epsilon]
        chosen = tied[0] if len(tied) == 1 else self._rng.choice(tied)
        if request.prompt_ids:
            self.recent.add(chosen.url, request.prompt_ids)
        return chosen
