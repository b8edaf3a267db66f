"""Prefill attention that computes only the new rows: the CPU fix that makes a cache hit cheap.

SGLang 0.5.23's ``torch_native`` backend (the attention on CPU) runs one
``scaled_dot_product_attention`` per sequence in an extend (prefill) batch. For a sequence whose
first ``P`` tokens are already cached (a radix-cache, host-tier or store hit, or a chunk after the
first), it builds a query of all ``S`` rows, the ``P`` cached rows left uninitialised, computes
causal attention for every row, and keeps the last ``S - P``. So a hit recomputes the attention
of the whole prefix: on one core at 2,048 tokens a device hit took 41% of a full recompute
(``docs/benchmarks.md``, "What a shared-store hit is worth").

``new_rows_only(original)`` wraps ``TorchNativeAttnBackend._run_sdpa_forward_extend``: for the
ordinary case (causal self-attention, no encoder, no sliding window) each sequence with a cached
prefix gets one SDPA of its ``S - P`` new query rows over all ``S`` keys with the causal mask
shifted by ``P`` (row ``i`` sees keys ``0 .. P + i``); a sequence without one keeps the plain
causal SDPA. Work per sequence falls from ``S x S`` to ``(S - P) x S``; the rows kept are the
same rows with the same keys, values and scale. The results equal SGLang's bit for bit in most
shapes; where PyTorch's CPU kernel blocks a short query differently (one or two rows, and a
few other shapes) they differ in the last bits (float32: at most 5e-7; bfloat16: one step in
0.2% of values; ``tests/unit/test_extend_attention.py``). Anything else (cross-attention,
encoder lengths, sliding windows, non-causal) goes to SGLang's own code unchanged.

On by default on the CPU engine; ``BANASERVE_EXTEND_ATTENTION=sglang`` in a worker's environment
keeps SGLang's own code (to compare, or to rule this patch out when chasing a difference).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from runtime_patches.cpu import cpu_engine_enabled

ENV = "BANASERVE_EXTEND_ATTENTION"


def choice() -> str:
    """``ENV``'s value (``new_rows`` by default); ValueError naming it if it is neither choice
    (the launcher's ``preflight`` checks it, so a worker never starts with a bad one)."""
    value = os.environ.get(ENV, "new_rows")
    if value not in ("new_rows", "sglang"):
        raise ValueError(f"{ENV}={value!r}: use 'new_rows' (default) or 'sglang'")
    return value


def enabled() -> bool:
    """Whether a process patches the attention: the CPU engine, unless ``ENV`` says ``sglang``."""
    return cpu_engine_enabled() and choice() == "new_rows"


def new_rows_only(original: Callable[..., Any]) -> Callable[..., Any]:
    def _run_sdpa_forward_extend(self: Any, query: Any, output: Any, k_cache: Any, v_cache: Any,
                                 req_to_token: Any, req_pool_indices: Any, seq_lens: Any,
                                 extend_prefix_lens: Any, extend_seq_lens: Any,
                                 encoder_lens: Any = None, scaling: Any = None,
                                 enable_gqa: bool = False, causal: bool = False,
                                 is_cross_attn: bool = False,
                                 sliding_window_size: int | None = None) -> Any:
        if (encoder_lens is not None or is_cross_attn or not causal
                or (sliding_window_size is not None and sliding_window_size > -1)):
            return original(self, query, output, k_cache, v_cache, req_to_token,
                            req_pool_indices, seq_lens, extend_prefix_lens, extend_seq_lens,
                            encoder_lens, scaling=scaling, enable_gqa=enable_gqa, causal=causal,
                            is_cross_attn=is_cross_attn,
                            sliding_window_size=sliding_window_size)
        return extend_attention(query, output, k_cache, v_cache, req_to_token,
                                req_pool_indices, seq_lens, extend_prefix_lens, extend_seq_lens,
                                scaling, enable_gqa)

    _run_sdpa_forward_extend.__wrapped__ = original  # type: ignore[attr-defined]
    return _run_sdpa_forward_extend


def extend_attention(query: Any, output: Any, k_cache: Any, v_cache: Any, req_to_token: Any,
                     req_pool_indices: Any, seq_lens: Any, extend_prefix_lens: Any,
                     extend_seq_lens: Any, scaling: Any, enable_gqa: bool) -> Any:
    """Causal self-attention of each sequence's new rows (``query``: ``[tokens, heads, dim]``,
    the new tokens of every sequence back to back) over its cached and new keys; written into
    ``output`` (same shape) and returned."""
    import torch
    from torch.nn.functional import scaled_dot_product_attention

    heads_first = query.movedim(0, 1)  # [heads, tokens, dim]
    start = 0
    for seq in range(seq_lens.shape[0]):
        new = int(extend_seq_lens[seq])
        total = int(seq_lens[seq])
        prefix = int(extend_prefix_lens[seq])
        end = start + new
        q = heads_first[:, start:end, :]
        slots = req_to_token[req_pool_indices[seq], :total]
        k = k_cache[slots].movedim(0, 1)
        v = v_cache[slots].movedim(0, 1)
        if not (q.dtype == k.dtype == v.dtype):
            k, v = k.to(q.dtype), v.to(q.dtype)
        if prefix == 0:
            mask, is_causal = None, True
        else:
            rows = torch.arange(prefix, prefix + new, device=q.device).unsqueeze(1)
            mask = torch.arange(total, device=q.device).unsqueeze(0) <= rows
            is_causal = False
        out = scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                           attn_mask=mask, is_causal=is_causal, scale=scaling,
                                           enable_gqa=enable_gqa)
        output[start:end] = out.squeeze(0).movedim(0, 1)
        start = end
    return output
