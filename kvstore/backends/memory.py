"""``MemoryStore``: the memory tier, a byte-bounded LRU of pages in RAM (reference backend).

Thread-safe with one lock; the lock is held only for dictionary work, never for copies of large
pages except the one ``bytes(page)`` that gives the store its own immutable copy on put.
``on_evict`` (optional) is called, outside the lock, with every page evicted to make room, so a
tier behind this one can keep it (``TieredStore`` uses it only for accounting: pages reach disk by
write-behind, not on eviction).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

from kvstore.backends.base import Page, PageStore, TierStats, check_key


class MemoryStore(PageStore):
    def __init__(self, capacity_bytes: int, max_page_bytes: int | None = None,
                 on_evict: Callable[[str, bytes], None] | None = None) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"MemoryStore.capacity_bytes: must be > 0, got {capacity_bytes}")
        self._capacity = capacity_bytes
        self._max_page = min(max_page_bytes or capacity_bytes, capacity_bytes)
        self._pages: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._on_evict = on_evict
        self._stats = TierStats("memory", capacity_bytes)

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        out: list[bytes | None] = []
        with self._lock:
            for key in keys:
                page = self._pages.get(key)
                if page is None:
                    self._stats.misses += 1
                else:
                    self._pages.move_to_end(key)
                    self._stats.hits += 1
                out.append(page)
        return out

    def put_many(self, items: Sequence[tuple[str, Page]]) -> list[bool]:
        for key, _ in items:  # a bad key fails the whole batch before anything is stored
            check_key(key)
        results: list[bool] = []
        evicted: list[tuple[str, bytes]] = []
        for key, page in items:
            size = len(page) if not isinstance(page, memoryview) else page.nbytes
            if size > self._max_page:
                results.append(False)
                continue
            with self._lock:
                if key in self._pages:
                    self._pages.move_to_end(key)
                    results.append(True)
                    continue
            copy = bytes(page)
            with self._lock:
                if key not in self._pages:
                    evicted += self._make_room(len(copy))
                    self._pages[key] = copy
                    self._bytes += len(copy)
                    self._stats.puts += 1
            results.append(True)
        if self._on_evict is not None:
            for key, page in evicted:
                self._on_evict(key, page)
        return results

    def _make_room(self, size: int) -> list[tuple[str, bytes]]:
        """Evict least recently used pages until ``size`` more bytes fit (lock held)."""
        evicted = []
        while self._pages and self._bytes + size > self._capacity:
            key, page = self._pages.popitem(last=False)
            self._bytes -= len(page)
            self._stats.evictions += 1
            evicted.append((key, page))
        return evicted

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        with self._lock:
            return [key in self._pages for key in keys]

    def delete_many(self, keys: Sequence[str]) -> int:
        removed = 0
        with self._lock:
            for key in keys:
                page = self._pages.pop(key, None)
                if page is not None:
                    self._bytes -= len(page)
                    removed += 1
        return removed

    def stats(self) -> list[TierStats]:
        with self._lock:
            self._stats.pages, self._stats.bytes = len(self._pages), self._bytes
            snapshot = TierStats(**{**self._stats.__dict__, "extra": dict(self._stats.extra)})
        return [snapshot]
