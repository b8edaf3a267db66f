"""The output-length predictor on Alpaca: quality against two baselines, training time, prediction
latency, and the latency it adds to the router, all in one run.

Phases (stderr shows progress):
  dataset   build-dataset on ../shared/data/alpaca_4000.json (SmolLM2 tokenizer, default pow2
            buckets, seed 0: 70/15/15 split); skipped with a message when the file is absent
  train     `profiler_ft train` with the default backbone (all-MiniLM-L6-v2, LoRA r=8) unless
            --predictor names a trained folder; seconds per epoch from its metadata
  quality   `profiler_ft eval` on the held-out test split: accuracy, MAE and per-bucket figures
            for the predictor, the majority bucket and a prompt-length regression, side by side;
            also the same figures with the original work's tiers (uellm preset) for the baselines
  latency   LengthPredictor.predict on test prompts (seeded sample) with 1 and 2 torch threads:
            --warmup calls, then batch 1 (--single calls) and batch 32 (--batches calls);
            p50/p99 per call and per request
  router    a fast fake worker (scripts/bench/fast_upstream.py) behind two `python -m router`
            processes, with and without --length-predictor (default 1 torch thread), taking
            turns for --runs rounds: concurrency 1 (--requests back-to-back requests, p50/p99)
            and concurrency 32 (closed loop, --seconds): the latency the prediction adds to
            each request, and req/s (medians over the rounds)

Writes JSON (machine, config, every figure) to --out, eval.json and confusion.png to --work,
and prints a summary. Numbers are from a
shared 2-core machine: anything else running skews them (the JSON records the load average).

  .venv/bin/python -m scripts.bench.length_predictor [--predictor DIR] [--quick] [--out F]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import statistics
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if __package__ in (None, ""):
    sys.path.insert(0, ROOT)

from scripts.bench.loadgen import closed_loop, request_bytes, sequential  # noqa: E402
from scripts.bench.procs import HOST, Fleet, free_port, log, wait_http  # noqa: E402
from scripts.bench.router_overhead import machine, percentiles  # noqa: E402

DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "alpaca_4000.json")


def build(args: argparse.Namespace) -> str:
    from profiler_ft.dataset import DatasetConfig, build
    from runtime_patches import models

    out = os.path.join(args.work, "data")
    cfg = DatasetConfig(inputs=(DATA,), out_dir=out, seed=args.seed)
    tokenizer_dir, _ = models.resolve(cfg.tokenizer)  # the served model: smollm2
    build(dataclasses.replace(cfg, tokenizer_dir=tokenizer_dir), progress=True)
    return out


def train(args: argparse.Namespace, data: str) -> str:
    from profiler_ft.train import TrainConfig, train

    out = os.path.join(args.work, "predictor")
    train(TrainConfig(data_dir=data, out_dir=out, epochs=args.epochs, seed=args.seed),
          progress=True, restart=True)
    return out


def quality(predictor: Any, data: str) -> dict[str, Any]:
    from profiler_ft.buckets import Buckets
    from profiler_ft.dataset import read_split
    from profiler_ft.evaluate import evaluate, majority, metrics, regression

    train_rows, test = read_split(data, "train"), read_split(data, "test")
    report = evaluate(predictor, train_rows, test)
    tiers = Buckets.parse("uellm")
    true_b = [tiers.index(ex.output_tokens) for ex in test]
    true_n = [ex.output_tokens for ex in test]
    relabel = [type(ex)(**{**ex.__dict__, "bucket": tiers.index(ex.output_tokens)})
               for ex in train_rows]
    lengths = [int(statistics.median([ex.output_tokens for ex in relabel if ex.bucket == i]
                                     or [tiers.fallback_length(i)]))
               for i in range(tiers.num_buckets)]
    report["uellm_tiers"] = [
        metrics(m.name, true_b, true_n, m.buckets, m.lengths, tiers)
        for m in (majority(relabel, test, tiers, lengths), regression(relabel, test, tiers))]
    return report


def latency(predictor: Any, data: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from profiler_ft.dataset import read_split

    texts = [ex.text for ex in read_split(data, "test")]
    rng = random.Random(args.seed)
    out: dict[str, Any] = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for _ in range(args.warmup):
            predictor.predict(rng.sample(texts, 32))
        single = []
        for _ in range(args.single):
            text = rng.choice(texts)
            started = time.perf_counter()
            predictor.predict([text])
            single.append(time.perf_counter() - started)
        batched = []
        for _ in range(args.batches):
            batch = rng.sample(texts, 32)
            started = time.perf_counter()
            predictor.predict(batch)
            batched.append(time.perf_counter() - started)
        out[f"threads_{threads}"] = {
            "batch_1": percentiles(single),
            "batch_32_per_call": percentiles(batched),
            "batch_32_per_request": percentiles([b / 32 for b in batched])}
        log(f"latency, {threads} thread(s): batch 1 p50 "
            f"{out[f'threads_{threads}']['batch_1']['p50_ms']:.1f} ms; batch 32 p50 "
            f"{out[f'threads_{threads}']['batch_32_per_request']['p50_ms']:.2f} ms per request")
    return out


async def _router_phase(port: int, args: argparse.Namespace) -> dict[str, Any]:
    body = {"model": "bench-model", "max_tokens": 16,
            "messages": [{"role": "user", "content": "Give three tips for staying healthy."}]}
    request = request_bytes(HOST, port, "/v1/chat/completions", body)
    await sequential(HOST, port, request, args.warmup * 5)
    c1 = await sequential(HOST, port, request, args.requests)
    c32 = await closed_loop(HOST, port, request, 32, args.seconds)
    return {"c1": percentiles(c1), "c32": percentiles(c32.latencies_s) | {
        "req_per_s": round(c32.rate, 1), "errors": c32.errors}}


def router(predictor_dir: str, args: argparse.Namespace) -> dict[str, Any]:
    """Both routers up at once; --runs rounds, the two taking turns in a seeded order."""
    runs: dict[str, list[dict[str, Any]]] = {"without": [], "with": []}
    rng = random.Random(args.seed)
    with Fleet(ROOT) as fleet:
        up_port = free_port()
        upstream = fleet.start("upstream", [sys.executable, "-m", "scripts.bench.fast_upstream",
                                            str(up_port)], None)
        wait_http(f"http://{HOST}:{up_port}/health", proc=upstream)
        ports = {}
        for name, extra in (("without", []), ("with", ["--length-predictor", predictor_dir])):
            ports[name] = free_port()
            proc = fleet.start(f"router-{name}", [
                sys.executable, "-m", "router", "--workers", f"http://{HOST}:{up_port}",
                "--port", str(ports[name]), "--log-level", "warning", *extra], None)
            wait_http(f"http://{HOST}:{ports[name]}/health", timeout_s=120, proc=proc)
        for run in range(args.runs):
            for name in rng.sample(sorted(ports), 2):
                runs[name].append(asyncio.run(_router_phase(ports[name], args)))
                last = runs[name][-1]
                log(f"router run {run + 1}/{args.runs}, {name} predictor: c1 p50 "
                    f"{last['c1']['p50_ms']:.2f} ms, c32 p50 {last['c32']['p50_ms']:.1f} ms, "
                    f"{last['c32']['req_per_s']} req/s")
    out: dict[str, Any] = {"runs": runs}
    for name, done in runs.items():
        out[name] = {k: {q: statistics.median(r[k][q] for r in done)
                         for q in done[0][k]} for k in ("c1", "c32")}
    out["added_ms"] = {k: {q: round(out["with"][k][q] - out["without"][k][q], 2)
                           for q in ("p50_ms", "p99_ms")} for k in ("c1", "c32")}
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--predictor", default="", help="a trained predictor folder (skip training)")
    p.add_argument("--data", default="", help="a dataset folder (skip build-dataset)")
    p.add_argument("--work", default=os.path.join(ROOT, "results", "length_predictor"),
                   help="where the dataset and predictor are written")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--single", type=int, default=200, help="batch-1 calls per thread count")
    p.add_argument("--batches", type=int, default=40, help="batch-32 calls per thread count")
    p.add_argument("--requests", type=int, default=300, help="concurrency-1 router requests")
    p.add_argument("--seconds", type=float, default=10.0, help="concurrency-32 phase length")
    p.add_argument("--runs", type=int, default=3, help="router rounds (medians reported)")
    p.add_argument("--quick", action="store_true", help="fewer calls (smoke run)")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "length_predictor.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.single, args.batches, args.requests, args.seconds, args.runs = 20, 5, 50, 3.0, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.data and not os.path.isfile(DATA):
        print(f"length_predictor: skipped: {DATA} is absent (the Alpaca sample from "
              "shared/data; see ../shared/data/README.md)", file=sys.stderr)
        return 0
    from profiler_ft.evaluate import write_report
    from profiler_ft.predictor import LengthPredictor

    result: dict[str, Any] = {"machine": machine(), "config": vars(args)}
    os.makedirs(args.work, exist_ok=True)
    data = args.data or build(args)
    predictor_dir = args.predictor or train(args, data)
    predictor = LengthPredictor.load(predictor_dir)
    result["training"] = {"seconds_per_epoch": predictor.meta.metrics.get("seconds_per_epoch"),
                          "history": predictor.meta.metrics.get("history"),
                          "examples": predictor.meta.train.get("examples"),
                          "backbone": predictor.meta.backbone}
    result["quality"] = quality(predictor, data)
    write_report(result["quality"], args.work)
    result["latency"] = latency(predictor, data, args)
    result["router"] = router(predictor_dir, args)
    result["machine"]["loadavg_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    q = {m["method"]: m for m in result["quality"]["methods"]}
    lat = result["latency"]["threads_1"]
    print(f"accuracy {q['predictor']['accuracy']:.3f} vs majority {q['majority']['accuracy']:.3f}"
          f" vs regression {q['prompt_length_regression']['accuracy']:.3f}; MAE "
          f"{q['predictor']['mae_tokens']:.1f} vs {q['majority']['mae_tokens']:.1f} vs "
          f"{q['prompt_length_regression']['mae_tokens']:.1f} tokens; "
          f"{result['training']['seconds_per_epoch']} s/epoch; batch-32 p50 "
          f"{lat['batch_32_per_request']['p50_ms']:.2f} ms/request (1 thread); router adds "
          f"{result['router']['added_ms']['c1']['p50_ms']} ms p50 at c1 -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
