"""Router overhead: the same request stream direct to a worker and through the router, one run.

Set-up (2-core machine, as in shared/notes/measured-here.md part 1): a fast fake worker
(scripts/bench/fast_upstream.py) and this load generator share core 1; the router under test is
pinned alone to core 0, so its numbers are its single-core capacity. BanaServe's router and, when
installed (requirements/bench.txt), SGLang's router SMG run in the same run against the same
upstream.

Phases, each target measured in alternating rounds so drift hits all alike:
  latency   concurrency 1, chat JSON: p50/p90/p99 per target; "added" = target - direct
  json      concurrency 64 closed loop for --seconds: requests/s, router CPU us/request
  sse       the same with "stream": true (21 events per stream): streams/s

Writes JSON (machine, config, every run) to --out and prints a one-line summary.

  python -m scripts.bench.router_overhead [--quick] [--policy round_robin] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

if __package__ in (None, ""):  # run as a file: make `scripts.bench` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__)))))

from scripts.bench.loadgen import closed_loop, request_bytes, sequential  # noqa: E402

HOST = "127.0.0.1"
CHAT = {"model": "bench-model", "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 16}


def log(message: str) -> None:
    print(f"[router_overhead] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout_s}s")


@dataclass
class Target:
    name: str
    port: int
    proc: subprocess.Popen[bytes] | None = None
    runs: dict[str, list[Any]] = field(default_factory=dict)

    def cpu_seconds(self) -> float:
        if self.proc is None:
            return 0.0
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(argv: list[str], cpu: str) -> subprocess.Popen[bytes]:
    taskset = ["taskset", "-c", cpu] if shutil.which("taskset") else []
    return subprocess.Popen(taskset + argv, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def start_targets(args: argparse.Namespace, procs: list[subprocess.Popen[bytes]]) -> list[Target]:
    up_port = free_port()
    procs.append(start([sys.executable, "-m", "scripts.bench.fast_upstream", str(up_port)], "1"))
    wait_http(f"http://{HOST}:{up_port}/health")
    targets = [Target("direct", up_port)]
    port = free_port()
    proc = start([sys.executable, "-m", "router", "--workers", f"http://{HOST}:{up_port}",
                  "--port", str(port), "--policy", args.policy, "--log-level", "warning"], "0")
    procs.append(proc)
    wait_http(f"http://{HOST}:{port}/health")
    targets.append(Target("banaserve", port, proc))
    smg = shutil.which("smg") or shutil.which("smg", path=os.path.dirname(sys.executable))
    if smg and not args.no_smg:
        port = free_port()
        proc = start([smg, "launch", "--host", HOST, "--port", str(port), "--worker-urls",
                      f"http://{HOST}:{up_port}", "--policy", "round_robin", "--log-level",
                      "warn", "--prometheus-host", HOST, "--prometheus-port",
                      str(free_port())], "0")
        procs.append(proc)
        wait_http(f"http://{HOST}:{port}/health")
        targets.append(Target("smg", port, proc))
    return targets


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {"p50_ms": pick(0.50), "p90_ms": pick(0.90), "p99_ms": pick(0.99)}


async def latency_phase(targets: list[Target], args: argparse.Namespace) -> None:
    log(f"latency at concurrency 1: {args.requests} requests per target in {args.rounds} rounds")
    for t in targets:
        request = request_bytes(HOST, t.port, "/v1/chat/completions", CHAT)
        await sequential(HOST, t.port, request, args.warmup)
        t.runs["latency_s"] = []
    for _ in range(args.rounds):
        for t in targets:
            request = request_bytes(HOST, t.port, "/v1/chat/completions", CHAT)
            t.runs["latency_s"] += await sequential(HOST, t.port, request,
                                                    args.requests // args.rounds)


async def capacity_phase(targets: list[Target], args: argparse.Namespace, stream: bool) -> None:
    phase = "sse" if stream else "json"
    body = {**CHAT, "stream": True} if stream else CHAT
    log(f"{phase} capacity: concurrency {args.concurrency}, {args.runs} x {args.seconds}s")
    for t in targets:
        request = request_bytes(HOST, t.port, "/v1/chat/completions", body)
        await closed_loop(HOST, t.port, request, args.concurrency, args.warmup_seconds)
        t.runs[phase] = []
    for _ in range(args.runs):
        for t in targets:
            request = request_bytes(HOST, t.port, "/v1/chat/completions", body)
            cpu_before = t.cpu_seconds()
            result = await closed_loop(HOST, t.port, request, args.concurrency, args.seconds)
            cpu = t.cpu_seconds() - cpu_before
            t.runs[phase].append({
                "rate": result.rate, "completed": result.completed, "errors": result.errors,
                "seconds": result.seconds,
                "cpu_us_per_request": cpu / result.completed * 1e6 if result.completed else None,
                **percentiles(result.latencies_s)})


def summarize(targets: list[Target]) -> dict[str, Any]:
    direct = percentiles(targets[0].runs["latency_s"])
    out: dict[str, Any] = {}
    for t in targets:
        lat = percentiles(t.runs["latency_s"])
        entry: dict[str, Any] = {"latency_c1": lat}
        if t.name != "direct":
            entry["added_p50_ms"] = lat["p50_ms"] - direct["p50_ms"]
            entry["added_p99_ms"] = lat["p99_ms"] - direct["p99_ms"]
        for phase in ("json", "sse"):
            runs = t.runs.get(phase, [])
            if runs:
                entry[f"{phase}_rate_median"] = statistics.median(r["rate"] for r in runs)
                cpu = [r["cpu_us_per_request"] for r in runs if r["cpu_us_per_request"]]
                entry[f"{phase}_cpu_us_per_request"] = statistics.median(cpu) if cpu else None
        out[t.name] = entry
    return out


def machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                  if line.startswith("model name")), platform.processor())
    import aiohttp

    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "aiohttp": aiohttp.__version__,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def one_line(summary: dict[str, Any]) -> str:
    ours = summary["banaserve"]
    text = (f"router_overhead: banaserve added p50 {ours['added_p50_ms']:.3f} ms "
            f"(p99 {ours['added_p99_ms']:.3f} ms) at c1; {ours['json_rate_median']:,.0f} req/s "
            f"JSON ({ours['json_cpu_us_per_request']:.0f} us CPU/req), "
            f"{ours['sse_rate_median']:,.0f} streams/s SSE on one core")
    smg = summary.get("smg")
    if smg:
        text += (f"; smg added p50 {smg['added_p50_ms']:.3f} ms, {smg['json_rate_median']:,.0f} "
                 f"req/s JSON, {smg['sse_rate_median']:,.0f} streams/s SSE")
    else:
        text += "; smg not installed (pip install -r requirements/bench.txt)"
    return text


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default="round_robin", help="BanaServe router policy")
    parser.add_argument("--requests", type=int, default=3000, help="c1 requests per target")
    parser.add_argument("--rounds", type=int, default=3, help="alternating c1 rounds")
    parser.add_argument("--warmup", type=int, default=300, help="c1 warm-up requests")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of a capacity run")
    parser.add_argument("--warmup-seconds", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=3, help="capacity runs per target")
    parser.add_argument("--no-smg", action="store_true", help="skip SGLang's router")
    parser.add_argument("--quick", action="store_true", help="smoke mode: tiny counts")
    parser.add_argument("--out", default="results/router_overhead.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.rounds, args.warmup = 300, 1, 50
        args.seconds, args.warmup_seconds, args.runs = 2.0, 0.5, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    os.chdir(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
            os.sched_setaffinity(0, {1})
        targets = start_targets(args, procs)
        log("targets: " + ", ".join(f"{t.name}:{t.port}" for t in targets))

        async def run_all() -> None:
            await latency_phase(targets, args)
            await capacity_phase(targets, args, stream=False)
            await capacity_phase(targets, args, stream=True)

        asyncio.run(run_all())
        summary = summarize(targets)
        result = {"benchmark": "router_overhead", "machine": machine(), "config": vars(args),
                  "summary": summary,
                  "runs": {t.name: {k: v for k, v in t.runs.items() if k != "latency_s"}
                           for t in targets},
                  "smg": "measured" if "smg" in summary else "not installed or skipped"}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(one_line(summary))
        log(f"wrote {args.out}")
        return 0
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
