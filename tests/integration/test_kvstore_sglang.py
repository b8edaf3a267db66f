"""Real SGLang CPU workers (tiny model) sharing the real kvstore server as their L3.

A prefix computed on worker A is loaded from the store by worker B (SGLang's own
``cached_tokens_details`` shows the storage hit) and B's greedy output equals A's fresh
computation; worker C does the same with layer-wise loading (``--kvstore-layerwise``: its trace
shows the fill and the overlapped L2->L1 load); with the store killed, every worker keeps serving
correct output by recomputing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest

from kvstore.client import KVStoreClient
from kvstore.layerwise import ENV_TRACE
from kvstore.sglang_backend import worker_args
from runtime_patches.launch import WorkerProcess
from tests.integration.cluster import (
    LOG_DIR,
    RouterProcess,
    free_port,
    generate,
    http_json,
    start_workers,
    storage_tokens,
    wait_until,
)

pytestmark = pytest.mark.integration
HICACHE = ("--hicache-io-backend", "direct", "--hicache-mem-layout", "layer_first",
           "--hicache-size", "1", "--page-size", "16", "--enable-cache-report")
# The real server, memory tier only (the CLI's SSD tier is tested on its own).
SERVE = """
import asyncio, logging, sys
from kvstore.__main__ import _serve
from kvstore.backends.memory import MemoryStore
from kvstore.server import ServerConfig
logging.basicConfig(level="INFO")
sys.exit(asyncio.run(_serve(MemoryStore(256 << 20), ServerConfig(port=int(sys.argv[1]),
                                                                  http_port=0), None)))
"""


class StoreProcess:
    def __init__(self) -> None:
        self.port = free_port()
        os.makedirs(LOG_DIR, exist_ok=True)
        self._log = open(os.path.join(LOG_DIR, "kvstore-server.log"), "wb")
        self.proc = subprocess.Popen([sys.executable, "-c", SERVE, str(self.port)],
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        assert wait_until(self._up, timeout_s=30), "kvstore server did not start"

    def _up(self) -> bool:
        assert self.proc.poll() is None, "kvstore server exited"
        try:
            with KVStoreClient("127.0.0.1", self.port, timeout_s=1.0, use_shm=False) as c:
                c.hello()
            return True
        except OSError:
            return False

    def pages(self) -> int:
        with KVStoreClient("127.0.0.1", self.port, timeout_s=2.0, use_shm=False) as c:
            return int(c.stats()["tiers"][0]["pages"])

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()


@pytest.fixture(scope="module")
def store() -> Iterator[StoreProcess]:
    server = StoreProcess()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def workers(store: StoreProcess) -> Iterator[list[WorkerProcess]]:
    args = (*worker_args(f"127.0.0.1:{store.port}", prefetch_threshold=16,
                         prefetch_policy="wait_complete"), *HICACHE)
    pair = start_workers("tiny", 2, "kvstore-worker", extra_args=args)
    yield pair
    for w in pair:
        w.stop()


@pytest.fixture(scope="module")
def layered(store: StoreProcess) -> Iterator[tuple[WorkerProcess, str]]:
    trace = os.path.join(LOG_DIR, "kvstore-layerwise-trace.jsonl")
    if os.path.exists(trace):
        os.remove(trace)
    os.environ[ENV_TRACE] = trace
    try:
        (worker,) = start_workers(
            "tiny", 1, "kvstore-layerwise", kvstore=f"127.0.0.1:{store.port}",
            kvstore_page_size=16, kvstore_layerwise=True,
            extra_args=("--hicache-storage-prefetch-policy", "wait_complete"))
    finally:
        del os.environ[ENV_TRACE]
    yield worker, trace
    worker.stop()


def router_storage_tokens(router: RouterProcess, worker: WorkerProcess) -> float | None:
    """``banaserve_worker_cached_tokens{tier="storage"}`` of ``worker`` on the router's
    ``/metrics`` (None until the router has read that worker's counters)."""
    with urllib.request.urlopen(router.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    want = f'banaserve_worker_cached_tokens_total{{tier="storage",worker="{worker.url}"}} '
    for line in text.splitlines():
        if line.startswith(want):
            return float(line[len(want):])
    return None


def test_prefix_from_worker_a_is_loaded_by_worker_b(store: StoreProcess,
                                                    workers: list[WorkerProcess]) -> None:
    """...and the router in front of both reports B's storage hit on its ``/metrics`` (it reads
    the workers' own counters, so it sees traffic sent straight to a worker too)."""
    a, b = workers
    router = RouterProcess([a.url, b.url], "--cache-report-interval", "0.3",
                           tag="router-kvstore")
    try:
        router.wait_ready()
        assert wait_until(lambda: router_storage_tokens(router, b) is not None, 30)
        before = router_storage_tokens(router, b)
        prompt = "def area(r):\n    return 3.14159 * r * r\n" * 30
        first = generate(a, prompt)
        assert storage_tokens(first) == 0
        # A writes its pages to the store behind the request
        assert wait_until(lambda: store.pages() > 0, timeout_s=20), "worker A wrote nothing"
        time.sleep(1.0)
        second = generate(b, prompt)
        loaded = storage_tokens(second)
        assert loaded > 0, second["meta_info"]
        assert second["output_ids"] == first["output_ids"]
        assert wait_until(lambda: router_storage_tokens(router, b) == before + loaded, 10), (
            before, loaded, router_storage_tokens(router, b))
        assert router_storage_tokens(router, a) == 0  # A computed, it loaded nothing
    finally:
        router.stop()


def router_metric(router: RouterProcess, sample: str) -> float:
    with urllib.request.urlopen(router.url + "/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(sample + " "):
                return float(line.split()[-1])
    return 0.0


def test_router_asks_the_store_which_prefix_it_holds(store: StoreProcess,
                                                     workers: list[WorkerProcess]) -> None:
    """``--kvstore``: before dispatching a prompt whose prefix worker A computed (and wrote to
    the store), ``cost_aware`` learns how many of its leading tokens the store holds, whole
    pages of the workers' page size; a prompt nobody computed is a miss (the control)."""
    a, b = workers
    router = RouterProcess([a.url, b.url], "--policy", "cost_aware", "--kvstore",
                           f"127.0.0.1:{store.port}", tag="router-store-index")
    try:
        router.wait_ready()
        prompt = "def perimeter(w, h):\n    return 2 * (w + h)\n" * 30
        before = store.pages()
        first = generate(a, prompt)
        tokens = first["meta_info"]["prompt_tokens"]
        assert wait_until(lambda: store.pages() >= before + tokens // 16, timeout_s=30)
        status, out, _ = http_json("POST", router.url + "/generate", {
            "text": prompt, "sampling_params": {"max_new_tokens": 4, "temperature": 0}})
        assert status == 200, out
        assert router_metric(router, 'banaserve_store_lookups_total{result="hit"}') == 1
        found = router_metric(router, "banaserve_store_lookup_tokens_total")
        assert found == tokens // 16 * 16, (found, tokens)
        status, out, _ = http_json("POST", router.url + "/generate", {
            "text": "class Queue:\n    pass\n" * 40,
            "sampling_params": {"max_new_tokens": 4, "temperature": 0}})
        assert status == 200, out
        assert router_metric(router, 'banaserve_store_lookups_total{result="miss"}') == 1
        assert router_metric(router, "banaserve_store_lookup_tokens_total") == found
    finally:
        router.stop()


def test_layerwise_worker_loads_the_prefix_layer_by_layer(
        store: StoreProcess, workers: list[WorkerProcess],
        layered: tuple[WorkerProcess, str]) -> None:
    a, _ = workers
    c, trace = layered
    prompt = "def volume(r, h):\n    return 3.14159 * r * r * h\n" * 30
    before = store.pages()  # A may finish writing before generate() returns
    first = generate(a, prompt)
    want = before + first["meta_info"]["prompt_tokens"] // 16
    assert wait_until(lambda: store.pages() >= want, timeout_s=30), (
        f"worker A wrote {store.pages() - before} of {want - before} pages")
    time.sleep(1.0)
    second = generate(c, prompt)
    loaded = storage_tokens(second)
    assert loaded > 0, second["meta_info"]
    assert second["output_ids"] == first["output_ids"]
    records = [json.loads(line) for line in open(trace, encoding="utf-8")]
    fills = [r for r in records if r["kind"] == "fill"]
    loads = [r for r in records if r["kind"] == "load"]
    assert sum(r["tokens"] for r in fills) == loaded
    assert fills[0]["layers"] == 4  # the tiny model's layers, copied one at a time
    assert loads and max(r["tokens"] for r in loads) >= loaded


def test_store_killed_workers_keep_serving(store: StoreProcess, workers: list[WorkerProcess],
                                           layered: tuple[WorkerProcess, str]) -> None:
    a, b = workers
    c, _ = layered
    store.kill()
    prompt = "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n" * 20
    out_a, out_b, out_c = generate(a, prompt), generate(b, prompt), generate(c, prompt)
    assert out_a["output_ids"] == out_b["output_ids"] == out_c["output_ids"]
    assert storage_tokens(out_b) == storage_tokens(out_c) == 0
    for w in (a, b, c):
        assert w.is_running()


def test_a_store_worker_reports_that_it_cannot_move_layers(
        layered: tuple[WorkerProcess, str]) -> None:
    """The hierarchical cache backs up every layer's KV: a worker running it answers its status
    (the rebalancer reads it) and says why it can never migrate layers or offload heads."""
    worker, _ = layered
    generate(worker, "def f(x):\n    return x * 2\n" * 10)
    with urllib.request.urlopen(worker.url + "/banaserve/status", timeout=30) as resp:
        status = json.load(resp)
    assert "hierarchical cache" in status["cannot_move"]
    assert 0 <= status["kv"]["used_tokens"] <= status["kv"]["pool_tokens"]
