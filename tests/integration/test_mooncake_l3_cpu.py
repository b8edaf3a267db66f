"""SGLang's own ``mooncake`` HiCache L3 on CPU (the benchmarks' baseline), through our patches.

SGLang lays the host pool out ``page_first_direct`` for mooncake, whose copy kernels come from
``sgl_kernel`` on CUDA only; ``runtime_patches.cpu.fixes`` provides them in torch. Two tiny-model
workers share one ``mooncake_master`` on loopback (TCP transport): worker B loads worker A's
prefix from the store (``cached_tokens_details.storage``) with the same greedy output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest

from runtime_patches.launch import WorkerProcess
from tests.integration.cluster import (
    LOG_DIR,
    free_port,
    generate,
    start_workers,
    storage_tokens,
    wait_until,
)

pytestmark = pytest.mark.integration
MASTER = shutil.which("mooncake_master", path=os.path.dirname(sys.executable))


@pytest.fixture(scope="module")
def master_port() -> Iterator[int]:
    if MASTER is None:
        pytest.skip(f"mooncake_master not installed next to {sys.executable} "
                    "(scripts/setup.sh installs mooncake-transfer-engine-non-cuda)")
    port = free_port()
    os.makedirs(LOG_DIR, exist_ok=True)
    with open(os.path.join(LOG_DIR, "mooncake-master.log"), "wb") as log:
        proc = subprocess.Popen([MASTER, f"-rpc_port={port}", f"-metrics_port={free_port()}",
                                 "-rpc_address=127.0.0.1"], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    time.sleep(1.0)
    assert proc.poll() is None, "mooncake_master exited at start"
    yield port
    proc.terminate()
    proc.wait(20)


@pytest.fixture(scope="module")
def workers(master_port: int) -> Iterator[list[WorkerProcess]]:
    extra = {"master_server_address": f"127.0.0.1:{master_port}", "protocol": "tcp",
             "device_name": "", "metadata_server": "P2PHANDSHAKE",
             "global_segment_size": 256 << 20, "local_hostname": "127.0.0.1",
             "prefetch_threshold": 16}
    args = ("--enable-hierarchical-cache", "--hicache-io-backend", "direct",
            "--hicache-mem-layout", "layer_first", "--hicache-size", "1", "--page-size", "16",
            "--hicache-storage-backend", "mooncake", "--hicache-storage-prefetch-policy",
            "wait_complete", "--hicache-storage-backend-extra-config", json.dumps(extra),
            "--enable-cache-report")
    pair = start_workers("tiny", 2, "mooncake-worker", extra_args=args)
    yield pair
    for w in pair:
        w.stop()


def backed_up_tokens(worker: WorkerProcess) -> float:
    with urllib.request.urlopen(worker.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(v) for v in re.findall(
        r"^sglang:backuped_tokens_total(?:\{[^}]*\})? ([0-9.e+]+)$", text, re.M))


def test_worker_b_loads_worker_a_prefix_from_mooncake(workers: list[WorkerProcess]) -> None:
    a, b = workers
    prompt = "def volume(r, h):\n    return 3.14159 * r * r * h\n" * 30
    first = generate(a, prompt)
    assert wait_until(lambda: backed_up_tokens(a) > 0, timeout_s=30), \
        "worker A backed nothing up to mooncake"
    time.sleep(1.0)
    second = generate(b, prompt)
    assert storage_tokens(second) > 0, second["meta_info"]
    assert second["output_ids"] == first["output_ids"]
    for w in workers:
        assert w.is_running()
