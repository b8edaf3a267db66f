"""What a worker does when a layer or head host is lost: the one owner of the flush state.

Who calls: :class:`runtime_patches.migration.manager.MigrationManager`, on the scheduler thread:
``on_step_lost`` from the ``run_batch`` patch when a model step failed with ``StepLost``;
``lose_range`` / ``lose_heads`` / ``abort_inflight`` when a restore or recall finds its host
gone; ``flush_gate`` before every scheduling step.

The worker cannot recompute the lost KV in place: the layers (or heads) are local again at
once, every request in flight is aborted with a 503 and a message naming the host (the OpenAI
layer answers with an error, never with the step's token), new prefills wait until those
requests have released their KV, then the radix cache is emptied (its prefixes' KV on the
host is gone) and the pool shrinks to its budget. State owned here: ``invalidating`` (between
the loss and the flush) and the count of aborted requests.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from runtime_patches.migration.heads import HeadsLost
from runtime_patches.migration.offloads import HeadOffload
from runtime_patches.migration.ranges import MigratedRange
from runtime_patches.migration.remote import RangeLost, StepLost

logger = logging.getLogger(__name__)


class HostLoss:
    """Owns the aftermath of a lost host (see the module docstring)."""

    def __init__(self, manager: Any) -> None:
        self.manager = manager
        self.invalidating = False
        self.num_aborted = 0

    def on_step_lost(self, exc: StepLost, batch: Any) -> None:
        """A host failed inside a model step: restore locally, abort what was in flight."""
        if isinstance(exc, HeadsLost):
            offload = self.manager.heads.offloads.get(exc.offload_id)
            if offload is None:
                raise exc
            address = offload.client.transport.address
            self.lose_heads(offload, exc.cause)
            self.abort_inflight(f"head host {address} holding KV heads {offload.heads} of "
                                f"layers {offload.layers} of this worker was lost "
                                f"({exc.cause}); the request was aborted rather than "
                                "continued on lost KV", batch=batch)
            return
        assert isinstance(exc, RangeLost)
        migrated = self.manager.ranges.get(exc.layers.start)
        if migrated is None or migrated.remote is not exc.layers:
            raise exc
        self.lose_range(migrated, exc.cause)
        self.abort_inflight(f"layer host {exc.layers.transport.address} serving layers "
                            f"[{exc.layers.start}, {exc.layers.end}) of this worker was lost "
                            f"({exc.cause}); the request was aborted rather than continued "
                            f"on lost KV", batch=batch)

    def lose_range(self, migrated: MigratedRange, cause: Exception) -> None:
        self.manager.layer_ranges.lose(migrated)
        self.invalidating = True
        self.manager.event("host_lost", {"layers": [migrated.start, migrated.end],
                                          "target": migrated.target, "error": str(cause)})
        logger.error("layer host %s lost (%s): layers [%d, %d) restored from local weights; "
                     "their KV is gone", migrated.remote.transport.address, cause,
                     migrated.start, migrated.end)

    def lose_heads(self, offload: HeadOffload, cause: Exception) -> None:
        self.manager.heads.lose(offload)
        self.invalidating = True
        self.manager.event("host_lost", {"offload": offload.id, "heads": offload.heads,
                                          "layers": offload.layers, "target": offload.target,
                                          "error": str(cause)})
        logger.error("head host %s lost (%s): KV heads %s of layers %s are local again; "
                     "their KV is gone", offload.client.transport.address, cause,
                     offload.heads, offload.layers)

    def abort_inflight(self, message: str, batch: Any) -> None:
        from sglang.srt.managers.schedule_batch import FINISH_ABORT

        sched = self.manager.scheduler
        reqs = set(sched.collect_inflight_reqs())
        if batch is not None:
            reqs.update(batch.reqs)
        if sched.chunked_req is not None:
            reqs.add(sched.chunked_req)
            sched._pending_chunked_abort_req = sched.chunked_req
        for req in reqs:
            if not req.finished():
                req.to_finish = FINISH_ABORT(message, HTTPStatus.SERVICE_UNAVAILABLE,
                                             "ServiceUnavailable")
                self.num_aborted += 1
        logger.error("aborted %d in-flight requests: %s", len(reqs), message)

    def flush_gate(self) -> bool:
        """Before every scheduling step: after a host loss, False (no new prefill) until every
        aborted request has released its KV; then the radix cache is emptied once and the pool
        sized to its budget."""
        if not self.invalidating:
            return True
        manager = self.manager
        sched = manager.scheduler
        if sched.chunked_req is not None or any(
                not req.finished() for req in sched.collect_inflight_reqs()):
            return False
        evicted = evict_cache(sched)
        capacity = manager.capacity
        if not manager.pending_restore and not manager.pending_recall:
            capacity.undrain()
            target = capacity.size_for(manager.local_head_layers())
            if target < capacity.size and len(capacity.used_slots()) == 0:
                capacity.resize(target)
        self.invalidating = False
        manager.event("flushed", {"evicted_tokens": evicted, "pool_tokens": capacity.size})
        logger.info("KV cache flushed after a lost host (%d cached tokens evicted)", evicted)
        return True


def evict_cache(scheduler: Any) -> int:
    """Evict every unlocked radix-cache entry; returns the tokens evicted."""
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    tree = scheduler.tree_cache
    evictable = int(tree.evictable_size())
    if evictable:
        tree.evict(EvictParams(num_tokens=evictable))
    return evictable
