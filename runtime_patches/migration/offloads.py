"""The worker's head offloads: which KV heads of which layers live on which head host.

Who calls: :class:`runtime_patches.migration.manager.MigrationManager`, on the scheduler thread
between model steps: ``check`` then ``offload`` for ``POST /banaserve/offload_heads``,
``recall`` once a ``POST /banaserve/recall_heads`` may shrink the pool, ``lose`` when a head
host failed mid-step (:class:`~runtime_patches.migration.heads.HeadsLost`). The manager owns
the pool size (``capacity.KVCapacity``) and the requests; this class owns the offloads, the
``SplitAttention`` stand-ins and the narrowed KV buffers of offloaded layers.

An offload moves, in order: the offloaded heads' KV of every slot in use (running requests and
the radix cache), then swaps ``SplitAttention`` into each layer and narrows that layer's KV
buffers to the local heads; the manager then grows the pool. A recall copies the remote heads'
KV of slots in use back into full-width buffers and puts the layers' own attention back.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from router.rebalance.messages import HeadsInfo, OffloadHeadsRequest
from runtime_patches.migration.capacity import new_kv_buffers
from runtime_patches.migration.errors import MigrationError
from runtime_patches.migration.heads import HeadClient, HeadOffload, SplitAttention
from runtime_patches.migration.ranges import KV_CHUNK_SLOTS, chunks
from runtime_patches.migration.transport import LayerTransport
from runtime_patches.migration.wire import dtype_name

logger = logging.getLogger(__name__)


def _with_heads(k: torch.Tensor, v: torch.Tensor,
                heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty buffers shaped like ``k``/``v`` but for ``heads`` KV heads."""
    return new_kv_buffers((k.shape[0], heads, *k.shape[2:]), (v.shape[0], heads, *v.shape[2:]),
                          k.dtype)


class HeadOffloads:
    """Owns this worker's head offloads (see the module docstring)."""

    def __init__(self, manager: Any) -> None:
        self.manager = manager
        self.offloads: dict[int, HeadOffload] = {}
        self._next_id = 1

    @property
    def pool(self) -> Any:
        return self.manager.pool

    def num_kv_heads(self) -> int:
        return int(self.pool.head_num)

    def heads_on(self, layer_id: int) -> list[int]:
        return [h for o in self.offloads.values() if layer_id in o.layers for h in o.heads]

    def describe(self) -> HeadsInfo:
        attn = self._first_attention()
        return HeadsInfo(self.num_kv_heads(),
                         int(attn.tp_q_head_num) if attn is not None else None,
                         tuple(o.describe() for o in sorted(self.offloads.values(),
                                                            key=lambda o: o.id)))

    def _first_attention(self) -> Any:
        for layer in self.manager.layers:
            attn = getattr(getattr(layer, "self_attn", None), "attn", None)
            if attn is not None:
                return attn.original if isinstance(attn, SplitAttention) else attn
        return None

    # -- offload --------------------------------------------------------------------------------
    def check(self, request: OffloadHeadsRequest) -> tuple[list[int], list[int], str]:
        """400 unless this worker can offload the request's heads to its target (the request's
        own fields are checked already); returns (layers, heads, target), ids sorted."""
        layers, heads = sorted(request.layer_ids), sorted(request.head_ids)
        num_layers, num_kv = len(self.manager.layers), self.num_kv_heads()
        if not all(0 <= i < num_layers for i in layers):
            raise MigrationError(400, f"layers {layers} are not all inside [0, {num_layers})")
        if not all(0 <= h < num_kv for h in heads):
            raise MigrationError(400, f"heads {heads} are not all KV heads in [0, {num_kv}) "
                                    "(query heads follow their KV head)")
        if len(heads) >= num_kv:
            raise MigrationError(400, f"offloading all {num_kv} KV heads leaves none here; "
                                    "migrate the layers instead")
        target = request.target
        if target not in self.manager.targets:
            raise MigrationError(400, f"unknown target {target!r}; this worker knows "
                                    f"{sorted(self.manager.targets) or 'no layer hosts'} "
                                    f"(set with --layer-host NAME=HOST:PORT)")
        for i in layers:
            if not self.manager.is_local(i):
                raise MigrationError(400, f"layer {i} is migrated to a layer host")
            if self.heads_on(i):
                raise MigrationError(400, f"layer {i} already has KV heads {self.heads_on(i)} "
                                        "offloaded; recall them first")
        return layers, heads, target

    def offload(self, transport: LayerTransport, layers: list[int], heads: list[int],
                target: str) -> HeadOffload:
        """Copy the heads' KV to the host, then split the layers' attention. Transport errors
        propagate with nothing changed here (the caller closes the transport)."""
        started = time.perf_counter()
        pool = self.pool
        attn = self._first_attention()
        transport.call("hello")
        transport.call("open_heads", {
            "layers": layers, "heads": heads, "num_q_heads": int(attn.tp_q_head_num),
            "num_kv_heads": self.num_kv_heads(), "head_dim": int(attn.qk_head_dim),
            "v_head_dim": int(attn.v_head_dim), "scaling": float(attn.scaling),
            "kv_size": int(pool.size), "kv_page_size": int(pool.page_size),
            "kv_dtype": dtype_name(pool.store_dtype)}, timeout=300)
        remote = torch.tensor(heads, dtype=torch.int64)
        moved = 0
        for slots in chunks(self.manager.used_slots(), KV_CHUNK_SLOTS):
            k = torch.stack([self._k(i)[slots][:, remote] for i in layers])
            v = torch.stack([self._v(i)[slots][:, remote] for i in layers])
            transport.call("put_kv", {}, {"slots": slots, "k": k, "v": v}, timeout=300)
            moved += k.numel() * k.element_size() + v.numel() * v.element_size()
        offload_id = self._next_id
        self._next_id += 1
        client = HeadClient(transport, offload_id, self.manager.model_runner.req_to_token_pool)
        wrappers, released = {}, 0
        local = torch.tensor([h for h in range(self.num_kv_heads()) if h not in heads])
        for i in layers:
            self_attn = self.manager.layers[i].self_attn
            wrappers[i] = SplitAttention(self_attn.attn, heads, client, pool)
            self_attn.attn = wrappers[i]
            k, v = self._k(i), self._v(i)
            new_k, new_v = _with_heads(k, v, len(local))
            new_k.copy_(k[:, local])
            new_v.copy_(v[:, local])
            released += _nbytes(k, v) - _nbytes(new_k, new_v)
            self._set(i, new_k, new_v)
        done = HeadOffload(offload_id, layers, heads, target, client, wrappers, moved, released,
                           time.perf_counter() - started)
        self.offloads[offload_id] = done
        return done

    # -- recall and loss ------------------------------------------------------------------------
    def recall(self, offload: HeadOffload) -> int:
        """Copy the remote heads' KV of slots in use back and widen the layers' buffers;
        returns the bytes copied. Transport errors propagate (the caller calls ``lose``)."""
        fresh = self._widened(offload)
        remote = torch.tensor(offload.heads, dtype=torch.int64)
        moved = 0
        for slots in chunks(self.manager.used_slots(), KV_CHUNK_SLOTS):
            _, out = offload.client.transport.call("get_kv", {}, {"slots": slots}, timeout=300)
            rows, cols = slots[:, None], remote[None, :]
            for j, i in enumerate(offload.layers):
                k_buf, v_buf = fresh[i]
                k_buf[rows, cols] = out["k"][j].to(k_buf.dtype)
                v_buf[rows, cols] = out["v"][j].to(v_buf.dtype)
            moved += out["k"].numel() * out["k"].element_size() * 2
        self._swap_out(offload, fresh)
        return moved

    def lose(self, offload: HeadOffload) -> None:
        """The host is gone: full-width buffers again (the remote heads' KV is lost; the manager
        aborts the requests that used it and flushes the cache), the layers' own attention."""
        self._swap_out(offload, self._widened(offload))

    def _widened(self, offload: HeadOffload) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        num_kv = self.num_kv_heads()
        local = torch.tensor([h for h in range(num_kv) if h not in offload.heads])
        fresh = {}
        for i in offload.layers:
            k, v = self._k(i), self._v(i)
            new_k, new_v = _with_heads(k, v, num_kv)
            new_k[:, local] = k
            new_v[:, local] = v
            fresh[i] = (new_k, new_v)
        return fresh

    def _swap_out(self, offload: HeadOffload,
                  buffers: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        for i, wrapper in offload.wrappers.items():
            self.manager.layers[i].self_attn.attn = wrapper.original
            self._set(i, *buffers[i])
        del self.offloads[offload.id]
        offload.client.close()

    # -- buffers --------------------------------------------------------------------------------
    def _k(self, layer_id: int) -> torch.Tensor:
        return self.pool.k_buffer[layer_id - self.pool.start_layer]

    def _v(self, layer_id: int) -> torch.Tensor:
        return self.pool.v_buffer[layer_id - self.pool.start_layer]

    def _set(self, layer_id: int, k: torch.Tensor, v: torch.Tensor) -> None:
        li = layer_id - self.pool.start_layer
        self.pool.k_buffer[li], self.pool.v_buffer[li] = k, v


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
