"""SLO-aware batching on real SmolLM2 CPU workers: FCFS against SLO-ODBS with predicted and with
oracle output lengths, all through the router's --batching path, in one run.

  .venv/bin/python -m scripts.bench.slo_batching --predictor DIR [--quick] [--out FILE]

Phases (stderr shows progress):
  workload   --prompts Alpaca prompts (seeded sample of ../shared/data/alpaca_4000.json; the
             predictor's training split is not excluded, see the note in the JSON), each in one
             of two SLO classes: tight (share --tight-share) and loose. Greedy decoding,
             max_tokens --max-tokens, EOS honoured.
  oracle     every prompt once through a plain router with every worker slot busy: the real
             output length of each prompt under greedy decoding (the oracle), the cluster's
             capacity (requests/s), the median end-to-end latency at full load (E) and the
             per-token time (for --slo-step-ms).
  slos       SLOs that bind (--slo-source fcfs-pilot, the default): one pilot run of
             `--batching fcfs` at the measured load (its own arrival seed), then the tight SLO
             is the (1 - --fcfs-miss) quantile of the pilot's end-to-end latencies, so FCFS
             misses about that share of the tight requests, and the loose SLO is
             --loose-x / --tight-x times the tight one. (--slo-source oracle-median: the older
             rule, --tight-x * E and --loose-x * E, which at this load every configuration met.)
  runs       for each configuration, a fresh router in front of the same two workers, then
             Poisson arrivals at --overload x capacity for --duration seconds (same seed, same
             request sequence), waiting until every request finished:
               none             no batching (each request dispatched at once; SGLang queues)
               fcfs             --batching fcfs
               slo-odbs         --batching slo-odbs --length-predictor DIR (predicted lengths)
               slo-odbs-oracle  --batching slo-odbs with X-BanaServe-Output-Length = oracle
             Configurations run in an order rotated per repeat (--repeats).
Per configuration: SLO attainment (all, tight, loose), end-to-end p50/p99, throughput (output
tokens/s and requests/s from the first send to the last completion), failures. JSON to --out,
one summary line per configuration (attainment with its range over repeats), a PNG bar chart
beside the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import statistics
import subprocess
import sys
import time
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__)))))

import aiohttp  # noqa: E402

from runtime_patches import models  # noqa: E402
from runtime_patches.launch import WorkerConfig, WorkerProcess  # noqa: E402
from scripts.bench.procs import free_port, log, wait_http  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ALPACA = os.path.join(ROOT, "..", "shared", "data", "alpaca_4000.json")
CONFIGS = ("none", "fcfs", "slo-odbs", "slo-odbs-oracle")


def build_workload(args: argparse.Namespace) -> list[dict[str, Any]]:
    with open(ALPACA, encoding="utf-8") as f:
        records = [r for r in json.load(f) if r.get("instruction")]
    rng = random.Random(args.seed)
    picked = rng.sample(records, args.prompts)
    workload = []
    for i, rec in enumerate(picked):
        text = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
        tight = rng.random() < args.tight_share
        workload.append({"id": i, "messages": [{"role": "user", "content": text}],
                         "class": "tight" if tight else "loose"})
    return workload


async def one_request(session: aiohttp.ClientSession, url: str, model: str, req: dict[str, Any],
                      max_tokens: int, oracle: bool) -> dict[str, Any]:
    body = {"model": model, "messages": req["messages"], "max_tokens": max_tokens,
            "temperature": 0, "slo_ms": req.get("slo_ms", 600_000)}
    headers = {"X-BanaServe-Output-Length": str(req["oracle_len"])} if oracle else {}
    started = time.perf_counter()
    try:
        async with session.post(url + "/v1/chat/completions", json=body,
                                headers=headers) as resp:
            out = await resp.json(content_type=None)
            if resp.status != 200:
                return {"ok": False, "why": f"http {resp.status}: {str(out)[:200]}"}
    except (aiohttp.ClientError, TimeoutError) as exc:
        return {"ok": False, "why": type(exc).__name__}
    e2e = time.perf_counter() - started
    return {"ok": True, "e2e": e2e, "tokens": out["usage"]["completion_tokens"],
            "met": e2e * 1000 <= req.get("slo_ms", 600_000), "class": req["class"],
            "predicted": resp.headers.get("X-BanaServe-Predicted-Length")}


async def closed_loop(url: str, model: str, workload: list[dict[str, Any]], max_tokens: int,
                      concurrency: int) -> tuple[list[dict[str, Any]], float]:
    """Every request once, ``concurrency`` at a time; results in workload order."""
    results: list[dict[str, Any]] = [{}] * len(workload)
    queue = list(range(len(workload)))
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def client() -> None:
            while queue:
                i = queue.pop(0)
                results[i] = await one_request(session, url, model, workload[i], max_tokens,
                                               oracle=False)
        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return results, time.perf_counter() - started


async def open_loop(url: str, model: str, workload: list[dict[str, Any]], rate: float,
                    duration: float, seed: int, max_tokens: int, oracle: bool,
                    ) -> tuple[list[dict[str, Any]], float]:
    rng = random.Random(seed)
    tasks = []
    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        started = time.perf_counter()
        next_at, i = 0.0, 0
        while next_at < duration:
            await asyncio.sleep(max(0.0, started + next_at - time.perf_counter()))
            tasks.append(asyncio.create_task(one_request(
                session, url, model, workload[i % len(workload)], max_tokens, oracle)))
            i += 1
            next_at += rng.expovariate(rate)
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - started


def start_router(urls: list[str], extra: list[str], tag: str) -> tuple[subprocess.Popen[bytes],
                                                                      str]:
    port = free_port()
    argv = [sys.executable, "-m", "router", "--workers", *urls, "--port", str(port),
            "--log-level", "warning", "--read-timeout", "1800", *extra]
    log_path = os.path.join(ROOT, "logs", "bench", f"slo-router-{tag}.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=ROOT)
    wait_http(f"http://127.0.0.1:{port}/health", timeout_s=180, proc=proc)
    return proc, f"http://127.0.0.1:{port}"


def router_args(config: str, args: argparse.Namespace, step_ms: float) -> list[str]:
    if config == "none":
        return []
    policy = "fcfs" if config == "fcfs" else "slo-odbs"
    extra = ["--batching", policy, "--batch-slots-per-worker", str(args.slots),
             "--slo-step-ms", f"{step_ms:.2f}", "--batch-window-ms", str(args.window_ms)]
    if config == "slo-odbs":
        extra += ["--length-predictor", args.predictor]
    return extra


def pct(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None


def summarise(config: str, runs: list[tuple[list[dict[str, Any]], float]]) -> dict[str, Any]:
    results = [r for rs, _ in runs for r in rs]
    ok = [r for r in results if r["ok"]]

    def attainment(rows: list[dict[str, Any]]) -> float | None:
        return sum(r.get("met", False) for r in rows) / len(rows) if rows else None

    per_run_tps = [sum(r["tokens"] for r in rs if r["ok"]) / secs for rs, secs in runs]
    per_run_rps = [sum(r["ok"] for r in rs) / secs for rs, secs in runs]
    return {
        "config": config, "repeats": len(runs), "sent": len(results), "ok": len(ok),
        "failures": sorted({r["why"] for r in results if not r["ok"]})[:5],
        "slo_attainment": attainment(results),
        "slo_attainment_tight": attainment([r for r in results if r.get("class") == "tight"]),
        "slo_attainment_loose": attainment([r for r in results if r.get("class") == "loose"]),
        "slo_attainment_runs": [attainment(rs) for rs, _ in runs],
        "e2e_p50_s": pct([r["e2e"] for r in ok], 0.5),
        "e2e_p99_s": pct([r["e2e"] for r in ok], 0.99),
        "throughput_tokens_per_s": statistics.median(per_run_tps),
        "throughput_tokens_per_s_runs": per_run_tps,
        "throughput_requests_per_s": statistics.median(per_run_rps),
    }


def calibrate(urls: list[str], served: str, workload: list[dict[str, Any]],
              args: argparse.Namespace) -> dict[str, Any]:
    proc, url = start_router(urls, [], "oracle")
    try:
        results, seconds = asyncio.run(closed_loop(url, served, workload, args.max_tokens,
                                                   args.slots * len(urls)))
    finally:
        proc.terminate()
        proc.wait(10)
    failed = [r for r in results if not r["ok"]]
    if failed:
        raise RuntimeError(f"{len(failed)} oracle requests failed, e.g. {failed[0]['why']}")
    median_e2e = statistics.median(r["e2e"] for r in results)
    for req, res in zip(workload, results, strict=True):
        req["oracle_len"] = res["tokens"]
    set_slos(workload, args.tight_x * median_e2e, args.loose_x * median_e2e)
    tokens = sum(r["tokens"] for r in results)
    per_request_token_s = statistics.median(r["e2e"] / max(1, r["tokens"]) for r in results)
    return {"capacity_rps": len(results) / seconds, "capacity_tokens_per_s": tokens / seconds,
            "seconds": seconds, "step_ms": 1000 * per_request_token_s,
            "median_e2e_s": median_e2e, "tight_slo_s": args.tight_x * median_e2e,
            "loose_slo_s": args.loose_x * median_e2e,
            "oracle_len_mean": tokens / len(results),
            "oracle_len_p50": pct([r["tokens"] for r in results], 0.5),
            "oracle_len_max": max(r["tokens"] for r in results)}


def set_slos(workload: list[dict[str, Any]], tight_s: float, loose_s: float) -> None:
    for req in workload:
        req["slo_ms"] = round(1000 * (tight_s if req["class"] == "tight" else loose_s))


def slos_from_pilot(e2e: list[float], fcfs_miss: float, loose_over_tight: float
                    ) -> tuple[float, float]:
    """(tight, loose) SLO seconds: the tight one is the (1 - ``fcfs_miss``) quantile of a FCFS
    pilot's end-to-end latencies (so FCFS misses about that share of them), the loose one
    ``loose_over_tight`` times it. Pure."""
    if not e2e:
        raise RuntimeError("the FCFS pilot completed no request; no SLO to derive")
    ordered = sorted(e2e)
    tight = ordered[min(len(ordered) - 1, int((1.0 - fcfs_miss) * len(ordered)))]
    return tight, tight * loose_over_tight


def pilot_slos(urls: list[str], served: str, workload: list[dict[str, Any]],
               args: argparse.Namespace, rate: float, step_ms: float) -> dict[str, Any]:
    """Run FCFS once at ``rate`` and set every request's SLO from its latencies."""
    proc, url = start_router(urls, router_args("fcfs", args, step_ms), "pilot")
    try:
        results, _ = asyncio.run(open_loop(url, served, workload, rate, args.duration,
                                           args.seed + 10_000, args.max_tokens, oracle=False))
    finally:
        proc.terminate()
        proc.wait(10)
    e2e = [r["e2e"] for r in results if r["ok"]]
    tight, loose = slos_from_pilot(e2e, args.fcfs_miss, args.loose_x / args.tight_x)
    set_slos(workload, tight, loose)
    return {"slo_source": "fcfs-pilot", "fcfs_miss_target": args.fcfs_miss,
            "pilot_sent": len(results), "pilot_ok": len(e2e),
            "pilot_e2e_p50_s": pct(e2e, 0.5), "pilot_e2e_p99_s": pct(e2e, 0.99),
            "tight_slo_s": tight, "loose_slo_s": loose}


def plot(summary: list[dict[str, Any]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is absent; no plot")
        return
    names = [s["config"] for s in summary]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, key, title in ((axes[0], "slo_attainment", "SLO attainment"),
                           (axes[1], "e2e_p99_s", "end-to-end p99 (s)"),
                           (axes[2], "throughput_tokens_per_s", "output tokens/s")):
        ax.bar(names, [s[key] or 0 for s in summary], color="#4c72b0")
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle("SLO-aware batching, SmolLM2-135M on 2 CPU workers, overloaded")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"plot: {path}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--predictor", required=True, help="a profiler_ft predictor folder")
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--slo-source", choices=("fcfs-pilot", "oracle-median"),
                   default="fcfs-pilot", help="how SLOs are derived (see above; default "
                   "fcfs-pilot)")
    p.add_argument("--fcfs-miss", type=float, default=0.4,
                   help="share of tight requests the FCFS pilot misses (default 0.4)")
    p.add_argument("--tight-x", type=float, default=2.0,
                   help="oracle-median: tight SLO as a multiple of the median latency at full "
                        "load")
    p.add_argument("--loose-x", type=float, default=8.0,
                   help="oracle-median: loose SLO as a multiple of that latency; fcfs-pilot: "
                        "the loose SLO is loose-x / tight-x times the tight one")
    p.add_argument("--tight-share", type=float, default=0.5)
    p.add_argument("--overload", type=float, default=1.5, help="arrival rate / capacity")
    p.add_argument("--duration", type=float, default=90.0, help="seconds of arrivals per run")
    p.add_argument("--slots", type=int, default=4,
                   help="running requests per worker (its --max-running-requests and the "
                        "router's --batch-slots-per-worker)")
    p.add_argument("--window-ms", type=float, default=20.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a short smoke run")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "slo_batching.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.duration, args.repeats = 60, 30.0, 1
    if not 0.0 < args.fcfs_miss < 1.0:
        p.error(f"--fcfs-miss: must be in (0, 1), got {args.fcfs_miss}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not os.path.exists(ALPACA):
        print(f"slo_batching: {ALPACA} is absent; nothing to replay", file=sys.stderr)
        return 2
    if not os.path.exists(os.path.join(args.predictor, "predictor.json")):
        print(f"slo_batching: --predictor {args.predictor} is not a predictor folder "
              "(python -m profiler_ft train)", file=sys.stderr)
        return 2
    path = models.prepare("smollm2")
    served = models.recipe("smollm2").served_name
    workload = build_workload(args)
    workers = [WorkerProcess(WorkerConfig(
        model_path=path, port=free_port(), served_model_name=served, device="cpu", cpus=str(i),
        max_running_requests=args.slots), log_path=os.path.join(ROOT, "logs", "bench",
                                                                f"slo-worker-{i}.log"))
        for i in range(2)]
    summary: list[dict[str, Any]] = []
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.wait_ready(600)
        urls = [w.url for w in workers]
        log(f"oracle pass: {len(workload)} prompts, {args.slots * 2} at a time")
        cal = calibrate(urls, served, workload, args)
        rate = args.overload * cal["capacity_rps"]
        log(f"capacity {cal['capacity_rps']:.2f} req/s ({cal['capacity_tokens_per_s']:.0f} "
            f"tok/s), step {cal['step_ms']:.1f} ms/token; arrivals at {rate:.2f} req/s")
        if args.slo_source == "fcfs-pilot":
            log(f"FCFS pilot: {args.duration:.0f} s of arrivals to derive the SLOs")
            cal.update(pilot_slos(urls, served, workload, args, rate, cal["step_ms"]))
        log(f"SLOs: tight {cal['tight_slo_s']:.1f} s, loose {cal['loose_slo_s']:.1f} s")
        runs: dict[str, list[tuple[list[dict[str, Any]], float]]] = {c: [] for c in CONFIGS}
        for repeat in range(args.repeats):
            order = CONFIGS[repeat % len(CONFIGS):] + CONFIGS[:repeat % len(CONFIGS)]
            for config in order:
                proc, url = start_router(urls, router_args(config, args, cal["step_ms"]),
                                         config)
                try:
                    log(f"repeat {repeat + 1}/{args.repeats}: {config}")
                    runs[config].append(asyncio.run(open_loop(
                        url, served, workload, rate, args.duration, args.seed + repeat,
                        args.max_tokens, oracle=config == "slo-odbs-oracle")))
                finally:
                    proc.terminate()
                    proc.wait(10)
        summary = [summarise(c, runs[c]) for c in CONFIGS]
    finally:
        for w in workers:
            w.stop()
    for s in summary:
        per_run = [a for a in s["slo_attainment_runs"] if a is not None]
        log(f"{s['config']:>16}: SLO met {s['slo_attainment']:.3f} [runs "
            f"{min(per_run):.3f}-{max(per_run):.3f}] (tight "
            f"{s['slo_attainment_tight']:.3f}, loose {s['slo_attainment_loose']:.3f}); e2e p50 "
            f"{s['e2e_p50_s']:.2f} s p99 {s['e2e_p99_s']:.2f} s; "
            f"{s['throughput_tokens_per_s']:.0f} tok/s; {s['sent'] - s['ok']} failed")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    result = {"when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg()},
              "config": vars(args), "calibration": cal, "arrival_rate_rps": rate,
              "note": "prompts are sampled from all of alpaca_4000.json, so some may be in the "
                      "predictor's training split; labels there are reference-answer lengths",
              "summary": summary}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    log(f"wrote {args.out}")
    plot(summary, os.path.splitext(args.out)[0] + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
