"""Two real ``python -m kvstore --backend mooncake`` servers on one real ``mooncake_master``.

The servers stand for two hosts (loopback, TCP transport): a page put through server 1 is read
through server 2, byte for byte; a page damaged inside Mooncake is a miss, counted and removed;
``/metrics`` shows the ``mooncake`` tier. Both metadata modes work: the master's embedded HTTP
metadata server (what ``scripts/cluster`` starts) and ``P2PHANDSHAKE``. Two tiny-model SGLang
CPU workers, each on its own server: worker B loads worker A's prefix through Mooncake. A server
whose master cannot be reached stops at start-up with one line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from kvstore.backends.mooncake import MooncakeConfig, mooncake_master_command
from kvstore.backends.mooncake_pages import mooncake_key
from kvstore.backends.mooncake_setup import connect
from kvstore.client import KVStoreClient
from runtime_patches import models
from runtime_patches.launch import WorkerConfig, WorkerProcess
from tests.integration.cluster import LOG_DIR, free_port, generate, storage_tokens, wait_until

pytestmark = pytest.mark.integration
MASTER_BIN = shutil.which("mooncake_master", path=os.path.dirname(sys.executable))
PAGE = 64 * 1024
SEGMENT = 64 << 20


def page(i: int) -> bytes:
    return i.to_bytes(4, "little") * (PAGE // 4)


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


class Master:
    """``mooncake_master`` as ``mooncake_master_command`` starts it, on free loopback ports."""

    def __init__(self, tag: str, http_metadata: bool = True) -> None:
        if MASTER_BIN is None:
            pytest.skip(f"mooncake_master not installed next to {sys.executable} "
                        "(scripts/setup.sh installs mooncake-transfer-engine-non-cuda)")
        self.rpc_port, self.metrics_port = free_port(), free_port()
        self.metadata_port = free_port() if http_metadata else None
        argv = mooncake_master_command(self.rpc_port, self.metadata_port, host="127.0.0.1",
                                       metrics_port=self.metrics_port, binary=MASTER_BIN)
        os.makedirs(LOG_DIR, exist_ok=True)
        with open(os.path.join(LOG_DIR, f"{tag}.log"), "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        health = (f"http://127.0.0.1:{self.metadata_port}/health" if http_metadata
                  else f"http://127.0.0.1:{self.metrics_port}/health")
        assert wait_until(lambda: self.proc.poll() is None and _ok(health), timeout_s=30), (
            "mooncake_master did not come up")

    @property
    def metadata(self) -> str:
        if self.metadata_port is None:
            return "P2PHANDSHAKE"
        return f"http://127.0.0.1:{self.metadata_port}/metadata"

    def config(self, **overrides: Any) -> MooncakeConfig:
        return MooncakeConfig(f"127.0.0.1:{self.rpc_port}", self.metadata, **overrides)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


class Server:
    """``python -m kvstore --backend mooncake`` on free ports, joined to ``master``."""

    def __init__(self, master: Master, tag: str) -> None:
        self.port, self.http_port = free_port(), free_port()
        argv = [sys.executable, "-m", "kvstore", "--port", str(self.port), "--http-port",
                str(self.http_port), "--backend", "mooncake",
                "--mooncake-master", f"127.0.0.1:{master.rpc_port}",
                "--mooncake-metadata", master.metadata, "--mooncake-local-host", "127.0.0.1",
                "--mooncake-segment-bytes", str(SEGMENT),
                "--mooncake-master-metrics", f"http://127.0.0.1:{master.metrics_port}/metrics",
                "--mooncake-connect-timeout", "10"]
        os.makedirs(LOG_DIR, exist_ok=True)
        with open(os.path.join(LOG_DIR, f"{tag}.log"), "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        assert wait_until(self._up, timeout_s=60), f"kvstore server {tag} did not start"

    def _up(self) -> bool:
        assert self.proc.poll() is None, "kvstore server exited at start"
        try:
            with KVStoreClient("127.0.0.1", self.port, timeout_s=1.0, use_shm=False) as c:
                c.hello()
            return True
        except OSError:
            return False

    def client(self, **kwargs: Any) -> KVStoreClient:
        return KVStoreClient("127.0.0.1", self.port, timeout_s=10.0, **kwargs)

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/stats", timeout=5) as r:
            return dict(json.load(r))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


def _gone(proc: subprocess.Popen[bytes]) -> bool:
    """Nothing is left of ``proc``'s process group."""
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Master, Server, Server]]:
    master = Master("mooncake-store-master")
    servers: list[Server] = []
    try:
        servers = [Server(master, f"mooncake-store-{i}") for i in (1, 2)]
        yield master, servers[0], servers[1]
    finally:
        codes = [s.stop() for s in servers]
        master_code = master.stop()
    assert codes == [0, 0] and master_code == 0


def test_a_page_put_through_one_server_is_read_through_the_other(
        cluster: tuple[Master, Server, Server]) -> None:
    _, one, two = cluster
    keys = [f"xhost-{i}" for i in range(16)]
    with one.client() as c1, two.client() as c2, two.client(use_shm=False) as c2_tcp:
        assert c1.put([(k, page(i)) for i, k in enumerate(keys)]) == [True] * 16
        assert c2.get(keys) == [page(i) for i in range(16)]
        assert c2_tcp.get(keys[:4] + ["absent"]) == [page(i) for i in range(4)] + [None]
        assert c2.exists(keys[:8] + ["absent"] + keys[8:]) == 8
        assert c2.contains(["absent", keys[3]]) == [False, True]
        # pages of a key never change: a second put is a no-op that succeeds
        assert c2.put([(keys[0], page(99))]) == [True]
        assert c1.get([keys[0]]) == [page(0)]
        assert c2.put([("back", page(7))]) == [True]
        assert c1.get(["back"]) == [page(7)]
        assert c2.delete([keys[15], "absent"]) == 1
        assert c1.get([keys[15]]) == [None]
    tier = one.stats()["tiers"][0]
    assert tier["name"] == "mooncake" and tier["puts"] == 16
    assert tier["pages"] >= 16  # the master's key count: the whole cluster's


def test_a_page_damaged_in_mooncake_is_a_miss_counted_and_removed(
        cluster: tuple[Master, Server, Server]) -> None:
    master, one, two = cluster
    with one.client() as c1:
        assert c1.put([("damaged", page(5)), ("intact", page(6))]) == [True, True]
    raw = connect(master.config(segment_bytes=0))  # a third client, straight into Mooncake
    try:
        value = bytearray(raw.get(mooncake_key("damaged")))
        value[-1] ^= 0xFF
        assert raw.upsert(mooncake_key("damaged"), bytes(value)) == 0
    finally:
        raw.close()
    errors_before = two.stats()["tiers"][0]["errors"]
    with two.client() as c2:
        assert c2.get(["damaged", "intact"]) == [None, page(6)]
        assert c2.contains(["damaged"]) == [False]  # removed
    assert two.stats()["tiers"][0]["errors"] == errors_before + 1


def test_metrics_show_the_mooncake_tier(cluster: tuple[Master, Server, Server]) -> None:
    _, one, _ = cluster
    with one.client() as c1:
        c1.put([("metrics", page(1))])
        c1.get(["metrics", "absent"])
    with urllib.request.urlopen(f"http://127.0.0.1:{one.http_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert 'banaserve_kvstore_tier_hits_total{tier="mooncake"}' in text
    assert 'banaserve_kvstore_tier_capacity_bytes{tier="mooncake"} 1.34217728e+08' in text
    assert 'banaserve_kvstore_tier_extra{name="no_space",tier="mooncake"} 0.0' in text


def test_p2p_handshake_cluster_shares_pages_and_stops_cleanly() -> None:
    """No metadata service; a server that stops takes the pages in its segment with it."""
    master = Master("mooncake-p2p-master", http_metadata=False)
    servers: list[Server] = []
    try:
        servers = [Server(master, f"mooncake-p2p-{i}") for i in (1, 2)]
        one, two = servers
        with one.client() as c1, two.client() as c2:
            assert c1.put([("p2p-a", page(1))]) == [True]
            assert c2.get(["p2p-a"]) == [page(1)]
            assert c2.put([("p2p-b", page(2))]) == [True]  # lands in server 2's segment
            assert c1.get(["p2p-b"]) == [page(2)]
        assert two.stop() == 0
        with one.client() as c1:
            assert wait_until(lambda: c1.get(["p2p-b"]) == [None], timeout_s=30)
            assert c1.get(["p2p-a"]) == [page(1)]
    finally:
        codes = [s.stop() for s in servers]
        master_code = master.stop()
    assert codes == [0, 0] and master_code == 0
    assert all(_gone(p.proc) for p in (*servers, master))


def _start_worker(tag: str, cpus: str, server: Server, layerwise: bool) -> WorkerProcess:
    cfg = WorkerConfig(model_path=models.prepare("tiny"), port=free_port(),
                       served_model_name=models.recipe("tiny").served_name, device="cpu",
                       cpus=cpus, kvstore=f"127.0.0.1:{server.port}", kvstore_page_size=16,
                       kvstore_layerwise=layerwise,
                       extra_args=("--hicache-storage-prefetch-policy", "wait_complete"))
    worker = WorkerProcess(cfg, log_path=os.path.join(LOG_DIR, f"{tag}.log"))
    worker.start()
    return worker


def test_worker_b_loads_worker_a_prefix_through_mooncake(
        cluster: tuple[Master, Server, Server]) -> None:
    """Worker A on server 1, worker B (layer-wise loading) on server 2: B's second request
    loads A's prefix from Mooncake, with A's greedy output."""
    _, one, two = cluster
    ncpu = os.cpu_count() or 1
    workers = [_start_worker("mooncake-worker-a", "0", one, False),
               _start_worker("mooncake-worker-b", str(1 % ncpu), two, True)]
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda w: w.wait_ready(600), workers))
        a, b = workers
        prompt = "def norm(x, y):\n    return (x * x + y * y) ** 0.5\n" * 30
        before = one.stats()["tiers"][0]["puts"]
        first = generate(a, prompt)
        assert storage_tokens(first) == 0
        want = before + first["meta_info"]["prompt_tokens"] // 16
        assert wait_until(lambda: one.stats()["tiers"][0]["puts"] >= want, timeout_s=30), (
            "worker A did not write its prefix through server 1")
        time.sleep(1.0)
        second = generate(b, prompt)
        assert storage_tokens(second) > 0, second["meta_info"]
        assert second["output_ids"] == first["output_ids"]
        assert two.stats()["tiers"][0]["hits"] > 0
    finally:
        for w in workers:
            w.stop()


def test_an_unreachable_master_stops_start_up_with_one_line() -> None:
    port = free_port()  # nothing listens there
    proc = subprocess.run(
        [sys.executable, "-m", "kvstore", "--no-http", "--port", str(free_port()), "--backend",
         "mooncake", "--mooncake-master", f"127.0.0.1:{port}", "--mooncake-connect-timeout",
         "1"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"kvstore: cannot build the store: mooncake backend: cannot "
                                   f"reach the mooncake master at 127.0.0.1:{port} within 1 s: "
                                   f"Connection refused")
