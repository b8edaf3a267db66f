"""Dispatch policies on real SGLang CPU workers: BanaServe's policies against SGLang's router.

  python -m scripts.bench.policies [--quick] [--rates 0.5,1,2] [--duration 60] [--out FILE]

Workload: the Mooncake conversation trace (``../shared/data/mooncake_conversation_trace.jsonl``):
each request's ``hash_ids`` name its 512-token prefix blocks; equal ids are shared prefixes with
the trace's own skewed popularity. Each id becomes a fixed pseudo-text of ``--block-tokens``
words (scaled down so prefill stays affordable on CPU), the first ``--max-blocks`` blocks form
the prompt, plus a unique question. Requests arrive open-loop (Poisson, seeded) at each rate;
every configuration replays the same request sequence against freshly flushed workers.

Per configuration and rate: throughput, TTFT p50/p99 (first streamed chunk), end-to-end p99,
load imbalance (max/mean of requests per worker, from each worker's own
``sglang:num_requests_total``) and prompt-cache hit ratio (``sglang:cached_tokens_total`` over
``sglang:prompt_tokens_total``). JSON out, one summary line per configuration, a PNG plot.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__)))))

import aiohttp  # noqa: E402

from runtime_patches import models  # noqa: E402
from runtime_patches.launch import WorkerConfig, WorkerProcess  # noqa: E402
from scripts.bench.router_overhead import free_port, wait_http  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRACE = os.path.join(ROOT, "..", "shared", "data", "mooncake_conversation_trace.jsonl")
WORDS = ("time system data model value server request memory cache token layer batch queue "
         "worker router prefix decode prefill latency throughput network storage kernel "
         "thread process buffer stream policy signal vector matrix tensor graph node edge "
         "cluster replica shard index record field schema query answer question").split()


def log(message: str) -> None:
    print(f"[policies] {message}", file=sys.stderr, flush=True)


def block_text(hash_id: int, words: int) -> str:
    rng = random.Random(hash_id * 7919 + 17)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def build_workload(args: argparse.Namespace) -> list[dict[str, Any]]:
    if not os.path.exists(TRACE):
        raise SystemExit(f"policies: trace not found at {TRACE}; this benchmark needs the "
                         "Mooncake conversation trace (see ../shared/data/README.md)")
    with open(TRACE) as f:
        rows = [json.loads(line) for _, line in zip(range(args.num_requests), f, strict=False)]
    requests = []
    for i, row in enumerate(rows):
        blocks = row["hash_ids"][:args.max_blocks]
        prompt = " ".join(block_text(h, args.block_tokens) for h in blocks)
        question = f"\nQuestion {i}: summarise the text above in one line."
        requests.append({"messages": [{"role": "user", "content": prompt + question}],
                         "max_tokens": max(1, min(args.max_tokens, row["output_length"]))})
    return requests


def worker_counters(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for name in ("num_requests_total", "prompt_tokens_total", "cached_tokens_total"):
        values = re.findall(rf"^sglang:{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M)
        out[name] = sum(float(v) for v in values)
    return out


def flush(url: str) -> None:
    for _ in range(60):
        try:
            req = urllib.request.Request(url + "/flush_cache", method="POST")
            with urllib.request.urlopen(req, timeout=10) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} would not flush its cache")


async def one_request(session: aiohttp.ClientSession, url: str, model: str,
                      req: dict[str, Any]) -> dict[str, Any]:
    body = {"model": model, **req, "stream": True, "temperature": 0, "ignore_eos": True}
    started = time.perf_counter()
    ttft = None
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                return {"ok": False, "why": f"http {resp.status}: {(await resp.text())[:200]}"}
            ok, why = False, "stream ended without [DONE]"
            async for line in resp.content:
                if line.startswith(b"data:") and ttft is None:
                    ttft = time.perf_counter() - started
                if line.startswith(b'data: {"error"'):
                    why = line.decode()[:200]
                elif line.startswith(b"data: [DONE]"):
                    ok = why == "stream ended without [DONE]"
    except (aiohttp.ClientError, TimeoutError) as exc:
        return {"ok": False, "why": type(exc).__name__}
    return {"ok": ok, "why": None if ok else why, "ttft": ttft,
            "e2e": time.perf_counter() - started}


async def open_loop(url: str, model: str, workload: list[dict[str, Any]], rate: float,
                    duration: float, seed: int) -> tuple[list[dict[str, Any]], float]:
    rng = random.Random(seed)
    tasks = []
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        started = time.perf_counter()
        next_at, i = 0.0, 0
        while next_at < duration:
            await asyncio.sleep(max(0.0, started + next_at - time.perf_counter()))
            tasks.append(asyncio.create_task(
                one_request(session, url, model, workload[i % len(workload)])))
            i += 1
            next_at += rng.expovariate(rate)
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - started


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start_router(name: str, urls: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    if name.startswith("smg:"):
        smg = shutil.which("smg") or shutil.which("smg", path=os.path.dirname(sys.executable))
        if smg is None:
            raise FileNotFoundError("smg")
        argv = [smg, "launch", "--host", "127.0.0.1", "--port", str(port), "--worker-urls",
                *urls, "--policy", name.split(":", 1)[1], "--log-level", "warn",
                "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
    else:
        argv = [sys.executable, "-m", "router", "--workers", *urls, "--port", str(port),
                "--policy", name, "--log-level", "warning"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, cwd=ROOT)
    wait_http(f"http://127.0.0.1:{port}/health", timeout_s=120)
    return proc, f"http://127.0.0.1:{port}"


def measure(name: str, workers: list[WorkerProcess], served: str,
            workload: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    urls = [w.url for w in workers]
    proc, url = start_router(name, urls)
    rows = []
    try:
        for rate in args.rates:
            for w in urls:
                flush(w)
            asyncio.run(open_loop(url, served, workload[-8:], 1.0, 3.0, seed=99))  # warm-up
            before = {w: worker_counters(w) for w in urls}
            results, seconds = asyncio.run(open_loop(url, served, workload, rate,
                                                     args.duration, args.seed))
            after = {w: worker_counters(w) for w in urls}
            per_worker = [after[w]["num_requests_total"] - before[w]["num_requests_total"]
                          for w in urls]
            prompt = sum(after[w]["prompt_tokens_total"] - before[w]["prompt_tokens_total"]
                         for w in urls)
            cached = sum(after[w]["cached_tokens_total"] - before[w]["cached_tokens_total"]
                         for w in urls)
            ok = [r for r in results if r["ok"]]
            ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
            row = {
                "policy": name, "rate": rate, "sent": len(results), "ok": len(ok),
                "throughput_rps": len(ok) / seconds, "ttft_p50_s": pct(ttft, 0.5),
                "ttft_p99_s": pct(ttft, 0.99), "e2e_p99_s": pct([r["e2e"] for r in ok], 0.99),
                "requests_per_worker": per_worker,
                "imbalance": max(per_worker) / statistics.mean(per_worker)
                if sum(per_worker) else None,
                "cache_hit": cached / prompt if prompt else None,
                "failures": sorted({r["why"] for r in results if not r["ok"]})}
            rows.append(row)
            log(f"{name} @ {rate}/s: {row['ok']}/{row['sent']} ok, TTFT p50 "
                f"{_fmt(row['ttft_p50_s'])} p99 {_fmt(row['ttft_p99_s'])}, imbalance "
                f"{_fmt(row['imbalance'], '', 2)}, cache hit {_fmt(row['cache_hit'], '', 2)}")
    finally:
        proc.terminate()
        proc.wait(10)
    return rows


def _fmt(value: float | None, unit: str = "s", digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{unit}"


def plot(rows: list[dict[str, Any]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name in dict.fromkeys(r["policy"] for r in rows):
        mine = [r for r in rows if r["policy"] == name]
        rates = [r["rate"] for r in mine]
        for ax, key in zip(axes, ("ttft_p99_s", "ttft_p50_s", "imbalance"), strict=True):
            ax.plot(rates, [r[key] for r in mine], marker="o", label=name)
            ax.set_xlabel("request rate (req/s)")
            ax.set_title(key)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    log(f"plot: {path}")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="prepared model name or folder")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--policies", default="load_aware,cache_aware,round_robin,"
                        "smg:cache_aware,smg:least_load",
                        help="comma-separated; smg:NAME runs SGLang's router with policy NAME")
    parser.add_argument("--rates", default="0.15,0.3",
                        help="request rates, req/s (2 CPU workers on SmolLM2 saturate near "
                             "0.25-0.3 req/s with the default workload)")
    parser.add_argument("--duration", type=float, default=90.0, help="seconds per rate")
    parser.add_argument("--num-requests", type=int, default=400, help="trace rows used")
    parser.add_argument("--block-tokens", type=int, default=64, help="words per hash block")
    parser.add_argument("--max-blocks", type=int, default=4, help="blocks per prompt")
    parser.add_argument("--max-tokens", type=int, default=16, help="cap on output tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="1 rate, 20 s, 3 policies")
    parser.add_argument("--out", default="results/policies.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.rates, args.duration = "0.2", 20.0
        args.policies = "load_aware,cache_aware,smg:cache_aware"
    args.rates = [float(r) for r in args.rates.split(",")]
    args.policies = args.policies.split(",")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # SIGTERM runs the clean-up below (stopping workers and routers) instead of orphaning them
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    workload = build_workload(args)
    path, served = models.resolve(args.model)
    ncpu = os.cpu_count() or 1
    workers = [WorkerProcess(WorkerConfig(
        model_path=path, port=free_port(), served_model_name=served, device="cpu",
        cpus=str(i % ncpu), max_total_tokens=16384, max_running_requests=16),
        log_path=os.path.join(ROOT, "logs", "bench", f"policies-worker-{i}.log"))
        for i in range(args.workers)]
    rows: list[dict[str, Any]] = []
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.wait_ready(600)
        log(f"{len(workers)} {served} workers up; {len(workload)} requests in the workload")
        for name in args.policies:
            try:
                rows += measure(name, workers, served, workload, args)
            except FileNotFoundError:
                log(f"{name}: smg not installed (pip install -r requirements/bench.txt); skipped")
    finally:
        for w in workers:
            w.stop()
    result = {"benchmark": "policies", "date": datetime.datetime.now(datetime.UTC).isoformat(
        timespec="seconds"), "nproc": ncpu, "config": {k: v for k, v in vars(args).items()},
        "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    plot(rows, os.path.splitext(args.out)[0] + ".png")
    for row in rows:
        print(f"policies: {row['policy']:18} rate {row['rate']:4.1f}/s  "
              f"{row['throughput_rps']:.2f} req/s  TTFT p50 {_fmt(row['ttft_p50_s'])} "
              f"p99 {_fmt(row['ttft_p99_s'])}  E2E p99 {_fmt(row['e2e_p99_s'])}  "
              f"imbalance {_fmt(row['imbalance'], '', 2)}  cache hit "
              f"{_fmt(row['cache_hit'], '', 2)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
