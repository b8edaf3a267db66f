"""``cache_aware``: prefix affinity with a load-imbalance fallback, like SGLang's router.

The router keeps, per worker, an approximate prefix tree of the prompts it sent there: each
prompt is cut into ``block_chars``-character blocks and every block is keyed by the hash of all
text up to its end (a hash chain, so a key stands for a whole prefix, as a radix-tree node does).
Each worker's index is an LRU of at most ``max_blocks`` keys.

For each request, with ``load(w) = max(running + waiting from /v1/loads, router in-flight)``:
1. if the load is imbalanced (``max - min > balance_abs`` and ``max > balance_rel * min``),
   pick the least loaded worker;
2. else, if the longest cached prefix covers more than ``cache_threshold`` of the prompt's
   blocks on some worker, pick that worker;
3. else pick the worker whose index is smallest (most room to cache new prefixes).
The prompt is then recorded in the chosen worker's index. Ties are broken at random.

Parameters: ``cache_threshold`` (0.3), ``balance_abs`` (8 requests), ``balance_rel`` (1.5),
``block_chars`` (64), ``max_blocks`` (65536 per worker), ``seed`` (none).
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Sequence

from router.policy.base import (
    RequestFeatures,
    register,
    reject_unknown,
    take_float,
    take_seed,
)
from router.policy.views import WorkerView


def prefix_keys(text: str, block_chars: int) -> list[int]:
    """One key per block; key i identifies text[: (i + 1) * block_chars]."""
    keys, running = [], 0
    for start in range(0, len(text), block_chars):
        running = hash((running, text[start:start + block_chars]))
        keys.append(running)
    return keys


class PrefixIndex:
    """An LRU set of prefix keys for one worker."""

    def __init__(self, max_blocks: int) -> None:
        self._keys: OrderedDict[int, None] = OrderedDict()
        self._max = max_blocks

    def __len__(self) -> int:
        return len(self._keys)

    def match(self, keys: list[int]) -> int:
        """Number of leading keys present (the cached prefix length, in blocks)."""
        count = 0
        for key in keys:
            if key not in self._keys:
                break
            count += 1
        return count

    def insert(self, keys: list[int]) -> None:
        for key in keys:
            self._keys[key] = None
            self._keys.move_to_end(key)
        while len(self._keys) > self._max:
            self._keys.popitem(last=False)


def request_load(worker: WorkerView) -> int:
    return max(worker.load.num_running_reqs + worker.load.num_waiting_reqs, worker.in_flight)


@register("cache_aware")
class CacheAware:
    name: str

    def __init__(self, params: dict[str, str]) -> None:
        params = dict(params)
        self.cache_threshold = take_float(params, "cache_threshold", 0.3)
        self.balance_abs = take_float(params, "balance_abs", 8.0)
        self.balance_rel = take_float(params, "balance_rel", 1.5, minimum=1.0)
        self.block_chars = int(take_float(params, "block_chars", 64.0, minimum=1.0))
        self.max_blocks = int(take_float(params, "max_blocks", 65536.0, minimum=1.0))
        seed = take_seed(params)
        reject_unknown("cache_aware", params)
        self._rng = random.Random(seed)
        self._indexes: dict[str, PrefixIndex] = {}

    def _index(self, url: str) -> PrefixIndex:
        if url not in self._indexes:
            self._indexes[url] = PrefixIndex(self.max_blocks)
        return self._indexes[url]

    def _lowest(self, candidates: Sequence[WorkerView], key: dict[str, float]) -> WorkerView:
        low = min(key[w.url] for w in candidates)
        return self._rng.choice([w for w in candidates if key[w.url] == low])

    def pick(self, candidates: Sequence[WorkerView], request: RequestFeatures) -> WorkerView:
        keys = prefix_keys(request.prompt_text, self.block_chars)
        loads = {w.url: float(request_load(w)) for w in candidates}
        high, low = max(loads.values()), min(loads.values())
        if high - low > self.balance_abs and high > self.balance_rel * low:
            chosen = self._lowest(candidates, loads)
        else:
            matches = {w.url: self._index(w.url).match(keys) for w in candidates}
            best = max(matches.values())
            if keys and best / len(keys) > self.cache_threshold:
                chosen = self._lowest(candidates, {u: -m for u, m in matches.items()})
            else:
                sizes = {w.url: float(len(self._index(w.url))) for w in candidates}
                chosen = self._lowest(candidates, sizes)
        self._index(chosen.url).insert(keys)
        return chosen
