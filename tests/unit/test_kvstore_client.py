"""kvstore.client against a real server on port 0 (TCP and shared memory paths)."""

from __future__ import annotations

import array
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

import kvstore.client
from kvstore.backends.memory import MemoryStore
from kvstore.client import KVStoreClient, KVStoreError, KVStoreUnavailable, is_loopback
from kvstore.server import KVStoreServer
from tests.unit.test_kvstore_server import running_server


def pages_for(prefix: str, count: int, size: int = 700) -> list[tuple[str, bytes]]:
    return [(f"{prefix}{i}", bytes((i + j) % 251 for j in range(size))) for i in range(count)]


def requests(server: KVStoreServer) -> dict[str, int]:
    return server.counters.snapshot()["requests"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server() -> Iterator[KVStoreServer]:
    with running_server(max_page_bytes=4 << 20) as server:
        yield server


@pytest.mark.parametrize("use_shm", [False, True])
def test_round_trip(server: KVStoreServer, use_shm: bool) -> None:
    items = pages_for("r", 20)
    keys = [key for key, _ in items]
    with KVStoreClient("127.0.0.1", server.port, use_shm=use_shm) as client:
        assert client.put(items) == [True] * 20
        assert server.store.get_many(keys) == [page for _, page in items]
        assert client.get(keys + ["missing"]) == [page for _, page in items] + [None]
        assert client.exists(keys[:5] + ["missing"] + keys[5:]) == 5
        assert client.contains([keys[0], "missing"]) == [True, False]
        dests = [bytearray(1000) for _ in keys]
        assert client.get_into(keys, dests) == [700] * 20
        assert [bytes(d[:700]) for d in dests] == [page for _, page in items]
        assert client.delete([keys[0], "missing"]) == 1
        assert client.exists(keys) == 0
        assert client.stats()["tiers"][0]["pages"] == 19
    shm_ops = {"attach_shm", "put_from", "get_into"}
    if use_shm:
        assert shm_ops <= set(requests(server)) and "put" not in requests(server)
    else:
        assert not shm_ops & set(requests(server))


def test_auto_means_shm_on_loopback(server: KVStoreServer) -> None:
    with KVStoreClient("127.0.0.1", server.port) as client:
        client.put(pages_for("a", 2))
    assert requests(server).get("put_from") == 1
    assert is_loopback("localhost") and is_loopback("127.0.0.2") and is_loopback("::1")
    assert not is_loopback("10.1.2.3") and not is_loopback("kvstore.internal")


@pytest.mark.parametrize("use_shm", [False, True])
def test_get_into_accepts_typed_buffers_and_reports_misses(server: KVStoreServer,
                                                           use_shm: bool) -> None:
    page = bytes(range(200)) * 6
    with KVStoreClient("127.0.0.1", server.port, use_shm=use_shm) as client:
        client.put([("t", page)])
        dest = array.array("i", [0] * 400)  # 1600 bytes
        assert client.get_into(["t", "nope"], [dest, bytearray(10)]) == [1200, None]
        assert dest.tobytes()[:1200] == page
        with pytest.raises(KVStoreError) as info:
            client.get_into(["t"], [bytearray(100)])
        assert info.value.code == "page_too_large"
        assert client.get(["t"]) == [page]  # the connection is still usable


@pytest.mark.parametrize("use_shm", [False, True])
def test_large_batches_are_split(use_shm: bool) -> None:
    with running_server(max_batch=64, max_frame_bytes=64 << 10, max_page_bytes=16 << 10) as srv, \
            KVStoreClient("127.0.0.1", srv.port, use_shm=use_shm) as client:
        items = pages_for("b", 600, size=3000)
        keys = [key for key, _ in items]
        assert client.put(items) == [True] * 600
        assert client.exists(keys) == 600 and client.contains(keys) == [True] * 600
        assert client.get(keys) == [page for _, page in items]
        dests = [bytearray(3000) for _ in keys]
        assert client.get_into(keys, dests) == [3000] * 600
        assert [bytes(d) for d in dests] == [page for _, page in items]
        assert client.delete(keys) == 600
    counts = requests(srv)
    assert counts["put_from" if use_shm else "put"] >= 600 * 3000 // (64 << 10)
    assert counts["exists"] >= 600 // 64


def test_page_above_server_limit_is_refused_locally(server: KVStoreServer) -> None:
    with KVStoreClient("127.0.0.1", server.port) as client:
        assert client.put([("huge", b"x" * ((4 << 20) + 1)), ("ok", b"y")]) == [False, True]
    assert server.store.contains_many(["huge", "ok"]) == [False, True]


def test_segment_grows_and_is_removed_on_close(server: KVStoreServer,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []  # this client's segments only (other test processes make theirs)

    class Recorded(kvstore.client.SharedMemory):  # type: ignore[misc]
        def __init__(self, name: str, create: bool = False, size: int = 0) -> None:
            super().__init__(name, create=create, size=size)
            made.append(self.name)

    monkeypatch.setattr(kvstore.client, "SharedMemory", Recorded)
    with KVStoreClient("127.0.0.1", server.port, use_shm=True) as client:
        client.put([("small", b"s" * 10)])
        big = pages_for("g", 3, size=1 << 20)
        assert client.put(big) == [True] * 3
        dests = [bytearray(1 << 20) for _ in big]
        assert client.get_into([key for key, _ in big], dests) == [1 << 20] * 3
        assert [bytes(d) for d in dests] == [page for _, page in big]
    assert requests(server)["attach_shm"] == 2
    assert len(made) == 2 and not set(made) & set(os.listdir("/dev/shm"))


def test_error_reply_is_kvstore_error_and_connection_survives(server: KVStoreServer) -> None:
    with KVStoreClient("127.0.0.1", server.port) as client:
        with pytest.raises(KVStoreError) as info:
            client.get([""])
        assert info.value.code == "bad_key"
        assert client.get(["a"]) == [None]
        assert client.hello().max_page_bytes == 4 << 20
    assert server.counters.snapshot()["connections_total"] == 1


def test_concurrent_threads(server: KVStoreServer) -> None:
    shared = KVStoreClient("127.0.0.1", server.port)
    failures: list[BaseException] = []

    def work(worker: int) -> None:
        own = KVStoreClient("127.0.0.1", server.port, use_shm=worker % 2 == 0)
        try:
            for client in (shared, own):
                for round_ in range(10):
                    items = pages_for(f"w{worker}.{id(client)}.{round_}.", 8, size=300)
                    keys = [key for key, _ in items]
                    assert client.put(items) == [True] * 8
                    assert client.get(keys) == [page for _, page in items]
                    assert client.exists(keys) == 8
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)
        finally:
            own.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    shared.close()
    assert not failures, failures
    assert server.store.stats()[0].pages == 6 * 2 * 10 * 8


def test_closed_port_is_unavailable_at_once() -> None:
    client = KVStoreClient("127.0.0.1", free_port(), timeout_s=1.0, backoff_s=5.0)
    start = time.monotonic()
    with pytest.raises(KVStoreUnavailable, match="connect failed"):
        client.exists(["a"])
    with pytest.raises(KVStoreUnavailable, match="down"):  # backing off: no new attempt
        client.get(["a"])
    assert time.monotonic() - start < 1.0
    client.close()


def test_silent_server_times_out() -> None:
    with socket.socket() as listener:  # accepts connections (kernel backlog), never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        client = KVStoreClient("127.0.0.1", listener.getsockname()[1], timeout_s=0.3)
        start = time.monotonic()
        with pytest.raises(KVStoreUnavailable, match="timed out"):
            client.exists(["a"])
        assert time.monotonic() - start < 2.0
        client.close()


def test_reconnects_after_server_restart() -> None:
    with running_server() as first:
        port = first.port
        client = KVStoreClient("127.0.0.1", port, backoff_s=0.01, max_backoff_s=0.05)
        assert client.put([("k", b"v")]) == [True]
    with pytest.raises(KVStoreUnavailable):
        client.get(["k"])
    with running_server(MemoryStore(1 << 20), port=port) as second:
        second.store.put_many([("k", b"again")])
        deadline = time.monotonic() + 5
        while True:
            try:
                assert client.get(["k"]) == [b"again"]
                break
            except KVStoreUnavailable:
                assert time.monotonic() < deadline
                time.sleep(0.02)
    client.close()


def test_closed_client_and_bad_arguments() -> None:
    client = KVStoreClient("127.0.0.1", 1)
    client.close()
    with pytest.raises(KVStoreUnavailable, match="closed"):
        client.exists(["a"])
    with pytest.raises(ValueError, match="timeout_s"):
        KVStoreClient("127.0.0.1", 1, timeout_s=0)
    with pytest.raises(ValueError, match="use_shm"):
        KVStoreClient("127.0.0.1", 1, use_shm="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2 keys but 1 buffers"):
        client.get_into(["a", "b"], [bytearray(1)])
