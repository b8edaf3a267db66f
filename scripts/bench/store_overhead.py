"""What attaching the global KV store costs a worker when the store serves nothing (issue 21,
item 1), taken apart one setting at a time.

  python -m scripts.bench.store_overhead [--arms plain,page64,l2,kvstore,...] [--rate 1.5]
                                         [--duration 60] [--repeats 3] [--out FILE]

One real SGLang CPU worker (SmolLM2, pinned to core 0; the store and this client on core 1)
gets the same open-loop Poisson stream of unique prompts (no prefix is ever repeated, so no
cache tier can help) under each arm; arms run one after another with a fresh worker each, in
an order rotated per repeat. Arms (``--arms``), each adding one thing to the one before:

- ``plain``: SGLang's radix cache, page size 1 (what a worker without the store runs);
- ``page64``: the same with ``--page-size 64`` (the store's page size until this benchmark);
- ``page16``: the same with ``--page-size 16``;
- ``l2``: HiCache with a 1 GB host tier, no store (``write_through``: every prefill is copied
  to the host tier);
- ``kvstore``: the launcher's ``--kvstore`` worker as it was before this benchmark (HiCache
  plus BanaServe's store; ``write_through``, prefetch policy ``timeout``);
- ``kvstore-best-effort``: ``kvstore`` with prefetch policy ``best_effort`` (a request never
  waits in the queue for a store lookup);
- ``kvstore-selective``: ``kvstore`` with ``write_through_selective`` (a prefix is copied to
  the host tier and the store only once it has been hit);
- ``kvstore-page16``, ``kvstore-page16-best-effort``, ``kvstore-page16-selective``:
  ``kvstore``, ``kvstore-best-effort`` and ``kvstore-selective`` with 16-token pages;
- ``kvstore-page16-noquery``: ``kvstore-page16`` that never asks the store for a prefix
  (prefetch threshold 2^20 tokens): what the per-request storage query costs;
- ``kvstore-launcher``: the worker ``runtime_patches.launch`` starts for ``--kvstore`` now,
  with no override (whatever its current defaults are).

Reported per arm (percentiles pool the repeats; throughput is the median run): TTFT p50/p99,
TPOT p50, E2E p99, output tokens/s, the worker's CPU seconds per request (all its processes and
threads), the store's CPU seconds, and the prompt tokens served from each cache tier (device,
host, storage: all near 0 by construction, which is checked). JSON and a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from runtime_patches import models
from runtime_patches.launch import WorkerConfig, WorkerProcess
from scripts.bench import policies
from scripts.bench.kvstore_e2e import TIERS, worker_counters
from scripts.bench.l3 import SharedL3
from scripts.bench.procs import can_pin, cpu_seconds, free_port

ROOT = policies.ROOT
PAGE = 64


@dataclass(frozen=True)
class Arm:
    name: str
    backend: str
    """``SharedL3`` backend: ``none``, ``l2`` or ``kvstore``."""
    extra: tuple[str, ...] = ()
    """SGLang flags appended last (they override the arm's defaults)."""
    launcher: bool = False
    """Start the store worker through ``WorkerConfig.kvstore`` (the launcher's defaults)."""
    page: int = PAGE
    """Tokens per KV page of a HiCache arm (``--page-size``; the store keys one page each)."""
    prefetch_threshold: int = 64
    """Shortest uncached prompt suffix, in tokens, for which the worker asks the store."""


ARMS = {arm.name: arm for arm in (
    Arm("plain", "none"),
    Arm("page64", "none", ("--page-size", str(PAGE))),
    Arm("l2", "l2", ("--hicache-write-policy", "write_through")),
    Arm("kvstore", "kvstore", ("--hicache-write-policy", "write_through",
                               "--hicache-storage-prefetch-policy", "timeout")),
    Arm("kvstore-best-effort", "kvstore", ("--hicache-write-policy", "write_through",
                                           "--hicache-storage-prefetch-policy", "best_effort")),
    Arm("kvstore-selective", "kvstore", ("--hicache-write-policy", "write_through_selective",
                                         "--hicache-storage-prefetch-policy", "timeout")),
    Arm("page16", "none", ("--page-size", "16")),
    Arm("kvstore-page16", "kvstore", ("--hicache-write-policy", "write_through",
                                      "--hicache-storage-prefetch-policy", "timeout"), page=16),
    Arm("kvstore-page16-best-effort", "kvstore", (
        "--hicache-write-policy", "write_through",
        "--hicache-storage-prefetch-policy", "best_effort"), page=16),
    Arm("kvstore-page16-selective", "kvstore", (
        "--hicache-write-policy", "write_through_selective",
        "--hicache-storage-prefetch-policy", "timeout"), page=16),
    Arm("kvstore-page16-noquery", "kvstore", ("--hicache-write-policy", "write_through"),
        page=16, prefetch_threshold=1 << 20),
    Arm("kvstore-launcher", "kvstore", (), launcher=True),
)}


def log(message: str) -> None:
    print(f"[store_overhead] {message}", file=sys.stderr, flush=True)


def workload(count: int, words: int, max_tokens: int, seed: int) -> list[dict[str, Any]]:
    """``count`` prompts of ``words`` words that share nothing but the chat template."""
    rng = random.Random(seed)
    return [{"messages": [{"role": "user", "content": policies.block_text(
        rng.randrange(1 << 40), words) + f"\nQuestion {i}: summarise the text above."}],
        "max_tokens": max_tokens} for i in range(count)]


def steal_seconds(cpu: int = 0) -> float:
    """Time the hypervisor gave ``cpu`` to someone else (``/proc/stat`` steal), seconds: on a
    VM, the share of a run the worker's core was not ours."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                return int(line.split()[8]) / os.sysconf("SC_CLK_TCK")
    return 0.0


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and every descendant (SGLang's scheduler and detokenizer)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += cpu_seconds(p)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


async def stream(session: aiohttp.ClientSession, url: str, model: str,
                 req: dict[str, Any]) -> dict[str, Any]:
    """One streamed chat completion: TTFT, end-to-end, output tokens (one per chunk)."""
    body = {"model": model, "messages": req["messages"], "max_tokens": req["max_tokens"],
            "stream": True, "temperature": 0, "ignore_eos": True}
    started = time.perf_counter()
    ttft, chunks = None, 0
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                return {"ok": False, "why": f"http {resp.status}"}
            done = False
            async for line in resp.content:
                if line.startswith(b"data: [DONE]"):
                    done = True
                elif line.startswith(b"data:") and b'"content"' in line:
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - started
    except (aiohttp.ClientError, TimeoutError) as exc:
        return {"ok": False, "why": type(exc).__name__}
    e2e = time.perf_counter() - started
    return {"ok": done and ttft is not None, "why": None if done else "no [DONE]", "ttft": ttft,
            "e2e": e2e, "tokens": chunks,
            "tpot": (e2e - ttft) / (chunks - 1) if ttft is not None and chunks > 1 else None}


async def open_loop(url: str, model: str, reqs: list[dict[str, Any]], rate: float,
                    seed: int) -> tuple[list[dict[str, Any]], float]:
    """Poisson arrivals at ``rate`` until ``reqs`` are all sent; results and wall seconds."""
    rng = random.Random(seed)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900),
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        started = time.perf_counter()
        tasks, at = [], 0.0
        for req in reqs:
            await asyncio.sleep(max(0.0, started + at - time.perf_counter()))
            tasks.append(asyncio.create_task(stream(session, url, model, req)))
            at += rng.expovariate(rate)
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - started


def run_arm(arm: Arm, path: str, served: str, args: argparse.Namespace, scratch: str,
            measured: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    store = SharedL3(arm.backend, scratch, arm.page, arm.prefetch_threshold,
                     store_cpus="1" if can_pin() else None, tag="store_overhead")
    extra = [*(store.worker_args() if not arm.launcher else ()), "--enable-cache-report",
             *arm.extra]
    cfg = WorkerConfig(
        model_path=path, port=free_port(), served_model_name=served, device="cpu",
        cpus="0" if can_pin() else None, max_total_tokens=args.kv_tokens,
        max_running_requests=args.max_running,
        kvstore=f"127.0.0.1:{store.port}" if arm.launcher else None,
        kvstore_page_size=arm.page, extra_args=tuple(extra))
    worker = WorkerProcess(cfg, log_path=os.path.join(
        ROOT, "logs", "bench", f"store_overhead-{arm.name}.log"))
    with store.serving([worker]):
        warm = workload(6, args.words, 4, seed=10_000 + seed)
        asyncio.run(open_loop(worker.url, served, warm, 100.0, 0))
        asyncio.run(open_loop(worker.url, served, warm[:2], 100.0, 0))
        policies.flush(worker.url)
        before = worker_counters(worker.url)
        pid = worker.pid
        assert pid is not None
        cpu0, steal0 = tree_cpu_seconds(pid), steal_seconds()
        store_cpu0 = tree_cpu_seconds(store.proc.pid) if store.proc is not None else 0.0
        results, seconds = asyncio.run(open_loop(worker.url, served, measured, args.rate, seed))
        cpu, steal = tree_cpu_seconds(pid) - cpu0, steal_seconds() - steal0
        store_cpu = (tree_cpu_seconds(store.proc.pid) - store_cpu0
                     if store.proc is not None else 0.0)
        after = worker_counters(worker.url)
        stored = store.pages() if store.is_kvstore else 0
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    return {"arm": arm.name, "results": results, "seconds": seconds, "worker_cpu_s": cpu,
            "steal_s": steal,
            "store_cpu_s": store_cpu, "store_pages": stored,
            "prompt_tokens": delta.get("prompt_tokens_total", 0.0),
            "cached_by_tier": {t: delta.get(f"cached_{t}", 0.0) for t in TIERS}}


def summarise(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    results = [r for run in runs for r in run["results"]]
    ok = [r for r in results if r["ok"]]
    pct = policies.pct
    tokens = [sum(r.get("tokens", 0) for r in run["results"] if r["ok"]) / run["seconds"]
              for run in runs]
    prompt = sum(run["prompt_tokens"] for run in runs)
    return {
        "arm": name, "repeats": len(runs), "sent": len(results), "ok": len(ok),
        "ttft_p50_s": pct([r["ttft"] for r in ok], 0.5),
        "ttft_p99_s": pct([r["ttft"] for r in ok], 0.99),
        "ttft_p50_runs": [pct([r["ttft"] for r in run["results"] if r["ok"]], 0.5)
                          for run in runs],
        "ttft_p99_runs": [pct([r["ttft"] for r in run["results"] if r["ok"]], 0.99)
                          for run in runs],
        "tpot_p50_s": pct([r["tpot"] for r in ok if r["tpot"] is not None], 0.5),
        "e2e_p99_s": pct([r["e2e"] for r in ok], 0.99),
        "output_tok_s": statistics.median(tokens), "output_tok_s_runs": tokens,
        "worker_cpu_s_per_request": statistics.median(
            run["worker_cpu_s"] / max(1, len(run["results"])) for run in runs),
        "store_cpu_s": statistics.median(run["store_cpu_s"] for run in runs),
        "steal_share_runs": [run.get("steal_s", 0.0) / run["seconds"] for run in runs],
        "store_pages": [run["store_pages"] for run in runs],
        "hit_by_tier": {t: (sum(run["cached_by_tier"][t] for run in runs) / prompt
                            if prompt else None) for t in TIERS},
        "failures": sorted({r["why"] for r in results if not r["ok"]})}


def plot(rows: list[dict[str, Any]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return
    keys = ("ttft_p50_s", "ttft_p99_s", "output_tok_s", "worker_cpu_s_per_request")
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 4))
    names = [r["arm"] for r in rows]
    for ax, key in zip(axes, keys, strict=True):
        ax.bar(names, [r[key] or 0 for r in rows])
        ax.set_title(key)
        ax.tick_params(axis="x", rotation=60, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    log(f"plot: {path}")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default="plain,page64,l2,kvstore,kvstore-best-effort",
                        help=f"comma-separated, from: {', '.join(ARMS)}")
    parser.add_argument("--model", default="smollm2", help="prepared model name or folder")
    parser.add_argument("--rate", type=float, default=1.0, help="requests per second")
    parser.add_argument("--requests", type=int, default=60, help="measured requests per run")
    parser.add_argument("--words", type=int, default=250,
                        help="words per prompt (250 words is about 330 SmolLM2 tokens)")
    parser.add_argument("--max-tokens", type=int, default=32, help="output tokens per request")
    parser.add_argument("--kv-tokens", type=int, default=8192, help="device KV pool, tokens")
    parser.add_argument("--max-running", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/bench/store_overhead.json")
    args = parser.parse_args(argv)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arm(s) {', '.join(unknown)} (one of {', '.join(ARMS)})")
    if args.rate <= 0 or args.requests <= 0 or args.repeats <= 0:
        parser.error("--rate, --requests and --repeats must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    path, served = models.resolve(args.model)
    scratch = tempfile.mkdtemp(prefix="store-overhead-")
    runs: dict[str, list[dict[str, Any]]] = {a: [] for a in args.arms}
    total, done = len(args.arms) * args.repeats, 0
    try:
        for repeat in range(args.repeats):
            k = repeat % len(args.arms)
            order = args.arms[k:] + args.arms[:k]
            measured = workload(args.requests, args.words, args.max_tokens, args.seed + repeat)
            for name in order:
                done += 1
                log(f"[{done}/{total}] {name}, repeat {repeat + 1}")
                run = run_arm(ARMS[name], path, served, args, scratch, measured,
                              args.seed + repeat)
                runs[name].append(run)
                ok = [r for r in run["results"] if r["ok"]]
                log(f"    {len(ok)}/{len(run['results'])} ok, TTFT p50 "
                    f"{policies._fmt(policies.pct([r['ttft'] for r in ok], 0.5))} p99 "
                    f"{policies._fmt(policies.pct([r['ttft'] for r in ok], 0.99))}, worker "
                    f"CPU {run['worker_cpu_s']:.1f} s, core 0 stolen {run['steal_s']:.1f} s, "
                    f"cached {run['cached_by_tier']}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = [summarise(name, runs[name]) for name in args.arms if runs[name]]
    result = {"benchmark": "store_overhead",
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "nproc": os.cpu_count(), "config": vars(args),
              "arms": {name: {"backend": ARMS[name].backend, "extra": list(ARMS[name].extra),
                              "launcher": ARMS[name].launcher, "page": ARMS[name].page}
                       for name in args.arms},
              "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    plot(rows, os.path.splitext(args.out)[0] + ".png")
    fmt = policies._fmt
    base = rows[0]
    for row in rows:
        rel = (row["ttft_p50_s"] / base["ttft_p50_s"]
               if row["ttft_p50_s"] and base["ttft_p50_s"] else None)
        print(f"store_overhead: {row['arm']:20} TTFT p50 {fmt(row['ttft_p50_s'])} "
              f"(x{fmt(rel, '', 2)} of {base['arm']}) p99 {fmt(row['ttft_p99_s'])}  TPOT p50 "
              f"{fmt(row['tpot_p50_s'])}  {row['output_tok_s']:.1f} tok/s  worker CPU "
              f"{row['worker_cpu_s_per_request']:.2f} s/req  store CPU "
              f"{row['store_cpu_s']:.1f} s  cached {row['hit_by_tier']}  "
              f"({row['ok']}/{row['sent']} ok)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
