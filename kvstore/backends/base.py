"""The storage seam behind the kvstore server: one interface, several backends.

Who calls it: ``kvstore.server`` (one ``PageStore`` per server process) calls every method from
its request handlers, possibly from several threads at once (the server runs blocking store calls
in a thread pool), so implementations are thread-safe. Nothing else touches a store directly.

Model: a store maps *keys* to *pages*. A key is a ``str`` of at most ``MAX_KEY_BYTES`` UTF-8 bytes
(in practice SGLang's 64-hex-digit page hash plus a namespace suffix naming model, TP rank, dtype
and layout; see ``kvstore.keys``). A page is an immutable byte string (one KV page as SGLang's
host pool lays it out); the store never interprets it. Pages of one key never change: putting an
existing key again is a no-op that reports success, so concurrent writers of the same prefix
agree without coordination.

Results:
- A miss is a normal result (``None`` / ``False`` / a shorter prefix count), never an exception.
- A full store evicts; it never fails a put for lack of space. ``put_many`` returns ``False`` for
  an item only if it can never be stored (larger than the store's page limit or its capacity).
- A corrupted page (checksum mismatch, truncated file) is reported as a miss and removed.
- Exceptions (``StoreError``) mean the backend itself failed (disk gone, I/O error); the server
  turns them into an error reply and keeps running.

Reference implementations: ``kvstore.backends.memory.MemoryStore`` (bounded LRU in RAM),
``kvstore.backends.disk.DiskStore`` (one checksummed file per page, index rebuilt from disk) and
``kvstore.backends.tiered.TieredStore`` (memory in front of disk, written behind), the single-host
default. A cluster backend (Mooncake Store) implements the same interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

MAX_KEY_BYTES = 512
"""Longest key, in UTF-8 bytes."""

Page = bytes | bytearray | memoryview
"""A page value as accepted by ``put_many``; stores keep their own immutable copy."""


class StoreError(RuntimeError):
    """The backend failed (I/O error, lost directory); not raised for misses or full tiers."""


@dataclass
class TierStats:
    """Counters of one tier since start (monotonic except ``pages``/``bytes``)."""

    name: str
    capacity_bytes: int
    pages: int = 0
    bytes: int = 0
    hits: int = 0
    misses: int = 0
    puts: int = 0
    evictions: int = 0
    errors: int = 0
    """Corrupted or unreadable pages found (each removed and reported as a miss)."""
    extra: dict[str, int] = field(default_factory=dict)
    """Backend-specific counters (for example ``write_queue``, ``written``)."""


class PageStore(ABC):
    """A thread-safe page store; see the module docstring for the contract."""

    @abstractmethod
    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The page of each key, or ``None`` where it is missing or was corrupted."""

    @abstractmethod
    def put_many(self, items: Sequence[tuple[str, Page]]) -> list[bool]:
        """Store pages (evicting others as needed); ``False`` only for a page that can never fit.

        Returns once the pages are readable through ``get_many`` (a write-behind tier may make
        them durable later)."""

    @abstractmethod
    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key is stored, without reading the pages."""

    def prefix_hits(self, keys: Sequence[str]) -> int:
        """How many keys, from the first, are all stored (SGLang's ``batch_exists``)."""
        count = 0
        for present in self.contains_many(keys):
            if not present:
                break
            count += 1
        return count

    @abstractmethod
    def delete_many(self, keys: Sequence[str]) -> int:
        """Remove keys; returns how many were present."""

    @abstractmethod
    def stats(self) -> list[TierStats]:
        """One entry per tier, fastest first."""

    def flush(self) -> None:
        """Block until every accepted page is durable (no-op for volatile stores)."""
        return None

    def close(self) -> None:
        """Release resources; pending writes are flushed first. Idempotent."""
        return None


def check_key(key: str) -> None:
    """``ValueError`` naming the key if it is not a valid store key."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"store key must be a non-empty string, got {key!r:.80}")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise ValueError(f"store key longer than {MAX_KEY_BYTES} bytes: {key[:40]!r}...")
