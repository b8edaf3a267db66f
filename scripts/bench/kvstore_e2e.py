"""BanaServe's central claim, end to end: load-only dispatch plus a global KV store against
cache-aware dispatch without one, on real SGLang CPU workers.

  python -m scripts.bench.kvstore_e2e [--quick] [--configs A,B] [--rates 0.3,0.6] [--out FILE]

Same workload and open-loop replay as ``scripts.bench.policies`` (shared prefixes with the
Mooncake trace's skewed popularity; see that module). Configurations (``--configs``):

- ``cache_aware``: workers without HiCache, BanaServe's router with ``cache_aware`` (prefix
  affinity): the best a router can do without a shared store.
- ``load_aware``: the same workers, ``load_aware`` dispatch (no affinity, no store).
- ``load_aware+l2``: HiCache with each worker's own host (L2) tier and no shared L3, to separate
  what the bigger private cache buys from what sharing buys.
- ``load_aware+kvstore``: HiCache with BanaServe's kvstore (``python -m kvstore``, memory tier)
  as every worker's shared L3.
- ``load_aware+file``: HiCache with SGLang's own ``file`` L3 on one shared directory.
- ``load_aware+mooncake``: HiCache with SGLang's ``mooncake`` L3 (``mooncake_master`` on
  loopback, TCP transport, each worker contributing a memory segment).

Every HiCache configuration uses the same page size (16 tokens: prefix matching is
page-granular, and a 64-token page would leave about 30 tokens of every prefix to recompute),
host tier (1 GB), prefetch threshold (64 tokens) and prefetch policy (SGLang's default,
``timeout``). Workers without HiCache keep SGLang's page size of 1. Before each run the
workers are flushed and the shared store emptied (kvstore: restarted; file: directory emptied;
mooncake: SGLang's ``/hicache/storage-backend/clear``), so every run starts cold and warms up
under its own configuration for ``--warmup`` seconds before ``--duration`` measured seconds.

Reported per configuration and rate: throughput, TTFT p50/p99, end-to-end p99, prefill tokens
computed per request (prompt tokens minus those served from any cache tier), the share of prompt
tokens served from each tier (device, host, storage), and imbalance. JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__)))))

from runtime_patches import models  # noqa: E402
from runtime_patches.launch import WorkerConfig, WorkerProcess  # noqa: E402
from scripts.bench import policies  # noqa: E402
from scripts.bench.l3 import BACKENDS, SharedL3  # noqa: E402
from scripts.bench.router_overhead import free_port  # noqa: E402

ROOT = policies.ROOT
PAGE_SIZE = 16
PREFETCH_THRESHOLD = 64
TIERS = ("device", "host", "storage")


def log(message: str) -> None:
    print(f"[kvstore_e2e] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Config:
    name: str
    policy: str
    backend: str

    @classmethod
    def parse(cls, name: str) -> Config:
        policy, _, backend = name.partition("+")
        backend = backend or "none"
        if backend not in BACKENDS:
            raise SystemExit(f"kvstore_e2e: unknown backend {backend!r} in {name!r} "
                             f"(one of {', '.join(BACKENDS[1:])})")
        return cls(name, policy, backend)


_SAMPLE = re.compile(r'^(sglang:[a-z_]+)(?:\{([^}]*)\})? ([0-9.e+-]+)$', re.M)


def worker_counters(url: str) -> dict[str, float]:
    """Request, prompt and cached-token counters (cached split by tier) of one worker."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = collections.defaultdict(float)
    for name, labels, value in _SAMPLE.findall(text):
        short = name.removeprefix("sglang:")
        if short in ("num_requests_total", "prompt_tokens_total"):
            out[short] += float(value)
        elif short == "cached_tokens_total":
            source = re.search(r'cache_source="([a-z]+)"', labels or "")
            tier = source.group(1) if source else "total"
            out[f"cached_{tier}"] += float(value)
    return dict(out)


def warm_workers(workers: list[WorkerProcess], served: str) -> None:
    """A freshly started CPU worker's first prefills of each new length are several times slower
    (one-time kernel set-up): send each worker a few prompts of the workload's sizes directly,
    then flush, before anything is measured."""
    async def warm(url: str) -> None:
        import aiohttp

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            for words in (50, 150, 300, 400):
                text = policies.block_text(-words, words)
                await policies.one_request(session, url, served, {
                    "messages": [{"role": "user", "content": text}], "max_tokens": 4})

    async def warm_all() -> None:
        await asyncio.gather(*(warm(w.url) for w in workers))

    asyncio.run(warm_all())
    for w in workers:
        policies.flush(w.url)


def run_once(cfg: Config, store: SharedL3, workers: list[WorkerProcess], served: str,
             rate: float, seed: int, workload: list[dict[str, Any]],
             args: argparse.Namespace) -> dict[str, Any]:
    urls = [w.url for w in workers]
    proc, url = policies.start_router(cfg.policy, urls)
    try:
        asyncio.run(policies.open_loop(url, served, policies.WARMUP, 2.0, 2.0, seed=99))
        for w in urls:
            policies.flush(w)
        store.empty(urls)
        results, seconds, before = asyncio.run(policies.open_loop(
            url, served, workload, rate, args.duration, seed, warmup=args.warmup,
            at_warmup=lambda: {w: worker_counters(w) for w in urls}))
        after = {w: worker_counters(w) for w in urls}
    finally:
        proc.terminate()
        proc.wait(10)
    keys = set().union(*(after[w].keys() for w in urls))
    delta = {k: [after[w].get(k, 0.0) - before[w].get(k, 0.0) for w in urls] for k in keys}
    cached = {tier: sum(delta.get(f"cached_{tier}", [0.0])) for tier in TIERS}
    total_cached = sum(delta.get("cached_total", [0.0])) or sum(cached.values())
    return {"results": results, "seconds": seconds,
            "requests_per_worker": delta["num_requests_total"],
            "prompt_tokens": sum(delta["prompt_tokens_total"]), "cached_tokens": total_cached,
            "cached_by_tier": cached}


def summarise(cfg: Config, rate: float, runs: list[dict[str, Any]]) -> dict[str, Any]:
    row = policies.summarise(cfg.name, rate, runs)
    prompt = sum(run["prompt_tokens"] for run in runs)
    requests = sum(sum(run["requests_per_worker"]) for run in runs)
    computed = prompt - sum(run["cached_tokens"] for run in runs)
    row.update({
        "config": cfg.name, "backend": cfg.backend,
        "prefill_tokens_computed": computed,
        "prefill_tokens_per_request": computed / requests if requests else None,
        "prompt_tokens_per_request": prompt / requests if requests else None,
        "hit_by_tier": {tier: (sum(run["cached_by_tier"][tier] for run in runs) / prompt
                               if prompt else None) for tier in TIERS}})
    return row


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="cache_aware,load_aware,load_aware+kvstore,"
                        "load_aware+file,load_aware+mooncake",
                        help="comma-separated POLICY[+BACKEND], BACKEND one of l2, kvstore, "
                             "file, mooncake")
    parser.add_argument("--model", default="smollm2", help="prepared model name or folder")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rates", default="0.1,0.2",
                        help="request rates, req/s (on the 2-vCPU AMD EPYC VM of 2026-11-30 a "
                             "cold 320-token SmolLM2 prefill took about 8.5 s)")
    parser.add_argument("--duration", type=float, default=180.0,
                        help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=60.0, help="unmeasured seconds first")
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration and rate")
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--prefixes", type=int, default=16)
    parser.add_argument("--prefix-blocks", type=int, default=4)
    parser.add_argument("--block-tokens", type=int, default=32,
                        help="words per trace block (a prefix of 4 blocks is about 290 tokens)")
    parser.add_argument("--kv-tokens", type=int, default=4096,
                        help="each worker's device KV pool (--max-total-tokens)")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="one rate, 20 s, cache_aware against load_aware+kvstore")
    parser.add_argument("--out", default="results/kvstore_e2e.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.rates, args.duration, args.warmup = "0.1", 40.0, 20.0
        args.configs = "cache_aware,load_aware+kvstore"
    args.rates = [float(r) for r in args.rates.split(",")]
    args.configs = [Config.parse(c) for c in args.configs.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    workload, info = policies.build_workload(args)
    path, served = models.resolve(args.model)
    ncpu = os.cpu_count() or 1
    scratch = tempfile.mkdtemp(prefix="kvstore-e2e-")
    runs: dict[tuple[str, float], list[dict[str, Any]]] = collections.defaultdict(list)
    total = len(args.configs) * len(args.rates) * args.repeats
    done = 0
    try:
        for cfg in args.configs:
            store = SharedL3(cfg.backend, scratch, PAGE_SIZE, PREFETCH_THRESHOLD,
                             tag="kvstore_e2e")
            workers = [WorkerProcess(WorkerConfig(
                model_path=path, port=free_port(), served_model_name=served, device="cpu",
                cpus=str(i % ncpu), max_total_tokens=args.kv_tokens, max_running_requests=16,
                extra_args=tuple(store.worker_args())),
                log_path=os.path.join(ROOT, "logs", "bench", f"kvstore_e2e-worker-{i}.log"))
                for i in range(args.workers)]
            with store.serving(workers):
                warm_workers(workers, served)
                log(f"{cfg.name}: {len(workers)} {served} workers up and warmed")
                for repeat in range(args.repeats):
                    for rate in args.rates:
                        done += 1
                        log(f"[{done}/{total}] {cfg.name} @ {rate}/s, repeat {repeat + 1}")
                        run = run_once(cfg, store, workers, served, rate, args.seed + repeat,
                                       workload, args)
                        runs[(cfg.name, rate)].append(run)
                        ok = [r for r in run["results"] if r["ok"]]
                        ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
                        log(f"    {len(ok)}/{len(run['results'])} ok, TTFT p50 "
                            f"{policies._fmt(policies.pct(ttft, 0.5))}, cached by tier "
                            f"{run['cached_by_tier']} of {run['prompt_tokens']:.0f} prompt "
                            f"tokens")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = [summarise(cfg, rate, runs[(cfg.name, rate)])
            for cfg in args.configs for rate in args.rates if runs[(cfg.name, rate)]]
    result = {"benchmark": "kvstore_e2e", "date": datetime.datetime.now(datetime.UTC).isoformat(
        timespec="seconds"), "nproc": ncpu,
        "config": {**vars(args), "configs": [c.name for c in args.configs]},
        "page_size": PAGE_SIZE, "prefetch_threshold": PREFETCH_THRESHOLD, "workload": info,
        "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    policies.plot(rows, os.path.splitext(args.out)[0] + ".png",
                  ("ttft_p50_s", "ttft_p99_s", "prefill_tokens_per_request", "throughput_rps"),
                  series="config")
    fmt = policies._fmt
    for row in rows:
        tiers = " ".join(f"{t} {fmt(row['hit_by_tier'][t], '', 2)}" for t in TIERS)
        print(f"kvstore_e2e: {row['config']:20} rate {row['rate']:4.2f}/s  "
              f"{row['throughput_rps']:.2f} req/s  TTFT p50 {fmt(row['ttft_p50_s'])} "
              f"p99 {fmt(row['ttft_p99_s'])}  E2E p99 {fmt(row['e2e_p99_s'])}  prefill "
              f"{fmt(row['prefill_tokens_per_request'], ' tok/req', 0)}  hit {tiers}  "
              f"imbalance {fmt(row['imbalance'], '', 2)}  ({row['ok']}/{row['sent']} ok)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
