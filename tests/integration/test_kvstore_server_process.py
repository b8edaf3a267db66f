"""The real `python -m kvstore` with an SSD tier: restarts, kill -9 mid-write, bad input."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kvstore.client import KVStoreClient, KVStoreUnavailable
from tests.integration.cluster import free_port, wait_until

pytestmark = pytest.mark.integration
PAGE = 256 * 1024


def page(i: int) -> bytes:
    return i.to_bytes(4, "little") * (PAGE // 4)


def start(ssd: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvstore", "--port", str(port), "--no-http", "--memory-gb",
         "0.02", "--ssd-dir", str(ssd), "--ssd-gb", "1"], stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, start_new_session=True)

    def up() -> bool:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    assert wait_until(up, timeout_s=30)
    return proc


def test_kill_9_mid_write_loses_only_unfinished_pages(tmp_path: Path) -> None:
    port = free_port()
    proc = start(tmp_path, port)
    done: list[int] = []

    def writer() -> None:
        with KVStoreClient("127.0.0.1", port, timeout_s=5) as client:
            try:
                for i in range(400):
                    if client.put([(f"p{i}", page(i))]) == [True]:
                        done.append(i)
            except KVStoreUnavailable:
                pass

    thread = threading.Thread(target=writer)
    thread.start()
    assert wait_until(lambda: len(done) >= 60, timeout_s=60)
    os.killpg(proc.pid, signal.SIGKILL)  # memory tier lost, write-behind cut mid-flight
    proc.wait(10)
    thread.join(30)
    proc = start(tmp_path, port)
    try:
        with KVStoreClient("127.0.0.1", port, timeout_s=5) as client:
            keys = [f"p{i}" for i in range(400)]
            got = client.get(keys)
            recovered = [i for i, g in enumerate(got) if g is not None]
            assert recovered, "nothing reached the SSD before the kill"
            assert all(got[i] == page(i) for i in recovered)  # never a wrong or partial page
            tiers = client.stats()["tiers"]
            assert tiers[1]["extra"]["recovered"] == len(recovered)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_graceful_stop_flushes_and_restart_serves_every_page(tmp_path: Path) -> None:
    port = free_port()
    proc = start(tmp_path, port)
    with KVStoreClient("127.0.0.1", port, timeout_s=5) as client:
        assert client.put([(f"q{i}", page(i)) for i in range(50)]) == [True] * 50
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    proc = start(tmp_path, port)
    try:
        with KVStoreClient("127.0.0.1", port, timeout_s=5) as client:
            assert client.get([f"q{i}" for i in range(50)]) == [page(i) for i in range(50)]
            # malformed input gets an error reply and the server keeps serving
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                raw.sendall((7).to_bytes(4, "big") + b"\xc1garbag")
                assert raw.recv(4)  # a framed error reply
            time.sleep(0.2)
            assert client.exists(["q0", "q1"]) == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
