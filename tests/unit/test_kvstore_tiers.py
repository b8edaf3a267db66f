"""The store's tiers: memory LRU, the SSD tier's files, checksums and recovery, write-behind."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from kvstore.backends.disk import HEADER, DiskStore
from kvstore.backends.memory import MemoryStore
from kvstore.backends.tiered import TieredStore
from kvstore.config import StoreConfig, build_store


def page(i: int, size: int = 100) -> bytes:
    return bytes((i * 7 + j) % 256 for j in range(size))


def file_size(key: str, size: int = 100) -> int:
    return HEADER.size + len(key.encode()) + size


# -- memory -------------------------------------------------------------------------------------
def test_memory_evicts_least_recently_used_and_counts_bytes() -> None:
    m = MemoryStore(300)
    m.put_many([("a", page(1)), ("b", page(2)), ("c", page(3))])
    m.get_many(["a"])  # a is now the most recent
    m.put_many([("d", page(4))])
    assert m.contains_many(["a", "b", "c", "d"]) == [True, False, True, True]
    (s,) = m.stats()
    assert (s.pages, s.bytes, s.evictions) == (3, 300, 1)


def test_memory_put_existing_is_a_noop_and_oversized_is_refused() -> None:
    m = MemoryStore(1000, max_page_bytes=150)
    assert m.put_many([("a", page(1)), ("a", page(2)), ("big", page(3, 200))]) == [True] * 2 + [
        False]
    assert m.get_many(["a", "big"]) == [page(1), None]


# -- disk ---------------------------------------------------------------------------------------
def test_disk_round_trip_eviction_and_prefix_hits(tmp_path: Path) -> None:
    d = DiskStore(str(tmp_path), capacity_bytes=3 * file_size("k0"))
    assert d.put_many([(f"k{i}", page(i)) for i in range(3)]) == [True] * 3
    assert d.get_many(["k0"]) == [page(0)]
    d.put_many([("k3", page(3))])  # evicts k1, the least recently used
    assert d.contains_many(["k0", "k1", "k2", "k3"]) == [True, False, True, True]
    assert d.prefix_hits(["k0", "k2", "k1", "k3"]) == 2
    (s,) = d.stats()
    assert (s.pages, s.bytes, s.evictions) == (3, 3 * file_size("k0"), 1)
    files = [f for _, _, fs in os.walk(tmp_path) for f in fs]
    assert len(files) == 3


def test_corrupted_page_is_a_miss_and_removed(tmp_path: Path) -> None:
    d = DiskStore(str(tmp_path), 10_000)
    d.put_many([("a", page(1)), ("b", page(2))])
    path = d._path("a")
    data = bytearray(Path(path).read_bytes())
    data[-1] ^= 0xFF
    Path(path).write_bytes(bytes(data))
    assert d.get_many(["a", "b"]) == [None, page(2)]
    assert not os.path.exists(path) and d.contains_many(["a"]) == [False]
    assert d.stats()[0].errors == 1


def test_truncated_page_is_a_miss_and_removed(tmp_path: Path) -> None:
    d = DiskStore(str(tmp_path), 10_000)
    d.put_many([("a", page(1))])
    path = d._path("a")
    os.truncate(path, os.path.getsize(path) - 10)
    assert d.get_many(["a"]) == [None] and not os.path.exists(path)


def test_restart_recovers_complete_pages_and_drops_partial_ones(tmp_path: Path) -> None:
    d = DiskStore(str(tmp_path), 10_000)
    d.put_many([(f"k{i}", page(i)) for i in range(4)])
    os.truncate(d._path("k1"), HEADER.size + 3)  # a kill -9 in the middle of a write
    os.truncate(d._path("k2"), 5)  # not even a whole header
    Path(d._path("k3") + ".tmp.123.0").write_bytes(b"partial")  # a write never renamed
    Path(tmp_path, "stray.txt").write_text("not a page")
    reopened = DiskStore(str(tmp_path), 10_000)
    assert reopened.contains_many(["k0", "k1", "k2", "k3"]) == [True, False, False, True]
    assert reopened.get_many(["k0", "k3"]) == [page(0), page(3)]
    (s,) = reopened.stats()
    assert s.extra["recovered"] == 2 and s.extra["recovered_dropped"] == 4
    leftover = sorted(f for _, _, fs in os.walk(tmp_path) for f in fs)
    assert len(leftover) == 2 and all(f.endswith(".page") for f in leftover)


def test_restart_over_a_smaller_capacity_evicts(tmp_path: Path) -> None:
    DiskStore(str(tmp_path), 10_000).put_many([(f"k{i}", page(i)) for i in range(5)])
    smaller = DiskStore(str(tmp_path), 2 * file_size("k0"))
    assert smaller.stats()[0].pages == 2


# -- tiered -------------------------------------------------------------------------------------
def test_write_behind_survives_a_restart_and_disk_hits_are_promoted(tmp_path: Path) -> None:
    store = TieredStore(MemoryStore(10_000), DiskStore(str(tmp_path), 10_000))
    store.put_many([("a", page(1)), ("b", page(2))])
    store.close()
    restarted = TieredStore(MemoryStore(10_000), DiskStore(str(tmp_path), 10_000))
    assert restarted.memory.contains_many(["a"]) == [False]
    assert restarted.get_many(["a", "b", "c"]) == [page(1), page(2), None]
    assert restarted.memory.contains_many(["a", "b"]) == [True, True]  # promoted
    memory, disk = restarted.stats()
    assert disk.hits == 2 and memory.pages == 2
    restarted.close()


def test_pages_evicted_from_memory_are_still_served_from_disk(tmp_path: Path) -> None:
    store = TieredStore(MemoryStore(250), DiskStore(str(tmp_path), 10_000))
    store.put_many([(f"k{i}", page(i)) for i in range(10)])
    store.flush()
    assert store.memory.stats()[0].pages == 2
    assert store.get_many([f"k{i}" for i in range(10)]) == [page(i) for i in range(10)]
    assert store.prefix_hits([f"k{i}" for i in range(10)]) == 10
    store.close()


def test_concurrent_writers_and_readers(tmp_path: Path) -> None:
    store = TieredStore(MemoryStore(5_000), DiskStore(str(tmp_path), 50_000),
                        write_queue_pages=8)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(40):
                key = f"k{(i + t) % 60}"
                store.put_many([(key, page(hash(key) % 97))])
                got = store.get_many([key])[0]
                assert got == page(hash(key) % 97)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.close()
    assert not errors
    memory, disk = store.stats()
    keys = {f"k{(i + t) % 60}" for i in range(40) for t in range(4)}
    assert disk.extra["write_errors"] == 0 and disk.pages == len(keys)
    assert disk.extra["written"] == len(keys)  # each page is queued for the disk once
    assert memory.bytes <= 5_000


def test_build_store_and_config_validation(tmp_path: Path) -> None:
    store = build_store(StoreConfig(memory_bytes=1 << 20, ssd_dir=str(tmp_path / "ssd"),
                                    ssd_bytes=1 << 20))
    assert [t.name for t in store.stats()] == ["memory", "ssd"]
    store.close()
    assert [t.name for t in build_store(StoreConfig(memory_bytes=1 << 20)).stats()] == ["memory"]
    with pytest.raises(ValueError, match="memory_bytes"):
        StoreConfig(memory_bytes=0)
    with pytest.raises(ValueError, match="ssd_bytes"):
        StoreConfig(ssd_dir=str(tmp_path), ssd_bytes=0)


def test_page_evicted_from_memory_while_queued_for_disk_is_still_served(tmp_path: Path) -> None:
    disk = DiskStore(str(tmp_path), 10_000)
    gate = threading.Event()
    real_put = disk.put_many

    def slow_put(items):  # type: ignore[no-untyped-def]
        gate.wait(10)
        return real_put(items)

    disk.put_many = slow_put  # type: ignore[method-assign]
    store = TieredStore(MemoryStore(150), disk)
    store.put_many([("a", page(1)), ("b", page(2))])  # b evicts a from memory; a is queued
    assert store.memory.contains_many(["a"]) == [False]
    assert store.get_many(["a"]) == [page(1)] and store.contains_many(["a"]) == [True]
    gate.set()
    store.close()
    assert disk.get_many(["a", "b"]) == [page(1), page(2)]
