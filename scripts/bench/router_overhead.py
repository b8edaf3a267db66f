"""Router overhead: the same request stream direct to a worker and through each router, one run.

Set-up (2-core machine, as in shared/notes/measured-here.md part 1): a fast fake worker
(scripts/bench/fast_upstream.py, raw asyncio HTTP/1.1) and this load generator (raw asyncio
streams, scripts/bench/loadgen.py) share core 1; each router under test is pinned alone to
core 0 with taskset, so its capacity numbers are its single-core capacity. Targets:
  direct     the fake worker itself (the floor: client + worker cost only)
  banaserve  `python -m router --workers http://127.0.0.1:UP --policy POLICY`
  smg        SGLang's router (`smg launch ... --policy round_robin`), when `smg` is on PATH or in
             this Python's bin/ (pip install -r requirements/bench.txt); else "not installed"
Every request is the chat body {"model":"bench-model","messages":[{"role":"user","content":
"hello"}],"max_tokens":16} to /v1/chat/completions, keep-alive, precomputed bytes.

Phases (stderr shows one progress line per phase); targets take turns within each round/run,
in an order shuffled by --seed, so machine drift hits all of them alike:
  latency   concurrency 1: --warmup requests per target, then --requests per target split over
            --rounds rounds; p50/p90/p99 per target; "added" = router p50/p99 - direct p50/p99
  json      --concurrency connections in a closed loop for --seconds after --warmup-seconds,
            --runs runs per target: req/s (median and every run), latency percentiles, router
            CPU per request (utime+stime from /proc/PID/stat over completed requests) and the
            CPU utilisation of router, worker and load generator (to show who was the limit)
  sse       the same with "stream": true: 20 events + data: [DONE] per stream; a stream counts
            as complete only when data: [DONE] has been read; streams/s

Writes JSON (machine, config, summary, every raw run) to --out and prints a one-line summary.
The machine is shared and has 2 cores: anything else running skews the numbers (the JSON
records the load average before and after). This is a benchmark, never part of the test run.

  .venv/bin/python -m scripts.bench.router_overhead [--quick] [--policy load_aware] [--out F]
  .venv/bin/python scripts/bench/router_overhead.py --help
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import shutil
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if __package__ in (None, ""):  # run as a file: make `scripts.bench` importable
    sys.path.insert(0, ROOT)

from scripts.bench.loadgen import closed_loop, request_bytes, sequential  # noqa: E402
from scripts.bench.procs import (  # noqa: E402
    HOST,
    Fleet,
    can_pin,
    cpu_seconds,
    free_port,  # re-exported: policies.py imports it from here
    log,
    wait_http,  # re-exported as well
)

__all__ = ["free_port", "wait_http", "main"]

CHAT: dict[str, object] = {"model": "bench-model",
                           "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
PATH = "/v1/chat/completions"
ROUTER_CPU, CLIENT_CPU = 0, 1
BUSY_ENOUGH = 0.85  # a router using less CPU than this at c64 was starved, not saturated


@dataclass
class Target:
    name: str
    port: int
    pid: int | None = None  # the router process (None for direct)
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def request(self, stream: bool = False) -> bytes:
        return request_bytes(HOST, self.port, PATH, {**CHAT, "stream": True} if stream else CHAT)


def find_smg() -> str | None:
    return shutil.which("smg") or shutil.which("smg", path=os.path.dirname(sys.executable))


async def wait_ready(target: Target, timeout_s: float = 60.0) -> None:
    """Until one chat request through ``target`` answers 200 (routers may report healthy
    before their worker is registered)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await sequential(HOST, target.port, target.request(), 1)
            return
        except (OSError, RuntimeError, asyncio.IncompleteReadError):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{target.name} never answered a chat request") from None
            await asyncio.sleep(0.2)


def start_targets(fleet: Fleet, args: argparse.Namespace) -> tuple[list[Target], int, str]:
    """Fake worker, BanaServe's router and (if installed) SMG; returns the worker pid too."""
    up_port = free_port()
    upstream = fleet.start("upstream", [sys.executable, "-m", "scripts.bench.fast_upstream",
                                        str(up_port)], CLIENT_CPU)
    wait_http(f"http://{HOST}:{up_port}/health", proc=upstream)
    worker_url = f"http://{HOST}:{up_port}"
    targets = [Target("direct", up_port)]
    port = free_port()
    proc = fleet.start("banaserve", [sys.executable, "-m", "router", "--workers", worker_url,
                                     "--port", str(port), "--policy", args.policy,
                                     "--log-level", "warning"], ROUTER_CPU)
    wait_http(f"http://{HOST}:{port}/health", proc=proc)
    targets.append(Target("banaserve", port, proc.pid))
    smg = find_smg()
    if args.no_smg:
        return targets, upstream.pid, "skipped (--no-smg)"
    if smg is None:
        return targets, upstream.pid, "not installed"
    port = free_port()
    proc = fleet.start("smg", [smg, "launch", "--host", HOST, "--port", str(port),
                               "--worker-urls", worker_url, "--policy", "round_robin",
                               "--log-level", "warn", "--prometheus-host", HOST,
                               "--prometheus-port", str(free_port())], ROUTER_CPU)
    wait_http(f"http://{HOST}:{port}/health", proc=proc)
    targets.append(Target("smg", port, proc.pid))
    return targets, upstream.pid, "measured"


def percentiles(values: list[float]) -> dict[str, float]:
    """Nearest-rank p50/p90/p99 in milliseconds."""
    if not values:
        return {"p50_ms": float("nan"), "p90_ms": float("nan"), "p99_ms": float("nan")}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {"p50_ms": pick(0.50), "p90_ms": pick(0.90), "p99_ms": pick(0.99)}


async def latency_phase(targets: list[Target], args: argparse.Namespace,
                        rng: random.Random) -> dict[str, list[float]]:
    """Concurrency-1 latency samples per target, gathered in shuffled alternating rounds."""
    log(f"phase latency: c1, {args.warmup} warm-up + {args.requests} requests per target "
        f"in {args.rounds} rounds")
    samples: dict[str, list[float]] = {t.name: [] for t in targets}
    timeout = 60 + args.requests * 0.05
    for t in targets:
        await asyncio.wait_for(sequential(HOST, t.port, t.request(), args.warmup), timeout)
        t.runs["latency"] = []
    per_round = max(1, args.requests // args.rounds)
    for round_index in range(args.rounds):
        for t in rng.sample(targets, len(targets)):
            got = await asyncio.wait_for(sequential(HOST, t.port, t.request(), per_round),
                                         timeout)
            samples[t.name] += got
            t.runs["latency"].append({"round": round_index, "requests": len(got),
                                      **percentiles(got)})
    return samples


async def capacity_run(target: Target, args: argparse.Namespace, stream: bool,
                       upstream_pid: int) -> dict[str, Any]:
    """One closed-loop run against ``target`` with CPU accounting of router and worker."""
    pids = {"router": target.pid, "upstream": upstream_pid}
    before = {k: cpu_seconds(pid) for k, pid in pids.items() if pid is not None}
    result = await asyncio.wait_for(
        closed_loop(HOST, target.port, target.request(stream), args.concurrency, args.seconds,
                    expect_done=stream), args.seconds + 60)
    used = {k: cpu_seconds(pids[k]) - v for k, v in before.items()}
    router_cpu = used.get("router")
    return {
        "rate": result.rate, "completed": result.completed, "errors": result.errors,
        "seconds": result.seconds,
        "router_cpu_us_per_request": (router_cpu / result.completed * 1e6
                                      if router_cpu is not None and result.completed else None),
        "router_cpu_util": router_cpu / result.seconds if router_cpu is not None else None,
        "upstream_cpu_util": used["upstream"] / result.seconds,
        "client_cpu_util": result.client_cpu_s / result.seconds,
        **percentiles(result.latencies_s)}


async def capacity_phase(targets: list[Target], args: argparse.Namespace, stream: bool,
                         upstream_pid: int, rng: random.Random) -> None:
    phase = "sse" if stream else "json"
    log(f"phase {phase}: c{args.concurrency}, {args.warmup_seconds:g}s warm-up + "
        f"{args.runs} x {args.seconds:g}s per target")
    for t in targets:
        await asyncio.wait_for(
            closed_loop(HOST, t.port, t.request(stream), args.concurrency,
                        args.warmup_seconds, expect_done=stream), args.warmup_seconds + 60)
        t.runs[phase] = []
    for run_index in range(args.runs):
        for t in rng.sample(targets, len(targets)):
            run = await capacity_run(t, args, stream, upstream_pid)
            t.runs[phase].append({"run": run_index, **run})
            errors = f", {run['errors']} errors" if run["errors"] else ""
            log(f"  {phase} run {run_index + 1}/{args.runs} {t.name}: {run['rate']:,.0f}/s{errors}")


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(targets: list[Target], samples: dict[str, list[float]]) -> dict[str, Any]:
    """Per target: c1 percentiles over all rounds, added latency, capacity medians."""
    direct = percentiles(samples["direct"])
    out: dict[str, Any] = {}
    for t in targets:
        lat = percentiles(samples[t.name])
        entry: dict[str, Any] = {"latency_c1": lat}
        if t.name != "direct":
            entry["added_p50_ms"] = lat["p50_ms"] - direct["p50_ms"]
            entry["added_p99_ms"] = lat["p99_ms"] - direct["p99_ms"]
        for phase in ("json", "sse"):
            runs = t.runs.get(phase, [])
            entry[f"{phase}_rate_median"] = median_of(runs, "rate")
            entry[f"{phase}_rate_runs"] = [r["rate"] for r in runs]
            entry[f"{phase}_errors"] = sum(r["errors"] for r in runs)
            entry[f"{phase}_cpu_us_per_request"] = median_of(runs, "router_cpu_us_per_request")
            entry[f"{phase}_router_cpu_util"] = median_of(runs, "router_cpu_util")
        out[t.name] = entry
    return out


def machine() -> dict[str, Any]:
    import aiohttp

    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f
                      if line.startswith("model name")), platform.processor())
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "aiohttp": aiohttp.__version__, "platform": platform.platform(),
            "pinned": can_pin(), "loadavg_start": os.getloadavg(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def one_line(summary: dict[str, Any], policy: str, smg_status: str) -> str:
    ours = summary["banaserve"]
    text = (f"router_overhead: added p50 {ours['added_p50_ms']:.2f} ms "
            f"(p99 {ours['added_p99_ms']:.2f} ms) at c1; capacity "
            f"{ours['json_rate_median']:,.0f} req/s JSON "
            f"({ours['json_cpu_us_per_request']:.0f} us CPU/req), "
            f"{ours['sse_rate_median']:,.0f} streams/s SSE "
            f"({ours['sse_cpu_us_per_request']:.0f} us CPU/stream) on one core [{policy}]")
    errors = ours["json_errors"] + ours["sse_errors"]
    if errors:
        text += f" ({errors} errors)"
    busy = min(ours["json_router_cpu_util"] or 0.0, ours["sse_router_cpu_util"] or 0.0)
    if busy < BUSY_ENOUGH:
        text += f" (router core only {busy:.0%} busy: other load on the machine?)"
    smg = summary.get("smg")
    if smg is None:
        return text + f"; smg: {smg_status}"
    return text + (f"; smg: added p50 {smg['added_p50_ms']:.2f} ms "
                   f"(p99 {smg['added_p99_ms']:.2f} ms), {smg['json_rate_median']:,.0f} req/s "
                   f"JSON ({smg['json_cpu_us_per_request']:.0f} us/req), "
                   f"{smg['sse_rate_median']:,.0f} streams/s SSE "
                   f"({smg['sse_cpu_us_per_request']:.0f} us/stream)")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench.router_overhead",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--policy", default="round_robin",
        help="BanaServe router policy, e.g. round_robin or load_aware (any the router accepts); "
             "SMG always runs round_robin (default %(default)s)")
    add("--requests", type=int, default=2000,
        help="measured c1 requests per target, over all rounds (default %(default)s)")
    add("--warmup", type=int, default=200, help="c1 warm-up requests per target (%(default)s)")
    add("--rounds", type=int, default=3, help="alternating c1 rounds (default %(default)s)")
    add("--concurrency", type=int, default=64,
        help="connections in the capacity phases (default %(default)s)")
    add("--seconds", type=float, default=10.0,
        help="length of one capacity run in seconds (default %(default)s)")
    add("--warmup-seconds", type=float, default=2.0,
        help="capacity warm-up per target and phase, seconds (default %(default)s)")
    add("--runs", type=int, default=3, help="capacity runs per target and phase (%(default)s)")
    add("--seed", type=int, default=0,
        help="seeds the order in which targets take turns (default %(default)s)")
    add("--no-smg", action="store_true", help="do not start SGLang's router even if installed")
    add("--quick", action="store_true",
        help="smoke mode: 300 c1 requests in 1 round after 50 warm-up, one 2 s run per "
             "capacity phase after 0.5 s warm-up")
    add("--out", default=os.path.join(ROOT, "results", "router_overhead.json"),
        help="JSON result path (default results/router_overhead.json in the repository)")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.rounds, args.warmup = 300, 1, 50
        args.seconds, args.warmup_seconds, args.runs = 2.0, 0.5, 1
    for name in ("requests", "rounds", "concurrency", "runs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.seconds <= 0:
        parser.error(f"--seconds must be positive, got {args.seconds}")
    return args


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through Fleet.__exit__, which stops every process


async def measure(targets: list[Target], args: argparse.Namespace,
                  upstream_pid: int) -> dict[str, list[float]]:
    rng = random.Random(args.seed)
    for t in targets:
        await wait_ready(t)
    samples = await latency_phase(targets, args, rng)
    await capacity_phase(targets, args, False, upstream_pid, rng)
    await capacity_phase(targets, args, True, upstream_pid, rng)
    return samples


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out_path = os.path.abspath(args.out)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)
    info = machine()
    if can_pin():
        os.sched_setaffinity(0, {CLIENT_CPU})  # load generator beside the fake worker
    try:
        with Fleet(cwd=ROOT) as fleet:
            targets, upstream_pid, smg_status = start_targets(fleet, args)
            log("targets: " + ", ".join(f"{t.name}:{t.port}" for t in targets)
                + ("" if smg_status == "measured" else f" (smg {smg_status})"))
            samples = asyncio.run(measure(targets, args, upstream_pid))
    except KeyboardInterrupt:
        log("interrupted; every started process has been stopped")
        return 130
    info["loadavg_end"] = os.getloadavg()
    summary = summarize(targets, samples)
    line = one_line(summary, args.policy, smg_status)
    result = {"benchmark": "router_overhead", "machine": info,
              "config": {**vars(args), "out": out_path, "body": CHAT, "path": PATH,
                         "smg_policy": "round_robin", "router_cpu": ROUTER_CPU,
                         "client_and_upstream_cpu": CLIENT_CPU},
              "smg": smg_status, "summary": summary, "summary_line": line,
              "runs": {t.name: t.runs for t in targets}}
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=2)
    print(line)
    log(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
