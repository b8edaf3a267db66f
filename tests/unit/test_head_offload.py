"""Head offload logic without an SGLang process: the GQA head grouping, the head host's
attention against unsplit attention, the host's validation, the worker's request checks and the
KV budget counted in head-layers."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from runtime_patches.migration.head_host import HeadShard, HeadSpec
from runtime_patches.migration.heads import head_groups
from runtime_patches.migration.host_runtime import HostRefusal
from runtime_patches.migration.manager import MigrationManager


def test_query_heads_follow_their_kv_head() -> None:
    assert head_groups(8, 4, [1, 3]) == [2, 3, 6, 7]
    assert head_groups(9, 3, [2]) == [6, 7, 8]
    assert head_groups(4, 4, [0, 2]) == [0, 2]


def _spec(**overrides: Any) -> HeadSpec:
    fields = dict(layers=[5], heads=[1, 3], num_q_heads=8, num_kv_heads=4, head_dim=16,
                  v_head_dim=16, scaling=0.25, kv_size=64, kv_page_size=1, kv_dtype="float32")
    fields.update(overrides)
    return HeadSpec.from_fields(fields)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Reference causal GQA attention over one sequence: q (T, Hq, D), k/v (S, Hk, D)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("thd,shd->hts", q, k) * scale
    t, s = q.shape[0], k.shape[0]
    mask = torch.ones(t, s, dtype=torch.bool).tril(diagonal=s - t)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hts,shd->thd", scores.softmax(-1), v)


def test_the_head_host_computes_its_heads_of_the_unsplit_attention() -> None:
    """Prefill 6 tokens, then decode one, through the shard; compare the offloaded heads'
    outputs with attention over all heads (fp32: equal to rounding)."""
    torch.manual_seed(0)
    spec = _spec()
    shard = HeadShard(spec)
    remote_kv, remote_q = spec.heads, head_groups(8, 4, spec.heads)
    q = torch.randn(7, 8, 16)
    k, v = torch.randn(7, 4, 16), torch.randn(7, 4, 16)
    slots = torch.tensor([9, 3, 4, 20, 21, 22, 40])
    req_to_token = slots[None, :].to(torch.int32)
    prefill = {"q": q[:6, remote_q].reshape(6, -1), "k": k[:6, remote_kv],
               "v": v[:6, remote_kv], "out_cache_loc": slots[:6],
               "seq_lens": torch.tensor([6]), "req_to_token": req_to_token[:, :6],
               "extend_prefix_lens": torch.tensor([0]), "extend_seq_lens": torch.tensor([6])}
    got = shard.attend({"layer_id": 5, "mode": 1, "meta": True}, prefill)["o"]
    want = _attention(q[:6], k[:6], v[:6], 0.25)[:, remote_q]
    assert torch.allclose(got.view(6, 4, 16), want, atol=1e-5)
    decode = {"q": q[6:, remote_q].reshape(1, -1), "k": k[6:, remote_kv], "v": v[6:, remote_kv],
              "out_cache_loc": slots[6:], "seq_lens": torch.tensor([7]),
              "req_to_token": req_to_token}
    got = shard.attend({"layer_id": 5, "mode": 2, "meta": True}, decode)["o"]
    want = _attention(q, k, v, 0.25)[6:, remote_q]
    assert torch.allclose(got.view(1, 4, 16), want, atol=1e-5)
    # The shard kept exactly the offloaded heads' KV at the worker's slot ids.
    k_held, v_held = shard.get_kv(slots)
    assert torch.equal(k_held[0], k[:, remote_kv]) and torch.equal(v_held[0], v[:, remote_kv])


def test_the_head_host_keeps_kv_across_resizes() -> None:
    shard = HeadShard(_spec())
    k = torch.randn(1, 3, 2, 16)
    shard.put_kv(torch.tensor([1, 2, 60]), k, k + 1)
    shard.resize_kv(128)
    assert shard.pool.k_buffer[5].shape == (129, 2, 16)
    assert torch.equal(shard.get_kv(torch.tensor([1, 2, 60]))[0], k)
    shard.resize_kv(61)
    assert torch.equal(shard.get_kv(torch.tensor([1, 2, 60]))[1], k + 1)
    with pytest.raises(HostRefusal, match="outside the pool"):
        shard.get_kv(torch.tensor([62]))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"heads": []}, "no layers or no heads"),
    ({"heads": [4]}, "outside"),
    ({"num_q_heads": 7}, "do not group"),
])
def test_the_head_host_refuses_bad_specs(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(HostRefusal, match=message):
        _spec(**overrides)


def test_the_head_host_refuses_steps_it_cannot_run() -> None:
    shard = HeadShard(_spec())
    with pytest.raises(HostRefusal, match="not offloaded here"):
        shard.attend({"layer_id": 6, "mode": 2}, {})
    with pytest.raises(HostRefusal, match="no batch metadata"):
        shard.attend({"layer_id": 5, "mode": 2}, {"q": torch.zeros(1, 64)})
    with pytest.raises(HostRefusal, match="expected 1 layers"):
        shard.put_kv(torch.tensor([1]), torch.zeros(2, 1, 2, 16), torch.zeros(2, 1, 2, 16))


# -- the worker's checks ------------------------------------------------------------------------


class _Attn(nn.Module):
    tp_q_head_num, tp_k_head_num, qk_head_dim, v_head_dim, scaling = 8, 4, 16, 16, 0.25


def _manager(num_layers: int = 4) -> MigrationManager:
    layers = nn.ModuleList(nn.Module() for _ in range(num_layers))
    for layer in layers:
        layer.self_attn = nn.Module()
        layer.self_attn.attn = _Attn()
    pool = SimpleNamespace(head_num=4)
    model = SimpleNamespace(model=SimpleNamespace(layers=layers))
    scheduler = SimpleNamespace(tp_worker=SimpleNamespace(model_runner=SimpleNamespace(
        model=model, device="cpu", token_to_kv_pool=pool)))
    return MigrationManager(scheduler, targets={"b": "127.0.0.1:1"})


@pytest.mark.parametrize(("body", "message"), [
    ({"layers": [0, 4], "heads": [1], "target": "b"}, "inside [0, 4)"),
    ({"layers": [], "heads": [1], "target": "b"}, "non-empty list"),
    ({"layers": [0], "heads": [True], "target": "b"}, "list of integers"),
    ({"layers": [0], "heads": [1, 1], "target": "b"}, "duplicates"),
    ({"layers": [0], "heads": [-1], "target": "b"}, "KV heads in [0, 4)"),
    ({"layers": [0], "heads": [0, 1, 2, 3], "target": "b"}, "leaves none here"),
    ({"layers": [0], "heads": [1], "target": "c"}, "unknown target 'c'"),
    ({"layers": [0], "heads": [1]}, "unknown target"),
    ({"layers": [0], "heads": [1], "target": "b", "x": 1}, "unknown fields"),
])
def test_bad_offload_requests_are_400(body: dict[str, Any], message: str) -> None:
    manager = _manager()
    status, out = manager.handle("offload_heads", body)
    assert status == 400 and message in out["error"], out
    assert manager.heads.offloads == {}
    assert all(isinstance(layer.self_attn.attn, _Attn) for layer in manager.layers)


def test_recall_of_an_unknown_offload_is_400() -> None:
    status, out = _manager().handle("recall_heads", {"id": 3})
    assert status == 400 and "no head offload with id 3" in out["error"]
    assert _manager().handle("recall_heads", {}) == (200, {"recalled": []})
    assert _manager().handle("recall_heads", {"ids": [1]})[0] == 400


def test_the_kv_budget_counts_head_layers() -> None:
    """4 layers x 4 KV heads: offloading 2 heads of every layer halves the head-layers kept,
    so the same memory holds twice the tokens; a migrated layer leaves all 4 of its heads."""
    from runtime_patches.migration.capacity import KVCapacity
    from tests.unit.test_migration import _scheduler

    capacity = KVCapacity(_scheduler(size=8, layers=4, heads=4))
    assert capacity.budget_rows == 4 * 4 * 9
    assert capacity.size_for(16) == 8
    assert capacity.size_for(8) == 17
    assert capacity.size_for(12) == 11  # one layer migrated: 3 x 4 head-layers


# -- the split itself, in one process -----------------------------------------------------------


class _InProcessTransport:
    """Hands ``attend`` straight to a HeadShard (the host's code, no socket)."""

    address = "in-process"
    bytes_sent = bytes_received = 0

    def __init__(self, shard: HeadShard) -> None:
        self.shard = shard

    def call(self, op: str, fields: dict[str, Any], tensors: dict[str, Any],
             timeout: float | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        assert op == "attend"
        return {}, self.shard.attend(fields, tensors)

    def close(self) -> None:
        pass


class _LocalPool:
    start_layer = 0

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k_buffer, self.v_buffer = [k], [v]

    def get_key_buffer(self, layer_id: int) -> torch.Tensor:
        return self.k_buffer[layer_id]

    def get_value_buffer(self, layer_id: int) -> torch.Tensor:
        return self.v_buffer[layer_id]


def test_split_attention_equals_the_unsplit_layer() -> None:
    """SplitAttention (local KV heads 0 and 2 through SGLang's torch_native backend, heads 1 and
    3 through a HeadShard) returns the layer's attention over all heads, in head order, and each
    side stores only its heads' KV; prefill of two requests, then one decode step."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

    from runtime_patches.migration.heads import HeadClient, SplitAttention

    torch.manual_seed(1)
    remote, local = [1, 3], [0, 2]
    shard = HeadShard(_spec(layers=[0], heads=remote))
    pool = _LocalPool(torch.zeros(65, 2, 16), torch.zeros(65, 2, 16))
    req_to_token = SimpleNamespace(req_to_token=torch.tensor([[1, 2, 3, 9, 0], [4, 5, 6, 7, 8]]))
    backend = TorchNativeAttnBackend(SimpleNamespace(device="cpu", req_to_token_pool=req_to_token,
                                                     token_to_kv_pool=pool))
    client = HeadClient(_InProcessTransport(shard), 1, req_to_token)  # type: ignore[arg-type]
    split = SplitAttention(RadixAttention(8, 16, 0.25, 4, layer_id=0), remote, client, pool)
    q, k, v = torch.randn(9, 8, 16), torch.randn(9, 4, 16), torch.randn(9, 4, 16)
    prefill = SimpleNamespace(
        forward_mode=ForwardMode.EXTEND, out_cache_loc=torch.tensor([1, 2, 3, 4, 5, 6, 7, 8]),
        req_pool_indices=torch.tensor([0, 1]), seq_lens=torch.tensor([3, 5]),
        extend_prefix_lens=torch.tensor([0, 0]), extend_seq_lens=torch.tensor([3, 5]),
        encoder_lens=None)
    decode = SimpleNamespace(
        forward_mode=ForwardMode.DECODE, out_cache_loc=torch.tensor([9]),
        req_pool_indices=torch.tensor([0]), seq_lens=torch.tensor([4]), encoder_lens=None)
    with forward_context(ForwardContext(attn_backend=backend)):
        out_prefill = split(q[:8].reshape(8, -1), k[:8].reshape(8, -1), v[:8].reshape(8, -1),
                            prefill)
        out_decode = split(q[8:].reshape(1, -1), k[8:].reshape(1, -1), v[8:].reshape(1, -1),
                           decode)
    client.close()
    first = _attention(q[:3], k[:3], v[:3], 0.25)
    second = _attention(q[3:8], k[3:8], v[3:8], 0.25)
    want = torch.cat((first, second)).reshape(8, -1)
    assert torch.allclose(out_prefill, want, atol=1e-5)
    rows = [0, 1, 2, 8]  # request 0's tokens, then its decoded one
    want = _attention(q[rows], k[rows], v[rows], 0.25)[-1:].reshape(1, -1)
    assert torch.allclose(out_decode, want, atol=1e-5)
    slots = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert torch.equal(pool.k_buffer[0][slots], k[:, local])
    assert torch.equal(shard.get_kv(slots)[1][0], v[:, remote])
    assert client.num_calls == 2
