"""The shared L3 behind SGLang CPU workers in the kvstore benchmarks: one class per run set-up.

``SharedL3(backend, scratch)`` starts what the backend needs, gives the worker flags and
environment, empties the tier between runs and stops it. Backends:

- ``none``: no HiCache at all (SGLang's plain radix cache, page size 1);
- ``l2``: HiCache with each worker's own host tier, no L3;
- ``kvstore``: BanaServe's store, memory tier (``python -m kvstore --memory-gb 2``);
- ``kvstore-ssd``: BanaServe's store with a memory tier too small to hold anything
  (``--memory-gb 0.001 --ssd-dir DIR``), so every hit is read and checksummed from its SSD files;
- ``file``: SGLang's own ``file`` L3 on one shared directory;
- ``mooncake``: SGLang's ``mooncake`` L3 (``mooncake_master`` on loopback, TCP transport, each
  worker contributing a 1 GB segment).

Every HiCache set-up uses the CPU HiCache flags of ``kvstore.sglang_args`` (1 GB host tier),
the same page size, prefetch threshold and write policy (``write_policy``: by default the one
the launcher gives store-attached workers, ``kvstore.sglang_args.WRITE_POLICY``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

from kvstore.sglang_args import CPU_HICACHE_ARGS, WRITE_POLICY, worker_args
from runtime_patches.launch import WorkerProcess
from scripts.bench.router_overhead import free_port, wait_http

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BACKENDS = ("none", "l2", "kvstore", "kvstore-ssd", "file", "mooncake")


class SharedL3:
    """See the module docstring."""

    def __init__(self, backend: str, scratch: str, page_size: int, prefetch_threshold: int,
                 store_cpus: str | None = None, tag: str = "bench",
                 write_policy: str = WRITE_POLICY) -> None:
        if backend not in BACKENDS:
            raise SystemExit(f"{tag}: unknown L3 backend {backend!r} (one of "
                             f"{', '.join(BACKENDS)})")
        self.backend, self.page_size, self.write_policy = backend, page_size, write_policy
        self.prefetch_threshold, self.store_cpus = prefetch_threshold, store_cpus
        self.proc: subprocess.Popen[bytes] | None = None
        self.port, self.http_port = free_port(), free_port()
        self.dir = os.path.join(scratch, f"l3-{backend}")
        self.log_path = os.path.join(ROOT, "logs", "bench", f"{tag}-{backend}.log")

    @property
    def is_kvstore(self) -> bool:
        return self.backend.startswith("kvstore")

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        os.makedirs(self.dir, exist_ok=True)
        if self.is_kvstore:
            argv = [sys.executable, "-m", "kvstore", "--host", "127.0.0.1", "--port",
                    str(self.port), "--http-port", str(self.http_port), "--log-level", "warning"]
            argv += (["--memory-gb", "0.001", "--ssd-dir", self.dir, "--ssd-gb", "4"]
                     if self.backend == "kvstore-ssd" else ["--memory-gb", "2"])
        elif self.backend == "mooncake":
            master = shutil.which("mooncake_master", path=os.path.dirname(sys.executable))
            if master is None:
                raise SystemExit(f"mooncake_master not found next to {sys.executable} "
                                 "(scripts/setup.sh installs mooncake-transfer-engine-non-cuda)")
            argv = [master, f"-rpc_port={self.port}", f"-metrics_port={self.http_port}",
                    "-rpc_address=127.0.0.1"]
        else:
            return
        if self.store_cpus is not None and shutil.which("taskset"):
            argv = ["taskset", "-c", self.store_cpus, *argv]
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd=ROOT)
        if self.is_kvstore:
            wait_http(f"http://127.0.0.1:{self.http_port}/stats", 60, self.proc)
        else:
            time.sleep(2.0)
            if self.proc.poll() is not None:
                raise RuntimeError(f"mooncake_master exited (see {self.log_path})")

    @contextlib.contextmanager
    def serving(self, workers: Sequence[WorkerProcess],
                timeout_s: float = 600.0) -> Iterator[None]:
        """The L3 and then ``workers`` (built with ``worker_args()``) up, with the environment
        they need; on exit the workers stop, then the L3, and the environment is restored."""
        saved = {key: os.environ.get(key) for key in self.env()}
        os.environ.update(self.env())
        try:
            self.start()
            for w in workers:
                w.start()
            for w in workers:
                w.wait_ready(timeout_s)
            yield
        finally:
            for w in workers:
                w.stop()
            self.stop()
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def worker_args(self) -> list[str]:
        if self.backend == "none":
            return []
        hicache = [*CPU_HICACHE_ARGS, "--page-size", str(self.page_size)]
        if self.is_kvstore:
            return [*worker_args(f"127.0.0.1:{self.port}", self.prefetch_threshold,
                                 write_policy=self.write_policy), *hicache]
        args = ["--enable-hierarchical-cache", *hicache, "--hicache-write-policy",
                self.write_policy]
        extra: dict[str, Any] = {"prefetch_threshold": self.prefetch_threshold}
        if self.backend == "file":
            args += ["--hicache-storage-backend", "file"]
        elif self.backend == "mooncake":
            extra.update(master_server_address=f"127.0.0.1:{self.port}", protocol="tcp",
                         device_name="", metadata_server="P2PHANDSHAKE",
                         global_segment_size="1gb", local_hostname="127.0.0.1")
            args += ["--hicache-storage-backend", "mooncake"]
        if self.backend != "l2":
            args += ["--hicache-storage-backend-extra-config", json.dumps(extra)]
        return args

    def env(self) -> dict[str, str]:
        """Environment the workers need (SGLang's file L3 reads its directory from it)."""
        return {"SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR": self.dir} \
            if self.backend == "file" else {}

    def pages(self) -> int:
        """Pages the L3 holds now (kvstore: its fullest tier; file: files; others: 0)."""
        if self.backend == "file":
            return sum(len(files) for _, _, files in os.walk(self.dir))
        if not self.is_kvstore:
            return 0
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/stats") as resp:
            stats = json.loads(resp.read())
        return max(int(tier["pages"]) for tier in stats["tiers"])

    def empty(self, worker_urls: list[str]) -> None:
        """A cold shared tier for the next run."""
        if self.is_kvstore:
            self.stop()
            shutil.rmtree(self.dir, ignore_errors=True)
            self.start()
        elif self.backend == "file":
            shutil.rmtree(self.dir, ignore_errors=True)
            os.makedirs(self.dir, exist_ok=True)
        elif self.backend == "mooncake":
            req = urllib.request.Request(worker_urls[0] + "/hicache/storage-backend/clear",
                                         method="POST")
            with urllib.request.urlopen(req, timeout=30) as resp:
                resp.read()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
