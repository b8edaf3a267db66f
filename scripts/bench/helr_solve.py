"""HELR solve time: the exact DP (router/placement/helr.py) on realistic sizes, pure CPU.

Cases: 80 layers over 8 GPUs (Llama-3-70B shape), 40 over 4 (Llama-2-13B), 28 over 2
(Qwen2.5-7B), each on two seeded synthetic clusters:
  dgx    NV18 between every pair (NVSwitch), equal GPUs, a little memory already in use
  mixed  GPUs in PCIe pairs (PIX), pairs on two sockets (SYS) and, with 8 GPUs, two nodes
         (NET, 12.5 GB/s); uneven memory already in use
and for every mode (lr, he, helr at 0.5) and both objectives (sum, bottleneck). Each case runs
--warmup untimed solves, then --runs timed ones; ``solve`` times helr.solve on the built
problem, ``plan`` times plan_placement end to end (costs, problem, DP, launch plan).

Writes JSON (machine, every case, every run) to --out (default results/helr_solve.json) and
prints one line per case. Numbers are from whatever else runs on the machine too: the JSON
records the load average.

  .venv/bin/python -m scripts.bench.helr_solve [--runs 5] [--warmup 1] [--seed 0] [--out F]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if __package__ in (None, ""):
    sys.path.insert(0, ROOT)

from router.placement import helr  # noqa: E402
from router.placement.costs import ModelShape, Workload, model_costs  # noqa: E402
from router.placement.placement import PlacementSpec, build_problem, plan_placement  # noqa: E402
from router.placement.topology import Cluster, cluster_from_dict  # noqa: E402

MODELS: dict[str, dict[str, Any]] = {
    "llama3-70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                   "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256},
    "llama2-13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                   "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000},
    "qwen2.5-7b": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064},
}
CASES = (("llama3-70b", 8, 80.0), ("llama2-13b", 4, 24.0), ("qwen2.5-7b", 2, 16.0))
"""(model, GPUs, GiB per GPU): memory chosen so the model needs more than one GPU."""
MODES = ("lr", "he", "helr")


def cluster(kind: str, num_gpus: int, memory_gb: float, rng: random.Random) -> Cluster:
    """A seeded synthetic cluster of ``kind`` ``dgx`` or ``mixed``."""
    used = [round(rng.uniform(0.0, 0.05 if kind == "dgx" else 0.25) * memory_gb, 2)
            for _ in range(num_gpus)]
    gpus = [{"id": i, "memory_gb": memory_gb, "tflops": 989, "mem_bw_gbps": 3350,
             "used_gb": used[i]} for i in range(num_gpus)]
    if kind == "dgx":
        matrix = [["X" if a == b else "NV18" for b in range(num_gpus)] for a in range(num_gpus)]
    else:
        per_node = 4 if num_gpus == 8 else num_gpus

        def kind_of(a: int, b: int) -> str:
            if a // per_node != b // per_node:
                return "NET"
            return "PIX" if a // 2 == b // 2 else "SYS"

        matrix = [["X" if a == b else kind_of(a, b) for b in range(num_gpus)]
                  for a in range(num_gpus)]
    return cluster_from_dict({"gpus": gpus, "links": {"matrix": matrix}})


def timed(fn: Any, runs: int, warmup: int) -> tuple[list[float], Any]:
    result = None
    for _ in range(warmup):
        result = fn()
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - started)
    return seconds, result


def run_case(model: str, num_gpus: int, memory_gb: float, kind: str, mode: str,
             objective: str, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(f"{args.seed}-{model}-{kind}")
    spec = PlacementSpec(
        costs=model_costs(ModelShape.from_config(MODELS[model]), "bf16"),
        cluster=cluster(kind, num_gpus, memory_gb, rng), model_path=model, mode=mode,
        objective=objective, workload=Workload(batch_size=8, prompt_tokens=1024,
                                               output_tokens=256))
    problem = build_problem(spec)
    solve_s, sol = timed(lambda: helr.solve(problem, spec.blend_weight, objective),
                         args.runs, args.warmup)
    plan_s, plan = timed(lambda: plan_placement(spec), args.runs, args.warmup)
    return {"model": model, "layers": spec.costs.num_layers, "gpus": num_gpus,
            "memory_gb": memory_gb, "topology": kind, "mode": mode, "objective": objective,
            "solve_s": solve_s, "solve_median_s": statistics.median(solve_s),
            "plan_median_s": statistics.median(plan_s), "num_gpus_used": sol.num_gpus,
            "latency_s": sol.latency_s, "partition": list(plan.launch.layer_partition),
            "cuda_visible_devices": list(plan.launch.cuda_visible_devices)}


def machine() -> dict[str, Any]:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), model)
    except OSError:
        pass
    import numpy

    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "numpy": numpy.__version__, "loadavg_start": os.getloadavg(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def one_line(case: dict[str, Any]) -> str:
    return (f"helr_solve: {case['layers']} layers / {case['gpus']} GPUs {case['topology']:<5} "
            f"{case['mode']:<4} {case['objective']:<10} solve {case['solve_median_s'] * 1e3:8.1f}"
            f" ms (max {max(case['solve_s']) * 1e3:.1f}), plan {case['plan_median_s'] * 1e3:8.1f}"
            f" ms -> {case['num_gpus_used']} GPUs {case['cuda_visible_devices']} "
            f"partition {case['partition']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="timed solves per case")
    parser.add_argument("--warmup", type=int, default=1, help="untimed solves first")
    parser.add_argument("--seed", type=int, default=0, help="seed for the synthetic clusters")
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "helr_solve.json"))
    args = parser.parse_args(argv)
    info = machine()
    cases = []
    for model, num_gpus, memory_gb in CASES:
        for kind in ("dgx", "mixed"):
            for mode in MODES:
                for objective in helr.OBJECTIVES:
                    case = run_case(model, num_gpus, memory_gb, kind, mode, objective, args)
                    print(one_line(case), flush=True)
                    cases.append(case)
    info["loadavg_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": info, "runs": args.runs, "warmup": args.warmup,
                   "seed": args.seed, "cases": cases}, f, indent=2)
    worst = max(cases, key=lambda c: c["solve_median_s"])
    print(f"helr_solve: slowest median solve {worst['solve_median_s'] * 1e3:.1f} ms "
          f"({worst['layers']} layers / {worst['gpus']} GPUs, {worst['topology']}, "
          f"{worst['objective']}); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
