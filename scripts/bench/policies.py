"""Dispatch policies on real SGLang CPU workers: BanaServe's policies against SGLang's router.

  python -m scripts.bench.policies [--quick] [--rates 0.2,0.4] [--duration 90] [--out FILE]

Workload, from the Mooncake conversation trace
(``../shared/data/mooncake_conversation_trace.jsonl``): each trace row's ``hash_ids`` name its
512-token prefix blocks, and rows of one conversation share their leading blocks. The
``--prefixes`` most frequent leading chains of ``--prefix-blocks`` blocks become the shared
prefixes, each drawn with the trace's own (skewed) frequency; every request is one such prefix plus
one block unique to it and a unique question. Each block id becomes a fixed pseudo-text of
``--block-tokens`` words (scaled down so prefill stays affordable on CPU). The prefixes together
are sized to overflow one worker's KV pool (``--kv-tokens``) but fit in the cluster's, the regime
where routing decides prefix reuse. Requests arrive open-loop (Poisson, seeded); every
configuration replays the same request sequence against freshly flushed workers.

Each run starts from flushed worker caches and sends the workload for ``--warmup`` seconds before
the measured ``--duration``: only requests sent after the warm-up count, and worker counters are
read at its end, so every policy is measured in its own steady state.

Order: for each repeat and rate, every policy runs once, in an order rotated per repeat, so slow
drift of the (shared, 2-core) machine hits all policies alike. Percentiles pool the repeats.

Per policy and rate: throughput, TTFT p50/p99 (first streamed chunk), end-to-end p99,
load imbalance (max/mean of requests per worker, from each worker's own
``sglang:num_requests_total``) and prompt-cache hit ratio (``sglang:cached_tokens_total`` over
``sglang:prompt_tokens_total``). JSON out, one summary line per configuration, a PNG plot.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
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
from collections.abc import Callable
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


def build_workload(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The request sequence and a description of it (prefix popularity, sizes)."""
    if not os.path.exists(TRACE):
        raise SystemExit(f"policies: trace not found at {TRACE}; this benchmark needs the "
                         "Mooncake conversation trace (see ../shared/data/README.md)")
    chains: collections.Counter[tuple[int, ...]] = collections.Counter()
    with open(TRACE) as f:
        for line in f:
            ids = json.loads(line)["hash_ids"]
            if len(ids) > args.prefix_blocks:
                chains[tuple(ids[:args.prefix_blocks])] += 1
    popular = chains.most_common(args.prefixes)
    prefixes = [" ".join(block_text(h, args.block_tokens) for h in chain) for chain, _ in popular]
    weights = [count for _, count in popular]
    rng = random.Random(args.seed)
    requests = []
    for i in range(args.num_requests):
        which = rng.choices(range(len(prefixes)), weights)[0]
        tail = block_text(10_000_000 + i, args.block_tokens // 2)
        question = f"\nQuestion {i}: summarise the text above in one line."
        requests.append({"prefix": which, "messages": [
            {"role": "user", "content": f"{prefixes[which]}\n{tail}{question}"}],
            "max_tokens": args.max_tokens})
    info = {"prefixes": len(prefixes), "prefix_counts_in_trace": weights,
            "prefix_words": args.prefix_blocks * args.block_tokens,
            "unique_words": args.block_tokens // 2}
    return requests, info


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
    body = {"model": model, "messages": req["messages"], "max_tokens": req["max_tokens"],
            "stream": True, "temperature": 0, "ignore_eos": True}
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
                    duration: float, seed: int, warmup: float = 0.0,
                    at_warmup: Callable[[], Any] | None = None,
                    ) -> tuple[list[dict[str, Any]], float, Any]:
    """Poisson arrivals at ``rate`` for ``warmup + duration`` seconds.

    Returns the requests sent after the warm-up (each with its result), the seconds from the
    end of the warm-up until the last of them finished, and what ``at_warmup`` returned (called
    in a thread at the end of the warm-up, to snapshot worker counters)."""
    rng = random.Random(seed)
    tasks: list[tuple[float, asyncio.Task[dict[str, Any]]]] = []
    timeout = aiohttp.ClientTimeout(total=600)
    loop = asyncio.get_running_loop()
    snapshot = None
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        started = time.perf_counter()
        next_at, i = 0.0, 0
        while next_at < warmup + duration:
            await asyncio.sleep(max(0.0, started + next_at - time.perf_counter()))
            if at_warmup is not None and next_at >= warmup:
                snapshot = await loop.run_in_executor(None, at_warmup)
                at_warmup = None
            tasks.append((next_at, asyncio.create_task(
                one_request(session, url, model, workload[i % len(workload)]))))
            i += 1
            next_at += rng.expovariate(rate)
        await asyncio.gather(*(task for _, task in tasks))
        measured = [task.result() for sent_at, task in tasks if sent_at >= warmup]
        return measured, time.perf_counter() - started - warmup, snapshot


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
    log_path = os.path.join(ROOT, "logs", "bench", f"policies-router-{name.replace(':', '-')}.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=ROOT)
    wait_http(f"http://127.0.0.1:{port}/health", timeout_s=120, proc=proc)
    return proc, f"http://127.0.0.1:{port}"


WARMUP = [{"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4}] * 4


def run_once(name: str, workers: list[WorkerProcess], served: str, rate: float, seed: int,
             workload: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """One open-loop run of ``workload`` at ``rate`` through a fresh router ``name``."""
    urls = [w.url for w in workers]
    proc, url = start_router(name, urls)
    try:
        asyncio.run(open_loop(url, served, WARMUP, 2.0, 2.0, seed=99))
        for w in urls:
            flush(w)
        results, seconds, before = asyncio.run(open_loop(
            url, served, workload, rate, args.duration, seed, warmup=args.warmup,
            at_warmup=lambda: {w: worker_counters(w) for w in urls}))
        after = {w: worker_counters(w) for w in urls}
    finally:
        proc.terminate()
        proc.wait(10)
    delta = {k: [after[w][k] - before[w][k] for w in urls] for k in before[urls[0]]}
    return {"results": results, "seconds": seconds, "requests_per_worker":
            delta["num_requests_total"], "prompt_tokens": sum(delta["prompt_tokens_total"]),
            "cached_tokens": sum(delta["cached_tokens_total"])}


def summarise(name: str, rate: float, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row per policy and rate; percentiles pool every repeat's requests."""
    results = [r for run in runs for r in run["results"]]
    ok = [r for r in results if r["ok"]]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    per_worker = [sum(col) for col in zip(*(run["requests_per_worker"] for run in runs),
                                          strict=True)]
    prompt = sum(run["prompt_tokens"] for run in runs)

    def imbalance(counts: list[float]) -> float | None:
        return max(counts) / statistics.mean(counts) if sum(counts) else None

    return {
        "policy": name, "rate": rate, "repeats": len(runs), "sent": len(results), "ok": len(ok),
        "throughput_rps": statistics.median(
            sum(r["ok"] for r in run["results"]) / run["seconds"] for run in runs),
        "throughput_rps_runs": [sum(r["ok"] for r in run["results"]) / run["seconds"]
                                for run in runs],
        "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99),
        "e2e_p50_s": pct([r["e2e"] for r in ok], 0.5),
        "e2e_p99_s": pct([r["e2e"] for r in ok], 0.99),
        "requests_per_worker": per_worker, "imbalance": imbalance(per_worker),
        "imbalance_runs": [imbalance(run["requests_per_worker"]) for run in runs],
        "cache_hit": sum(run["cached_tokens"] for run in runs) / prompt if prompt else None,
        "failures": sorted({r["why"] for r in results if not r["ok"]})}


def _fmt(value: float | None, unit: str = "s", digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{unit}"


def plot(rows: list[dict[str, Any]], path: str,
         keys: tuple[str, ...] = ("ttft_p50_s", "ttft_p99_s", "e2e_p99_s", "imbalance",
                                  "cache_hit"),
         series: str = "policy") -> None:
    """One panel per ``keys`` entry against the request rate, one line per ``series`` value."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4))
    for name in dict.fromkeys(r[series] for r in rows):
        mine = [r for r in rows if r[series] == name]
        rates = [r["rate"] for r in mine]
        for ax, key in zip(axes, keys, strict=True):
            ax.plot(rates, [r[key] for r in mine], marker="o", label=name)
            ax.set_xlabel("request rate (req/s)")
            ax.set_title(key)
    axes[0].legend(fontsize=8)
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
    parser.add_argument("--rates", default="0.3,0.6",
                        help="request rates, req/s (2 pinned CPU workers on SmolLM2 complete "
                             "about 0.65 req/s of the default workload)")
    parser.add_argument("--duration", type=float, default=75.0,
                        help="measured seconds per run, after the warm-up")
    parser.add_argument("--warmup", type=float, default=30.0,
                        help="seconds of the same open-loop workload before measuring, so "
                             "worker caches reach the policy's steady state (requests sent "
                             "then are not counted)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs per policy and rate (policy order rotated per repeat)")
    parser.add_argument("--num-requests", type=int, default=1000,
                        help="length of the request sequence (a run uses its first part)")
    parser.add_argument("--prefixes", type=int, default=16,
                        help="shared prefixes: the trace's most frequent leading block chains")
    parser.add_argument("--prefix-blocks", type=int, default=4, help="blocks per prefix")
    parser.add_argument("--block-tokens", type=int, default=64, help="words per hash block")
    parser.add_argument("--kv-tokens", type=int, default=4096,
                        help="each worker's KV pool (--max-total-tokens)")
    parser.add_argument("--max-tokens", type=int, default=16, help="output tokens per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="1 rate, 20 s, 3 policies")
    parser.add_argument("--out", default="results/policies.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.rates, args.duration, args.warmup, args.repeats = "0.3", 20.0, 10.0, 1
        args.policies = "load_aware,cache_aware,smg:cache_aware"
    args.rates = [float(r) for r in args.rates.split(",")]
    args.policies = args.policies.split(",")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # SIGTERM runs the clean-up below (stopping workers and routers) instead of orphaning them
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    workload, info = build_workload(args)
    path, served = models.resolve(args.model)
    ncpu = os.cpu_count() or 1
    workers = [WorkerProcess(WorkerConfig(
        model_path=path, port=free_port(), served_model_name=served, device="cpu",
        cpus=str(i % ncpu), max_total_tokens=args.kv_tokens, max_running_requests=16),
        log_path=os.path.join(ROOT, "logs", "bench", f"policies-worker-{i}.log"))
        for i in range(args.workers)]
    policies = list(args.policies)
    if shutil.which("smg") is None and shutil.which(
            "smg", path=os.path.dirname(sys.executable)) is None:
        log("smg not installed (pip install -r requirements/bench.txt): its policies skipped")
        policies = [p for p in policies if not p.startswith("smg:")]
    runs: dict[tuple[str, float], list[dict[str, Any]]] = collections.defaultdict(list)
    total = args.repeats * len(args.rates) * len(policies)
    done = 0
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.wait_ready(600)
        log(f"{len(workers)} {served} workers up; {len(workload)} requests over "
            f"{info['prefixes']} shared prefixes (trace counts {info['prefix_counts_in_trace']})")
        for repeat in range(args.repeats):
            order = policies[repeat % len(policies):] + policies[:repeat % len(policies)]
            for rate in args.rates:
                for name in order:
                    done += 1
                    log(f"[{done}/{total}] repeat {repeat + 1}, {name} @ {rate}/s "
                        f"({args.duration:.0f} s)")
                    run = run_once(name, workers, served, rate, args.seed + repeat, workload,
                                   args)
                    runs[(name, rate)].append(run)
                    ok = [r for r in run["results"] if r["ok"]]
                    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
                    log(f"    {len(ok)}/{len(run['results'])} ok, TTFT p50 "
                        f"{_fmt(pct(ttft, 0.5))}, per worker {run['requests_per_worker']}")
    finally:
        for w in workers:
            w.stop()
    rows = [summarise(name, rate, runs[(name, rate)])
            for name in policies for rate in args.rates if runs[(name, rate)]]
    result = {"benchmark": "policies", "date": datetime.datetime.now(datetime.UTC).isoformat(
        timespec="seconds"), "nproc": ncpu, "config": {k: v for k, v in vars(args).items()},
        "workload": info, "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    plot(rows, os.path.splitext(args.out)[0] + ".png")
    for row in rows:
        print(f"policies: {row['policy']:18} rate {row['rate']:4.2f}/s  "
              f"{row['throughput_rps']:.2f} req/s  TTFT p50 {_fmt(row['ttft_p50_s'])} "
              f"p99 {_fmt(row['ttft_p99_s'])}  E2E p99 {_fmt(row['e2e_p99_s'])}  "
              f"imbalance {_fmt(row['imbalance'], '', 2)}  cache hit "
              f"{_fmt(row['cache_hit'], '', 2)}  ({row['ok']}/{row['sent']} ok)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
