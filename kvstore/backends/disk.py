"""``DiskStore``: the SSD tier, one checksummed file per page under a directory.

Layout: ``DIR/xx/<sha1(key)>.page`` (``xx``: the first two hex digits, so no directory holds more
than 1/256 of the pages), plus ``DIR/.lock``. A file is a 24-byte header, the key, the page:

    magic b"BKVP" | version u16 | key length u16 | page length u64 | crc32(key + page) u32 | pad

Checksum: ``zlib.crc32`` (stdlib, releases the GIL on large buffers, catches every burst error
up to 32 bits and any other corruption with probability 1 - 2**-32). It guards against torn and
rotted files, not against an adversary, so a stronger hash would cost time and buy nothing.

Writes go to ``<name>.tmp.<pid>.<n>`` in the same directory and are ``os.replace``d into place,
so a reader or a restart sees a page whole or not at all; with ``fsync`` the file is synced before
the rename and its directory after. Start-up takes an exclusive ``flock`` on ``DIR/.lock`` (two
stores sharing a directory would delete each other's pages) and rebuilds the index from the files:
temporary files and page files whose header, length or name is wrong (a kill -9 mid-write, a
truncated disk) are deleted and counted in ``extra["recovered_dropped"]``; files the store did not
write are left alone. Checksums are verified when a page is read, not at start-up (reading every
page would make a restart of a large tier slow): a page whose header, length or checksum does not
match on read is deleted, counted in ``errors`` and reported as a miss.

Recency survives restarts: a read sets the file's mtime, and start-up orders pages by mtime.
Thread-safe: one lock guards the index (key -> size, generation, LRU order). Page reads and the
writing of temporary files happen outside it; renames into place and unlinks happen inside it, so
a page file is in place exactly when its key is indexed. Capacity counts header + key + page
bytes; least recently used pages are evicted.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import BinaryIO

from kvstore.backends.base import MAX_KEY_BYTES, Page, PageStore, StoreError, TierStats, check_key

logger = logging.getLogger(__name__)

MAGIC = b"BKVP"
VERSION = 1
HEADER = struct.Struct(">4sHHQI4x")
SUFFIX = ".page"
LOCK_NAME = ".lock"
_FANOUT_DIR = re.compile(r"[0-9a-f]{2}")
_PAGE_FILE = re.compile(r"[0-9a-f]{40}\.page")
_TMP_FILE = re.compile(r"[0-9a-f]{40}\.page\.tmp\.\d+\.\d+")


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
        # key -> (bytes on disk, generation), least recently used first
        self._index: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._bytes = 0
        self._generations = itertools.count()
        self._tmp_ids = itertools.count()
        self._closed = False
        self._stats = TierStats("ssd", capacity_bytes,
                                extra={"recovered": 0, "recovered_dropped": 0})
        self._lock_file = self._lock_directory()
        try:
            self._rebuild()
        except BaseException:
            self._lock_file.close()
            raise

    # -- start-up ---------------------------------------------------------------------------
    def _lock_directory(self) -> BinaryIO:
        """Create the directory and hold its lock; ``StoreError`` if another store holds it."""
        path = os.path.join(self.directory, LOCK_NAME)
        try:
            os.makedirs(self.directory, exist_ok=True)
            lock_file = open(path, "ab")  # held open until close()
        except OSError as exc:
            raise StoreError(f"ssd tier: cannot open {self.directory}: {exc}") from exc
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            lock_file.close()
            raise StoreError(f"ssd tier: {self.directory} is in use by another store") from exc
        return lock_file

    def _rebuild(self) -> None:
        found: list[tuple[int, str, int]] = []  # (mtime, key, size)
        dropped = 0
        try:
            subdirs = sorted(n for n in os.listdir(self.directory) if _FANOUT_DIR.fullmatch(n))
            for subdir in subdirs:
                with os.scandir(os.path.join(self.directory, subdir)) as entries:
                    for entry in entries:
                        if _TMP_FILE.fullmatch(entry.name):
                            dropped += _remove(entry.path)
                        elif _PAGE_FILE.fullmatch(entry.name):
                            page = self._recover(entry.path)
                            if page is None:
                                dropped += _remove(entry.path)
                            else:
                                found.append(page)
        except OSError as exc:
            raise StoreError(f"ssd tier: cannot scan {self.directory}: {exc}") from exc
        for _, key, size in sorted(found):  # least recently used first
            self._index[key] = (size, next(self._generations))
            self._bytes += size
        self._stats.extra.update(recovered=len(found), recovered_dropped=dropped)
        logger.info("ssd tier %s: %d pages (%d bytes) recovered, %d partial files dropped",
                    self.directory, len(found), self._bytes, dropped)
        self._evict_over_capacity(0)

    def _recover(self, path: str) -> tuple[int, str, int] | None:
        """``(mtime, key, size)`` of a complete page file with a sound header, else ``None``."""
        try:
            with open(path, "rb") as f:
                head = f.read(HEADER.size + MAX_KEY_BYTES)
                st = os.fstat(f.fileno())
        except OSError:
            return None
        if len(head) < HEADER.size:
            return None
        magic, version, key_len, page_len, _ = HEADER.unpack_from(head)
        encoded = head[HEADER.size:HEADER.size + key_len]
        if (magic != MAGIC or version != VERSION or len(encoded) != key_len
                or st.st_size != HEADER.size + key_len + page_len):
            return None
        try:
            key = encoded.decode()
        except UnicodeDecodeError:
            return None
        if self._path(key) != path:  # renamed or copied from elsewhere: not where we'd look
            return None
        return st.st_mtime_ns, key, st.st_size

    def _path(self, key: str) -> str:
        digest = hashlib.sha1(key.encode()).hexdigest()
        return os.path.join(self.directory, digest[:2], digest + SUFFIX)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"ssd tier {self.directory} is closed")

    # -- reads ------------------------------------------------------------------------------
    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        self._check_open()
        return [self._get(key) for key in keys]

    def _get(self, key: str) -> bytes | None:
        with self._lock:
            entry = self._index.get(key)
            if entry is None:
                self._stats.misses += 1
                return None
            self._index.move_to_end(key)
        path = self._path(key)
        try:
            page = _read_page(path, key.encode())
        except FileNotFoundError:
            if not os.path.isdir(self.directory):
                raise StoreError(f"ssd tier: directory {self.directory} is gone") from None
            page, problem = None, "vanished"
        except OSError as exc:
            raise StoreError(f"ssd tier: cannot read {path}: {exc}") from exc
        else:
            problem = "is corrupted or truncated"
        with self._lock:
            if page is not None:
                self._stats.hits += 1
                return page
            self._stats.misses += 1
            if self._index.get(key) == entry:  # else evicted or rewritten meanwhile: a miss
                logger.warning("ssd tier: page file %s %s; removed", path, problem)
                self._stats.errors += 1
                self._forget(key)
        return None

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        self._check_open()
        with self._lock:
            return [key in self._index for key in keys]

    # -- writes -----------------------------------------------------------------------------
    def put_many(self, items: Sequence[tuple[str, Page]]) -> list[bool]:
        self._check_open()
        for key, _ in items:
            check_key(key)
        return [self._put(key, page) for key, page in items]

    def _put(self, key: str, page: Page) -> bool:
        encoded = key.encode()
        view = memoryview(page).cast("B")
        size = HEADER.size + len(encoded) + view.nbytes
        if view.nbytes > self._max_page or size > self._capacity:
            return False
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
                return True
        path = self._path(key)
        tmp = self._write_tmp(path, encoded, view)
        with self._lock:  # rename under the lock: a file is in place iff its key is indexed
            stored_meanwhile = key in self._index
            if stored_meanwhile:
                self._index.move_to_end(key)
            else:
                self._evict_over_capacity(size)
                try:
                    os.replace(tmp, path)
                except OSError as exc:
                    self._stats.errors += 1
                    _remove(tmp)
                    raise StoreError(f"ssd tier: cannot write {path}: {exc}") from exc
                self._index[key] = (size, next(self._generations))
                self._bytes += size
                self._stats.puts += 1
        if stored_meanwhile:
            _remove(tmp)
        elif self._fsync:
            _fsync_dir(os.path.dirname(path))
        return True

    def _write_tmp(self, path: str, encoded: bytes, page: memoryview) -> str:
        """Write the page file beside ``path`` under a temporary name; returns that name."""
        tmp = f"{path}.tmp.{os.getpid()}.{next(self._tmp_ids)}"
        header = HEADER.pack(MAGIC, VERSION, len(encoded), page.nbytes, _checksum(encoded, page))
        try:
            try:
                f = open(tmp, "xb")
            except FileNotFoundError:  # first page of this fan-out directory
                self._make_fanout_dir(os.path.dirname(path))
                f = open(tmp, "xb")
            with f:
                f.write(header)
                f.write(encoded)
                f.write(page)
                if self._fsync:
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as exc:
            _remove(tmp)
            with self._lock:
                self._stats.errors += 1
            raise StoreError(f"ssd tier: cannot write {path}: {exc}") from exc
        return tmp

    def _make_fanout_dir(self, path: str) -> None:
        """``mkdir`` one level only: if the store's directory is gone, fail rather than recreate."""
        try:
            os.mkdir(path)
        except FileExistsError:
            return
        if self._fsync:
            _fsync_dir(self.directory)

    # -- eviction and deletion ---------------------------------------------------------------
    def _evict_over_capacity(self, incoming: int) -> None:
        """Drop least recently used pages until ``incoming`` more bytes fit (lock held)."""
        while self._index and self._bytes + incoming > self._capacity:
            self._forget(next(iter(self._index)))
            self._stats.evictions += 1

    def _forget(self, key: str) -> None:
        """Remove ``key`` from the index and its file from disk (lock held)."""
        entry = self._index.pop(key, None)
        if entry is not None:
            self._bytes -= entry[0]
            _remove(self._path(key))

    def delete_many(self, keys: Sequence[str]) -> int:
        self._check_open()
        removed = 0
        with self._lock:
            for key in keys:
                if key in self._index:
                    self._forget(key)
                    removed += 1
        return removed

    def stats(self) -> list[TierStats]:
        with self._lock:
            self._stats.pages, self._stats.bytes = len(self._index), self._bytes
            return [TierStats(**{**self._stats.__dict__, "extra": dict(self._stats.extra)})]

    def close(self) -> None:
        """Release the directory lock; later calls other than ``stats`` raise ``StoreError``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._lock_file.close()


def _read_page(path: str, encoded: bytes) -> bytes | None:
    """The page in ``path`` if its header, key, length and checksum are right, else ``None``.

    ``FileNotFoundError`` and other ``OSError``s propagate. A successful read sets the file's
    mtime, which start-up uses as the page's recency."""
    with open(path, "rb") as f:
        head = f.read(HEADER.size + len(encoded))
        if len(head) != HEADER.size + len(encoded):
            return None
        magic, version, key_len, page_len, crc = HEADER.unpack_from(head)
        if (magic != MAGIC or version != VERSION or key_len != len(encoded)
                or head[HEADER.size:] != encoded
                or os.fstat(f.fileno()).st_size != len(head) + page_len):
            return None
        page = f.read(page_len)
        if len(page) != page_len or _checksum(encoded, page) != crc:
            return None
        now = time.time_ns()
        try:
            os.utime(f.fileno(), ns=(now, now))
        except OSError:
            pass  # recency across restarts is best effort
    return page


def _remove(path: str) -> int:
    """Unlink ``path``; 1 if it was removed, 0 if it was already gone or cannot be removed."""
    try:
        os.remove(path)
    except FileNotFoundError:
        return 0
    except OSError as exc:
        logger.warning("ssd tier: cannot remove %s: %s", path, exc)
        return 0
    return 1


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
