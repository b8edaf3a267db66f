"""What a shared-store hit is worth: time to first token for a prefix recomputed, loaded from the
shared L3, and found in the worker's own device (L1) cache, per L3 and prefix length.

  python -m scripts.bench.kvstore_hit [--backends kvstore,kvstore-ssd,file] [--lengths 150,500]

Two real SGLang CPU workers, A (core 1) and B (core 0), share one L3. For each prefix (unique
per repeat, seeded): A computes it (``cold``); once A's pages are in the store, B gets the same
prefix with another question (``store``: its prefix is loaded from the L3, checked in SGLang's
``cached_tokens_details``); B gets it a second time (``device``: a plain radix-cache hit). Each
request generates one token, so its latency is the time to first token. Backends:

- ``kvstore``: BanaServe's store, memory tier (``python -m kvstore --memory-gb 2``);
- ``kvstore-ssd``: BanaServe's store with a memory tier too small to hold anything
  (``--memory-gb 0.001 --ssd-dir DIR``), so every hit is read (and checksummed) from its SSD
  files (through the page cache);
- ``kvstore-layerwise``: ``kvstore`` with worker B loading layer by layer
  (``--kvstore-layerwise``): B answers SGLang's prefetch once the pages are read from the store
  and copies each layer into its host and device pools while earlier layers compute. B's trace
  (``kvstore.layerwise``) gives, per store hit, the store read, the layer-by-layer fill and L2->L1
  copy times, and how long the forward actually waited for a layer; ``hidden`` is the share of
  that transfer the request did not wait for: 1 - (read + forward wait) / (read + fill + L2->L1);
- ``file``: SGLang's own ``file`` L3 on a shared directory.

Warm-up: each worker serves two throw-away prefixes first. JSON out (every sample), medians
printed. The store's CPU time is on core 1 with worker A, idle while B loads.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__)))))

from runtime_patches import models  # noqa: E402
from runtime_patches.launch import WorkerConfig, WorkerProcess  # noqa: E402
from scripts.bench.l3 import SharedL3  # noqa: E402
from scripts.bench.policies import WORDS, flush  # noqa: E402
from scripts.bench.procs import timed_generate  # noqa: E402
from scripts.bench.router_overhead import free_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAGE_SIZE = 64
BACKENDS = ("kvstore", "kvstore-layerwise", "kvstore-ssd", "file")


def log(message: str) -> None:
    print(f"[kvstore_hit] {message}", file=sys.stderr, flush=True)


def generate(url: str, text: str) -> dict[str, Any]:
    seconds, meta = timed_generate(url, {"text": text, "sampling_params": {
        "max_new_tokens": 1, "temperature": 0}}, timeout=600)
    details = meta.get("cached_tokens_details") or {}
    return {"seconds": seconds, "prompt_tokens": meta["prompt_tokens"],
            "cached": meta.get("cached_tokens", 0), "storage": details.get("storage", 0),
            "device": details.get("device", 0), "host": details.get("host", 0)}


def prefix_text(seed: int, words: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def wait_stored(l3: SharedL3, min_pages: int, timeout_s: float = 30.0) -> None:
    """Until A's pages have reached the L3 (its backup is asynchronous)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if l3.pages() >= min_pages:
            return
        time.sleep(0.1)
    log(f"warning: L3 holds fewer than {min_pages} pages after {timeout_s} s")


class Trace:
    """Worker B's layer-wise trace: the records each store hit appended."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._offset = 0

    def new_records(self) -> list[dict[str, Any]]:
        if not os.path.exists(self.path):
            return []
        with open(self.path, encoding="utf-8") as f:
            f.seek(self._offset)
            text = f.read()
            self._offset = f.tell()
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def transfer_of(records: list[dict[str, Any]]) -> dict[str, float]:
    """One store hit's transfer: read (before the prefetch answer), layer-by-layer fill and
    L2->L1 copies (behind it), and the forward's waits for layers."""
    fills = [r for r in records if r["kind"] == "fill"]
    loads = [r for r in records if r["kind"] == "load"]
    read = sum(r["read_s"] for r in fills)
    total = read + sum(r["copy_s"] for r in fills) + sum(r["copy_s"] for r in loads)
    waited = sum(r["blocked_s"] for r in loads)
    return {"read_s": read, "fill_s": sum(r["copy_s"] for r in fills),
            "l2_l1_s": sum(r["copy_s"] for r in loads), "forward_wait_s": waited,
            "transfer_s": total, "hidden": 1 - (read + waited) / total if total else 0.0}


def measure(backend: str, lengths: list[int], repeats: int, model: str, scratch: str,
            seed: int) -> list[dict[str, Any]]:
    from kvstore.layerwise import ENV_ENABLE, ENV_TRACE

    path, served = models.resolve(model)
    layered = backend == "kvstore-layerwise"
    # write_through: A's one computation of a prefix goes to the store (this measures what a
    # hit costs, not when a prefix is worth storing)
    l3 = SharedL3("kvstore" if layered else backend, scratch, PAGE_SIZE, PAGE_SIZE,
                  store_cpus="1", tag="kvstore_hit", write_policy="write_through")
    trace = Trace(os.path.join(scratch, f"layerwise-{seed}.jsonl"))
    b_env = ((ENV_ENABLE, "1"), (ENV_TRACE, trace.path)) if layered else ()
    workers = [WorkerProcess(WorkerConfig(
        model_path=path, port=free_port(), served_model_name=served, device="cpu", cpus=cpus,
        max_total_tokens=4096, max_running_requests=4,
        extra_args=(*l3.worker_args(), "--enable-cache-report"), extra_env=env),
        log_path=os.path.join(ROOT, "logs", "bench", f"kvstore_hit-worker-{name}.log"))
        for name, cpus, env in (("a", "1", ()), ("b", "0", b_env))]
    samples = []
    with l3.serving(workers):
        a, b = (w.url for w in workers)
        for i in range(2):  # warm-up: first prefills of a fresh CPU worker are slow
            for url in (a, b):
                generate(url, prefix_text(-1 - i, 300) + " warm")
        for url in (a, b):
            flush(url)
        for repeat in range(repeats):
            for words in lengths:
                prefix = prefix_text(seed * 1000 + repeat * 100 + words, words)
                before = l3.pages()
                cold = generate(a, prefix + "\nQuestion: what is the first word?")
                wait_stored(l3, before + cold["prompt_tokens"] // PAGE_SIZE)
                trace.new_records()
                store = generate(b, prefix + "\nQuestion: what is the last word?")
                sample = {"backend": backend, "words": words, "repeat": repeat,
                          "prompt_tokens": cold["prompt_tokens"], "cold": cold, "store": store}
                if layered:
                    sample["layerwise"] = transfer_of(trace.new_records())
                sample["device"] = generate(b, prefix + "\nQuestion: how many words are there?")
                samples.append(sample)
                log(f"{backend} {cold['prompt_tokens']} tokens: cold {cold['seconds']:.3f} s, "
                    f"store {store['seconds']:.3f} s ({store['storage']} from L3), device "
                    f"{sample['device']['seconds']:.3f} s ({sample['device']['device']} cached)"
                    + (" | transfer {transfer_s:.4f} s (read {read_s:.4f}, fill {fill_s:.4f}, "
                       "L2->L1 {l2_l1_s:.4f}), forward waited {forward_wait_s:.4f} s, hidden "
                       "{hidden:.0%}".format(**sample["layerwise"]) if layered else ""))
    return samples


def summarise(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for backend in dict.fromkeys(s["backend"] for s in samples):
        for words in dict.fromkeys(s["words"] for s in samples):
            mine = [s for s in samples if s["backend"] == backend and s["words"] == words]
            if not mine:
                continue
            row: dict[str, Any] = {"backend": backend, "words": words,
                                   "prompt_tokens": statistics.median(
                                       s["prompt_tokens"] for s in mine), "n": len(mine)}
            for kind in ("cold", "store", "device"):
                row[f"{kind}_s"] = statistics.median(s[kind]["seconds"] for s in mine)
            row["storage_tokens"] = statistics.median(s["store"]["storage"] for s in mine)
            if all("layerwise" in s for s in mine):
                for key in ("transfer_s", "read_s", "fill_s", "l2_l1_s", "forward_wait_s",
                            "hidden"):
                    row[key] = statistics.median(s["layerwise"][key] for s in mine)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--lengths", default="150,500,1000",
                        help="prefix lengths in words (about 1.1-1.2 tokens each)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/kvstore_hit.json")
    args = parser.parse_args(argv)
    backends = args.backends.split(",")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        parser.error(f"unknown backend(s) {', '.join(unknown)} (one of {', '.join(BACKENDS)})")
    lengths = [int(n) for n in args.lengths.split(",")]
    scratch = tempfile.mkdtemp(prefix="kvstore-hit-")
    samples: list[dict[str, Any]] = []
    try:
        for backend in backends:
            samples += measure(backend, lengths, args.repeats, args.model, scratch, args.seed)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = summarise(samples)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"benchmark": "kvstore_hit", "date": datetime.datetime.now(
            datetime.UTC).isoformat(timespec="seconds"), "config": vars(args), "rows": rows,
            "samples": samples}, f, indent=2)
    for row in rows:
        print(f"kvstore_hit: {row['backend']:12} {row['prompt_tokens']:5.0f} tokens  cold "
              f"{row['cold_s']:.3f} s  store {row['store_s']:.3f} s "
              f"({row['storage_tokens']:.0f} tokens from L3)  device {row['device_s']:.3f} s  "
              f"(medians of {row['n']})"
              + (f"  transfer {row['transfer_s'] * 1e3:.1f} ms, forward waited "
                 f"{row['forward_wait_s'] * 1e3:.1f} ms, hidden {row['hidden']:.0%}"
                 if "hidden" in row else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
