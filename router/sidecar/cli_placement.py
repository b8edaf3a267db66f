"""``python -m router.sidecar plan-placement``: HELR's options, the readable plan, exit codes.

Who calls what: ``router/sidecar/__main__.py`` adds ``add_placement_arguments`` to its
``plan-placement`` subcommand and runs ``run_placement`` on the parsed options. The planning
itself is pure and lives in ``router.placement`` (``spec_from_fields`` -> ``plan_placement``);
this module only parses options, prints, and picks the exit status.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from router.placement.costs import Workload
from router.placement.helr import GIB, MODE_WEIGHTS, OBJECTIVES, InfeasibleError
from router.placement.placement import PlacementSpec, Plan, plan_placement, spec_from_fields
from router.placement.topology import Cluster, load_cluster

__all__ = ["add_placement_arguments", "render_plan", "run_placement"]


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m router.sidecar plan-placement``."""
    work, spec = Workload(), {f.name: f.default for f in dataclasses.fields(PlacementSpec)}
    parser.add_argument("--model", required=True, help="HF model folder (or its config.json)")
    parser.add_argument("--dtype", help="bf16, fp16, fp32 or int8 (default: the config's)")
    parser.add_argument("--cluster", metavar="YAML", help="cluster file (docs/helr.md); with "
                        "--nvidia-smi-topo it only supplies the GPUs")
    parser.add_argument("--nvidia-smi-topo", metavar="FILE",
                        help="saved output of `nvidia-smi topo -m` for the links")
    parser.add_argument("--gpu-memory-gb", type=float, help="GiB per GPU (with --nvidia-smi-topo)")
    parser.add_argument("--gpu-tflops", type=float, help="peak TFLOP/s per GPU at the dtype")
    parser.add_argument("--gpu-mem-bw-gbps", type=float, default=3350.0,
                        help="memory bandwidth per GPU, GB/s (default %(default)s: H100 SXM)")
    parser.add_argument("--gpu-used-gb", type=float, default=0.0,
                        help="GiB already used on every GPU (default 0)")
    parser.add_argument("--mode", choices=list(MODE_WEIGHTS), default=spec["mode"])
    parser.add_argument("--weight", type=float, help="helr blend: 0 = lr .. 1 = he (default 0.5)")
    parser.add_argument("--objective", choices=list(OBJECTIVES), default=spec["objective"])
    parser.add_argument("--batch-size", type=int, default=work.batch_size)
    parser.add_argument("--prompt-tokens", type=int, default=work.prompt_tokens)
    parser.add_argument("--output-tokens", type=int, default=work.output_tokens)
    parser.add_argument("--prefill-chunk-tokens", type=int, default=work.prefill_chunk_tokens)
    parser.add_argument("--headroom", type=float, default=spec["headroom"])
    parser.add_argument("--contention", type=float, default=spec["contention"])
    parser.add_argument("--check", action="store_true",
                        help="only say whether it fits: exit 0 if so, 1 naming the constraint")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _cluster_from_args(args: argparse.Namespace) -> Cluster:
    gpu_spec = None
    if args.gpu_memory_gb is not None or args.gpu_tflops is not None:
        gpu_spec = {"memory_gb": args.gpu_memory_gb, "tflops": args.gpu_tflops,
                    "mem_bw_gbps": args.gpu_mem_bw_gbps, "used_gb": args.gpu_used_gb}
    return load_cluster(args.cluster, args.nvidia_smi_topo, gpu_spec)


def _seconds(value: float) -> str:
    return f"{value * 1e3:.2f} ms" if value < 1 else f"{value:.3f} s"


def render_plan(plan: Plan) -> str:
    """The readable plan ``plan-placement`` prints."""
    lines = [f"HELR plan: mode {plan.mode} (weight {plan.weight:.2f}), objective "
             f"{plan.objective}, {len(plan.stages)} of {plan.num_gpus_total} GPUs",
             f"{'rank':>4}  {'gpu':>3}  {'layers':<14}{'holds':<30}{'memory / usable':>22}"
             f"{'compute':>12}{'hand-off in':>13}"]
    for st in plan.stages:
        holds = " + ".join(x for x, on in (("embedding", st.has_embedding), ("layers", True),
                                          ("lm_head", st.has_lm_head)) if on)
        span = f"{st.first_layer}-{st.end_layer - 1} ({st.end_layer - st.first_layer})"
        memory = f"{st.memory_bytes / GIB:.2f} / {st.usable_bytes / GIB:.2f} GiB"
        hand_off = _seconds(st.handoff_in_s) if st.rank else "-"
        lines.append(f"{st.rank:>4}  {st.gpu_id:>3}  {span:<14}{holds:<30}{memory:>22}"
                     f"{_seconds(st.compute_s):>12}{hand_off:>13}")
    counts = ", ".join(f"{k}: {_seconds(v)}" for k, v in plan.best_by_count)
    lines += [f"predicted latency {_seconds(plan.latency_s)} ({plan.objective}); end-to-end "
              f"{_seconds(plan.end_to_end_s)}, bottleneck {_seconds(plan.bottleneck_s)}; "
              f"score {plan.score:.3f}",
              f"best latency by GPU count: {counts}"]
    lines += [f"warning: {w}" for w in plan.warnings]
    lines += ["command:", f"  {plan.launch.command}"]
    return "\n".join(lines)


def run_placement(args: argparse.Namespace) -> int:
    """``plan-placement``: 0 planned (or fits), 1 nothing fits, 2 bad input."""
    try:
        cluster = _cluster_from_args(args)
        folder = os.path.dirname(args.model) if os.path.isfile(args.model) else args.model
        fields = {"model": args.model, "model_path": folder, "dtype": args.dtype,
                  "mode": args.mode, "weight": args.weight, "objective": args.objective,
                  "batch_size": args.batch_size, "prompt_tokens": args.prompt_tokens,
                  "output_tokens": args.output_tokens,
                  "prefill_chunk_tokens": args.prefill_chunk_tokens, "headroom": args.headroom,
                  "contention": args.contention}
        spec = spec_from_fields(fields, cluster)
    except ValueError as exc:
        print(f"plan-placement: {exc}", file=sys.stderr)
        return 2
    try:
        plan = plan_placement(spec)
    except InfeasibleError as exc:
        if args.json:
            print(json.dumps({"feasible": False, "constraint": exc.constraint,
                              "reason": str(exc)}))
        else:
            print(f"infeasible: {exc}", file=sys.stdout if args.check else sys.stderr)
        return 1
    if args.check:
        text = (json.dumps({"feasible": True, "num_gpus": len(plan.stages)}) if args.json else
                f"feasible: {len(plan.stages)} of {plan.num_gpus_total} GPUs, "
                f"predicted latency {_seconds(plan.latency_s)}")
        print(text)
    elif args.json:
        print(json.dumps({"feasible": True, **plan.as_dict()}, indent=2))
    else:
        print(render_plan(plan))
    return 0
