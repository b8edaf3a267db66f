"""HELR in simulation: place one instance's layers on several smaller GPUs with the REAL solver.

Who calls: ``scripts.sim.experiment`` when a system has ``helr:`` set. ``helr_costs`` builds
the GPUs of one instance (``HelrSpec``: count, memory, peak FLOP/s, HBM bandwidth, the link
type between them) as a ``router.placement.topology`` cluster, asks the real
``router.placement.placement.plan_placement`` (costs from ``router.placement.costs``, solver
``router.placement.helr.solve``) where LLaMA-2-13B's layers go, and turns the plan into the
instance's cost model: the KV pool is what the used GPUs have left after their stages' weights
and workspace, and every step pays one activation hand-off per stage boundary. Compute is
unchanged: a pipeline without micro-batches runs its stages one after the other, so the
per-step time is the one-GPU time plus the hand-offs (the memory it gains is the point).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from router.placement.costs import ModelShape, Workload, model_costs
from router.placement.placement import PlacementSpec, plan_placement
from router.placement.topology import cluster_from_dict, link_for_kind
from scripts.sim.costs import CostModel

LLAMA2_13B = {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
              "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000}
"""LLaMA-2-13B's config.json shape (the same one scripts/bench/helr_solve.py uses)."""


@dataclass(frozen=True)
class HelrSpec:
    """The GPUs one instance may spread over."""

    num_gpus: int = 2
    """GPUs available to each instance."""
    gpu_memory_gb: float = 40.0
    """Memory per GPU, GiB (A100-40GB)."""
    tflops: float = 312.0
    """Peak dense bf16 TFLOP/s per GPU (A100)."""
    mem_bw_gbps: float = 2039.0
    """HBM bandwidth per GPU, GB/s."""
    link: str = "NV12"
    """Link type between the GPUs (``router.placement.topology`` names: NV12, PIX, SYS...)."""
    mode: str = "helr"
    """``lr``, ``he`` or ``helr`` (router.placement.placement)."""
    batch_size: int = 32
    """The batch the placement is sized for (KV reserve = batch x (prompt + output))."""
    prompt_tokens: int = 1024
    output_tokens: int = 256

    def __post_init__(self) -> None:
        if self.num_gpus < 1:
            raise ValueError(f"HelrSpec.num_gpus: must be >= 1 (got {self.num_gpus})")
        for name in ("gpu_memory_gb", "tflops", "mem_bw_gbps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"HelrSpec.{name}: must be > 0 (got {getattr(self, name)})")


def helr_costs(base: CostModel, spec: HelrSpec) -> tuple[CostModel, dict[str, Any]]:
    """``base`` re-sized for an instance placed by HELR, and a description of the plan."""
    gpus = [{"id": i, "memory_gb": spec.gpu_memory_gb, "tflops": spec.tflops,
             "mem_bw_gbps": spec.mem_bw_gbps} for i in range(spec.num_gpus)]
    matrix = [["X" if a == b else spec.link for b in range(spec.num_gpus)]
              for a in range(spec.num_gpus)]
    costs = model_costs(ModelShape.from_config(LLAMA2_13B), "bf16")
    plan = plan_placement(PlacementSpec(
        costs=costs, cluster=cluster_from_dict({"gpus": gpus, "links": {"matrix": matrix}}),
        mode=spec.mode, workload=Workload(batch_size=spec.batch_size,
                                          prompt_tokens=spec.prompt_tokens,
                                          output_tokens=spec.output_tokens)))
    reserved = spec.batch_size * (spec.prompt_tokens + spec.output_tokens)
    kv_reserved = reserved * base.kv_bytes_per_token
    free = sum(st.usable_bytes for st in plan.stages) \
        - sum(st.memory_bytes for st in plan.stages) + kv_reserved
    pool = max(1, int(free // base.kv_bytes_per_token))
    link = link_for_kind(spec.link)
    boundaries = len(plan.stages) - 1
    per_token = boundaries * base.activation_bytes_per_token / (link.bandwidth_gbps * 1e9)
    latency = boundaries * link.latency_us * 1e-6
    sized = base.replace(
        name=f"{base.name}+helr{len(plan.stages)}x{spec.gpu_memory_gb:g}g",
        kv_pool_tokens=pool,
        prefill_overhead_s=base.prefill_overhead_s + latency,
        prefill_per_token_s=base.prefill_per_token_s + per_token,
        decode_overhead_s=base.decode_overhead_s + latency,
        decode_per_seq_s=base.decode_per_seq_s + per_token,
        source=f"{base.source} Placed by HELR over {len(plan.stages)} of {spec.num_gpus} "
               f"{spec.gpu_memory_gb:g} GiB GPUs ({spec.link}).")
    return sized, {"stages": len(plan.stages), "partition": list(plan.launch.layer_partition),
                   "kv_pool_tokens": pool, "mode": spec.mode,
                   "predicted_latency_s": plan.latency_s}
