"""The memory tier, the tiered store (write-behind, promotion, queue policy) and its config."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from kvstore.backends.base import Page, StoreError
from kvstore.backends.disk import DiskStore
from kvstore.backends.memory import MemoryStore
from kvstore.backends.tiered import TieredStore
from kvstore.config import StoreConfig, build_store


def page(i: int, size: int = 100) -> bytes:
    return bytes((i * 7 + j) % 256 for j in range(size))


class GatedDisk(DiskStore):
    """A disk tier whose writes wait for ``gate``; ``entered`` is set when one is waiting."""

    def __init__(self, directory: str, capacity_bytes: int) -> None:
        super().__init__(directory, capacity_bytes)
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.fail_next: BaseException | None = None

    def put_many(self, items: Sequence[tuple[str, Page]]) -> list[bool]:
        self.entered.set()
        assert self.gate.wait(10), "test never opened the gate"
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        return super().put_many(items)


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[GatedDisk]:
    disk = GatedDisk(str(tmp_path), 10_000)
    yield disk
    disk.gate.set()  # never leave a writer thread waiting
    disk.close()


# -- memory -------------------------------------------------------------------------------------
def test_memory_evicts_least_recently_used_and_counts_bytes() -> None:
    evicted: list[str] = []
    m = MemoryStore(300, on_evict=lambda key, _: evicted.append(key))
    m.put_many([("a", page(1)), ("b", page(2)), ("c", page(3))])
    m.get_many(["a"])  # a is now the most recent
    m.put_many([("d", page(4))])
    m.put_many([("c", page(3))])  # a put refreshes recency too
    m.put_many([("e", page(5, 150))])
    assert evicted == ["b", "a", "d"]
    assert m.contains_many(["c", "e"]) == [True, True] and m.prefix_hits(["c", "e", "a"]) == 2
    (s,) = m.stats()
    assert (s.pages, s.bytes, s.evictions, s.puts) == (2, 250, 3, 5)
    assert m.delete_many(["c", "c", "x"]) == 1 and m.stats()[0].bytes == 150


def test_memory_put_existing_is_a_noop_and_oversized_is_refused() -> None:
    m = MemoryStore(1000, max_page_bytes=150)
    assert m.put_many([("a", page(1)), ("a", page(2)), ("big", page(3, 200))]) == [True, True,
                                                                                   False]
    assert m.get_many(["a", "big"]) == [page(1), None]
    (s,) = m.stats()
    assert (s.puts, s.bytes, s.hits, s.misses) == (1, 100, 1, 1)
    with pytest.raises(ValueError):
        m.put_many([("ok", page(1)), ("x" * 600, page(2))])
    assert m.contains_many(["ok"]) == [False]  # the batch is checked before anything is stored


# -- tiered -------------------------------------------------------------------------------------
def test_write_behind_survives_a_restart_and_disk_hits_are_promoted(tmp_path: Path) -> None:
    store = TieredStore(MemoryStore(10_000), DiskStore(str(tmp_path), 10_000))
    assert store.put_many([("a", page(1)), ("b", memoryview(page(2)))]) == [True, True]
    store.flush()
    assert store.disk is not None and store.disk.contains_many(["a", "b"]) == [True, True]
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        store.put_many([("c", page(3))])
    restarted = TieredStore(MemoryStore(10_000), DiskStore(str(tmp_path), 10_000))
    assert restarted.contains_many(["a", "b", "c"]) == [True, True, False]
    assert restarted.memory.contains_many(["a"]) == [False]
    assert restarted.get_many(["a", "b", "c"]) == [page(1), page(2), None]
    assert restarted.memory.contains_many(["a", "b"]) == [True, True]  # promoted
    memory, disk = restarted.stats()
    assert (disk.hits, disk.misses, memory.pages, disk.extra["written"]) == (2, 1, 2, 0)
    restarted.get_many(["a"])
    assert restarted.stats()[1].hits == 2  # now a memory hit
    restarted.close()


def test_pages_evicted_from_memory_are_still_served_from_disk(tmp_path: Path) -> None:
    store = TieredStore(MemoryStore(250), DiskStore(str(tmp_path), 10_000))
    keys = [f"k{i}" for i in range(10)]
    store.put_many([(key, page(i)) for i, key in enumerate(keys)])
    store.flush()
    assert store.memory.stats()[0].pages == 2
    assert store.prefix_hits(keys) == 10 and store.prefix_hits(["k0", "nope", "k1"]) == 1
    assert store.get_many(keys) == [page(i) for i in range(10)]
    memory, disk = store.stats()
    assert disk.extra["written"] == 10 and disk.extra["write_queue"] == 0
    assert memory.bytes <= 250 and disk.pages == 10
    store.close()


def test_page_evicted_from_memory_while_queued_is_still_served(gated: GatedDisk) -> None:
    store = TieredStore(MemoryStore(150), gated)
    store.put_many([("a", page(1)), ("b", page(2))])  # b evicts a from memory; a is queued
    assert store.memory.contains_many(["a"]) == [False]
    assert store.contains_many(["a"]) == [True]
    assert store.get_many(["a"]) == [page(1)]
    assert gated.contains_many(["a", "b"]) == [False, False]
    gated.gate.set()
    store.flush()
    assert gated.get_many(["a", "b"]) == [page(1), page(2)]
    store.close()


def test_full_write_queue_waits_briefly_then_drops_the_newest_write(gated: GatedDisk) -> None:
    store = TieredStore(MemoryStore(10_000), gated, write_queue_pages=2, write_wait_s=0.05)
    store.put_many([("a", page(1))])
    assert gated.entered.wait(5)  # the writer holds a; the queue is empty again
    assert store.put_many([("b", page(2)), ("c", page(3)), ("d", page(4))]) == [True] * 3
    memory, disk = store.stats()
    assert (disk.extra["write_queue"], disk.extra["write_drops"]) == (2, 1)
    assert store.get_many(["d"]) == [page(4)] and memory.pages == 4  # d lives in memory
    gated.gate.set()
    store.flush()
    assert gated.contains_many(["a", "b", "c", "d"]) == [True, True, True, False]
    store.put_many([("d", page(4))])  # put again: queued again, written this time
    store.flush()
    assert gated.contains_many(["d"]) == [True]
    assert store.stats()[1].extra["written"] == 4
    store.close()


def test_delete_cancels_queued_writes_and_waits_for_one_in_flight(gated: GatedDisk) -> None:
    store = TieredStore(MemoryStore(150), gated)
    store.put_many([("a", page(1)), ("b", page(2))])  # a in flight (evicted), b queued
    assert gated.entered.wait(5)
    assert store.delete_many(["b"]) == 1
    deleted: list[int] = []
    deleter = threading.Thread(target=lambda: deleted.append(store.delete_many(["a", "x"])))
    deleter.start()
    deleter.join(0.05)
    assert deleter.is_alive()  # waiting for the write of a
    gated.gate.set()
    deleter.join(5)
    assert deleted == [1]
    store.flush()
    assert store.contains_many(["a", "b"]) == [False, False]
    assert gated.contains_many(["a", "b"]) == [False, False]
    store.close()


def test_a_failing_disk_write_is_counted_and_the_writer_goes_on(gated: GatedDisk) -> None:
    store = TieredStore(MemoryStore(10_000), gated)
    gated.fail_next = RuntimeError("a bug in the disk tier")
    gated.gate.set()
    store.put_many([("a", page(1))])
    store.flush()
    store.put_many([("b", page(2))])
    store.flush()
    extra = store.stats()[1].extra
    assert (extra["write_errors"], extra["written"]) == (1, 1)
    assert gated.contains_many(["a", "b"]) == [False, True]
    assert store.get_many(["a"]) == [page(1)]  # still in memory
    store.close()


def test_pages_too_large_for_memory_go_straight_to_disk(tmp_path: Path) -> None:
    store = TieredStore(MemoryStore(150), DiskStore(str(tmp_path), 1000))
    assert store.put_many([("big", page(1, 200)), ("huge", page(2, 2000))]) == [True, False]
    assert store.disk is not None and store.disk.contains_many(["big"]) == [True]
    assert store.get_many(["big", "huge"]) == [page(1, 200), None]
    assert store.put_many([("big", page(1, 200))]) == [True]  # existing: a no-op
    assert store.stats()[1].puts == 1
    store.close()


def test_memory_only_store(tmp_path: Path) -> None:
    store = TieredStore(MemoryStore(250), None)
    store.put_many([(f"k{i}", page(i)) for i in range(3)])
    assert store.get_many(["k0", "k1", "k2"]) == [None, page(1), page(2)]
    assert store.delete_many(["k1", "k0"]) == 1
    store.flush()
    store.close()
    assert [t.name for t in store.stats()] == ["memory"]


def test_concurrent_writers_and_readers(tmp_path: Path) -> None:
    store = TieredStore(MemoryStore(1_000), DiskStore(str(tmp_path), 50_000),
                        write_queue_pages=4, write_wait_s=5.0)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(40):
                n = (i * (t + 1)) % 30
                assert store.put_many([(f"k{n}", page(n))]) == [True]
                assert store.get_many([f"k{n}", f"k{(n + 1) % 30}"])[0] == page(n)
                assert store.contains_many([f"k{n}"]) == [True]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store.flush()
    assert not errors
    memory, disk = store.stats()
    keys = {f"k{(i * (t + 1)) % 30}" for i in range(40) for t in range(4)}
    assert disk.extra == {"recovered": 0, "recovered_dropped": 0, "write_queue": 0,
                          "written": len(keys), "write_drops": 0, "write_errors": 0}
    assert disk.pages == len(keys) and disk.errors == 0 and memory.bytes <= 1_000
    assert store.get_many(sorted(keys)) == [page(int(k[1:])) for k in sorted(keys)]
    store.close()


# -- config -------------------------------------------------------------------------------------
def test_build_store(tmp_path: Path) -> None:
    store = build_store(StoreConfig(memory_bytes=1 << 20, ssd_dir=str(tmp_path / "ssd"),
                                    ssd_bytes=1 << 20, write_queue_pages=8))
    assert [(t.name, t.capacity_bytes) for t in store.stats()] == [("memory", 1 << 20),
                                                                   ("ssd", 1 << 20)]
    with pytest.raises(StoreError, match="in use"):
        build_store(StoreConfig(ssd_dir=str(tmp_path / "ssd")))
    store.close()
    assert [t.name for t in build_store(StoreConfig(memory_bytes=1 << 20)).stats()] == ["memory"]
    with pytest.raises(FrozenInstanceError):
        StoreConfig().memory_bytes = 1  # type: ignore[misc]


@pytest.mark.parametrize(("field", "value"), [
    ("memory_bytes", 0), ("memory_bytes", 1.5), ("max_page_bytes", -1),
    ("write_queue_pages", 0), ("write_queue_pages", True), ("fsync", 1), ("ssd_dir", " "),
])
def test_config_validation_names_the_field_and_value(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"StoreConfig.{field}: .*{value!r}"):
        StoreConfig(**{field: value})  # type: ignore[arg-type]


def test_ssd_bytes_is_checked_only_with_an_ssd_dir(tmp_path: Path) -> None:
    StoreConfig(ssd_bytes=0)
    with pytest.raises(ValueError, match="StoreConfig.ssd_bytes: .* 0"):
        StoreConfig(ssd_dir=str(tmp_path), ssd_bytes=0)
