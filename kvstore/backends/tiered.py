"""``TieredStore``: the memory tier in front of the SSD tier, written behind (single-host default).

- ``put_many`` stores in memory and queues each new page for one writer thread that puts it on
  disk. Pages the memory tier refuses (larger than it) go to disk at once, synchronously.
- The queue is bounded (``write_queue_pages``). When it is full, ``put_many`` waits for room, at
  most ``write_wait_s`` per call in all; past that, the pages that still find no room are not
  queued (``extra["write_drops"]``) and live in memory only. We drop the newest writes, not the
  oldest: a new page is at the hot end of the memory LRU, while the oldest queued page may already
  be evicted from memory, the queue holding its only copy. A dropped page gets queued again the
  next time it is put, so a busy prefix still reaches the disk.
- ``get_many`` answers from memory, then from pages still queued, then from disk; the last two
  are promoted into memory.
- A page evicted from memory is still on disk or still queued (the queue holds its own
  reference), unless its write was dropped, failed or refused by the disk tier (all three
  counted: ``extra["write_drops"]``, ``extra["write_errors"]``; ``extra["written"]`` counts the
  pages that reached the disk, ``extra["write_queue"]`` those waiting).
- ``delete_many`` cancels queued writes of the keys and waits for one in flight, so a delete is
  never undone by a write behind it.
- ``flush`` waits until the queue is drained; ``close`` drains it, stops the writer and closes
  the disk tier (idempotent).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence

from kvstore.backends.base import Page, PageStore, StoreError, TierStats, check_key
from kvstore.backends.disk import DiskStore
from kvstore.backends.memory import MemoryStore

logger = logging.getLogger(__name__)


class TieredStore(PageStore):
    def __init__(self, memory: MemoryStore, disk: DiskStore | None,
                 write_queue_pages: int = 1024, write_wait_s: float = 0.2) -> None:
        if write_queue_pages <= 0:
            raise ValueError(f"TieredStore.write_queue_pages: must be > 0, got "
                             f"{write_queue_pages}")
        if write_wait_s < 0:
            raise ValueError(f"TieredStore.write_wait_s: must be >= 0, got {write_wait_s}")
        self.memory, self.disk = memory, disk
        self._max_queue = write_queue_pages
        self._write_wait_s = write_wait_s
        # The write-behind state, all guarded by _cond: pages queued for the disk (in order, and
        # by key for reads), the key being written, counters, and whether we are closing.
        self._cond = threading.Condition()
        self._queue: deque[tuple[str, bytes]] = deque()
        self._pending: dict[str, bytes] = {}
        self._writing: str | None = None
        self._num_written = 0
        self._num_write_drops = 0
        self._num_write_errors = 0
        self._closed = False
        self._writer: threading.Thread | None = None
        if disk is not None:
            self._writer = threading.Thread(target=self._write_behind, name="kvstore-writer",
                                            daemon=True)
            self._writer.start()

    # -- the writer thread ------------------------------------------------------------------
    def _write_behind(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:  # closed and drained
                    return
                key, page = self._queue.popleft()
                self._cond.notify_all()  # room in the queue
                if self._pending.get(key) is not page:  # cancelled by delete_many
                    continue
                self._writing = key
            written = self._write_one(key, page)
            with self._cond:
                self._writing = None
                if self._pending.get(key) is page:
                    del self._pending[key]
                self._num_written += written
                self._num_write_errors += not written
                self._cond.notify_all()

    def _write_one(self, key: str, page: bytes) -> bool:
        assert self.disk is not None
        try:
            return self.disk.put_many([(key, page)])[0]
        except StoreError as exc:
            logger.warning("write-behind to the ssd tier failed: %s", exc)
        except Exception:  # a bug must not stop the writer: flush() would wait forever
            logger.exception("write-behind to the ssd tier failed unexpectedly")
        return False

    def _enqueue(self, key: str, page: bytes, deadline: float) -> None:
        """Queue ``page`` for the disk unless it is there or queued; drop it past ``deadline``.

        The disk is asked under ``_cond`` (lock order: ``_cond``, then the disk's lock; nothing
        takes them the other way): the writer unqueues a key only once the disk has it, so a
        key is never queued twice."""
        assert self.disk is not None
        with self._cond:
            while True:
                if self._closed or key in self._pending or self.disk.contains_many([key])[0]:
                    return
                if len(self._queue) < self._max_queue:
                    self._pending[key] = page
                    self._queue.append((key, page))
                    self._cond.notify_all()
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._count_drop()
                    return
                self._cond.wait(remaining)

    def _count_drop(self) -> None:
        """Count a write the full queue had no room for (``_cond`` held)."""
        self._num_write_drops += 1
        if self._num_write_drops % 1000 == 1:
            logger.warning("ssd write queue full (%d pages): %d writes dropped so far; those "
                           "pages are in memory only", self._max_queue, self._num_write_drops)

    # -- the PageStore interface ------------------------------------------------------------
    def put_many(self, items: Sequence[tuple[str, Page]]) -> list[bool]:
        for key, _ in items:
            check_key(key)
        if self._closed:
            raise StoreError("the store is closed")
        # One copy, shared by the memory tier and the write queue (bytes(b) is b for bytes).
        owned = [(key, page if type(page) is bytes else bytes(page)) for key, page in items]
        stored = self.memory.put_many(owned)
        if self.disk is None:
            return stored
        deadline = time.monotonic() + self._write_wait_s
        results = []
        for (key, page), in_memory in zip(owned, stored, strict=True):
            if in_memory:
                self._enqueue(key, page, deadline)
                results.append(True)
            else:  # larger than the memory tier takes: straight to disk
                results.append(self.disk.put_many([(key, page)])[0])
        return results

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        pages = self.memory.get_many(keys)
        missing = [i for i, page in enumerate(pages) if page is None]
        if not missing or self.disk is None:
            return pages
        with self._cond:  # evicted from memory, still waiting for the disk
            for i in missing:
                pages[i] = self._pending.get(keys[i])
        on_disk = [i for i in missing if pages[i] is None]
        if on_disk:
            for i, page in zip(on_disk, self.disk.get_many([keys[i] for i in on_disk]),
                               strict=True):
                pages[i] = page
        promote = [(keys[i], page) for i in missing if (page := pages[i]) is not None]
        if promote:
            self.memory.put_many(promote)
        return pages

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        present = self.memory.contains_many(keys)
        if self.disk is None or all(present):
            return present
        with self._cond:
            present = [here or key in self._pending
                       for key, here in zip(keys, present, strict=True)]
        on_disk = self.disk.contains_many(keys)
        return [a or b for a, b in zip(present, on_disk, strict=True)]

    def delete_many(self, keys: Sequence[str]) -> int:
        unique = list(dict.fromkeys(keys))
        wanted = set(unique)
        with self._cond:
            cancelled = {key for key in unique if self._pending.pop(key, None) is not None}
            while self._writing is not None and self._writing in wanted:
                self._cond.wait()
        removed = 0
        for key in unique:
            present = self.memory.delete_many([key]) > 0 or key in cancelled
            if self.disk is not None:
                present = self.disk.delete_many([key]) > 0 or present
            removed += present
        return removed

    def stats(self) -> list[TierStats]:
        tiers = self.memory.stats()
        if self.disk is not None:
            disk = self.disk.stats()[0]
            with self._cond:
                disk.extra.update(write_queue=len(self._queue), written=self._num_written,
                                  write_drops=self._num_write_drops,
                                  write_errors=self._num_write_errors)
            tiers.append(disk)
        return tiers

    def flush(self) -> None:
        with self._cond:
            while self._queue or self._writing is not None:
                if self._writer is None or not self._writer.is_alive():
                    return
                self._cond.wait(1.0)

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        if self._writer is not None:
            self._writer.join()  # the writer drains the queue before it stops
        if self.disk is not None:
            self.disk.close()
