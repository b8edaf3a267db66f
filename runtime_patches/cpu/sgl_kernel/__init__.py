"""Pure-PyTorch stand-in for the CPU build of SGLang's kernel package ``sgl_kernel``.

Why: SGLang's CPU engine imports ``sgl_kernel`` unconditionally, but only CUDA wheels of the kernel
package are published (the CUDA wheel fails to load without ``libcuda.so.1``). On a CPU without AMX
none of the ``torch.ops.sgl_kernel.*`` operators is dispatched, so the engine needs only the Python
symbols below. ``runtime_patches.boot`` maps ``import sgl_kernel`` here in CPU-engine processes.

``assign_req_to_token_pool_cpu`` is real (every request uses it); the others belong to features
BanaServe does not enable on CPU (speculative decoding, Mamba) and raise a clear error if reached.
"""

from __future__ import annotations

from typing import Any

import torch

__version__ = "0.0.0+banaserve-cpu-standin"


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """Write each request's new KV slots: ``req_to_token[r, start:end] = out_cache_loc[...]``.

    ``out_cache_loc`` holds the slots of all requests back to back, in request order.
    """
    offset = 0
    for row, start, end in zip(
        req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist(), strict=True
    ):
        count = end - start
        if count > 0:
            req_to_token[row, start:end] = out_cache_loc[offset : offset + count].to(
                req_to_token.dtype
            )
        offset += count


def _unsupported(name: str) -> Any:
    def raise_unsupported(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"sgl_kernel.{name} is not available in BanaServe's CPU stand-in "
            "(it serves speculative decoding / Mamba models, which are not supported on CPU)"
        )

    raise_unsupported.__name__ = name
    return raise_unsupported


UNSUPPORTED = (
    "copy_all_layer_kv_cache_cpu",
    "assign_draft_cache_locs_contiguous_cpu",
    "assign_extend_cache_locs_cpu",
    "fill_accept_out_cache_loc_cpu",
    "fill_bonus_tokens_cpu",
    "rotate_input_ids_cpu",
    "build_tree_kernel_efficient_cpu",
    "verify_tree_greedy_cpu",
    "causal_conv1d_fn_cpu",
    "causal_conv1d_update_cpu",
    "chunk_gated_delta_rule_cpu",
)
for _name in UNSUPPORTED:
    globals()[_name] = _unsupported(_name)
