"""``DiskStore``: the SSD tier, one checksummed file per page under a directory.

Layout: ``DIR/xx/<sha1(key)>.page`` (``xx``: the first two hex digits, so no directory holds more
than 1/256 of the pages). A file is a 24-byte header, then the key, then the page:

    magic b"BKVP" | version u16 | key length u16 | page length u64 | crc32(key + page) u32 | pad

Writes go to ``<name>.tmp.<pid>.<n>`` in the same directory and are ``os.replace``d into place,
so a reader or a restart sees a page whole or not at all; with ``fsync`` the file (and its
directory) are synced before and after the rename. Start-up rebuilds the index from the files:
temporary files and files whose header or length is wrong (a kill -9 mid-write, a truncated disk)
are deleted and counted (``recovered_dropped``); checksums are verified when a page is read, not
at start-up (reading every page would make a restart of a large tier slow). A page whose checksum
or length does not match on read is deleted, counted in ``errors`` and reported as a miss.

Thread-safe: one lock guards the index (key -> size, recency); file reads and writes happen
outside it. Capacity counts header + key + page bytes; least recently used pages are evicted.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Sequence

from kvstore.backends.base import Page, PageStore, StoreError, TierStats, check_key

logger = logging.getLogger(__name__)

MAGIC = b"BKVP"
VERSION = 1
HEADER = struct.Struct(">4sHHQI4x")
SUFFIX = ".page"


def _checksum(key: bytes, page: bytes | memoryview) -> int:
    return zlib.crc32(page, zlib.crc32(key))


class DiskStore(PageStore):
    def __init__(self, directory: str, capacity_bytes: int, max_page_bytes: int | None = None,
                 fsync: bool = False) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"DiskStore.capacity_bytes: must be > 0, got {capacity_bytes}")
        self.directory = os.path.abspath(directory)
        self._capacity = capacity_bytes
        self._max_page = min(max_page_bytes or capacity_bytes, capacity_bytes)
        self._fsync = fsync
        self._lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()  # key -> bytes on disk, LRU order
        self._bytes = 0
        self._tmp_ids = itertools.count()
        self._stats = TierStats("ssd", capacity_bytes,
                                extra={"recovered": 0, "recovered_dropped": 0})
        os.makedirs(self.directory, exist_ok=True)
        self._rebuild()

    # -- paths and recovery -----------------------------------------------------------------
    def _path(self, key: str) -> str:
        digest = hashlib.sha1(key.encode()).hexdigest()
        return os.path.join(self.directory, digest[:2], digest + SUFFIX)

    def _rebuild(self) -> None:
        found: list[tuple[float, str, int]] = []
        for root, _, files in os.walk(self.directory):
            for name in files:
                path = os.path.join(root, name)
                key, size = self._read_header(path) if name.endswith(SUFFIX) else (None, 0)
                if key is None or self._path(key) != path:
                    self._stats.extra["recovered_dropped"] += 1
                    _remove(path)
                    continue
                found.append((os.path.getmtime(path), key, size))
        for _, key, size in sorted(found):  # oldest first: LRU order approximated by mtime
            self._index[key] = size
            self._bytes += size
        self._stats.extra["recovered"] = len(found)
        if found or self._stats.extra["recovered_dropped"]:
            logger.info("ssd tier %s: %d pages recovered, %d partial files dropped",
                        self.directory, len(found), self._stats.extra["recovered_dropped"])
        self._evict_over_capacity(0)

    @staticmethod
    def _read_header(path: str) -> tuple[str | None, int]:
        """The key and total size of a well-formed complete file, else ``(None, 0)``."""
        try:
            with open(path, "rb") as f:
                head = f.read(HEADER.size)
                if len(head) != HEADER.size:
                    return None, 0
                magic, version, key_len, page_len, _ = HEADER.unpack(head)
                key = f.read(key_len)
                size = os.fstat(f.fileno()).st_size
        except OSError:
            return None, 0
        if magic != MAGIC or version != VERSION or len(key) != key_len:
            return None, 0
        if size != HEADER.size + key_len + page_len:
            return None, 0
        try:
            return key.decode(), size
        except UnicodeDecodeError:
            return None, 0

    # -- reads ------------------------------------------------------------------------------
    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return [self._get(key) for key in keys]

    def _get(self, key: str) -> bytes | None:
        with self._lock:
            if key not in self._index:
                self._stats.misses += 1
                return None
            self._index.move_to_end(key)
        page = self._read_page(key)
        with self._lock:
            if page is None:
                self._stats.errors += 1
                self._stats.misses += 1
                self._forget(key)
            else:
                self._stats.hits += 1
        return page

    def _read_page(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            logger.warning("ssd tier: page file of %s vanished", key[:16])
            return None
        except OSError as exc:
            raise StoreError(f"ssd tier: cannot read {path}: {exc}") from exc
        if len(data) >= HEADER.size:
            magic, version, key_len, page_len, crc = HEADER.unpack_from(data)
            start = HEADER.size + key_len
            stored_key = data[HEADER.size:start]
            if (magic == MAGIC and version == VERSION and len(data) == start + page_len
                    and stored_key == key.encode() and _checksum(stored_key, data[start:]) == crc):
                return data[start:]
        logger.warning("ssd tier: page %s is corrupted or truncated; removed", path)
        _remove(path)
        return None

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        with self._lock:
            return [key in self._index for key in keys]

    # -- writes -----------------------------------------------------------------------------
    def put_many(self, items: Sequence[tuple[str, Page]]) -> list[bool]:
        return [self._put(key, page) for key, page in items]

    def _put(self, key: str, page: Page) -> bool:
        check_key(key)
        encoded = key.encode()
        size = HEADER.size + len(encoded) + memoryview(page).nbytes
        if memoryview(page).nbytes > self._max_page or size > self._capacity:
            return False
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
                return True
        self._write(key, encoded, page)
        with self._lock:
            if key not in self._index:
                self._evict_over_capacity(size)
                self._index[key] = size
                self._bytes += size
                self._stats.puts += 1
        return True

    def _write(self, key: str, encoded: bytes, page: Page) -> None:
        path = self._path(key)
        tmp = f"{path}.tmp.{os.getpid()}.{next(self._tmp_ids)}"
        header = HEADER.pack(MAGIC, VERSION, len(encoded), memoryview(page).nbytes,
                             _checksum(encoded, memoryview(page)))
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(header)
                f.write(encoded)
                f.write(page)
                if self._fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
            if self._fsync:
                _fsync_dir(os.path.dirname(path))
        except OSError as exc:
            _remove(tmp)
            with self._lock:
                self._stats.errors += 1
            raise StoreError(f"ssd tier: cannot write {path}: {exc}") from exc

    def _evict_over_capacity(self, incoming: int) -> None:
        """Drop least recently used pages until ``incoming`` more bytes fit (lock held)."""
        while self._index and self._bytes + incoming > self._capacity:
            key, _ = next(iter(self._index.items()))
            self._forget(key)
            self._stats.evictions += 1

    def _forget(self, key: str) -> None:
        """Remove ``key`` from the index and disk (lock held)."""
        size = self._index.pop(key, None)
        if size is not None:
            self._bytes -= size
            _remove(self._path(key))

    def delete_many(self, keys: Sequence[str]) -> int:
        with self._lock:
            present = [k for k in keys if k in self._index]
            for key in present:
                self._forget(key)
        return len(present)

    def stats(self) -> list[TierStats]:
        with self._lock:
            self._stats.pages, self._stats.bytes = len(self._index), self._bytes
            return [TierStats(**{**self._stats.__dict__, "extra": dict(self._stats.extra)})]


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("ssd tier: cannot remove %s: %s", path, exc)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
