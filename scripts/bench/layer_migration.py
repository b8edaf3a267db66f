"""Layer migration: migration time against bytes moved, per-step cost of a migrated range,
and the throughput of a saturated worker before and after moving part of its layers.

One SGLang CPU worker (core 0) and one layer host (core 1, the idle "device"), SmolLM2-135M by
default. The host initialises SGLang's runtime at start (``--warm-model``); one untimed
migrate/restore comes first anyway. Then, with --repeats runs of each (seeded prompts,
greedy, ignore_eos):

1. migrate / restore the last k layers for k in --ranges, with the KV of --warm-prompts
   prompts in the radix cache: seconds, weight and KV bytes, effective GB/s;
2. one request of --decode-tokens tokens, streamed: ms per output token with no layer migrated
   and with the last k layers migrated, hand-off bytes and host time per step;
3. --concurrency requests of --throughput-tokens tokens at once on a pool too small for all of
   them (--max-total-tokens): output tokens/s and the most requests running at once, with no
   layer migrated and with the last half migrated (the pool then holds about twice the tokens).

Writes JSON (machine, every run) to --out (default results/layer_migration.json) and prints
one line per measurement.

  .venv/bin/python -m scripts.bench.layer_migration [--model smollm2] [--repeats 2]
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
from scripts.bench.procs import free_port, log  # noqa: E402
from tests.integration.cluster import http_json  # noqa: E402
from tests.integration.sse import SSEStream  # noqa: E402

WORDS = ("river stone light garden number engine winter market letter window signal "
         "forest music paper silver orange planet theory bridge story").split()


def prompts(seed: int, n: int, words: int) -> list[str]:
    rng = random.Random(seed)
    return [f"Write about {' '.join(rng.choice(WORDS) for _ in range(words))}." for _ in range(n)]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        path = models.prepare(args.model)
        self.served = models.recipe(args.model).served_name
        ncpu = os.cpu_count() or 1
        self.host = LayerHostProcess(LayerHostConfig(port=free_port(), cpus=[1 % ncpu],
                                                     warm_model=path),
                                     log_path="logs/bench/layer-host.log")
        self.worker = WorkerProcess(WorkerConfig(
            model_path=path, port=free_port(), served_model_name=self.served, device="cpu",
            cpus="0", max_total_tokens=args.max_total_tokens,
            max_running_requests=args.concurrency,
            layer_hosts=(("idle", self.host.address),)), log_path="logs/bench/layer-worker.log")

    def start(self) -> None:
        self.host.start()
        self.worker.start()
        self.host.wait_ready()
        self.worker.wait_ready(600)

    def stop(self) -> None:
        self.worker.stop()
        self.host.stop()

    def call(self, method: str, path: str, body: Any = None) -> Any:
        status, out, _ = http_json(method, self.worker.url + path, body, timeout=900)
        if status != 200:
            raise RuntimeError(f"{path}: {status} {out}")
        return out

    def migrate(self, start: int, end: int) -> dict[str, Any]:
        return dict(self.call("POST", "/banaserve/migrate_layers",
                              {"layers": [start, end], "target": "idle"}))

    def restore(self) -> dict[str, Any]:
        return dict(self.call("POST", "/banaserve/restore_layers", {}))

    def body(self, prompt: str, tokens: int, stream: bool) -> dict[str, Any]:
        return {"model": self.served, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
                "ignore_eos": True, "stream": stream}

    def decode_ms(self, prompt: str, tokens: int) -> float:
        """Mean ms between streamed tokens after the first (decode only)."""
        stream = SSEStream(self.worker.url, "/v1/completions", self.body(prompt, tokens, True))
        stamps = []
        for data in stream.events():
            if data == "[DONE]":
                break
            stamps.append(time.perf_counter())
        return 1000 * (stamps[-1] - stamps[0]) / (len(stamps) - 1)

    def throughput(self, batch: list[str], tokens: int) -> tuple[float, int]:
        """(output tokens/s, most requests running at once, sampled every 0.2 s)."""
        peak, done = 0, threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.wait(0.2):
                loads = self.call("GET", "/v1/loads")["loads"]
                peak = max(peak, sum(int(x["num_running_reqs"]) for x in loads))

        sampler = threading.Thread(target=sample, daemon=True)
        started = time.perf_counter()
        sampler.start()
        with ThreadPoolExecutor(len(batch)) as pool:
            outs = list(pool.map(lambda p: self.call("POST", "/v1/completions",
                                                     self.body(p, tokens, False)), batch))
        elapsed = time.perf_counter() - started
        done.set()
        sampler.join()
        return sum(o["usage"]["completion_tokens"] for o in outs) / elapsed, peak


def run(args: argparse.Namespace) -> dict[str, Any]:
    bench = Bench(args)
    result: dict[str, Any] = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                          "model": args.model},
                              "started": datetime.datetime.now(datetime.UTC).isoformat(),
                              "args": vars(args), "migration": [], "decode": [],
                              "throughput": []}
    bench.start()
    try:
        num_layers = len(bench.call("GET", "/banaserve/status")["local_layers"])
        bench.migrate(num_layers - 1, num_layers)
        bench.restore()
        warm = prompts(args.seed, args.warm_prompts, 60)
        for rep in range(args.repeats):
            for k in args.ranges:
                for p in warm:  # a restore drains the cache: fill it again, so KV moves too
                    bench.call("POST", "/v1/completions", bench.body(p, 8, False))
                m = bench.migrate(num_layers - k, num_layers)
                r = bench.restore()["restored"][0]
                row = {"repeat": rep, "layers": k, "seconds": m["migration_seconds"],
                       "grow_seconds": m["grow_seconds"],
                       "weight_bytes": m["weight_bytes"], "kv_bytes": m["kv_bytes_moved"],
                       "restore_seconds": r["restore_seconds"],
                       "gb_per_s": (m["weight_bytes"] + m["kv_bytes_moved"])
                       / m["migration_seconds"] / 1e9}
                result["migration"].append(row)
                log(f"migrate {k:2d} layers: {row['seconds']:.3f} s for "
                    f"{row['weight_bytes'] / 1e6:.1f} MB weights + {row['kv_bytes'] / 1e6:.2f} MB"
                    f" KV ({row['gb_per_s']:.2f} GB/s), then {row['grow_seconds']:.3f} s growing "
                    f"the pool; restore {row['restore_seconds']:.3f} s")
        decode_prompt = prompts(args.seed + 1, 1, 12)[0]
        for rep in range(args.repeats):
            for k in (0, *args.ranges):
                if k:
                    bench.migrate(num_layers - k, num_layers)
                ms = bench.decode_ms(decode_prompt, args.decode_tokens)
                row: dict[str, Any] = {"repeat": rep, "layers": k, "ms_per_token": ms}
                if k:
                    fwd = bench.restore()["restored"][0]["forward"]
                    row.update(handoff_bytes_per_step=fwd["handoff_bytes"] / fwd["steps"],
                               host_round_trip_ms=fwd["mean_step_ms"])
                result["decode"].append(row)
                log(f"decode with {k:2d} layers migrated: {ms:.1f} ms/token "
                    f"{json.dumps({x: round(y, 1) for x, y in row.items() if x.startswith('h')})}")
        batch = prompts(args.seed + 2, args.concurrency, 60)
        for rep in range(args.repeats):
            for k in (0, num_layers // 2):
                bench.call("POST", "/flush_cache")
                if k:
                    bench.migrate(num_layers - k, num_layers)
                pool_tokens = bench.call("GET", "/banaserve/status")["kv"]["pool_tokens"]
                tps, peak = bench.throughput(batch, args.throughput_tokens)
                if k:
                    restore = bench.call("POST", "/banaserve/restore_layers", {})
                    while restore.get("pending"):
                        time.sleep(0.5)
                        restore = bench.call("GET", "/banaserve/status")
                        restore = {"pending": restore["pending_restore"]}
                result["throughput"].append({"repeat": rep, "layers": k, "tokens_per_s": tps,
                                             "pool_tokens": pool_tokens,
                                             "peak_running": peak})
                log(f"{args.concurrency} concurrent on {pool_tokens} KV tokens, {k:2d} layers "
                    f"migrated: {tps:.1f} tok/s, at most {peak} running")
    finally:
        bench.stop()
    summary: dict[str, Any] = {}
    for part, key in (("migration", "seconds"), ("decode", "ms_per_token"),
                      ("throughput", "tokens_per_s")):
        for k in sorted({r["layers"] for r in result[part]}):
            summary[f"{part}[{k}] {key}"] = statistics.median(
                r[key] for r in result[part] if r["layers"] == k)
    result["summary"] = summary
    return result


def plot(result: dict[str, Any], path: str) -> None:
    """Three panels: migration time against MB moved, decode ms/token against layers migrated,
    throughput with and without half the layers migrated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 4))
    rows = result["migration"]
    a.scatter([(r["weight_bytes"] + r["kv_bytes"]) / 1e6 for r in rows],
              [1000 * r["seconds"] for r in rows], label="copy (weights + KV)")
    a.scatter([(r["weight_bytes"] + r["kv_bytes"]) / 1e6 for r in rows],
              [1000 * (r["seconds"] + r.get("grow_seconds", 0.0)) for r in rows], marker="x",
              label="copy + pool growth")
    a.set(xlabel="MB moved", ylabel="ms", title="migration time")
    a.legend()
    layers = sorted({r["layers"] for r in result["decode"]})
    b.plot(layers, [statistics.median(r["ms_per_token"] for r in result["decode"]
                                      if r["layers"] == k) for k in layers], "o-")
    b.set(xlabel="last k layers on the host", ylabel="ms per output token",
          title="decode step, one request", ylim=(0, None))
    labels = sorted({r["layers"] for r in result["throughput"]})
    c.bar([f"{k} layers migrated" for k in labels],
          [statistics.median(r["tokens_per_s"] for r in result["throughput"]
                             if r["layers"] == k) for k in labels])
    c.set(ylabel="output tokens/s", title="memory-bound worker, 16 requests")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--ranges", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 5, 10, 15], help="layers to migrate (the last k), e.g. 1,5,10")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warm-prompts", type=int, default=8,
                        help="prompts served first, so their KV is in the cache and moves too")
    parser.add_argument("--decode-tokens", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--throughput-tokens", type=int, default=128)
    parser.add_argument("--max-total-tokens", type=int, default=1024,
                        help="the worker's KV pool at start (small: part 3 is memory-bound)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/layer_migration.json")
    parser.add_argument("--plot", default="results/layer_migration.png")
    args = parser.parse_args(argv)
    result = run(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    plot(result, args.plot)
    for name, value in result["summary"].items():
        print(f"{name}: {value:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
