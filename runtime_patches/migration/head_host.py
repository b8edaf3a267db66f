"""The head host's side of attention offload: some KV heads of some layers of one worker.

Who calls what: ``runtime_patches.migration.host`` (one session per connection) creates one
:class:`HeadShard` when a worker offloads heads (op ``open_heads``), fills it with the KV those
heads already hold (``put_kv``), then calls :meth:`HeadShard.attend` once per offloaded layer
per model step of the worker; ``get_kv`` hands the KV back when the worker recalls the heads,
``resize_kv`` follows the worker's pool when it grows or shrinks.

Per-head attention is independent, so the worker's layer output is exact when the offloaded
heads' attention runs here: the worker sends the queries of the query heads that belong to
the offloaded KV heads (grouped-query attention: query head ``h`` reads KV head
``h // (num_q_heads / num_kv_heads)``), and the new keys and values of those KV heads; this
shard stores the keys and values in its own pool at the worker's slot ids and returns the
attention output of those query heads. It runs SGLang's ``torch_native`` backend, the worker's
own CPU attention, over a pool that holds only these heads, so each head's arithmetic is the
worker's. No SGLang runtime is needed: attention has no weights.

The batch metadata attention needs (mode, sequence lengths, the batch's rows of the worker's
``req_to_token``, extend lengths) is the same for every layer of one model step, so the worker
sends it with the first offloaded layer of a step (field ``meta``) and this shard keeps it for
the step's later layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from runtime_patches.migration.capacity import new_kv_buffers, resized_kv
from runtime_patches.migration.host_runtime import HostRefusal
from runtime_patches.migration.wire import parse_dtype


@dataclass(frozen=True)
class HeadSpec:
    """What a worker sends to open a head shard."""

    layers: list[int]
    heads: list[int]
    """The offloaded KV heads (ids in ``[0, num_kv_heads)``, ascending)."""
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    scaling: float
    kv_size: int
    kv_page_size: int
    kv_dtype: str

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> HeadSpec:
        try:
            spec = cls(**{name: fields[name] for name in cls.__dataclass_fields__})
        except KeyError as exc:
            raise HostRefusal(f"open_heads: missing field {exc.args[0]!r}") from None
        if not spec.layers or not spec.heads:
            raise HostRefusal("open_heads: no layers or no heads")
        if spec.num_kv_heads < 1 or spec.num_q_heads % spec.num_kv_heads:
            raise HostRefusal(f"open_heads: {spec.num_q_heads} query heads do not group over "
                              f"{spec.num_kv_heads} KV heads")
        if not all(0 <= h < spec.num_kv_heads for h in spec.heads):
            raise HostRefusal(f"open_heads: heads {spec.heads} outside [0, {spec.num_kv_heads})")
        return spec


class _ShardPool:
    """The part of ``MHATokenToKVPool`` that SGLang's torch_native backend reads."""

    def __init__(self, layers: list[int], rows: int, heads: int, head_dim: int,
                 v_head_dim: int, dtype: torch.dtype) -> None:
        self.k_buffer: dict[int, torch.Tensor] = {}
        self.v_buffer: dict[int, torch.Tensor] = {}
        for layer_id in layers:
            self.k_buffer[layer_id], self.v_buffer[layer_id] = new_kv_buffers(
                (rows, heads, head_dim), (rows, heads, v_head_dim), dtype)

    def get_key_buffer(self, layer_id: int) -> torch.Tensor:
        return self.k_buffer[layer_id]

    def get_value_buffer(self, layer_id: int) -> torch.Tensor:
        return self.v_buffer[layer_id]


class HeadShard:
    """KV heads ``spec.heads`` of layers ``spec.layers`` of one worker, and their attention."""

    def __init__(self, spec: HeadSpec) -> None:
        from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
        from sglang.srt.layers.radix_attention import AttentionType

        self.spec = spec
        self.layers = list(spec.layers)
        self.size, self.page_size = spec.kv_size, spec.kv_page_size
        group = spec.num_q_heads // spec.num_kv_heads
        self.pool = _ShardPool(self.layers, self.size + self.page_size, len(spec.heads),
                               spec.head_dim, spec.v_head_dim, parse_dtype(spec.kv_dtype))
        self._req_to_token = SimpleNamespace(req_to_token=torch.zeros((1, 1), dtype=torch.int32))
        self.backend = TorchNativeAttnBackend(SimpleNamespace(
            device="cpu", req_to_token_pool=self._req_to_token, token_to_kv_pool=self.pool))
        self.attn = {layer_id: SimpleNamespace(
            layer_id=layer_id, tp_q_head_num=len(spec.heads) * group,
            tp_k_head_num=len(spec.heads), tp_v_head_num=len(spec.heads),
            qk_head_dim=spec.head_dim, head_dim=spec.head_dim, v_head_dim=spec.v_head_dim,
            scaling=spec.scaling, is_cross_attention=False, attn_type=AttentionType.DECODER,
            sliding_window_size=-1, logit_cap=0.0) for layer_id in self.layers}
        self._batch: Any = None

    # -- KV ------------------------------------------------------------------------------------
    def _check_slots(self, slots: torch.Tensor) -> torch.Tensor:
        slots = slots.to(torch.int64)
        if slots.numel() and (int(slots.min()) < 0
                              or int(slots.max()) >= self.size + self.page_size):
            raise HostRefusal("kv: slot ids outside the pool")
        return slots

    def put_kv(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """``k``/``v``: (offloaded layers, len(slots), offloaded heads, head_dim)."""
        slots = self._check_slots(slots)
        heads = len(self.spec.heads)
        if (k.shape[0] != len(self.layers) or v.shape[0] != len(self.layers)
                or k.shape[1] != slots.numel() or k.shape[2] != heads):
            raise HostRefusal(f"kv: expected {len(self.layers)} layers x {slots.numel()} slots "
                              f"x {heads} heads, got {tuple(k.shape)}")
        for i, layer_id in enumerate(self.layers):
            k_buf, v_buf = self.pool.k_buffer[layer_id], self.pool.v_buffer[layer_id]
            k_buf[slots] = k[i].to(k_buf.dtype)
            v_buf[slots] = v[i].to(v_buf.dtype)

    def get_kv(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        slots = self._check_slots(slots)
        return (torch.stack([self.pool.k_buffer[i][slots] for i in self.layers]),
                torch.stack([self.pool.v_buffer[i][slots] for i in self.layers]))

    def resize_kv(self, size: int) -> None:
        if size < 1:
            raise HostRefusal(f"resize_kv: size {size} must be >= 1")
        for layer_id in self.layers:
            self.pool.k_buffer[layer_id], self.pool.v_buffer[layer_id] = resized_kv(
                self.pool.k_buffer[layer_id], self.pool.v_buffer[layer_id],
                size + self.page_size)
        self.size = size

    def kv_bytes(self) -> int:
        return sum(b.numel() * b.element_size()
                   for b in (*self.pool.k_buffer.values(), *self.pool.v_buffer.values()))

    def weight_bytes(self) -> int:
        return 0

    def describe(self) -> dict[str, Any]:
        return {"head_layers": self.layers, "heads": list(self.spec.heads),
                "kv_bytes": self.kv_bytes()}

    # -- one layer of one model step ------------------------------------------------------------
    def attend(self, fields: dict[str, Any],
               tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Store the new K/V of the offloaded heads and return their attention output."""
        layer_id = int(fields["layer_id"])
        attn = self.attn.get(layer_id)
        if attn is None:
            raise HostRefusal(f"attend: layer {layer_id} is not offloaded here "
                              f"(layers {self.layers})")
        if fields.get("meta"):
            self._batch = self._forward_batch(int(fields["mode"]), tensors)
        batch = self._batch
        if batch is None:
            raise HostRefusal("attend: no batch metadata for this step")
        q, k, v = tensors["q"], tensors["k"], tensors["v"]
        loc = batch.out_cache_loc
        if k.shape[0] != loc.numel() or q.shape[0] != loc.numel():
            raise HostRefusal(f"attend: {q.shape[0]} query rows and {k.shape[0]} KV rows for "
                              f"{loc.numel()} slots")
        k_buf, v_buf = self.pool.k_buffer[layer_id], self.pool.v_buffer[layer_id]
        k_buf[loc] = k.view(-1, attn.tp_k_head_num, attn.qk_head_dim).to(k_buf.dtype)
        v_buf[loc] = v.view(-1, attn.tp_v_head_num, attn.v_head_dim).to(v_buf.dtype)
        with torch.inference_mode():
            out = self.backend.forward(q.reshape(q.shape[0], -1), None, None, attn, batch,
                                       save_kv_cache=False)
        return {"o": out}

    def _forward_batch(self, mode_value: int, tensors: dict[str, torch.Tensor]) -> Any:
        from sglang.srt.model_executor.forward_batch_info import ForwardMode

        mode = ForwardMode(mode_value)
        if not (mode.is_extend() or mode.is_decode()):
            raise HostRefusal(f"attend: mode {mode.name} is not supported")
        self._req_to_token.req_to_token = tensors["req_to_token"]
        seq_lens = tensors["seq_lens"]
        batch = SimpleNamespace(
            forward_mode=mode, out_cache_loc=tensors["out_cache_loc"].to(torch.int64),
            req_pool_indices=torch.arange(seq_lens.numel(), dtype=torch.int64),
            seq_lens=seq_lens, encoder_lens=None, extend_prefix_lens=None,
            extend_seq_lens=None)
        if mode.is_extend():
            batch.extend_prefix_lens = tensors["extend_prefix_lens"]
            batch.extend_seq_lens = tensors["extend_seq_lens"]
        return batch
