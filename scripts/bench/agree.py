"""Our replay benchmark and SGLang's ``bench_serving`` against the same cluster: do they agree?

  python -m scripts.bench.agree [--url URL] [--model smollm2] [--input-len 256]
                                [--output-len 64] [--num-prompts 40] [--rates inf,1.0]
                                [--repeats 3] [--out results/bench/agree_bench_serving.json]

Without ``--url`` it brings up the main job's cluster itself (two SmolLM2 CPU workers, one core
each, behind ``python -m router``, load_aware) and stops it at the end.

Workload, identical for both tools: ``--num-prompts`` completions of exactly ``--input-len``
prompt tokens and ``--output-len`` output tokens (``ignore_eos``), sent open loop at each of
``--rates`` (requests/s, Poisson; ``inf``: all at once, the only setting where the two tools'
arrival times are identical too). bench_serving runs as SGLang ships it (``python -m
sglang.bench_serving --backend sglang-oai --dataset-name random-ids --random-range-ratio 1``);
ours is ``scripts.bench.replay`` with the ``random`` source. For each repeat and rate the two
run back to back, in an order alternated per repeat, each after the same warm-up.

Two comparisons, per rate:
- definitions: our ``summarise`` applied to bench_serving's own per-request timings
  (``--output-details``) against the numbers bench_serving prints: the same percentiles and
  throughput from the same data, so any difference is a difference of definition. One is
  known: bench_serving's end to end (and TPOT) runs to the stream's last chunk (``[DONE]``),
  which its details do not carry; ours, and the recomputation, stop at the last token.
- measurement: our tool's numbers against bench_serving's, mean over repeats, with each tool's
  own spread between repeats; the tools agree where the gap between them is within that spread.

JSON to ``--out`` (every run of both tools), a table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import sys
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__)))))

from scripts.bench.procs import log  # noqa: E402
from scripts.bench.replay import bench_serving  # noqa: E402
from scripts.bench.replay.bench_serving import results_from_details  # noqa: E402
from scripts.bench.replay.metrics import SLO, summarise  # noqa: E402

METRICS = (("ttft_s", "p50", "median_ttft_ms"), ("ttft_s", "p99", "p99_ttft_ms"),
           ("tpot_s", "p50", "median_tpot_ms"), ("tpot_s", "p99", "p99_tpot_ms"),
           ("itl_s", "p50", "median_itl_ms"), ("e2e_s", "p50", "median_e2e_latency_ms"),
           ("output_tokens_per_s", None, "output_throughput"))


def ours_value(summary: dict[str, Any], key: str, q: str | None) -> float | None:
    """A metric of our summary in bench_serving's unit (ms for latencies, tok/s)."""
    if q is None:
        return summary[key]  # type: ignore[no-any-return]
    value = summary[key][q]
    return None if value is None else 1000 * value


def run_bench_serving(url: str, tokenizer_dir: str, model: str, args: argparse.Namespace,
                      rate: float, seed: int) -> dict[str, Any]:
    dataset = ["--dataset-name", "random-ids", "--random-input-len", str(args.input_len),
               "--random-output-len", str(args.output_len), "--random-range-ratio", "1.0",
               "--num-prompts", str(args.num_prompts)]
    return bench_serving.run(url, model, tokenizer_dir, "completions", rate, seed, args.warmup,
                             dataset)


def run_ours(url: str, model: str, tokenizer: Any, args: argparse.Namespace, rate: float,
             seed: int) -> dict[str, Any]:
    from scripts.bench.replay.run import BenchConfig, TargetConfig, _one_run
    from scripts.bench.replay.workload import WorkloadConfig, build

    cfg = BenchConfig(target=TargetConfig(url=url, model=model, api="completions"),
                      warmup_requests=args.warmup, load_interval_s=1.0)
    workload = build(WorkloadConfig(
        source="random", num_requests=args.num_prompts, max_input_tokens=args.input_len,
        max_output_tokens=args.output_len, rate=None if rate == float("inf") else rate,
        seed=seed), tokenizer)
    return asyncio.run(_one_run(cfg, model, workload, f"ours {rate}/s"))


def compare(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """Per metric: both tools' mean and spread over repeats, the gap, and the definitions check
    (our summarise on bench_serving's own timings)."""
    rows: dict[str, Any] = {}
    for key, q, theirs_key in METRICS:
        name = f"{key}.{q}" if q else key
        ours = [ours_value(o["summary"], key, q) for o, _ in pairs]
        theirs = [float(t[theirs_key]) for _, t in pairs]
        recomputed = [ours_value(t["_recomputed"], key, q) for _, t in pairs]
        ours_ok = [v for v in ours if v is not None]
        row = {"ours": ours, "bench_serving": theirs, "ours_on_their_timings": recomputed,
               "ours_mean": statistics.fmean(ours_ok) if ours_ok else None,
               "bench_serving_mean": statistics.fmean(theirs),
               "ours_spread": _spread(ours_ok), "bench_serving_spread": _spread(theirs)}
        if row["ours_mean"] is not None and row["bench_serving_mean"]:
            row["gap_pct"] = 100 * (row["ours_mean"] / row["bench_serving_mean"] - 1)
        defs = [abs(r / t - 1) * 100 for r, t in zip(recomputed, theirs, strict=True)
                if r is not None and t]
        row["definitions_max_diff_pct"] = max(defs) if defs else None
        rows[name] = row
    return rows


def _spread(values: list[float]) -> float | None:
    """Half the range between repeats, as % of their mean."""
    if len(values) < 2 or not statistics.fmean(values):
        return None
    return 100 * (max(values) - min(values)) / 2 / statistics.fmean(values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench.agree", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an OpenAI-compatible endpoint already running "
                        "(default: bring up two SmolLM2 CPU workers behind the router)")
    parser.add_argument("--model", default="smollm2",
                        help="prepared model (smollm2, tiny) whose tokenizer both tools use")
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--num-prompts", type=int, default=40)
    parser.add_argument("--rates", default="inf,1.0",
                        help="comma-separated requests/s; inf sends all at once (inf,1.0)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="warm-up requests per run")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="results/bench/agree_bench_serving.json")
    args = parser.parse_args(argv)
    try:
        rates = [float(r) for r in args.rates.split(",")]
    except ValueError:
        parser.error(f"--rates: {args.rates!r} is not a comma-separated list of numbers")
    if any(r <= 0 for r in rates) or min(args.input_len, args.output_len, args.num_prompts,
                                         args.repeats) < 1:
        parser.error("rates, lengths, --num-prompts and --repeats must be positive")
    try:
        import datasets  # noqa: F401  (bench_serving imports it)
    except ImportError:
        print("agree: sglang.bench_serving needs the datasets package "
              "(pip install -r requirements/bench.txt)", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    from runtime_patches import models
    from scripts.bench.replay.cluster import Cluster, ClusterConfig

    tokenizer_dir, _ = models.resolve(args.model)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    result: dict[str, Any] = {
        "benchmark": "agree_bench_serving", "args": vars(args),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "started": datetime.datetime.now(datetime.UTC).isoformat(), "rates": {}}
    cluster = None if args.url else Cluster(ClusterConfig(model=args.model), "agree")
    try:
        url = args.url or cluster.__enter__()  # type: ignore[union-attr]
        model = _served(url)
        for rate in rates:
            pairs = []
            for repeat in range(args.repeats):
                seed = args.seed + repeat
                order = ("ours", "theirs") if repeat % 2 == 0 else ("theirs", "ours")
                got: dict[str, dict[str, Any]] = {}
                for tool in order:
                    log(f"rate {rate}/s repeat {repeat + 1}/{args.repeats}: {tool}")
                    if tool == "ours":
                        got[tool] = run_ours(url, model, tokenizer, args, rate, seed)
                    else:
                        record = run_bench_serving(url, tokenizer_dir, model, args, rate, seed)
                        record["_recomputed"] = summarise(
                            results_from_details(record), float(record["duration"]), SLO())
                        got[tool] = record
                pairs.append((got["ours"], got["theirs"]))
            rows = compare(pairs)
            result["rates"][str(rate)] = {
                "comparison": rows,
                "ours_runs": [{k: v for k, v in o.items() if k != "load"} for o, _ in pairs],
                "bench_serving_runs": [{k: v for k, v in t.items() if k != "generated_texts"}
                                       for _, t in pairs]}
            _print(rate, rows)
    finally:
        if cluster is not None:
            cluster.__exit__(None, None, None)
    result["finished"] = datetime.datetime.now(datetime.UTC).isoformat()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"wrote {args.out}")
    return 0


def _served(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url + "/v1/models", timeout=30) as resp:
        return str(json.load(resp)["data"][0]["id"])


def _print(rate: float, rows: dict[str, Any]) -> None:
    print(f"\nrate {rate}/s: ours vs bench_serving (mean over repeats; spread = half range)")
    print(f"{'metric':<22}{'ours':>10}{'spread':>8}{'bench_serving':>15}{'spread':>8}"
          f"{'gap':>8}{'defs':>8}")
    for name, row in rows.items():
        def f(v: float | None, unit: str = "") -> str:
            return "-" if v is None else f"{v:.1f}{unit}"
        print(f"{name:<22}{f(row['ours_mean']):>10}{f(row['ours_spread'], '%'):>8}"
              f"{f(row['bench_serving_mean']):>15}{f(row['bench_serving_spread'], '%'):>8}"
              f"{f(row.get('gap_pct'), '%'):>8}{f(row['definitions_max_diff_pct'], '%'):>8}")


if __name__ == "__main__":
    sys.exit(main())
