"""The SSD tier: file format, LRU and byte accounting, corruption, recovery, locking, threads."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstore.backends.base import StoreError
from kvstore.backends.disk import HEADER, MAGIC, DiskStore


def page(i: int, size: int = 100) -> bytes:
    return bytes((i * 7 + j) % 256 for j in range(size))


def file_size(key: str, size: int = 100) -> int:
    return HEADER.size + len(key.encode()) + size


def files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != ".lock")


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[list[DiskStore]]:
    """Stores a test opens; closed at the end so their directory locks are released."""
    opened: list[DiskStore] = []
    yield opened
    for store in opened:
        store.close()


def open_store(stores: list[DiskStore], root: Path, capacity: int = 10_000,
               **kwargs: object) -> DiskStore:
    store = DiskStore(str(root), capacity, **kwargs)  # type: ignore[arg-type]
    stores.append(store)
    return store


def test_file_layout_and_format(tmp_path: Path, stores: list[DiskStore]) -> None:
    d = open_store(stores, tmp_path)
    assert d.put_many([("key", page(1))]) == [True]
    (path,) = files(tmp_path)
    assert path.parent.parent == tmp_path and path.name.startswith(path.parent.name)
    data = path.read_bytes()
    assert data[:4] == MAGIC and len(data) == file_size("key")
    assert data[HEADER.size:HEADER.size + 3] == b"key" and data[HEADER.size + 3:] == page(1)


def test_lru_eviction_order_and_byte_accounting(tmp_path: Path, stores: list[DiskStore]) -> None:
    d = open_store(stores, tmp_path, capacity=3 * file_size("k0"))
    assert d.put_many([(f"k{i}", page(i)) for i in range(3)]) == [True] * 3
    assert d.get_many(["k0"]) == [page(0)]  # k0 is now the most recent; k1 the least
    d.put_many([("k3", page(3))])
    assert d.contains_many(["k0", "k1", "k2", "k3"]) == [True, False, True, True]
    d.put_many([("k0", page(0))])  # a put refreshes recency too: k2 goes next
    d.put_many([("k4", page(4))])
    assert d.contains_many(["k0", "k2", "k3", "k4"]) == [True, False, True, True]
    (s,) = d.stats()
    assert (s.pages, s.bytes, s.evictions, s.puts) == (3, 3 * file_size("k0"), 2, 5)
    assert s.bytes == sum(p.stat().st_size for p in files(tmp_path))
    assert d.prefix_hits(["k0", "k3", "k1", "k4"]) == 2


def test_put_existing_is_a_noop_and_oversized_is_refused(tmp_path: Path,
                                                         stores: list[DiskStore]) -> None:
    d = open_store(stores, tmp_path / "d", capacity=1000, max_page_bytes=150)
    assert d.put_many([("a", page(1))]) == [True]
    before = os.stat(d._path("a"))
    assert d.put_many([("a", page(2)), ("big", page(3, 200))]) == [True, False]
    after = os.stat(d._path("a"))
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert d.get_many(["a", "big"]) == [page(1), None]
    small = open_store(stores, tmp_path / "small", capacity=file_size("a", 50))
    assert small.put_many([("a", page(1, 51)), ("b", bytearray(page(2, 50)))]) == [False, True]
    assert d.stats()[0].puts == 1 and len(files(tmp_path / "small")) == 1


def test_memoryview_pages_are_stored_whole(tmp_path: Path, stores: list[DiskStore]) -> None:
    d = open_store(stores, tmp_path, fsync=True)
    assert d.put_many([("v", memoryview(page(5, 64)).cast("B", (8, 8)))]) == [True]
    assert d.get_many(["v"]) == [page(5, 64)]


@pytest.mark.parametrize("offset", [0, 5, HEADER.size - 5, HEADER.size, -1],
                         ids=["magic", "version", "checksum", "key", "payload"])
def test_corrupted_page_is_a_miss_and_removed(tmp_path: Path, stores: list[DiskStore],
                                              offset: int) -> None:
    d = open_store(stores, tmp_path)
    d.put_many([("a", page(1)), ("b", page(2))])
    path = Path(d._path("a"))
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    assert d.get_many(["a", "b"]) == [None, page(2)]
    assert not path.exists() and d.contains_many(["a"]) == [False]
    (s,) = d.stats()
    assert (s.errors, s.hits, s.misses, s.pages, s.bytes) == (1, 1, 1, 1, file_size("b"))


@pytest.mark.parametrize("new_size", [HEADER.size + 1 + 50, 3, 0])
def test_truncated_page_is_a_miss_and_removed(tmp_path: Path, stores: list[DiskStore],
                                              new_size: int) -> None:
    d = open_store(stores, tmp_path)
    d.put_many([("a", page(1))])
    os.truncate(d._path("a"), new_size)
    assert d.get_many(["a"]) == [None] and not os.path.exists(d._path("a"))
    assert d.stats()[0].errors == 1 and d.stats()[0].bytes == 0


def test_page_with_trailing_bytes_is_a_miss(tmp_path: Path, stores: list[DiskStore]) -> None:
    d = open_store(stores, tmp_path)
    d.put_many([("a", page(1))])
    with open(d._path("a"), "ab") as f:
        f.write(b"junk")
    assert d.get_many(["a"]) == [None] and d.stats()[0].errors == 1


def test_file_deleted_behind_the_store_is_a_miss(tmp_path: Path, stores: list[DiskStore]) -> None:
    d = open_store(stores, tmp_path)
    d.put_many([("a", page(1))])
    os.remove(d._path("a"))
    assert d.get_many(["a"]) == [None] and d.contains_many(["a"]) == [False]
    assert d.stats()[0].errors == 1


def test_recovery_keeps_complete_pages_and_drops_partial_ones(tmp_path: Path,
                                                              stores: list[DiskStore]) -> None:
    d = DiskStore(str(tmp_path), 10_000)
    d.put_many([(f"k{i}", page(i)) for i in range(6)])
    d.close()
    os.truncate(d._path("k1"), HEADER.size + 3)  # a kill -9 in the middle of a write
    os.truncate(d._path("k2"), 5)  # not even a whole header
    Path(d._path("k3") + ".tmp.123.0").write_bytes(b"partial")  # a write never renamed
    os.rename(d._path("k4"), d._path("k3") + ".x")  # junk beside a page: not ours, kept
    shutil.copy(d._path("k5"), Path(d._path("k5")).with_name("0" * 40 + ".page"))  # misnamed
    Path(tmp_path, "notes.txt").write_text("not a page")
    reopened = open_store(stores, tmp_path)
    assert reopened.contains_many([f"k{i}" for i in range(6)]) == [True, False, False, True,
                                                                   False, True]
    assert reopened.get_many(["k0", "k3", "k5"]) == [page(0), page(3), page(5)]
    (s,) = reopened.stats()
    assert s.extra == {"recovered": 3, "recovered_dropped": 4}
    assert (s.pages, s.bytes, s.errors) == (3, 3 * file_size("k0"), 0)
    leftover = {p.name for p in files(tmp_path)}
    assert {"notes.txt", Path(d._path("k3")).name + ".x"} < leftover and len(leftover) == 5


def test_restart_keeps_recency_and_evicts_over_a_smaller_capacity(
        tmp_path: Path, stores: list[DiskStore]) -> None:
    d = DiskStore(str(tmp_path), 10_000)
    d.put_many([(f"k{i}", page(i)) for i in range(4)])
    for i in range(4):  # written long ago, in order (file timestamps are coarse)
        os.utime(d._path(f"k{i}"), ns=(i * 10**9, i * 10**9))
    assert d.get_many(["k0"]) == [page(0)]  # a read makes k0 the most recent
    d.close()
    smaller = open_store(stores, tmp_path, capacity=2 * file_size("k0"))
    assert smaller.contains_many(["k0", "k1", "k2", "k3"]) == [True, False, False, True]
    (s,) = smaller.stats()
    assert (s.pages, s.evictions, s.extra["recovered"]) == (2, 2, 4)
    assert len(files(tmp_path)) == 2


def test_delete_many(tmp_path: Path, stores: list[DiskStore]) -> None:
    d = open_store(stores, tmp_path)
    d.put_many([("a", page(1)), ("b", page(2))])
    assert d.delete_many(["a", "a", "missing"]) == 1
    assert d.contains_many(["a", "b"]) == [False, True] and len(files(tmp_path)) == 1
    assert d.stats()[0].bytes == file_size("b")


def test_a_directory_has_one_store_at_a_time(tmp_path: Path, stores: list[DiskStore]) -> None:
    first = DiskStore(str(tmp_path), 10_000)
    first.put_many([("a", page(1))])
    with pytest.raises(StoreError, match="in use"):
        DiskStore(str(tmp_path), 10_000)
    first.close()
    first.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        first.get_many(["a"])
    assert open_store(stores, tmp_path).get_many(["a"]) == [page(1)]


def test_lost_directory_is_a_store_error(tmp_path: Path, stores: list[DiskStore]) -> None:
    d = open_store(stores, tmp_path / "ssd")
    d.put_many([("a", page(1))])
    shutil.rmtree(tmp_path / "ssd")
    with pytest.raises(StoreError):
        d.get_many(["a"])
    with pytest.raises(StoreError):
        d.put_many([("b", page(2))])
    assert not (tmp_path / "ssd").exists()  # not silently recreated
    assert d.stats()[0].errors == 1


def test_invalid_key_is_a_value_error(tmp_path: Path, stores: list[DiskStore]) -> None:
    d = open_store(stores, tmp_path)
    with pytest.raises(ValueError):
        d.put_many([("good", page(1)), ("", page(2))])
    assert d.contains_many(["good"]) == [False]  # the batch is checked before any write


def test_concurrent_puts_gets_and_deletes_stay_consistent(tmp_path: Path,
                                                          stores: list[DiskStore]) -> None:
    d = open_store(stores, tmp_path, capacity=12 * file_size("k00"))
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(60):
                key = f"k{(i * (t + 1)) % 20:02d}"  # shared keys, evictions all the time
                assert d.put_many([(key, page(int(key[1:])))]) == [True]
                got = d.get_many([key])[0]
                assert got is None or got == page(int(key[1:]))
                if i % 7 == t:
                    d.delete_many([key])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    (s,) = d.stats()
    on_disk = files(tmp_path)
    assert s.errors == 0 and s.pages == len(on_disk) <= 12
    assert s.bytes == sum(p.stat().st_size for p in on_disk)
    keys = [f"k{i:02d}" for i in range(20)]
    assert sum(d.contains_many(keys)) == s.pages
    assert all(got in (None, page(i)) for i, got in enumerate(d.get_many(keys)))
