"""The worker side of attention offload: some KV heads of some layers live on a head host.

Who calls what, all on the scheduler thread:
- :class:`runtime_patches.migration.manager.MigrationManager` owns one :class:`HeadOffloads`
  and calls ``parse`` / ``offload`` for ``POST /banaserve/offload_heads``, ``recall`` when a
  ``POST /banaserve/recall_heads`` has drained the pool, ``lose`` when a head host failed.
- SGLang's attention call (``LlamaAttention.forward``: ``self.attn(q, k, v, forward_batch)``)
  reaches :class:`SplitAttention`, which replaced the layer's ``RadixAttention`` for the
  duration of an offload.

:class:`SplitAttention` splits one layer's attention by KV head. Query heads follow their KV
head (grouped-query attention: query head ``h`` reads KV head ``h // group``). The offloaded
heads' queries and new keys/values go to the head host on a helper thread
(:class:`HeadClient`) while the local heads run through the worker's own attention backend on a
KV buffer that now holds only the local heads; the two outputs are put back in head order.
Attention is independent per head, so the result is the unsplit layer's (same kernels, same
per-head arithmetic). The KV memory the offloaded heads leave behind goes to the pool: it grows
to the worker's budget over the heads still held here (``capacity.KVCapacity``).
"""

from __future__ import annotations

import copy
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from router.rebalance.messages import AttentionStats, OffloadInfo
from runtime_patches.migration.remote import StepLost, attention_metadata
from runtime_patches.migration.transport import LayerHostLost, LayerHostRefused, LayerTransport

logger = logging.getLogger(__name__)


class HeadsLost(StepLost):
    """An offload's head host is gone or refused a step."""

    def __init__(self, offload_id: int, address: str, cause: Exception) -> None:
        super().__init__(f"KV heads of offload {offload_id} on {address}: {cause}")
        self.offload_id = offload_id
        self.cause = cause


class HeadClient:
    """One offload's session with its head host: sends one layer's remote half per call, on a
    helper thread so the local half computes meanwhile. The step's batch metadata goes with the
    first layer of each step only."""

    def __init__(self, transport: LayerTransport, offload_id: int, req_to_token_pool: Any) -> None:
        self.transport = transport
        self.offload_id = offload_id
        self._req_to_token_pool = req_to_token_pool
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="head-offload")
        self._last_batch: Any = None
        self._last_loc: Any = None
        self.num_calls = 0
        self.wait_seconds = 0.0
        self.bytes_exchanged = 0

    def submit(self, layer_id: int, forward_batch: Any, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> Future[dict[str, torch.Tensor]]:
        tensors: dict[str, Any] = {"q": q.contiguous(), "k": k.contiguous(), "v": v.contiguous()}
        # A new step is a new ForwardBatch in SGLang 0.5.23 (and always new KV slots); either
        # change sends the metadata again.
        meta = (forward_batch is not self._last_batch
                or forward_batch.out_cache_loc is not self._last_loc)
        if meta:
            tensors.update(attention_metadata(forward_batch, self._req_to_token_pool))
            self._last_batch, self._last_loc = forward_batch, forward_batch.out_cache_loc
        fields = {"layer_id": layer_id, "mode": int(forward_batch.forward_mode), "meta": meta}
        return self._thread.submit(self._call, fields, tensors)

    def _call(self, fields: dict[str, Any], tensors: dict[str, Any]) -> dict[str, torch.Tensor]:
        before = self.transport.bytes_sent + self.transport.bytes_received
        _, out = self.transport.call("attend", fields, tensors)
        self.bytes_exchanged += self.transport.bytes_sent + self.transport.bytes_received - before
        return out

    def wait(self, future: Future[dict[str, torch.Tensor]]) -> torch.Tensor:
        started = time.perf_counter()
        try:
            out = future.result()
        except (LayerHostLost, LayerHostRefused) as exc:
            self._last_batch = None
            raise HeadsLost(self.offload_id, self.transport.address, exc) from exc
        finally:
            self.wait_seconds += time.perf_counter() - started
        if "o" not in out:
            raise HeadsLost(self.offload_id, self.transport.address,
                            ValueError("the reply has no attention output"))
        self.num_calls += 1
        return out["o"]

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        self.transport.close()

    def stats(self) -> AttentionStats:
        return AttentionStats(self.num_calls, self.bytes_exchanged, round(self.wait_seconds, 6))


def head_groups(num_q_heads: int, num_kv_heads: int, kv_heads: list[int]) -> list[int]:
    """The query heads that read ``kv_heads`` (grouped-query attention), ascending."""
    group = num_q_heads // num_kv_heads
    return [h * group + j for h in sorted(kv_heads) for j in range(group)]


class SplitAttention(nn.Module):
    """Stands in for one layer's ``RadixAttention``: local KV heads here, the rest remote."""

    def __init__(self, attn: nn.Module, remote_heads: list[int], client: HeadClient,
                 pool: Any) -> None:
        super().__init__()
        self.original = attn
        self.layer_id = int(attn.layer_id)
        num_q, num_kv = int(attn.tp_q_head_num), int(attn.tp_k_head_num)
        local = [h for h in range(num_kv) if h not in remote_heads]
        self.num_q_heads, self.num_kv_heads = num_q, num_kv
        self.head_dim, self.v_head_dim = int(attn.qk_head_dim), int(attn.v_head_dim)
        self.local_kv = torch.tensor(local, dtype=torch.int64)
        self.remote_kv = torch.tensor(sorted(remote_heads), dtype=torch.int64)
        self.local_q = torch.tensor(head_groups(num_q, num_kv, local), dtype=torch.int64)
        self.remote_q = torch.tensor(head_groups(num_q, num_kv, remote_heads), dtype=torch.int64)
        # The worker's own backend computes the local heads as a narrower RadixAttention.
        self.local = copy.copy(attn)
        self.local.tp_q_head_num = len(self.local_q)
        self.local.tp_k_head_num = self.local.tp_v_head_num = len(local)
        self.client = client
        self._pool = pool

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, forward_batch: Any,
                save_kv_cache: bool = True) -> torch.Tensor:
        """``RadixAttention.forward`` as the supported layers call it (Llama, Qwen2: no extra
        arguments; the manager offloads only those layer classes)."""
        from sglang.srt.model_executor.forward_context import get_attn_backend

        tokens = q.shape[0]
        if forward_batch.forward_mode.is_idle():
            return q.new_empty(tokens, self.num_q_heads * self.v_head_dim)
        q3 = q.view(tokens, self.num_q_heads, self.head_dim)
        k3 = k.view(tokens, self.num_kv_heads, self.head_dim)
        v3 = v.view(tokens, self.num_kv_heads, self.v_head_dim)
        future = self.client.submit(self.layer_id, forward_batch, q3[:, self.remote_q],
                                    k3[:, self.remote_kv], v3[:, self.remote_kv])
        q_local = q3[:, self.local_q].reshape(tokens, -1)
        k_local, v_local = k3[:, self.local_kv], v3[:, self.local_kv]
        if save_kv_cache:
            li = self.layer_id - self._pool.start_layer
            k_buf, v_buf = self._pool.k_buffer[li], self._pool.v_buffer[li]
            loc = forward_batch.out_cache_loc
            k_buf[loc] = k_local.to(k_buf.dtype)
            v_buf[loc] = v_local.to(v_buf.dtype)
        out_local = get_attn_backend().forward(q_local, k_local, v_local, self.local,
                                               forward_batch, save_kv_cache=False)
        out_remote = self.client.wait(future)
        out = q.new_empty(tokens, self.num_q_heads, self.v_head_dim)
        out[:, self.local_q] = out_local.view(tokens, -1, self.v_head_dim)
        out[:, self.remote_q] = out_remote.view(tokens, -1, self.v_head_dim).to(out.dtype)
        return out.view(tokens, self.num_q_heads * self.v_head_dim)


@dataclass
class HeadOffload:
    """KV heads ``heads`` of ``layers`` on the head host ``target``."""

    id: int
    layers: list[int]
    heads: list[int]
    target: str
    client: HeadClient
    wrappers: dict[int, SplitAttention]
    kv_bytes_moved: int
    kv_bytes_released: int
    seconds: float
    grow_seconds: float = 0.0
    offloaded_at: float = field(default_factory=time.time)

    def describe(self) -> OffloadInfo:
        return OffloadInfo(self.id, tuple(self.layers), tuple(self.heads), self.target,
                           self.client.transport.address, self.kv_bytes_moved,
                           self.kv_bytes_released, round(self.seconds, 4),
                           round(self.grow_seconds, 4), self.offloaded_at, self.client.stats())
