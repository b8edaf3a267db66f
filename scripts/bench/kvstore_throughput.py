"""kvstore get/put throughput against the machine's own limits, measured in the same run.

  python -m scripts.bench.kvstore_throughput [--quick] [--page-kib 64,1024,4096] [--out FILE]

Baselines (same process, same run): a large in-process memcpy (numpy ``copyto``), and a
sequential file write (with fsync) and read of the same size on the disk under ``--dir``.

Targets: a real ``python -m kvstore`` server per tier, pinned to core 0 when the machine has
two cores (the client runs on core 1):
  memory  --memory-gb large enough for every page, no SSD tier
  ssd     a memory tier far smaller than the data, so gets come from the SSD tier (files in the
          OS page cache unless --drop-caches, which needs root)
and three client paths: ``shm`` (same-host shared memory; gets with ``get_into`` into the
caller's buffers: a copy on each side), ``lease`` (shared memory; gets with ``get_leased``, the
pages readable in place in the client's segment: one copy, the server's, as the layer-wise
SGLang backend reads them) and ``tcp`` (``get``). For each page size: put ``--total-mib`` of
pages in batches of ``--batch`` pages (distinct keys), then get them all back; ``--runs`` runs
after one warm-up run, GB/s per run and the median. Seeded page contents. JSON (machine, config,
every run) to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__)))))

import numpy as np  # noqa: E402

from kvstore.client import KVStoreClient  # noqa: E402
from scripts.bench.procs import free_port  # noqa: E402

GB = 1e9


def log(message: str) -> None:
    print(f"[kvstore-bench] {message}", file=sys.stderr, flush=True)


def memcpy_gbps(size: int, runs: int) -> list[float]:
    src = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # warm-up: fault the pages in
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        np.copyto(dst, src)
        out.append(size / (time.perf_counter() - t) / GB)
    return out


def file_gbps(directory: str, size: int, runs: int) -> dict[str, list[float]]:
    data = np.random.default_rng(1).integers(0, 255, size, dtype=np.uint8).tobytes()
    path = os.path.join(directory, "raw.bin")
    writes, reads = [], []
    for _ in range(runs):
        t = time.perf_counter()
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        writes.append(size / (time.perf_counter() - t) / GB)
        t = time.perf_counter()
        with open(path, "rb") as f:
            while f.read(16 << 20):
                pass
        reads.append(size / (time.perf_counter() - t) / GB)
    os.remove(path)
    return {"write_fsync": writes, "read_page_cache": reads}


def start_server(tier: str, ssd_dir: str, total: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    argv = [sys.executable, "-m", "kvstore", "--port", str(port), "--no-http",
            "--log-level", "warning", "--max-frame-mb", "1024"]
    if tier == "memory":
        argv += ["--memory-gb", f"{3 * total / 2**30:.3f}"]
    else:
        argv += ["--memory-gb", "0.01", "--ssd-dir", ssd_dir, "--ssd-gb",
                 f"{3 * total / 2**30:.3f}", "--max-page-mb", "64"]
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        argv = ["taskset", "-c", "0", *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with KVStoreClient("127.0.0.1", port, timeout_s=1, use_shm=False) as c:
                c.hello()
            return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"kvstore server ({tier}) did not start")


def one_run(port: int, path: str, page: int, count: int, batch: int, run: int,
            flush: Any) -> dict[str, float]:
    rng = np.random.default_rng(run)
    pages = [rng.integers(0, 255, page, dtype=np.uint8).tobytes() for _ in range(min(count, 8))]
    keys = [f"r{run}-p{i}" for i in range(count)]
    with KVStoreClient("127.0.0.1", port, timeout_s=60, use_shm=(path != "tcp")) as client:
        t = time.perf_counter()
        for i in range(0, count, batch):
            ok = client.put([(k, pages[j % len(pages)]) for j, k in
                             enumerate(keys[i:i + batch], start=i)])
            assert all(ok), "a put was refused"
        put_s = time.perf_counter() - t
        flush()
        dests = [bytearray(page) for _ in range(batch)]
        t = time.perf_counter()
        for i in range(0, count, batch):
            chunk = keys[i:i + batch]
            if path == "shm":
                sizes = client.get_into(chunk, dests[:len(chunk)])
                assert all(s == page for s in sizes), "a get missed"
            elif path == "lease":
                with client.get_leased(chunk, page) as lease:
                    assert all(s == page for s in lease.sizes), "a get missed"
            else:
                got = client.get(chunk)
                assert all(g is not None for g in got), "a get missed"
        get_s = time.perf_counter() - t
        client.delete(keys)
    total = page * count
    return {"put_gbps": total / put_s / GB, "get_gbps": total / get_s / GB}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--page-kib", default="64,1024,4096")
    parser.add_argument("--total-mib", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default=None, help="directory for the SSD tier and file tests")
    parser.add_argument("--tiers", default="memory,ssd",
                        help="server set-ups to measure (memory, ssd)")
    parser.add_argument("--paths", default="shm,lease,tcp",
                        help="client paths to measure (shm, lease, tcp)")
    parser.add_argument("--quick", action="store_true", help="128 MiB, 1 MiB pages, 2 runs")
    parser.add_argument("--out", default="results/kvstore_throughput.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.page_kib, args.total_mib, args.runs = "1024", 128, 2
    pages = [int(p) * 1024 for p in args.page_kib.split(",")]
    total = args.total_mib << 20
    base = tempfile.mkdtemp(prefix="kvbench-", dir=args.dir)
    result: dict[str, Any] = {
        "benchmark": "kvstore_throughput", "date": datetime.datetime.now(
            datetime.UTC).isoformat(timespec="seconds"), "nproc": os.cpu_count(),
        "config": vars(args), "baselines": {}, "rows": []}
    try:
        log(f"baselines: memcpy and file I/O of {args.total_mib} MiB")
        result["baselines"]["memcpy_gbps"] = memcpy_gbps(total, args.runs)
        result["baselines"].update(file_gbps(base, total, args.runs))
        for tier in args.tiers.split(","):
            ssd = os.path.join(base, f"ssd-{tier}")
            proc, port = start_server(tier, ssd, total)
            try:
                for page in pages:
                    count = max(1, total // page)
                    for path in args.paths.split(","):
                        runs = [one_run(port, path, page, count, args.batch, r, lambda: None)
                                for r in range(args.runs + 1)][1:]
                        row = {"tier": tier, "path": path, "page_bytes": page, "pages": count,
                               "runs": runs,
                               "put_gbps": statistics.median(r["put_gbps"] for r in runs),
                               "get_gbps": statistics.median(r["get_gbps"] for r in runs)}
                        result["rows"].append(row)
                        log(f"{tier:14} {path} {page >> 10:5} KiB: put {row['put_gbps']:.2f} "
                            f"GB/s, get {row['get_gbps']:.2f} GB/s")
            finally:
                proc.terminate()
                proc.wait(30)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    b = result["baselines"]
    print(f"kvstore_throughput: memcpy {statistics.median(b['memcpy_gbps']):.1f} GB/s, file write"
          f"+fsync {statistics.median(b['write_fsync']):.2f} GB/s, read "
          f"{statistics.median(b['read_page_cache']):.2f} GB/s; " + "; ".join(
              f"{r['tier']}/{r['path']}/{r['page_bytes'] >> 10}KiB put {r['put_gbps']:.2f} "
              f"get {r['get_gbps']:.2f}" for r in result["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
