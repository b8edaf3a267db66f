"""An exact index of which worker holds which prompt prefix, built from SGLang's KV events.

Who calls what:
- ``router.kv_events`` (one subscriber task per worker, on the event loop) decodes each
  ``KVEventBatch`` a worker publishes (``--kv-events-config``, ZMQ) and calls ``apply`` with the
  worker's URL and each event as the plain dict SGLang encodes (``{"type": "BlockStored",
  ...}``); on a sequence gap, a restart or the worker leaving it calls ``clear(worker)``.
- Policies read it through ``match(token_ids)``: how many leading tokens of a prompt each worker
  has, per storage medium (``GPU``: its device radix cache; ``CPU``: its HiCache host tier).

Keyed by tokens, not by SGLang's block hashes: the trie holds one node per token, shared by every
worker that stored the same prefix; a block's last node records ``(worker, medium)`` as an owner.
Each worker's block hashes map to trie nodes only to resolve ``parent_block_hash`` and
``BlockRemoved``, so the router never has to reproduce SGLang's hashing, and workers with different
page sizes share one trie. SGLang stores a block only after its parent and evicts leaves first, so
owning a block means owning its whole prefix; ``match`` reports, per owner, the depth of the
deepest owned node on the prompt's path.

Pure: no I/O, no clock; not thread-safe (one event loop owns it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Owner = tuple[str, str]
"""``(worker URL, medium)``."""

DEVICE = "GPU"
"""SGLang's medium for the device radix cache (also on CPU workers: the tier the forward reads)."""
HOST = "CPU"
"""SGLang's medium for the HiCache host tier (pages a worker can load back without recompute)."""


class _Node:
    __slots__ = ("parent", "token", "children", "owners")

    def __init__(self, parent: _Node | None, token: int) -> None:
        self.parent = parent
        self.token = token
        self.children: dict[int, _Node] = {}
        self.owners: set[Owner] = set()


@dataclass
class WorkerIndexStats:
    """What the index holds for one worker (``/workers``, metrics, tests)."""

    num_blocks: dict[str, int]
    """Blocks held, per medium."""
    num_events: int = 0
    num_orphans: int = 0
    """``BlockStored`` events whose parent block was unknown (missed events): not indexed."""
    num_clears: int = 0


class KvIndex:
    """Prefixes held by each worker, per medium; see the module docstring."""

    def __init__(self) -> None:
        self._root = _Node(None, -1)
        self._blocks: dict[str, dict[int, _Node]] = {}
        """worker -> SGLang block hash -> the block's last trie node."""
        self._stats: dict[str, WorkerIndexStats] = {}

    # -- writers ----------------------------------------------------------------------------

    def apply(self, worker: str, event: Mapping[str, Any]) -> None:
        """Apply one decoded KV event of ``worker``. Raises ``ValueError`` for an unknown type
        or a malformed event (the caller clears the worker: its index can no longer be trusted)."""
        kind = event.get("type")
        stats = self._stats_of(worker)
        stats.num_events += 1
        if kind == "BlockStored":
            self._stored(worker, event, stats)
        elif kind == "BlockRemoved":
            self._removed(worker, event)
        elif kind == "AllBlocksCleared":
            self.clear(worker, count=False)
        else:
            raise ValueError(f"unknown KV event type {kind!r}")

    def clear(self, worker: str, count: bool = True) -> None:
        """Forget everything ``worker`` holds (gap in its events, restart, removal)."""
        for node in list(self._blocks.pop(worker, {}).values()):
            for owner in [o for o in node.owners if o[0] == worker]:
                node.owners.discard(owner)
            self._prune(node)
        stats = self._stats_of(worker)
        stats.num_blocks = {}
        if count:
            stats.num_clears += 1

    def forget(self, worker: str) -> None:
        """``clear`` and drop the worker's statistics (it left the pool)."""
        self.clear(worker, count=False)
        self._stats.pop(worker, None)

    # -- readers ----------------------------------------------------------------------------

    def match(self, token_ids: Sequence[int]) -> dict[Owner, int]:
        """Leading tokens of ``token_ids`` each ``(worker, medium)`` holds (absent: none)."""
        best: dict[Owner, int] = {}
        node = self._root
        for depth, token in enumerate(token_ids, start=1):
            child = node.children.get(token)
            if child is None:
                break
            node = child
            for owner in node.owners:
                best[owner] = depth
        return best

    def matched_tokens(self, token_ids: Sequence[int], medium: str = DEVICE) -> dict[str, int]:
        """``match`` for one medium, keyed by worker."""
        return {w: n for (w, m), n in self.match(token_ids).items() if m == medium}

    def stats(self, worker: str) -> WorkerIndexStats:
        got = self._stats.get(worker)
        return WorkerIndexStats(dict(got.num_blocks), got.num_events, got.num_orphans,
                                got.num_clears) if got else WorkerIndexStats({})

    def workers(self) -> Iterable[str]:
        return list(self._stats)

    # -- internals --------------------------------------------------------------------------

    def _stats_of(self, worker: str) -> WorkerIndexStats:
        return self._stats.setdefault(worker, WorkerIndexStats({}))

    def _stored(self, worker: str, event: Mapping[str, Any], stats: WorkerIndexStats) -> None:
        hashes, tokens = event.get("block_hashes"), event.get("token_ids")
        size = event.get("block_size")
        if (not isinstance(hashes, list) or not isinstance(tokens, list)
                or not isinstance(size, int) or size <= 0 or not hashes
                or len(tokens) > size * len(hashes) or len(tokens) <= size * (len(hashes) - 1)):
            raise ValueError(f"malformed BlockStored event: {dict(event)!r:.200}")
        medium = str(event.get("medium") or DEVICE)
        blocks = self._blocks.setdefault(worker, {})
        parent_hash = event.get("parent_block_hash")
        if parent_hash is None:
            node = self._root
        else:
            found = blocks.get(parent_hash)
            if found is None:
                stats.num_orphans += 1
                return
            node = found
        for i, block_hash in enumerate(hashes):
            for token in tokens[i * size:(i + 1) * size]:
                if not isinstance(token, int):
                    raise ValueError(f"BlockStored token ids must be integers, got {token!r}")
                child = node.children.get(token)
                if child is None:
                    child = node.children[token] = _Node(node, token)
                node = child
            if (worker, medium) not in node.owners:
                node.owners.add((worker, medium))
                stats.num_blocks[medium] = stats.num_blocks.get(medium, 0) + 1
            blocks[block_hash] = node

    def _removed(self, worker: str, event: Mapping[str, Any]) -> None:
        hashes = event.get("block_hashes")
        if not isinstance(hashes, list):
            raise ValueError(f"malformed BlockRemoved event: {dict(event)!r:.200}")
        medium = str(event.get("medium") or DEVICE)
        blocks = self._blocks.get(worker, {})
        stats = self._stats_of(worker)
        for block_hash in hashes:
            node = blocks.get(block_hash)
            if node is None or (worker, medium) not in node.owners:
                continue
            node.owners.discard((worker, medium))
            stats.num_blocks[medium] -= 1
            if not any(o[0] == worker for o in node.owners):
                del blocks[block_hash]
            self._prune(node)

    def _prune(self, node: _Node) -> None:
        """Drop ``node`` and its ancestors while they hold nothing and lead nowhere."""
        while node.parent is not None and not node.owners and not node.children:
            parent = node.parent
            del parent.children[node.token]
            node = parent
