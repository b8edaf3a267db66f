"""``runtime_patches.cpu.extend_attention``: prefill attention over only the new rows gives what
SGLang's own ``torch_native`` code gives for those rows (to float32 rounding), with a cached
prefix or without, batched, in both dtypes a CPU worker serves; other layers go to SGLang."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
native = pytest.importorskip("sglang.srt.layers.attention.torch_native_backend")

from runtime_patches.cpu.extend_attention import extend_attention, new_rows_only  # noqa: E402

ORIGINAL = getattr(native.TorchNativeAttnBackend._run_sdpa_forward_extend, "__wrapped__",
                   native.TorchNativeAttnBackend._run_sdpa_forward_extend)
HEADS, KV_HEADS, DIM, POOL = 9, 3, 64, 3000  # SmolLM2's attention shape


def batch(seqs: list[tuple[int, int]], dtype: Any, seed: int = 0) -> tuple[Any, tuple[Any, ...]]:
    """A query for each sequence's new tokens and the cache it reads: (prefix, new) per seq."""
    gen = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(POOL, KV_HEADS, DIM, generator=gen).to(dtype)
    v_cache = torch.randn(POOL, KV_HEADS, DIM, generator=gen).to(dtype)
    req_to_token = torch.zeros(len(seqs), 2048, dtype=torch.int64)
    for i, (prefix, new) in enumerate(seqs):
        req_to_token[i, :prefix + new] = torch.randperm(POOL, generator=gen)[:prefix + new]
    query = torch.randn(sum(n for _, n in seqs), HEADS, DIM, generator=gen).to(dtype)
    return query, (k_cache, v_cache, req_to_token, torch.arange(len(seqs)),
                   torch.tensor([p + n for p, n in seqs]), torch.tensor([p for p, _ in seqs]),
                   torch.tensor([n for _, n in seqs]))


def run_both(seqs: list[tuple[int, int]], dtype: Any) -> tuple[Any, Any]:
    query, cache = batch(seqs, dtype)
    theirs, ours = torch.zeros_like(query), torch.zeros_like(query)
    ORIGINAL(None, query, theirs, *cache, None, scaling=0.125, enable_gqa=True, causal=True)
    extend_attention(query, ours, *cache, 0.125, True)
    return ours, theirs


# cold, a store hit, a chunk after the first, a repeated prompt (one new token)
SEQS = [(0, 40), (512, 7), (96, 96), (1000, 1), (1024, 1)]


def test_new_rows_match_sglangs_attention_in_float32() -> None:
    ours, theirs = run_both(SEQS, torch.float32)
    assert (ours - theirs).abs().max().item() <= 1e-6
    ours, theirs = run_both([(512, 7), (96, 96)], torch.float32)
    assert torch.equal(ours, theirs)  # bit for bit where the kernel blocks alike


def test_new_rows_match_sglangs_attention_in_bfloat16() -> None:
    ours, theirs = run_both(SEQS, torch.bfloat16)
    assert (ours.float() - theirs.float()).abs().max().item() <= 1e-3  # one bf16 step at most
    ours, theirs = run_both(SEQS[:4], torch.bfloat16)
    assert torch.equal(ours, theirs)


def test_a_mask_off_by_one_row_would_be_caught() -> None:
    """Negative control: the comparison above sees a one-token shift of the causal mask."""
    query, cache = batch([(64, 8)], torch.float32)
    theirs, shifted = torch.zeros_like(query), torch.zeros_like(query)
    ORIGINAL(None, query, theirs, *cache, None, scaling=0.125, enable_gqa=True, causal=True)
    k, v, r2t, idx, seq_lens, prefix, new = cache
    extend_attention(query, shifted, k, v, r2t, idx, seq_lens, prefix - 1, new, 0.125, True)
    assert (shifted - theirs).abs().max().item() > 1e-3


def test_other_layers_go_to_sglangs_code() -> None:
    calls: list[dict[str, Any]] = []

    def original(self: Any, *args: Any, **kwargs: Any) -> str:
        calls.append(kwargs)
        return "sglang"

    wrapped = new_rows_only(original)
    query, cache = batch([(8, 8)], torch.float32)
    out = torch.zeros_like(query)
    for kwargs in (dict(causal=False), dict(causal=True, is_cross_attn=True),
                   dict(causal=True, sliding_window_size=4)):
        assert wrapped(None, query, out, *cache, None, scaling=0.125, **kwargs) == "sglang"
    assert wrapped(None, query, out, *cache, torch.tensor([3]), causal=True) == "sglang"
    assert len(calls) == 4
    assert wrapped(None, query, out, *cache, None, scaling=0.125, causal=True, enable_gqa=True,
                   sliding_window_size=-1) is out  # -1 means no window: the new path


def test_it_is_on_for_the_cpu_engine_unless_the_operator_keeps_sglangs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime_patches.cpu import extend_attention as module

    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "1")
    monkeypatch.delenv(module.ENV, raising=False)
    assert module.enabled()
    monkeypatch.setenv(module.ENV, "sglang")
    assert not module.enabled()
    monkeypatch.setenv(module.ENV, "fast")
    with pytest.raises(ValueError, match="BANASERVE_EXTEND_ATTENTION='fast'"):
        module.enabled()
    monkeypatch.setenv(module.ENV, "new_rows")
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "0")
    assert not module.enabled()


def test_the_launcher_refuses_a_bad_setting_in_one_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from runtime_patches import launch

    monkeypatch.setenv("BANASERVE_EXTEND_ATTENTION", "fast")
    assert launch.main(["--model", "tiny", "--port", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["launch: BANASERVE_EXTEND_ATTENTION='fast': use 'new_rows' (default) or "
                   "'sglang'"]
