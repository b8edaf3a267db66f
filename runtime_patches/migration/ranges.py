"""The worker's migrated layer ranges: which decoder layers run on which layer host.

Who calls: :class:`runtime_patches.migration.manager.MigrationManager`, on the scheduler thread
between model steps: ``check`` then ``migrate`` for ``POST /banaserve/migrate_layers``,
``restore`` once a ``POST /banaserve/restore_layers`` may shrink the pool, ``lose`` when a
layer host failed mid-step (:class:`~runtime_patches.migration.remote.RangeLost`). The manager
owns the pool size (``capacity.KVCapacity``) and the requests; this class owns the ranges, the
stand-in modules in ``model.layers``, the parked layers and the migrated layers' placeholder
KV buffers.

A migration moves, in order: the layers' weights, the KV of every slot in use (running
requests and the radix cache) for those layers, then swaps the stand-ins in and drops the
worker's KV buffers of those layers (the manager then grows the pool). A restore copies the KV
of slots in use back and puts the parked layers back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from router.rebalance.messages import MigrateRequest, RangeInfo
from runtime_patches.migration.capacity import new_kv_buffers
from runtime_patches.migration.errors import MigrationError
from runtime_patches.migration.remote import PassThroughLayer, RemoteLayers
from runtime_patches.migration.transport import LayerTransport
from runtime_patches.migration.wire import dtype_name

KV_CHUNK_SLOTS = 2048
"""Slots per KV message during migrate and restore."""


@dataclass
class MigratedRange:
    start: int
    end: int
    target: str
    remote: RemoteLayers
    parked: list[nn.Module]
    kv_shapes: list[tuple[torch.Size, torch.Size]]
    weight_bytes: int
    kv_bytes_moved: int
    kv_bytes_released: int
    seconds: float
    """Copy-out (weights, then KV) until the stand-ins are in; ``grow_seconds`` comes on top."""
    grow_seconds: float = 0.0
    migrated_at: float = field(default_factory=time.time)

    def describe(self) -> RangeInfo:
        return RangeInfo((self.start, self.end), self.target, self.remote.transport.address,
                         self.weight_bytes, self.kv_bytes_moved, self.kv_bytes_released,
                         round(self.seconds, 4), round(self.grow_seconds, 4), self.migrated_at,
                         self.remote.stats())


def check_range(layers: tuple[int, int], num_layers: int) -> None:
    """400 unless ``layers`` (a range the request already checked: ``0 <= start < end``) lies
    inside the model's ``num_layers``."""
    start, end = layers
    if not 0 <= start < end <= num_layers:
        raise MigrationError(400, f"layers [{start}, {end}) are not a non-empty range inside "
                                  f"[0, {num_layers})")


class LayerRanges:
    """Owns this worker's migrated ranges (see the module docstring)."""

    def __init__(self, manager: Any) -> None:
        self.manager = manager
        self.ranges: dict[int, MigratedRange] = {}

    @property
    def pool(self) -> Any:
        return self.manager.pool

    @property
    def layers(self) -> nn.ModuleList:
        return self.manager.layers

    def is_local(self, layer_id: int) -> bool:
        return not any(r.start <= layer_id < r.end for r in self.ranges.values())

    def num_migrated(self, without: list[MigratedRange] | None = None) -> int:
        return sum(r.end - r.start for r in self.ranges.values()
                   if not without or r not in without)

    def describe(self) -> tuple[RangeInfo, ...]:
        return tuple(r.describe() for r in sorted(self.ranges.values(), key=lambda r: r.start))

    def first_local_layer(self) -> nn.Module | None:
        return next((m for m in self.layers
                     if not isinstance(m, PassThroughLayer | RemoteLayers)), None)

    # -- migrate ---------------------------------------------------------------------------------
    def check(self, request: MigrateRequest) -> tuple[int, int, str]:
        """400 unless this worker can migrate the request's range to its target (the request's
        own fields are checked already); returns (start, end, target)."""
        check_range(request.layers, len(self.layers))
        (start, end), target = request.layers, request.target
        if target not in self.manager.targets:
            raise MigrationError(400, f"unknown target {target!r}; this worker knows "
                                      f"{sorted(self.manager.targets) or 'no layer hosts'} "
                                      f"(set with --layer-host NAME=HOST:PORT)")
        for r in self.ranges.values():
            if start < r.end and r.start < end:
                raise MigrationError(400, f"layers [{start}, {end}) overlap the migrated range "
                                          f"[{r.start}, {r.end})")
        split = [i for i in range(start, end) if self.manager.heads.heads_on(i)]
        if split:
            raise MigrationError(400, f"layers {split} have KV heads offloaded; recall them "
                                      "before migrating the layers")
        return start, end, target

    def check_supported(self) -> None:
        from runtime_patches.migration.host_runtime import SUPPORTED_LAYER_CLASSES

        layer = self.first_local_layer()
        name = f"{type(layer).__module__}.{type(layer).__qualname__}" if layer else "?"
        if name not in SUPPORTED_LAYER_CLASSES:
            raise MigrationError(409, f"layer migration and head offload do not support {name}")

    def migrate(self, transport: LayerTransport, start: int, end: int,
                target: str) -> MigratedRange:
        """Copy weights and KV to the host, then swap the stand-ins in. Transport errors
        propagate with nothing changed here (the caller closes the transport)."""
        started = time.perf_counter()
        weight_bytes, kv_moved = self._copy_out(transport, start, end)
        return self._swap_in(transport, start, end, target, weight_bytes, kv_moved,
                             time.perf_counter() - started)

    def _copy_out(self, transport: LayerTransport, start: int, end: int) -> tuple[int, int]:
        pool, runner = self.pool, self.manager.model_runner
        layer = self.layers[start]
        transport.call("hello")
        transport.call("open", {
            "layer_class": f"{type(layer).__module__}.{type(layer).__qualname__}",
            "hf_config": runner.model_config.hf_config.to_dict(), "start": start, "end": end,
            "dtype": dtype_name(runner.model_config.dtype),
            "kv_size": pool.size, "kv_page_size": pool.page_size,
            "kv_dtype": dtype_name(pool.store_dtype), "kv_head_num": pool.head_num,
            "kv_head_dim": pool.head_dim, "kv_v_head_dim": pool.v_head_dim,
        })
        weight_bytes = 0
        for i in range(start, end):
            state = {k: v.detach() for k, v in self.layers[i].state_dict().items()}
            weight_bytes += sum(t.numel() * t.element_size() for t in state.values())
            transport.call("load_layer", {"layer_id": i}, state, timeout=300)
        kv_moved = 0
        for slots in chunks(self.manager.used_slots(), KV_CHUNK_SLOTS):
            k = torch.stack([pool.k_buffer[i - pool.start_layer][slots] for i in range(start, end)])
            v = torch.stack([pool.v_buffer[i - pool.start_layer][slots] for i in range(start, end)])
            transport.call("put_kv", {}, {"slots": slots, "k": k, "v": v}, timeout=300)
            kv_moved += k.numel() * k.element_size() + v.numel() * v.element_size()
        return weight_bytes, kv_moved

    def _swap_in(self, transport: LayerTransport, start: int, end: int, target: str,
                 weight_bytes: int, kv_moved: int, seconds: float) -> MigratedRange:
        layers, pool = self.layers, self.pool
        parked = [layers[i] for i in range(start, end)]
        resume = (layers[end] if end < len(layers) else parked[0]).attn_boundary
        remote = RemoteLayers(transport, start, end, resume,
                              self.manager.model_runner.req_to_token_pool)
        layers[start] = remote
        for i in range(start + 1, end):
            layers[i] = PassThroughLayer(i)
        shapes, released = [], 0
        for i in range(start, end):
            li = i - pool.start_layer
            k, v = pool.k_buffer[li], pool.v_buffer[li]
            shapes.append((k.shape, v.shape))
            released += layer_kv_bytes(pool, i)
            pool.k_buffer[li] = _placeholder(k)
            pool.v_buffer[li] = _placeholder(v)
        migrated = MigratedRange(start, end, target, remote, parked, shapes, weight_bytes,
                                 kv_moved, released, seconds)
        self.ranges[start] = migrated
        return migrated

    # -- restore and loss ------------------------------------------------------------------------
    def restore(self, migrated: MigratedRange) -> int:
        """Copy the KV of slots in use back, put the parked layers back, close the session;
        returns the bytes copied. Transport errors propagate (the caller calls ``lose``)."""
        transport = migrated.remote.transport
        fresh = self._fresh(migrated)
        kv_bytes = 0
        for slots in chunks(self.manager.used_slots(), KV_CHUNK_SLOTS):
            _, out = transport.call("get_kv", {}, {"slots": slots}, timeout=300)
            for j, (k_buf, v_buf) in enumerate(fresh):
                k_buf[slots] = out["k"][j].to(k_buf.dtype)
                v_buf[slots] = out["v"][j].to(v_buf.dtype)
            kv_bytes += out["k"].numel() * out["k"].element_size() * 2
        self._swap_out(migrated, fresh)
        transport.close()
        return kv_bytes

    def lose(self, migrated: MigratedRange) -> None:
        """The host is gone: the parked layers come back with empty KV buffers (the manager
        aborts the requests whose KV was there and flushes the cache)."""
        self._swap_out(migrated, self._fresh(migrated))
        migrated.remote.transport.close()

    def _fresh(self, migrated: MigratedRange) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Empty KV buffers for the range's layers at the pool's current size."""
        rows = self.pool.size + self.pool.page_size
        return [new_kv_buffers((rows, *k[1:]), (rows, *v[1:]), self.pool.store_dtype)
                for k, v in migrated.kv_shapes]

    def _swap_out(self, migrated: MigratedRange,
                  buffers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        layers, pool = self.layers, self.pool
        for offset, i in enumerate(range(migrated.start, migrated.end)):
            layers[i] = migrated.parked[offset]
            li = i - pool.start_layer
            pool.k_buffer[li], pool.v_buffer[li] = buffers[offset]
        del self.ranges[migrated.start]


def chunks(slots: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [slots[i:i + size] for i in range(0, slots.numel(), size)]


def layer_kv_bytes(pool: Any, layer_id: int) -> int:
    li = layer_id - pool.start_layer
    return sum(b.numel() * b.element_size() for b in (pool.k_buffer[li], pool.v_buffer[li]))


def _placeholder(buffer: torch.Tensor) -> torch.Tensor:
    """A buffer of the same shape backed by one zero row: reads see zeros, writes fail."""
    return torch.zeros((1, *buffer.shape[1:]), dtype=buffer.dtype).expand(buffer.shape)
