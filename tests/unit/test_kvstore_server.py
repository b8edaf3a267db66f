"""kvstore.server against raw sockets: a real server on port 0 serving a MemoryStore."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator, Sequence
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import msgpack
import pytest

from kvstore.backends.base import StoreError
from kvstore.backends.memory import MemoryStore
from kvstore.protocol import HEADER, NO_ID, SHM_PREFIX, encode_frame
from kvstore.server import KVStoreServer, ServerConfig


@contextlib.contextmanager
def running_server(store: MemoryStore | None = None, max_page_bytes: int | None = None,
                   **cfg: Any) -> Iterator[KVStoreServer]:
    """A ``KVStoreServer`` on its own event loop thread; blocking clients may call it."""
    store = store if store is not None else MemoryStore(64 << 20)
    server = KVStoreServer(store, ServerConfig(**{"port": 0, "http_port": 0, **cfg}),
                           max_page_bytes=max_page_bytes)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def connect(server: KVStoreServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exact(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise EOFError(f"connection closed after {len(data)} of {count} bytes")
        data += chunk
    return data


def read_reply(sock: socket.socket) -> dict[str, Any]:
    (length,) = HEADER.unpack(recv_exact(sock, HEADER.size))
    return msgpack.unpackb(recv_exact(sock, length), raw=False)


def call(sock: socket.socket, msg: dict[str, Any]) -> dict[str, Any]:
    sock.sendall(encode_frame(msg))
    return read_reply(sock)


def send_body(sock: socket.socket, body: bytes) -> dict[str, Any]:
    sock.sendall(HEADER.pack(len(body)) + body)
    return read_reply(sock)


def new_segment(size: int) -> SharedMemory:
    return SharedMemory(SHM_PREFIX + secrets.token_hex(8), create=True, size=size)


def http_get(server: KVStoreServer, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}{path}", timeout=5) as r:
        return r.read().decode()


@pytest.fixture
def server() -> Iterator[KVStoreServer]:
    with running_server(max_page_bytes=1 << 16, max_batch=64) as server:
        yield server


def test_hello_reports_version_and_limits(server: KVStoreServer) -> None:
    with connect(server) as sock:
        reply = call(sock, {"op": "hello", "id": 1, "version": 99})
    assert reply["ok"] and reply["id"] == 1 and reply["version"] == 1
    assert (reply["max_batch"], reply["max_page_bytes"]) == (64, 1 << 16)
    assert reply["max_frame_bytes"] == 256 << 20 and reply["shm"] is True


def test_put_get_exists_delete_round_trip(server: KVStoreServer) -> None:
    pages = [bytes(range(256)) * 4, b"\x00" * 3000, b""]
    with connect(server) as sock:
        put = call(sock, {"op": "put", "id": 1, "keys": ["a", "b", "c"], "pages": pages})
        assert put["stored"] == [True, True, True]
        got = call(sock, {"op": "get", "id": 2, "keys": ["a", "x", "b", "c"]})
        assert got["pages"] == [pages[0], None, pages[1], b""]
        exists = call(sock, {"op": "exists", "id": 3, "keys": ["a", "b", "x", "c"]})
        assert (exists["hits"], exists["present"]) == (2, [True, True, False, True])
        assert call(sock, {"op": "delete", "id": 4, "keys": ["a", "x"]})["removed"] == 1
        assert call(sock, {"op": "exists", "id": 5, "keys": ["a"]})["hits"] == 0


def test_page_over_max_page_bytes_is_not_stored(server: KVStoreServer) -> None:
    with connect(server) as sock:
        reply = call(sock, {"op": "put", "id": 1, "keys": ["big", "small"],
                            "pages": [b"x" * ((1 << 16) + 1), b"y"]})
    assert reply["stored"] == [False, True]
    assert server.store.contains_many(["big", "small"]) == [False, True]


def test_pipelined_requests_are_answered_in_order(server: KVStoreServer) -> None:
    with connect(server) as sock:
        requests = [{"op": "put", "id": 10, "keys": ["p"], "pages": [b"v"]},
                    {"op": "get", "id": 11, "keys": ["p"]},
                    {"op": "nope", "id": 12},
                    {"op": "exists", "id": 13, "keys": ["p", "q"]}]
        sock.sendall(b"".join(encode_frame(msg) for msg in requests))
        replies = [read_reply(sock) for _ in requests]
    assert [reply["id"] for reply in replies] == [10, 11, 12, 13]
    assert replies[1]["pages"] == [b"v"]
    assert replies[2]["error"]["code"] == "unknown_op"
    assert replies[3]["hits"] == 1


@pytest.mark.parametrize(("body", "code", "reply_id"), [
    (b"\xc1\xc1", "bad_msgpack", NO_ID),
    (msgpack.packb({"op": "flushall", "id": 5}), "unknown_op", 5),
    (msgpack.packb({"op": "get", "id": 6, "keys": "abc"}), "bad_request", 6),
    (msgpack.packb({"op": "put", "id": 7, "keys": ["a"], "pages": [1]}), "bad_request", 7),
    (msgpack.packb({"op": "get", "id": 8, "keys": [""]}), "bad_key", 8),
    (msgpack.packb({"op": "get", "id": 9, "keys": ["k"] * 65}), "too_many_keys", 9),
    (msgpack.packb([1, 2, 3]), "bad_request", NO_ID),
])
def test_bad_request_gets_error_and_connection_keeps_serving(
        server: KVStoreServer, body: bytes, code: str, reply_id: int) -> None:
    with connect(server) as sock:
        reply = send_body(sock, body)
        assert (reply["ok"], reply["id"], reply["error"]["code"]) == (False, reply_id, code)
        assert reply["error"]["message"]
        assert call(sock, {"op": "exists", "id": 1, "keys": ["a"]})["ok"] is True
    assert server.counters.snapshot()["errors"] == {code: 1}


def test_oversized_frame_is_refused_and_only_that_connection_closed() -> None:
    with running_server(max_frame_bytes=4096) as server, connect(server) as other:
        with connect(server) as sock:
            sock.sendall(HEADER.pack(1 << 20) + b"x" * 8192)
            reply = read_reply(sock)
            assert reply["error"]["code"] == "frame_too_large" and reply["id"] == NO_ID
            assert sock.recv(1) == b""  # closed cleanly, not reset
        assert call(other, {"op": "put", "id": 1, "keys": ["k"], "pages": [b"v"]})["ok"]
        with connect(server) as fresh:
            assert call(fresh, {"op": "get", "id": 2, "keys": ["k"]})["pages"] == [b"v"]


def test_shm_put_from_and_get_into(server: KVStoreServer) -> None:
    segment = new_segment(1 << 16)
    try:
        pages = [bytes([i]) * (100 + i) for i in range(5)]
        offsets = [i * 1000 for i in range(5)]
        for offset, page in zip(offsets, pages, strict=True):
            segment.buf[offset:offset + len(page)] = page
        with connect(server) as sock:
            attach = call(sock, {"op": "attach_shm", "id": 1, "name": segment.name,
                                 "size": segment.size})
            assert attach["size"] == segment.size
            put = call(sock, {"op": "put_from", "id": 2, "keys": [f"s{i}" for i in range(5)],
                              "offsets": offsets, "sizes": [len(p) for p in pages]})
            assert put["stored"] == [True] * 5
            assert server.store.get_many([f"s{i}" for i in range(5)]) == pages
            segment.buf[:] = b"\x00" * segment.size
            got = call(sock, {"op": "get_into", "id": 3, "keys": ["s4", "nope", "s2", "s3"],
                              "offsets": [0, 500, 1000, 2000], "capacities": [500, 500, 1000, 50]})
        assert got["sizes"] == [104, -1, 102, 103]
        assert bytes(segment.buf[0:104]) == pages[4]
        assert bytes(segment.buf[1000:1102]) == pages[2]
        assert bytes(segment.buf[2000:2103]) == b"\x00" * 103  # did not fit: not written
    finally:
        segment.close()
        segment.unlink()


def test_shm_errors(server: KVStoreServer) -> None:
    segment = new_segment(4096)
    try:
        with connect(server) as sock:
            reply = call(sock, {"op": "get_into", "id": 1, "keys": ["a"], "offsets": [0],
                                "capacities": [10]})
            assert reply["error"]["code"] == "no_shm"
            reply = call(sock, {"op": "attach_shm", "id": 2, "name": SHM_PREFIX + "0" * 16,
                                "size": 4096})
            assert reply["error"]["code"] == "shm_unavailable"
            reply = call(sock, {"op": "attach_shm", "id": 3, "name": segment.name,
                                "size": 8192})
            assert reply["error"]["code"] == "shm_unavailable"  # larger than the segment
            assert call(sock, {"op": "attach_shm", "id": 4, "name": segment.name,
                               "size": 4096})["ok"]
            reply = call(sock, {"op": "put_from", "id": 5, "keys": ["a", "b"],
                                "offsets": [0, 4000], "sizes": [10, 200]})
            assert reply["error"]["code"] == "out_of_bounds"
            assert server.store.contains_many(["a", "b"]) == [False, False]
    finally:
        segment.close()
        segment.unlink()


def test_slow_store_call_does_not_block_other_clients() -> None:
    release = threading.Event()

    class SlowStore(MemoryStore):
        def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
            if "slow" in keys:
                release.wait(10)
            return super().get_many(keys)

    with running_server(SlowStore(1 << 20), threads=2) as server, \
            connect(server) as slow, connect(server) as fast:
        slow.sendall(encode_frame({"op": "get", "id": 1, "keys": ["slow"]}))
        assert call(fast, {"op": "exists", "id": 2, "keys": ["a"]})["ok"]
        release.set()
        assert read_reply(slow)["pages"] == [None]


def test_store_failure_is_an_error_reply_and_server_keeps_running() -> None:
    class BrokenStore(MemoryStore):
        def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
            raise StoreError("disk gone")

    with running_server(BrokenStore(1 << 20)) as server, connect(server) as sock:
        reply = call(sock, {"op": "get", "id": 1, "keys": ["a"]})
        assert reply["error"] == {"code": "store_error", "message": "disk gone"}
        assert call(sock, {"op": "exists", "id": 2, "keys": ["a"]})["ok"]


def test_stop_closes_connections_and_the_store() -> None:
    closed = threading.Event()

    class ClosingStore(MemoryStore):
        def close(self) -> None:
            closed.set()

    with running_server(ClosingStore(1 << 20)) as server:
        sock = connect(server)
        assert call(sock, {"op": "exists", "id": 1, "keys": ["a"]})["ok"]
    assert closed.is_set()
    with sock:
        assert sock.recv(1) == b""


def test_stats_op_and_http_stats(server: KVStoreServer) -> None:
    with connect(server) as sock:
        call(sock, {"op": "put", "id": 1, "keys": ["a", "b"], "pages": [b"12", b"345"]})
        call(sock, {"op": "get", "id": 2, "keys": ["a", "zz"]})
        call(sock, {"op": "frobnicate", "id": 3})
        via_op = call(sock, {"op": "stats", "id": 4})
        via_http = json.loads(http_get(server, "/stats"))
    for document in (via_op, via_http):
        (tier,) = document["tiers"]
        assert (tier["name"], tier["pages"], tier["bytes"]) == ("memory", 2, 5)
        assert (tier["capacity_bytes"], tier["hits"], tier["misses"]) == (64 << 20, 1, 1)
        assert tier["evictions"] == 0 and tier["errors"] == 0
    counters = via_http["server"]
    assert counters["connections"] == 1 and counters["connections_total"] == 1
    assert counters["requests"] == {"put": 1, "get": 1, "stats": 1}
    assert counters["errors"] == {"unknown_op": 1}
    assert counters["bytes_in"] > 5 and counters["bytes_out"] > 5


def test_namespaces_op_lists_the_suffixes_of_written_pages_newest_first(
        server: KVStoreServer) -> None:
    old, new = "@m/page_first/float32/p16/l2h1d4/tp0of1", "@m/page_first/float32/p64/l2h1d4/tp0of1"
    with connect(server) as sock:
        assert call(sock, {"op": "namespaces", "id": 1})["namespaces"] == []
        call(sock, {"op": "put", "id": 2, "keys": ["aa" + old, "bb" + old, "plain"],
                    "pages": [b"1", b"2", b"3"]})
        call(sock, {"op": "put", "id": 3, "keys": ["cc" + new], "pages": [b"4"]})
        call(sock, {"op": "exists", "id": 4, "keys": ["dd@never/written"]})
        assert call(sock, {"op": "namespaces", "id": 5})["namespaces"] == [new, old]
        call(sock, {"op": "put", "id": 6, "keys": ["ee" + old], "pages": [b"5"]})
        assert call(sock, {"op": "namespaces", "id": 7})["namespaces"] == [old, new]


def test_a_page_too_large_to_store_names_no_namespace() -> None:
    with running_server(max_page_bytes=2) as server, connect(server) as sock:
        reply = call(sock, {"op": "put", "id": 1, "keys": ["aa@big"], "pages": [b"123"]})
        assert reply["stored"] == [False]
        assert call(sock, {"op": "namespaces", "id": 2})["namespaces"] == []


def test_http_metrics(server: KVStoreServer) -> None:
    with connect(server) as sock:
        call(sock, {"op": "put", "id": 1, "keys": ["a"], "pages": [b"1234"]})
        call(sock, {"op": "get", "id": 2, "keys": [""]})
        text = http_get(server, "/metrics")
    lines = set(text.splitlines())
    for line in ('banaserve_kvstore_tier_pages{tier="memory"} 1.0',
                 'banaserve_kvstore_tier_bytes{tier="memory"} 4.0',
                 'banaserve_kvstore_tier_puts_total{tier="memory"} 1.0',
                 'banaserve_kvstore_requests_total{op="put"} 1.0',
                 'banaserve_kvstore_keys_total{op="put"} 1.0',
                 'banaserve_kvstore_errors_total{code="bad_key"} 1.0',
                 "banaserve_kvstore_connections 1.0",
                 "# TYPE banaserve_kvstore_tier_capacity_bytes gauge",
                 "# TYPE banaserve_kvstore_sent_bytes_total counter"):
        assert line in lines, line


@pytest.mark.parametrize(("field", "value"), [
    ("port", 70000), ("http_port", -1), ("host", ""), ("max_frame_bytes", 10),
    ("max_batch", 0), ("threads", 0)])
def test_server_config_names_the_bad_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"ServerConfig.{field}"):
        ServerConfig(**{field: value})


def test_cli_bad_value_exits_2_with_one_line() -> None:
    result = subprocess.run([sys.executable, "-m", "kvstore", "--memory-gb", "-1"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and not result.stdout
    assert result.stderr.startswith("kvstore: --memory-gb") and "-1" in result.stderr


def test_cli_help_explains_flags() -> None:
    result = subprocess.run([sys.executable, "-m", "kvstore", "--help"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for flag in ("--host", "--port", "--http-port", "--memory-gb", "--ssd-dir", "--ssd-gb",
                 "--fsync", "--max-batch", "--threads"):
        assert flag in result.stdout


def _wait_listening(proc: subprocess.Popen[str]) -> int:
    """The client port from the server's 'listening' log line."""
    assert proc.stderr is not None
    for line in proc.stderr:
        match = re.search(r"listening on [^ ]+:(\d+) ", line)
        if match:
            return int(match.group(1))
    raise AssertionError(f"server exited without listening (rc {proc.wait()})")


def _stop_and_check(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=20)
    assert proc.returncode == 0, rest
    assert "stopped" in rest


_SERVE_MEMORY = """
import asyncio, logging
from kvstore.__main__ import _serve
from kvstore.backends.memory import MemoryStore
from kvstore.server import ServerConfig
logging.basicConfig(level="INFO")
raise SystemExit(asyncio.run(_serve(MemoryStore(1 << 20), ServerConfig(port=0, http_port=0),
                                    None)))
"""


def test_serve_stops_gracefully_on_sigterm() -> None:
    with subprocess.Popen([sys.executable, "-c", _SERVE_MEMORY], stderr=subprocess.PIPE,
                          text=True) as proc:
        port = _wait_listening(proc)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            assert call(sock, {"op": "put", "id": 1, "keys": ["k"], "pages": [b"v"]})["ok"]
            _stop_and_check(proc)
            assert sock.recv(1) == b""


def test_cli_serves_the_configured_store(tmp_path: Path) -> None:
    pytest.importorskip("kvstore.config")
    with subprocess.Popen([sys.executable, "-m", "kvstore", "--port", "0", "--http-port", "0",
                           "--memory-gb", "0.01", "--ssd-dir", str(tmp_path), "--ssd-gb", "0.01"],
                          stderr=subprocess.PIPE, text=True) as proc:
        port = _wait_listening(proc)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            assert call(sock, {"op": "put", "id": 1, "keys": ["k"], "pages": [b"v"]})["ok"]
            assert call(sock, {"op": "get", "id": 2, "keys": ["k"]})["pages"] == [b"v"]
        _stop_and_check(proc)
