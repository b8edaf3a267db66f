"""The worker's KV pool, sized to its memory budget as layers leave and come back.

Who calls: :class:`runtime_patches.migration.manager.MigrationManager`, on the scheduler thread
between model steps: ``size_for`` to plan, ``resize`` after a migration (grow) and before a
restore (shrink), ``held_above`` / ``drain`` / ``undrain`` while a restore waits for slots.

The budget is what the worker was started with: ``num_layers x num_kv_heads x (pool tokens +
one page)`` head-rows of KV. With m layers on layer hosts, or some layers' KV heads on head
hosts, the same memory holds ``budget / (local head-layers)`` tokens (a local head-layer is
one KV head of one local layer), so the pool grows by that factor: every local layer's
buffers are reallocated larger (their rows copied), the allocator gets the new slot ids, and
every SGLang component that copied ``max_total_num_tokens`` at start-up (the load report of
``/v1/loads``, the pool statistics behind ``/metrics``, the idle memory check) is told the new
capacity. Layer and head hosts hold their KV for the same slot ids, so they grow first. A
layer whose KV heads were partly offloaded keeps a narrower buffer (only its local heads);
resizing keeps that width.

Shrinking needs the slots above the new size to be free. ``drain`` marks the limit and
``sweep`` (before every scheduling step) takes free slots above it out of the allocator, so new
KV is placed below; the manager empties the radix cache's unlocked entries meanwhile and
finishes the shrink once no slot above the limit is held.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)


def new_kv_buffers(k_shape: tuple[int, ...], v_shape: tuple[int, ...],
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed K and V buffers laid out as SGLang's pool lays them out: the two halves of one
    allocation when their shapes match. Used by the worker and both kinds of host."""
    if tuple(k_shape) == tuple(v_shape):
        fused = torch.zeros((2, *k_shape), dtype=dtype)
        return fused[0], fused[1]
    return torch.zeros(k_shape, dtype=dtype), torch.zeros(v_shape, dtype=dtype)


def resized_kv(k: torch.Tensor, v: torch.Tensor,
               rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """New K and V buffers of ``rows`` rows holding as many leading rows of ``k``/``v`` as fit
    (slot ids are row numbers, so the slots in use keep their KV)."""
    new_k, new_v = new_kv_buffers((rows, *k.shape[1:]), (rows, *v.shape[1:]), k.dtype)
    keep = min(rows, k.shape[0])
    new_k[:keep] = k[:keep]
    new_v[:keep] = v[:keep]
    return new_k, new_v


def _is_placeholder(buffer: torch.Tensor) -> bool:
    return buffer.dim() > 0 and buffer.stride(0) == 0


class KVCapacity:
    """Owns the size of one worker's KV pool (see the module docstring)."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        pool = self.pool
        self.num_layers = len(pool.k_buffer)
        self.base_size = int(pool.size)
        self.num_kv_heads = int(pool.head_num)
        self.budget_rows = self.num_layers * self.num_kv_heads * (self.base_size + pool.page_size)
        """Head-rows of KV the worker was started with (see the module docstring)."""
        self.drain_limit: int | None = None
        self._dropped: torch.Tensor | None = None

    @property
    def pool(self) -> Any:
        return self.scheduler.tp_worker.model_runner.token_to_kv_pool

    @property
    def allocator(self) -> Any:
        return self.scheduler.token_to_kv_pool_allocator

    @property
    def size(self) -> int:
        return int(self.pool.size)

    def size_for(self, local_head_layers: int) -> int:
        """Pool tokens the budget gives ``local_head_layers`` (the KV heads kept here, summed
        over the local layers: ``num_layers x num_kv_heads`` when nothing has moved)."""
        page = self.pool.page_size
        rows = self.budget_rows // max(local_head_layers, 1)
        return max(self.base_size, (rows - page) // page * page)

    def used_slots(self) -> torch.Tensor:
        """Slot ids holding KV: neither in the allocator's free lists nor drained."""
        allocator = self.allocator
        used = torch.ones(allocator.size + 1, dtype=torch.bool)
        used[0] = False
        for free in (allocator.free_pages, allocator.release_pages):
            if free.numel():
                used[free.cpu()] = False
        if self._dropped is not None:
            used[self._dropped] = False
        return used.nonzero().flatten()

    # -- resizing ------------------------------------------------------------------------------
    def resize(self, new_size: int) -> None:
        """Reallocate local layers' buffers and the allocator for ``new_size`` tokens. A shrink
        must come after every slot above ``new_size`` is free (see ``drain``)."""
        pool, allocator = self.pool, self.allocator
        old_size = int(pool.size)
        if new_size == old_size:
            return
        page = pool.page_size
        rows = new_size + page
        for li in range(len(pool.k_buffer)):
            k, v = pool.k_buffer[li], pool.v_buffer[li]
            if _is_placeholder(k):  # a migrated layer: no memory here
                pool.k_buffer[li] = torch.zeros((1, *k.shape[1:]), dtype=k.dtype).expand(
                    (rows, *k.shape[1:]))
                pool.v_buffer[li] = torch.zeros((1, *v.shape[1:]), dtype=v.dtype).expand(
                    (rows, *v.shape[1:]))
                continue
            pool.k_buffer[li], pool.v_buffer[li] = resized_kv(k, v, rows)
        pool.size = new_size
        if hasattr(pool, "_build_kv_buffer_descs"):
            pool._kv_buffer_descs = pool._build_kv_buffer_descs()
        if new_size > old_size:
            extra = torch.arange(old_size + 1, new_size + 1, dtype=allocator.free_pages.dtype)
            allocator.free_pages = torch.cat((allocator.free_pages, extra))
        else:
            allocator.free_pages = allocator.free_pages[allocator.free_pages <= new_size]
            allocator.release_pages = allocator.release_pages[
                allocator.release_pages <= new_size]
        allocator.size = new_size
        self._publish_capacity(new_size)
        logger.info("KV pool resized from %d to %d tokens (%d local layers)", old_size,
                    new_size, sum(not _is_placeholder(b) for b in pool.k_buffer))

    def _publish_capacity(self, new: int) -> None:
        """Tell SGLang's components that copied the capacity at start-up (load report, pool
        statistics, idle memory check) the pool now holds ``new`` tokens."""
        sched = self.scheduler
        old = sched.max_total_num_tokens
        owners = [sched, *(v for v in vars(sched).values()
                           if hasattr(v, "max_total_num_tokens") and v is not sched)]
        for owner in owners:
            if getattr(owner, "max_total_num_tokens", None) == old:
                object.__setattr__(owner, "max_total_num_tokens", new)

    # -- draining ------------------------------------------------------------------------------
    def drain(self, limit: int) -> None:
        """Place no new KV above ``limit``; ``sweep`` then collects the slots as they free."""
        if self._dropped is None:
            self._dropped = torch.zeros(self.allocator.size + 1, dtype=torch.bool)
        self.drain_limit = limit
        self.sweep()

    def sweep(self) -> int:
        """Take free slots above the drain limit out of the allocator (called before every
        scheduling step, so no allocation can pick them); returns how many are still held."""
        limit, allocator = self.drain_limit, self.allocator
        if limit is None or self._dropped is None:
            return 0
        for name in ("free_pages", "release_pages"):
            free = getattr(allocator, name)
            high = free > limit
            if bool(high.any()):
                self._dropped[free[high]] = True
                setattr(allocator, name, free[~high])
        # Drained slots leave the capacity too, so SGLang's accounting stays exact meanwhile.
        self._publish_capacity(allocator.size - int(self._dropped.sum()))
        return int(allocator.size - limit - int(self._dropped[limit + 1:].sum()))

    def undrain(self) -> None:
        """Give the drained slots back to the allocator (a restore was cancelled)."""
        if self._dropped is None:
            return
        back = self._dropped.nonzero().flatten().to(self.allocator.free_pages.dtype)
        self.allocator.free_pages = torch.cat((self.allocator.free_pages, back))
        self._dropped, self.drain_limit = None, None
        self._publish_capacity(self.allocator.size)

    def finish_drain(self) -> None:
        """Shrink to the drain limit once ``sweep`` reports nothing held above it."""
        assert self.drain_limit is not None and self.sweep() == 0
        limit = self.drain_limit
        self._dropped, self.drain_limit = None, None
        self.resize(limit)
