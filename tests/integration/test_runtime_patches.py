"""The CPU enablement reaches every SGLang process and works where it matters."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from runtime_patches.launch import WorkerProcess
from tests.integration.cluster import http_json, start_workers, wait_until

pytestmark = pytest.mark.integration


def test_plugin_verified_patches_in_scheduler_and_detokenizer(
        tiny_workers: list[WorkerProcess]) -> None:
    for worker in tiny_workers:
        assert worker.log_path is not None
        with open(worker.log_path) as f:
            pids = set(re.findall(r"runtime patches verified in pid (\d+)", f.read()))
        # SGLang's load_plugins() runs in the scheduler and the detokenizer process.
        assert len(pids) >= 2, pids


def test_doctor_probe_applies_every_cpu_patch() -> None:
    out = subprocess.run([sys.executable, "-m", "runtime_patches", "doctor"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    applied = out.stdout.rsplit("patches applied: ", 1)[1].strip().split(", ")
    from runtime_patches import boot
    from runtime_patches.registry import REGISTRY

    boot.install()
    expected = {p.name for p in REGISTRY.patches() if p.name.startswith(("cpu.", "queue."))}
    assert expected <= set(applied), expected - set(applied)


@pytest.fixture(scope="module")
def hicache_worker(tmp_path_factory: pytest.TempPathFactory,
                   ) -> Iterator[tuple[WorkerProcess, str]]:
    storage = tmp_path_factory.mktemp("hicache")
    os.environ["SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR"] = str(storage)
    try:
        (worker,) = start_workers(
            "tiny", 1, "hicache-worker",
            extra_args=("--enable-hierarchical-cache", "--hicache-io-backend", "direct",
                        "--hicache-mem-layout", "layer_first", "--hicache-size", "1",
                        "--hicache-storage-backend", "file", "--page-size", "16",
                        "--hicache-storage-prefetch-policy", "wait_complete",
                        "--enable-cache-report"))
    finally:
        del os.environ["SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR"]
    yield worker, str(storage)
    worker.stop()


def test_hicache_l3_hit_after_flush_on_cpu(hicache_worker: tuple[WorkerProcess, str]) -> None:
    """HiCache's host pool and direct IO run in the scheduler only thanks to the CPU patches."""
    worker, storage = hicache_worker
    body = {"text": "x = [i * i for i in range(10)]\n" * 40,
            "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
    status, first, _ = http_json("POST", worker.url + "/generate", body)
    assert status == 200, first
    # the write-through to the file tier is asynchronous (slower on a loaded machine)
    pages = first["meta_info"]["prompt_tokens"] // 16
    assert wait_until(lambda: len(os.listdir(storage)) >= pages, timeout_s=60), (
        f"{len(os.listdir(storage))} of {pages} pages written")
    time.sleep(0.5)
    assert wait_until(lambda: http_json("POST", worker.url + "/flush_cache")[0] == 200,
                      timeout_s=30, interval_s=0.5)
    status, second, _ = http_json("POST", worker.url + "/generate", body)
    assert status == 200, second
    details = second["meta_info"].get("cached_tokens_details") or {}
    assert details.get("storage", 0) > 0, second["meta_info"]
    assert second["output_ids"] == first["output_ids"]
