"""Post-import fixes that let SGLang 0.5.23's CPU engine serve, HiCache and PD included.

Each fix is registered in :data:`runtime_patches.registry.REGISTRY` and applied by the import hook
right after its target module executes. Nothing here imports torch or SGLang at import time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from runtime_patches import SGLANG_VERSION
from runtime_patches.cpu import cpu_engine_enabled, extend_attention
from runtime_patches.registry import REGISTRY, Patch, installed_version

TORCHVISION_VERSION = "0.28.0"
CPU_HICACHE_HOST_RESERVE_BYTES = 2 * 1024**3
"""Host RAM a CPU worker's HiCache pool leaves free. SGLang keeps back 10 GiB, sized for GPU
hosts; on a CPU server the RAM is the serving memory, and a 24 GiB machine with a few workers
up (each about 1.8 GB) then refused every store-attached worker (``Not enough host memory``)."""


def _no_host_register(buffer: Any, registration_granularity_bytes: Any = None) -> None:
    """On a CPU device the HiCache "host" pool is plain RAM: nothing to register."""


def transfer_kv_direct(
    src_layers: Sequence[Any],
    dst_layers: Sequence[Any],
    src_indices: Any,
    dst_indices: Any,
    page_size: int,
) -> None:
    """Pure-torch ``sgl_kernel.kvcacheio.transfer_kv_direct``: copy token slots layer by layer."""
    src = src_indices.long()
    dst = dst_indices.long()
    for src_layer, dst_layer in zip(src_layers, dst_layers, strict=True):
        dst_layer[dst] = src_layer[src].to(dst_layer.dtype)


def transfer_kv_per_layer_direct_pf_lf(
    src_ptrs: Sequence[Any],
    dst_ptrs: Sequence[Any],
    src_indices: Any,
    dst_indices: Any,
    layer_id: int,
    page_size: int,
) -> None:
    """Pure-torch ``sgl_kernel.kvcacheio.transfer_kv_per_layer_direct_pf_lf``: one layer from a
    ``page_first_direct`` host pool (``[pages, layers, page_size, heads, dim]`` per K and V) into
    layer-major device buffers (``[slots, heads, dim]``)."""
    src = src_indices.long()
    pages, offsets = src // page_size, src % page_size
    dst = dst_indices.long()
    for host, device in zip(src_ptrs, dst_ptrs, strict=True):
        device[dst] = host[pages, layer_id, offsets].to(device.dtype)


def transfer_kv_all_layer_direct_lf_pf(
    src_ptrs: Sequence[Any],
    dst_ptrs: Sequence[Any],
    src_indices: Any,
    dst_indices: Any,
    page_size: int,
) -> None:
    """Pure-torch ``sgl_kernel.kvcacheio.transfer_kv_all_layer_direct_lf_pf``: every layer from
    the device buffers (``src_ptrs`` = all K layers, then all V layers) into a
    ``page_first_direct`` host pool (``dst_ptrs`` = ``[k_buffer, v_buffer]``)."""
    if len(src_ptrs) % len(dst_ptrs):
        raise ValueError(f"transfer_kv_all_layer_direct_lf_pf: {len(src_ptrs)} device layers "
                         f"do not split over {len(dst_ptrs)} host buffers")
    num_layers = len(src_ptrs) // len(dst_ptrs)
    src = src_indices.long()
    dst = dst_indices.long()
    pages, offsets = dst // page_size, dst % page_size
    for which, host in enumerate(dst_ptrs):
        for layer in range(num_layers):
            host[pages, layer, offsets] = src_ptrs[which * num_layers + layer][src].to(host.dtype)


def _host_pool_without_pinning(original_init: Callable[..., None]) -> Callable[..., None]:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        # CPU torch cannot pin memory; later scratch allocations read this flag.
        self.pin_memory = False

    return __init__


def _cpu_stream_noops(module: ModuleType) -> None:
    import torch

    if not hasattr(torch.cpu.Stream, "synchronize"):
        torch.cpu.Stream.synchronize = lambda self: None  # type: ignore[attr-defined]
    if not hasattr(torch.cpu.Stream, "query"):
        torch.cpu.Stream.query = lambda self: True  # type: ignore[attr-defined]


def _torchvision_schemas(module: ModuleType) -> None:
    # PyPI's torchvision 0.28.0 is a CUDA build whose _C cannot load against CPU torch, and its
    # _meta_registrations then fail on ops that were never defined. Defining the two schemas lets
    # the import succeed; calling them still raises (no kernel). transformers imports torchvision.
    if module._has_ops():
        return
    import torch

    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    module._banaserve_cpu_library = lib  # type: ignore[attr-defined]  # keep definitions alive


def _cpu_torchvision() -> bool:
    torch_version = installed_version("torch") or ""
    return torch_version.endswith("+cpu") and installed_version("torchvision") is not None


def register() -> None:
    """Add the CPU fixes to the registry (called once by ``runtime_patches.boot``)."""
    REGISTRY.add(Patch(
        name="cpu.no_cuda_host_register",
        target="sglang.srt.mem_cache.pool_host.common:_cuda_host_register",
        kind="replace", new=_no_host_register,
        rationale="HiCache host pools call cudaHostRegister; on CPU the host pool is plain RAM.",
        package="sglang", version=SGLANG_VERSION, when=cpu_engine_enabled,
    ))
    REGISTRY.add(Patch(
        name="cpu.transfer_kv_direct",
        target="sglang.srt.mem_cache.pool_host.mha:transfer_kv_direct",
        kind="provide", new=transfer_kv_direct,
        rationale="The direct HiCache IO path imports this from sgl_kernel only on CUDA/HIP.",
        package="sglang", version=SGLANG_VERSION, when=cpu_engine_enabled,
    ))
    for name, fn in (("transfer_kv_per_layer_direct_pf_lf", transfer_kv_per_layer_direct_pf_lf),
                     ("transfer_kv_all_layer_direct_lf_pf", transfer_kv_all_layer_direct_lf_pf)):
        REGISTRY.add(Patch(
            name=f"cpu.{name}",
            target=f"sglang.srt.mem_cache.pool_host.mha:{name}",
            kind="provide", new=fn,
            rationale="The page_first_direct host layout (which SGLang's mooncake L3 needs) "
                      "imports this from sgl_kernel only on CUDA/HIP.",
            package="sglang", version=SGLANG_VERSION, when=cpu_engine_enabled,
        ))
    REGISTRY.add(Patch(
        name="cpu.host_pool_no_pin",
        target="sglang.srt.mem_cache.pool_host.base:HostKVCache.__init__",
        kind="wrap", new=_host_pool_without_pinning,
        rationale="Host KV pools default to pin_memory=True, which CPU torch cannot honour.",
        package="sglang", version=SGLANG_VERSION, when=cpu_engine_enabled,
    ))
    REGISTRY.add(Patch(
        name="cpu.hicache_host_reserve",
        target="sglang.srt.mem_cache.pool_host.base:HICACHE_HOST_MEMORY_RESERVE_BYTES",
        kind="set", new=CPU_HICACHE_HOST_RESERVE_BYTES,
        rationale="SGLang keeps 10 GiB of host RAM back from HiCache pools, sized for GPU "
                  "hosts; a CPU worker's RAM is its serving memory.",
        package="sglang", version=SGLANG_VERSION, when=cpu_engine_enabled,
    ))
    REGISTRY.add(Patch(
        name="cpu.extend_attention_new_rows",
        target="sglang.srt.layers.attention.torch_native_backend:"
               "TorchNativeAttnBackend._run_sdpa_forward_extend",
        kind="wrap", new=extend_attention.new_rows_only,
        rationale="torch_native prefill recomputes the attention of every cached prefix row "
                  "and discards it; a cache hit then cost 41% of a recompute at 2k tokens.",
        package="sglang", version=SGLANG_VERSION, when=extend_attention.enabled,
    ))
    REGISTRY.add(Patch(
        name="cpu.mooncake_no_host_index_staging",
        target="sglang.srt.disaggregation.mooncake.conn:MooncakeKVSender.supports_host_tensor_indices",
        kind="set", new=False,
        rationale="PD prefill stages page indices in pinned memory with torch.cuda.Event.",
        package="sglang", version=SGLANG_VERSION, when=cpu_engine_enabled,
    ))
    REGISTRY.add(Patch(
        name="cpu.stream_noops",
        target="sglang.srt.mem_cache.l2_transfer",
        kind="call", new=_cpu_stream_noops,
        rationale="HiCache's L2 transfer calls Stream.synchronize/query, which "
                  "torch.cpu.Stream lacks.",
        package="sglang", version=SGLANG_VERSION, when=cpu_engine_enabled,
    ))
    REGISTRY.add(Patch(
        name="cpu.torchvision_schemas",
        target="torchvision.extension:_has_ops",
        kind="call", new=_torchvision_schemas,
        package="torchvision", version=TORCHVISION_VERSION,
        rationale="PyPI's torchvision is a CUDA build; without its op schemas the import fails.",
        when=_cpu_torchvision,
    ))
