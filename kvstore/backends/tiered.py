"""``TieredStore``: the memory tier in front of the SSD tier, written behind (single-host default).

- ``put_many`` stores in memory and queues the page for one writer thread that puts it on disk.
  The queue is bounded (``write_queue_pages``): when it is full, ``put_many`` waits for room, so a
  slow disk slows writers instead of losing pages or growing memory without bound.
- ``get_many`` answers from memory; misses go to disk, and disk hits are promoted into memory.
- A page evicted from memory is still on disk, or still in the write queue (which holds its own
  reference), so eviction from memory never loses a page the SSD tier can hold.
- ``flush`` waits until the queue is drained; ``close`` flushes and stops the writer.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence

from kvstore.backends.base import Page, PageStore, StoreError, TierStats
from kvstore.backends.disk import DiskStore
from kvstore.backends.memory import MemoryStore

logger = logging.getLogger(__name__)
_STOP = ("", b"")


class TieredStore(PageStore):
    def __init__(self, memory: MemoryStore, disk: DiskStore | None,
                 write_queue_pages: int = 1024) -> None:
        if write_queue_pages <= 0:
            raise ValueError(f"TieredStore.write_queue_pages: must be > 0, got "
                             f"{write_queue_pages}")
        self.memory, self.disk = memory, disk
        self._queue: queue.Queue[tuple[str, bytes]] = queue.Queue(write_queue_pages)
        self._pending: dict[str, bytes] = {}  # pages queued for the disk, not yet written
        self._pending_lock = threading.Lock()
        self._written = 0
        self._write_errors = 0
        self._closed = False
        self._writer: threading.Thread | None = None
        if disk is not None:
            self._writer = threading.Thread(target=self._write_behind, name="kvstore-writer",
                                            daemon=True)
            self._writer.start()

    def _write_behind(self) -> None:
        assert self.disk is not None
        while True:
            key, page = self._queue.get()
            try:
                if (key, page) == _STOP:
                    return
                self.disk.put_many([(key, page)])
                self._written += 1
            except StoreError as exc:
                self._write_errors += 1
                logger.warning("write-behind to the ssd tier failed: %s", exc)
            finally:
                with self._pending_lock:
                    self._pending.pop(key, None)
                self._queue.task_done()

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        pages = self.memory.get_many(keys)
        if self.disk is not None and None in pages:
            with self._pending_lock:  # evicted from memory, still waiting for the disk
                pages = [page if page is not None else self._pending.get(key)
                         for key, page in zip(keys, pages, strict=True)]
        missing = [i for i, page in enumerate(pages) if page is None]
        if missing and self.disk is not None:
            found = self.disk.get_many([keys[i] for i in missing])
            promote = []
            for i, page in zip(missing, found, strict=True):
                if page is not None:
                    pages[i] = page
                    promote.append((keys[i], page))
            if promote:
                self.memory.put_many(promote)
        return pages

    def put_many(self, items: Sequence[tuple[str, Page]]) -> list[bool]:
        if self._closed:
            raise StoreError("the store is closed")
        stored = self.memory.put_many(items)
        if self.disk is None:
            return stored
        results = []
        for (key, page), in_memory in zip(items, stored, strict=True):
            with self._pending_lock:
                queued = key in self._pending
            if queued or self.disk.contains_many([key])[0]:
                results.append(True)
                continue
            if not in_memory:  # larger than the memory tier takes: straight to disk
                results.append(self.disk.put_many([(key, page)])[0])
                continue
            data = page if isinstance(page, bytes) else bytes(page)
            with self._pending_lock:
                if key in self._pending:
                    results.append(True)
                    continue
                self._pending[key] = data
            self._queue.put((key, data))
            results.append(True)
        return results

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        present = self.memory.contains_many(keys)
        if self.disk is not None and not all(present):
            with self._pending_lock:
                present = [here or key in self._pending
                           for key, here in zip(keys, present, strict=True)]
            on_disk = self.disk.contains_many(keys)
            present = [a or b for a, b in zip(present, on_disk, strict=True)]
        return present

    def delete_many(self, keys: Sequence[str]) -> int:
        self.flush()
        removed = self.memory.delete_many(keys)
        if self.disk is not None:
            removed = max(removed, self.disk.delete_many(keys))
        return removed

    def stats(self) -> list[TierStats]:
        tiers = self.memory.stats()
        if self.disk is not None:
            disk = self.disk.stats()[0]
            disk.extra.update(write_queue=self._queue.qsize(), written=self._written,
                              write_errors=self._write_errors)
            tiers.append(disk)
        return tiers

    def flush(self) -> None:
        if self._writer is not None:
            self._queue.join()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self.flush()
            self._queue.put(_STOP)
            self._writer.join()
