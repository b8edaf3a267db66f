"""How fast one CPU worker computes, per dtype, beside what this CPU's matmul can do.

  python -m scripts.bench.worker_speed [--dtypes bfloat16,float32] [--lengths 256,2048,6144]
      [--batches 1,8] [--repeats 3] [--cpus 0] [--kv-events on|off|both]
      [--out results/worker_speed.json]
      [-- SGLANG_ARGS]

For each dtype, one real SGLang worker on the prepared SmolLM2 (``--model``), pinned to ``--cpus``
(one core by default), started by the project's launcher with that dtype. Measured, after a
warm-up request:

- **prefill**: a ``/generate`` of random token ids of each length with ``max_new_tokens`` 1 (a
  fresh, seeded sequence every repeat, so the radix cache never hits); tokens/s = length over the
  request's wall time;
- **decode** at each batch size B: B concurrent requests of 64-token prompts, once with 1 new
  token and once with 1 + ``--decode-tokens`` (``ignore_eos``); decode tokens/s =
  B x decode-tokens over the difference of the two wall times.

Beside them, in the same run and on the same cores, a bare ``torch`` matmul of the model's MLP
shape (tokens x hidden @ hidden x intermediate) per dtype: the CPU's reachable GFLOP/s. Each
worker figure is turned into GFLOP/s with the model's FLOPs per token (2 x non-embedding
parameters, plus attention 2 x layers x q-width x context, and the LM head on decode steps) and
shown as a share of that matmul rate. The CPU model and its bf16 flags are recorded. JSON out
(every sample), a table printed; ``plot`` draws prefill tokens/s per length and dtype.

Arguments after ``--`` go to every worker (e.g. ``-- --attention-backend flex_attention``);
``--label`` names such a variant in the output.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__)))))

from runtime_patches import cpu_dtype, models  # noqa: E402
from runtime_patches.launch import (  # noqa: E402
    WorkerConfig,
    WorkerProcess,
    parse_cpus,
)
from scripts.bench.procs import free_port, timed_generate  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DECODE_PROMPT = 64


def log(message: str) -> None:
    print(f"[worker_speed] {message}", file=sys.stderr, flush=True)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# -- the model's arithmetic (pure) ----------------------------------------------------------------
def model_shape(model_dir: str) -> dict[str, int]:
    with open(os.path.join(model_dir, "config.json")) as fh:
        cfg = json.load(fh)
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    return {"hidden": hidden, "layers": int(cfg["num_hidden_layers"]),
            "intermediate": int(cfg["intermediate_size"]), "heads": heads,
            "kv_heads": int(cfg.get("num_key_value_heads") or heads), "head_dim": head_dim,
            "vocab": int(cfg["vocab_size"])}


def layer_params(s: dict[str, int]) -> int:
    """Weights of one decoder layer's matmuls (q, k, v, o and the gated MLP)."""
    q = s["heads"] * s["head_dim"]
    kv = s["kv_heads"] * s["head_dim"]
    return s["hidden"] * (2 * q + 2 * kv) + 3 * s["hidden"] * s["intermediate"]


def prefill_flops_per_token(s: dict[str, int], length: int) -> float:
    """Matmul FLOPs per prompt token of a causal prefill of ``length`` tokens (the one LM-head
    row of the last token is left out)."""
    attention = 2 * s["layers"] * s["heads"] * s["head_dim"] * length  # QK^T + AV, mean ctx L/2
    return 2 * s["layers"] * layer_params(s) + attention


def decode_flops_per_token(s: dict[str, int], context: int) -> float:
    """Matmul FLOPs of one decode step of one sequence at ``context`` tokens (LM head included)."""
    attention = 4 * s["layers"] * s["heads"] * s["head_dim"] * context
    return 2 * s["layers"] * layer_params(s) + 2 * s["hidden"] * s["vocab"] + attention


# -- measurements -----------------------------------------------------------------------------
def matmul_gflops(dtype: str, s: dict[str, int], cores: list[int], seconds: float = 2.0
                  ) -> float:
    """GFLOP/s of a tokens(256) x hidden @ hidden x intermediate matmul on ``cores``."""
    import torch

    before = os.sched_getaffinity(0)
    threads = torch.get_num_threads()
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(len(cores))
    try:
        dt = getattr(torch, dtype)
        a = torch.randn(256, s["hidden"]).to(dt)
        b = torch.randn(s["hidden"], s["intermediate"]).to(dt)
        for _ in range(3):
            a @ b
        n, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            a @ b
            n += 1
        elapsed = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
        os.sched_setaffinity(0, before)
    return 2 * 256 * s["hidden"] * s["intermediate"] * n / elapsed / 1e9


def generate(url: str, ids: list[int], new_tokens: int) -> dict[str, Any]:
    seconds, meta = timed_generate(url, {"input_ids": ids, "sampling_params": {
        "max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True}})
    return {"seconds": seconds, "prompt_tokens": meta["prompt_tokens"],
            "completion_tokens": meta["completion_tokens"],
            "cached_tokens": meta.get("cached_tokens", 0)}


class Prompts:
    """Seeded random token-id prompts, each one new (no radix-cache hit between them)."""

    def __init__(self, seed: int, vocab: int) -> None:
        import random

        self._rng = random.Random(seed)
        self._vocab = vocab

    def take(self, length: int) -> list[int]:
        # Ids from the ordinary part of the vocabulary (past the special tokens).
        return [self._rng.randrange(100, self._vocab) for _ in range(length)]


def batch_seconds(url: str, prompts: list[list[int]], new_tokens: int) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: generate(url, p, new_tokens), prompts))
    for r in results:
        if r["completion_tokens"] != new_tokens:
            raise RuntimeError(f"asked {new_tokens} tokens, got {r['completion_tokens']}")
    return time.perf_counter() - started


def measure_worker(url: str, s: dict[str, int], args: argparse.Namespace, prompts: Prompts,
                   progress: Any) -> dict[str, Any]:
    generate(url, prompts.take(256), 8)  # warm-up
    batch_seconds(url, [prompts.take(DECODE_PROMPT) for _ in range(max(args.batches))], 4)
    prefill: dict[str, Any] = {}
    for length in args.lengths:
        runs = []
        for _ in range(args.repeats):
            r = generate(url, prompts.take(length), 1)
            if r["cached_tokens"]:
                raise RuntimeError(f"prefill of {length} tokens hit the cache "
                                   f"({r['cached_tokens']} tokens): not a prefill measurement")
            runs.append(r["seconds"])
            progress.update(1)
        median = statistics.median(runs)
        prefill[str(length)] = {
            "seconds": runs, "tokens_per_s": length / median,
            "gflops": length / median * prefill_flops_per_token(s, length) / 1e9}
    decode: dict[str, Any] = {}
    for batch in args.batches:
        rates = []
        for _ in range(args.repeats):
            t1 = batch_seconds(url, [prompts.take(DECODE_PROMPT) for _ in range(batch)], 1)
            tn = batch_seconds(url, [prompts.take(DECODE_PROMPT) for _ in range(batch)],
                               1 + args.decode_tokens)
            rates.append(batch * args.decode_tokens / max(tn - t1, 1e-9))
            progress.update(1)
        median = statistics.median(rates)
        ctx = DECODE_PROMPT + args.decode_tokens // 2
        decode[str(batch)] = {"tokens_per_s_runs": rates, "tokens_per_s": median,
                              "gflops": median * decode_flops_per_token(s, ctx) / 1e9}
    return {"prefill": prefill, "decode": decode}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    path = models.prepare(args.model)
    served = models.recipe(args.model).served_name if args.model in ("smollm2", "tiny") else None
    s = model_shape(path)
    cores = parse_cpus(args.cpus)
    flags = cpu_dtype.cpu_flags()
    result: dict[str, Any] = {
        "benchmark": "worker_speed", "label": args.label,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python -m scripts.bench.worker_speed " + " ".join(args.argv),
        "cpu": {"model": cpu_model(), "native_bf16_flags": sorted(
            flags & set(cpu_dtype.NATIVE_BF16_FLAGS)), "cores": cores,
            "launcher_auto_choice": cpu_dtype.choose_cpu_dtype(flags).dtype},
        "model": {"name": args.model, "shape": s,
                  "gflop_per_token_no_attention": prefill_flops_per_token(s, 0) / 1e9},
        "settings": {"lengths": args.lengths, "batches": args.batches, "repeats": args.repeats,
                     "decode_tokens": args.decode_tokens, "decode_prompt": DECODE_PROMPT,
                     "sglang_args": args.sglang_args, "seed": args.seed,
                     "kv_events": args.kv_events},
        "matmul_gflops": {}, "workers": {}}
    for dtype in args.dtypes:
        result["matmul_gflops"][dtype] = matmul_gflops(dtype, s, cores)
        log(f"matmul {dtype}: {result['matmul_gflops'][dtype]:.1f} GFLOP/s on cores {cores}")
    kv_settings = {"on": [True], "off": [False], "both": [False, True]}[args.kv_events]
    steps = (len(args.dtypes) * len(kv_settings) * args.repeats
             * (len(args.lengths) + len(args.batches)))
    progress = tqdm(total=steps, desc="worker_speed", unit="run", file=sys.stderr)
    for dtype in args.dtypes:
        for kv_events in kv_settings:
            key = dtype if len(kv_settings) == 1 else (
                f"{dtype}, KV events {'on' if kv_events else 'off'}")
            cfg = WorkerConfig(model_path=path, port=free_port(), served_model_name=served,
                               device="cpu", dtype=dtype, cpus=args.cpus,
                               max_total_tokens=max(args.lengths) + 1024,
                               max_running_requests=max(8, max(args.batches)),
                               kv_events=kv_events, extra_args=tuple(args.sglang_args))
            worker = WorkerProcess(cfg, log_path=os.path.join(
                ROOT, "logs", "bench",
                f"worker_speed-{args.label or 'default'}-{key.replace(', ', '-')}.log"))
            progress.set_postfix_str(f"{key}: starting")
            worker.start()
            try:
                worker.wait_ready(600)
                progress.set_postfix_str(key)
                result["workers"][key] = {
                    "dtype": dtype, "kv_events": kv_events, **measure_worker(
                        worker.url, s, args, Prompts(args.seed, s["vocab"]), progress)}
            finally:
                worker.stop()
    progress.close()
    return result


def table(result: dict[str, Any]) -> str:
    lines = [f"CPU: {result['cpu']['model']} (native bf16 flags: "
             f"{', '.join(result['cpu']['native_bf16_flags']) or 'none'}; launcher picks "
             f"{result['cpu']['launcher_auto_choice']}), cores {result['cpu']['cores']}"]
    lines.append("| dtype | matmul GFLOP/s | " + " | ".join(
        f"prefill {n} tok/s (% of matmul)" for n in result["settings"]["lengths"]) + " | " +
        " | ".join(f"decode b{b} tok/s" for b in result["settings"]["batches"]) + " |")
    lines.append("|" + "---|" * (2 + len(result["settings"]["lengths"])
                                 + len(result["settings"]["batches"])))
    for dtype, w in result["workers"].items():
        peak = result["matmul_gflops"][w.get("dtype", dtype)]
        cells = [f"{p['tokens_per_s']:.0f} ({100 * p['gflops'] / peak:.0f}%)"
                 for p in w["prefill"].values()]
        cells += [f"{d['tokens_per_s']:.1f}" for d in w["decode"].values()]
        lines.append(f"| {dtype} | {peak:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for dtype, w in result["workers"].items():
        xs = [int(n) for n in w["prefill"]]
        ax.plot(xs, [p["tokens_per_s"] for p in w["prefill"].values()], marker="o", label=dtype)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("prefill tokens/s")
    ax.set_title(f"SmolLM2 prefill, {result['cpu']['model']}, {len(result['cpu']['cores'])} "
                 "core(s)", fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def parse_args(argv: list[str]) -> argparse.Namespace:
    raw, extra = list(argv), []
    if "--" in raw:
        cut = raw.index("--")
        raw, extra = raw[:cut], raw[cut + 1:]
    parser = argparse.ArgumentParser(prog="python -m scripts.bench.worker_speed",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    parser.add_argument("--model", default="smollm2", help="prepared model (default smollm2)")
    parser.add_argument("--dtypes", default="bfloat16,float32",
                        type=lambda t: t.split(","), help="comma-separated (default "
                        "bfloat16,float32)")
    parser.add_argument("--lengths", default=[256, 2048, 6144], type=ints,
                        help="prefill prompt lengths (default 256,2048,6144)")
    parser.add_argument("--batches", default=[1, 8], type=ints,
                        help="decode batch sizes (default 1,8)")
    parser.add_argument("--decode-tokens", type=int, default=64,
                        help="decode steps timed per request (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell (default 3)")
    parser.add_argument("--cpus", default="0", help="the worker's cores (default 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default="", help="names this variant in the output")
    parser.add_argument("--kv-events", default="on", choices=["on", "off", "both"],
                        help="workers publish SGLang's KV events (the launcher's default: on); "
                             "both: each dtype without, then with them, in the same run")
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "worker_speed.json"))
    args = parser.parse_args(raw)
    bad = [d for d in args.dtypes if d not in cpu_dtype.CHOICES or d == "auto"]
    if bad:
        parser.error(f"--dtypes: {bad} not among bfloat16, float32, float16")
    if args.repeats < 1 or args.decode_tokens < 1 or min(args.lengths + args.batches) < 1:
        parser.error("--repeats, --decode-tokens, --lengths and --batches must be >= 1")
    args.sglang_args = extra
    args.argv = list(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        parse_cpus(args.cpus)
        result = run(args)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"worker_speed: {exc}", file=sys.stderr)
        return 1
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    plot(result, os.path.splitext(args.out)[0] + ".png")
    print(table(result))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
