"""Attention (head) offload: decode step time against the share of KV heads offloaded and the
bytes exchanged per step, the KV capacity gained, and the end-to-end effect of the router's
rebalancer on a workload that overloads one instance's KV memory.

Part 1, one SGLang CPU worker (core 0) and one head host (core 1), SmolLM2-135M by default
(30 layers x 3 KV heads = 90 head-layers): for each --fractions share f, f x 90 head-layers are
offloaded (the last KV heads of each layer, spread evenly), then --batch streamed requests of
--decode-tokens tokens run at once: ms per output token (decode only), the bytes the worker and
the host exchanged per decode step, and the pool's tokens against the original pool.

Part 2, two workers behind the router (round_robin, so each gets half of the requests; with
--hot-only every request goes straight to A and B only hosts heads): A on
core 0 with a small pool (--hot-pool tokens), B on core 1 with a large one (--cold-pool) and a
head host beside it on core 1. --requests streamed requests arrive at --rate per second. Run
once with the router's rebalancer off and once with ``--rebalance`` (same workers, cache
flushed and offloads recalled in between): p50/p99 time per output token, p50/p99 time to
first token, output tokens/s, and the rebalancer's decisions.

Writes JSON (machine, every run) to --out (default results/head_offload.json), a plot to
--plot, and prints one line per measurement.

  .venv/bin/python -m scripts.bench.head_offload [--model smollm2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if __package__ in (None, ""):
    sys.path.insert(0, ROOT)

from runtime_patches import models  # noqa: E402
from runtime_patches.launch import WorkerConfig, WorkerProcess  # noqa: E402
from runtime_patches.migration.host_process import LayerHostConfig, LayerHostProcess  # noqa: E402
from scripts.bench.layer_migration import prompts  # noqa: E402
from scripts.bench.procs import free_port, log, wait_http  # noqa: E402
from tests.integration.cluster import http_json  # noqa: E402
from tests.integration.sse import SSEStream  # noqa: E402


def plan(num_layers: int, num_kv_heads: int, fraction: float) -> list[tuple[list[int], list[int]]]:
    """Offload requests for ``fraction`` of all head-layers: layer i gets n_i of its last KV
    heads, with n_i as even as possible; consecutive layers with the same n_i share one offload.
    Every layer keeps at least one KV head."""
    total = round(fraction * num_layers * num_kv_heads)
    base, extra = divmod(total, num_layers)
    counts = [min(num_kv_heads - 1, base + (1 if i < extra else 0)) for i in range(num_layers)]
    out: list[tuple[list[int], list[int]]] = []
    for i, n in enumerate(counts):
        if n == 0:
            continue
        heads = list(range(num_kv_heads - n, num_kv_heads))
        if out and out[-1][1] == heads and out[-1][0][-1] == i - 1:
            out[-1][0].append(i)
        else:
            out.append(([i], heads))
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def stream_timing(url: str, body: dict[str, Any]) -> dict[str, float]:
    """Send ``body`` to ``url``/v1/completions streamed: start, first and last token times."""
    started = time.perf_counter()
    stamps = []
    # A hot worker's queue can hold a request for minutes before its first token (12 requests of
    # 256 tokens, 2 at a time): allow what the rest of the benchmark allows.
    for data in SSEStream(url, "/v1/completions", body, timeout=900).events():
        if data == "[DONE]":
            break
        if "error" in data[:40]:
            raise RuntimeError(f"stream error: {data[:300]}")
        stamps.append(time.perf_counter())
    return {"ttft": stamps[0] - started, "tokens": len(stamps),
            "tpot": (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else 0.0,
            "end": stamps[-1]}


class Worker:
    def __init__(self, proc: WorkerProcess, served: str) -> None:
        self.proc, self.served = proc, served

    @property
    def url(self) -> str:
        return self.proc.url

    def call(self, method: str, path: str, body: Any = None) -> Any:
        status, out, _ = http_json(method, self.url + path, body, timeout=900)
        if status not in (200, 202):
            raise RuntimeError(f"{path}: {status} {out}")
        return out

    def body(self, prompt: str, tokens: int) -> dict[str, Any]:
        return {"model": self.served, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
                "ignore_eos": True, "stream": True}

    def recall_all(self) -> None:
        """Recall every head offload and restore every migrated range (a rebalancer may have
        left either), waiting for drains to finish."""
        deadline = time.monotonic() + 300
        while True:
            status = self.call("GET", "/banaserve/status")
            if not status["heads"]["offloads"] and not status["ranges"]:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("recall / restore did not finish")
            if status["heads"]["offloads"]:
                self.call("POST", "/banaserve/recall_heads", {})
            if status["ranges"]:
                self.call("POST", "/banaserve/restore_layers", {})
            time.sleep(0.5)


def part_decode(args: argparse.Namespace, path: str, served: str) -> list[dict[str, Any]]:
    ncpu = os.cpu_count() or 1
    host = LayerHostProcess(LayerHostConfig(port=free_port(), cpus=[1 % ncpu]),
                            log_path="logs/bench/head-host.log")
    proc = WorkerProcess(WorkerConfig(
        model_path=path, port=free_port(), served_model_name=served, device="cpu", cpus="0",
        max_total_tokens=args.max_total_tokens, layer_hosts=(("idle", host.address),)),
        log_path="logs/bench/head-worker.log")
    worker = Worker(proc, served)
    rows: list[dict[str, Any]] = []
    host.start()
    proc.start()
    try:
        host.wait_ready()
        proc.wait_ready(600)
        status = worker.call("GET", "/banaserve/status")
        num_layers, num_kv = status["num_layers"], status["heads"]["num_kv_heads"]
        base_pool = status["kv"]["pool_tokens"]
        batch = prompts(args.seed, args.batch, 12)
        for p in batch:  # warm-up: one untimed pass, and one untimed offload/recall
            stream_timing(worker.url, worker.body(p, 8))
        worker.call("POST", "/banaserve/offload_heads",
                    {"layers": [0], "heads": [num_kv - 1], "target": "idle"})
        worker.recall_all()
        for rep in range(args.repeats):
            for fraction in args.fractions:
                worker.call("POST", "/flush_cache?timeout=30")
                offloads = [worker.call("POST", "/banaserve/offload_heads",
                                        {"layers": layers, "heads": heads, "target": "idle"})
                            for layers, heads in plan(num_layers, num_kv, fraction)]
                status = worker.call("GET", "/banaserve/status")
                offloaded = sum(len(o["layers"]) * len(o["heads"])
                                for o in status["heads"]["offloads"])
                before = sum(o["attention"]["bytes_exchanged"]
                             for o in status["heads"]["offloads"])
                with ThreadPoolExecutor(len(batch)) as pool:
                    timings = list(pool.map(lambda p: stream_timing(
                        worker.url, worker.body(p, args.decode_tokens)), batch))
                after = worker.call("GET", "/banaserve/status")
                exchanged = sum(o["attention"]["bytes_exchanged"]
                                for o in after["heads"]["offloads"]) - before
                steps = args.decode_tokens  # the batch decodes together: one step per token
                row = {"repeat": rep, "fraction": fraction,
                       "head_layers_offloaded": offloaded,
                       "head_layers_total": num_layers * num_kv, "batch": len(batch),
                       "ms_per_token": 1000 * statistics.mean(t["tpot"] for t in timings),
                       "bytes_per_step": exchanged / steps,
                       "pool_tokens": status["kv"]["pool_tokens"], "base_pool_tokens": base_pool,
                       "offload_seconds": sum(o["offload_seconds"] for o in offloads),
                       "kv_bytes_moved": sum(o["kv_bytes_moved"] for o in offloads)}
                worker.recall_all()
                rows.append(row)
                log(f"{100 * offloaded / (num_layers * num_kv):4.1f}% of head-layers offloaded: "
                    f"{row['ms_per_token']:.1f} ms/token (batch {len(batch)}), "
                    f"{row['bytes_per_step'] / 1e3:.1f} KB exchanged per step, pool "
                    f"{row['pool_tokens']} tokens (was {base_pool})")
    finally:
        proc.stop()
        host.stop()
    return rows


def start_router(urls: list[str], rebalance: bool, args: argparse.Namespace,
                 tag: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    argv = [sys.executable, "-m", "router", "--workers", *urls, "--port", str(port),
            "--policy", "round_robin", "--log-level", "info"]
    if rebalance:
        argv += ["--rebalance", *args.rebalance_args.split()]
    os.makedirs("logs/bench", exist_ok=True)
    with open(f"logs/bench/head-router-{tag}.log", "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)
    wait_http(f"http://127.0.0.1:{port}/health", timeout_s=120, proc=proc)
    return proc, f"http://127.0.0.1:{port}"


def part_rebalance(args: argparse.Namespace, path: str, served: str) -> list[dict[str, Any]]:
    ncpu = os.cpu_count() or 1
    cold_host = LayerHostProcess(LayerHostConfig(port=free_port(), cpus=[1 % ncpu],
                                                 warm_model=path),
                                 log_path="logs/bench/head-cold-host.log")
    hot = WorkerProcess(WorkerConfig(
        model_path=path, port=free_port(), served_model_name=served, device="cpu", cpus="0",
        max_total_tokens=args.hot_pool, layer_hosts=(("cold", cold_host.address),)),
        log_path="logs/bench/head-hot.log")
    cold = WorkerProcess(WorkerConfig(
        model_path=path, port=free_port(), served_model_name=served, device="cpu",
        cpus=str(1 % ncpu), max_total_tokens=args.cold_pool,
        own_layer_host=cold_host.address), log_path="logs/bench/head-cold.log")
    workers = [Worker(hot, served), Worker(cold, served)]
    rows: list[dict[str, Any]] = []
    cold_host.start()
    hot.start()
    cold.start()
    try:
        cold_host.wait_ready()
        hot.wait_ready(600)
        cold.wait_ready(600)
        batch = prompts(args.seed + 3, args.requests, args.prompt_words)
        for rep in range(args.repeats):
            for rebalance in (False, True):
                for w in workers:
                    w.recall_all()
                    w.call("POST", "/flush_cache?timeout=30")
                router, url = start_router([hot.url, cold.url], rebalance, args,
                                           f"{'on' if rebalance else 'off'}-{rep}")
                try:
                    # --hot-only: straight to the hot worker (the cold one idle but for the
                    # head host); otherwise through the router, half to each.
                    row = drive(hot.url if args.hot_only else url, workers[0], batch, args)
                    if rebalance:
                        code, out, _ = http_json("GET", url + "/rebalance")
                        row["decisions"] = out.get("recent_decisions", []) if code == 200 else out
                finally:
                    router.terminate()
                    router.wait(30)
                row.update(repeat=rep, rebalance=rebalance,
                           scenario="hot-only" if args.hot_only else "round-robin")
                rows.append(row)
                log(f"rebalancer {'on ' if rebalance else 'off'}: p50/p99 TPOT "
                    f"{row['tpot_p50_ms']:.1f}/{row['tpot_p99_ms']:.1f} ms, p50/p99 TTFT "
                    f"{row['ttft_p50_s']:.2f}/{row['ttft_p99_s']:.2f} s, "
                    f"{row['tokens_per_s']:.1f} tok/s, hot pool peak {row['hot_pool_tokens']} "
                    f"tokens, hot peak running {row['hot_peak_running']}")
    finally:
        for proc in (hot, cold):
            proc.stop()
        cold_host.stop()
    return rows


def drive(url: str, hot: Worker, batch: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Open loop: one request every 1/rate s, streamed; sample the hot worker meanwhile."""
    peak, pool_peak, done = 0, 0, threading.Event()

    def sample() -> None:
        nonlocal peak, pool_peak
        while not done.wait(0.5):
            loads = hot.call("GET", "/v1/loads")["loads"]
            peak = max(peak, sum(int(x["num_running_reqs"]) for x in loads))
            pool_peak = max(pool_peak, sum(int(x["max_total_num_tokens"]) for x in loads))

    body = {"model": hot.served, "max_tokens": args.output_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()

    def one(i: int) -> dict[str, float]:
        time.sleep(max(0.0, started + i / args.rate - time.perf_counter()))
        return stream_timing(url, {**body, "prompt": batch[i]})

    with ThreadPoolExecutor(len(batch)) as pool:
        timings = list(pool.map(one, range(len(batch))))
    done.set()
    sampler.join()
    makespan = max(t["end"] for t in timings) - started
    tpot = [1000 * t["tpot"] for t in timings]
    ttft = [t["ttft"] for t in timings]
    return {"tpot_p50_ms": statistics.median(tpot), "tpot_p99_ms": percentile(tpot, 0.99),
            "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": percentile(ttft, 0.99),
            "tokens_per_s": sum(t["tokens"] for t in timings) / makespan,
            "makespan_s": makespan, "hot_peak_running": peak, "hot_pool_tokens": pool_peak}


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 4))
    rows = result["decode"]
    fractions = sorted({r["fraction"] for r in rows})

    def med(key: str, f: float) -> float:
        return statistics.median(r[key] for r in rows if r["fraction"] == f)

    shares = [100 * med("head_layers_offloaded", f) / med("head_layers_total", f)
              for f in fractions]
    a.plot(shares, [med("ms_per_token", f) for f in fractions], "o-")
    a.set(xlabel="% of KV head-layers offloaded", ylabel="ms per output token",
          title=f"decode step, batch {rows[0]['batch'] if rows else '?'}", ylim=(0, None))
    a2 = a.twinx()
    a2.plot(shares, [med("bytes_per_step", f) / 1e3 for f in fractions],
            "s--", color="tab:orange")
    a2.set_ylabel("KB exchanged per step", color="tab:orange")
    b.bar([f"{s:.1f}%" for s in shares], [med("pool_tokens", f) for f in fractions])
    b.set(xlabel="KV head-layers offloaded", ylabel="KV pool tokens", title="capacity")
    e2e = result["rebalance"]
    if e2e:
        labels = ["rebalancer off", "rebalancer on"]
        p99 = [statistics.median(r["tpot_p99_ms"] for r in e2e if r["rebalance"] == on)
               for on in (False, True)]
        tps = [statistics.median(r["tokens_per_s"] for r in e2e if r["rebalance"] == on)
               for on in (False, True)]
        c.bar(labels, p99, color="tab:blue", width=0.5)
        c.set(ylabel="p99 ms per output token (bars)",
              title=f"memory-overloaded instance ({e2e[0].get('scenario', 'round-robin')})")
        c2 = c.twinx()
        c2.plot(labels, tps, "o-", color="tab:green")
        c2.set_ylim(0, 1.2 * max(tps))
        c2.set_ylabel("output tokens/s (line)", color="tab:green")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fractions", type=lambda s: [float(x) for x in s.split(",")],
                        default=[0.0, 0.25, 0.5], help="shares of head-layers to offload")
    parser.add_argument("--batch", type=int, default=4, help="requests decoding together")
    parser.add_argument("--decode-tokens", type=int, default=48)
    parser.add_argument("--max-total-tokens", type=int, default=4096)
    parser.add_argument("--skip-rebalance", action="store_true", help="part 1 only")
    parser.add_argument("--skip-decode", action="store_true", help="part 2 only")
    parser.add_argument("--hot-only", action="store_true",
                        help="part 2 sends every request straight to the hot worker (the cold "
                             "worker only hosts heads) instead of round-robin through the router")
    parser.add_argument("--hot-pool", type=int, default=1024)
    parser.add_argument("--cold-pool", type=int, default=8192)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--rate", type=float, default=1.0, help="requests per second")
    parser.add_argument("--prompt-words", type=int, default=150,
                        help="words per prompt (about 1.1 SmolLM2 tokens each)")
    parser.add_argument("--output-tokens", type=int, default=256,
                        help="with --prompt-words, sized so the hot pool holds 2 requests")
    parser.add_argument("--rebalance-args", default="--rebalance-period 1",
                        help="extra router flags with --rebalance")
    parser.add_argument("--out", default="results/head_offload.json")
    parser.add_argument("--plot", default="results/head_offload.png")
    args = parser.parse_args(argv)
    path = models.prepare(args.model)
    served = models.recipe(args.model).served_name
    result: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "model": args.model},
        "started": datetime.datetime.now(datetime.UTC).isoformat(), "args": vars(args)}
    result["decode"] = [] if args.skip_decode else part_decode(args, path, served)
    result["rebalance"] = [] if args.skip_rebalance else part_rebalance(args, path, served)
    summary: dict[str, Any] = {}
    for f in sorted({r["fraction"] for r in result["decode"]}):
        rows = [r for r in result["decode"] if r["fraction"] == f]
        for key in ("ms_per_token", "bytes_per_step", "pool_tokens"):
            summary[f"decode[{f}] {key}"] = statistics.median(r[key] for r in rows)
    for on in (False, True):
        rows = [r for r in result["rebalance"] if r["rebalance"] == on]
        for key in ("tpot_p99_ms", "tokens_per_s", "ttft_p99_s"):
            if rows:
                summary[f"rebalance[{'on' if on else 'off'}] {key}"] = statistics.median(
                    r[key] for r in rows)
    result["summary"] = summary
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    plot(result, args.plot)
    for name, value in summary.items():
        print(f"{name}: {value:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
