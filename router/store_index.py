"""Which leading pages of a prompt the shared kvstore holds (``--kvstore``), for ``cost_aware``.

A worker attached to the store (``runtime_patches.launch --kvstore``) loads a prefix the store
holds instead of recomputing it, so a prompt whose prefix another worker computed is cheap on
every attached worker, not only on the one whose device cache holds it. The router's KV index
(``router.kv_events``) sees the workers' device and host tiers; this module adds the store.

Contract (``StoreIndex.leading_tokens(ids)``): the leading tokens of ``ids`` whose pages the
store holds, under the namespace (key suffix, ``kvstore.keys``) that holds the most of them
among the ones the store saw written most recently (the ``namespaces`` op, refreshed every
``refresh_s``). It never raises and never waits longer than ``timeout_s``: an unreachable or
slow store, an unknown page size or a prompt the worker would hash differently (a LoRA adapter,
``extra_key``, ``cache_salt``: SGLang seeds those chains with a namespace) answer 0, and the
request is dispatched on the rest of the score. After a failure the store is not asked again
for ``backoff_s``. Every worker of the router's pool is assumed to read this store; the figure
is a price, not a promise: the worker looks the pages up itself with its own exact keys.

Page hashes are SGLang 0.5.23's storage chain (``sglang.srt.mem_cache.utils
.get_storage_hash_str`` without a namespace seed: SHA-256 of the previous page's digest and the
page's token ids as little-endian uint32), computed here so the router needs neither torch nor
SGLang's native extension; ``tests/unit/test_store_index.py`` compares it with SGLang's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import struct
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvstore.keys import page_size_of
from kvstore.protocol import HEADER, decode_body, encode_frame

logger = logging.getLogger(__name__)

EMPTY_REFRESH_S = 0.5
"""While the store has named no namespace yet, it is asked again after this many seconds."""
NAMESPACED_FIELDS = ("lora_path", "extra_key", "cache_salt")
"""Request fields that make SGLang seed a prompt's storage chain (the router cannot)."""


def page_hashes(ids: Sequence[int], page_size: int, max_pages: int) -> list[str]:
    """SGLang's storage hashes of the first ``max_pages`` whole pages of ``ids`` (hex)."""
    hashes: list[str] = []
    prior = b""
    pages = min(len(ids) // page_size, max_pages)
    for start in range(0, pages * page_size, page_size):
        page = ids[start:start + page_size]
        if any(not 0 <= t <= 0xFFFFFFFF for t in page):
            break  # SGLang hashes such ids another way; claim nothing from here on
        digest = hashlib.sha256(prior + struct.pack(f"<{page_size}I", *page)).digest()
        hashes.append(digest.hex())
        prior = digest
    return hashes


@dataclass(frozen=True)
class StoreIndexConfig:
    host: str
    port: int
    timeout_s: float = 0.1
    """Longest a lookup may take (connect included) before it answers 0."""
    refresh_s: float = 5.0
    """Seconds between reads of the store's namespaces (at most ``EMPTY_REFRESH_S`` while it
    has named none, so the first pages written are priced soon after a cold start)."""
    backoff_s: float = 2.0
    """Seconds without lookups after a failure."""
    max_namespaces: int = 4
    """Most recently written namespaces asked about per lookup."""
    max_keys: int = 256
    """Keys per lookup, shared by the namespaces (longer prompts are priced on their start)."""

    @classmethod
    def parse(cls, address: str, **kwargs: Any) -> StoreIndexConfig:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--kvstore {address!r}: expected HOST:PORT")
        return cls(host.strip("[]"), int(port), **kwargs)


@dataclass
class StoreIndexStats:
    lookups: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("hit", "miss", "error", "skipped"), 0))
    """Lookups by result: ``hit`` (some pages held), ``miss``, ``error`` (the store failed or
    timed out), ``skipped`` (backing off, no namespace yet, or a namespaced prompt)."""
    tokens: int = 0
    """Leading prompt tokens found in the store, summed over lookups."""


class StoreIndex:
    """One connection to the store, one lookup at a time (owned by the app)."""

    def __init__(self, cfg: StoreIndexConfig) -> None:
        self.cfg = cfg
        self.stats = StoreIndexStats()
        self._lock = asyncio.Lock()
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._namespaces: list[tuple[str, int]] = []
        self._read_at = float("-inf")
        self._down_until = float("-inf")
        self._next_id = 0

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        try:
            yield
        finally:
            self._close()

    async def leading_tokens(self, ids: Sequence[int], body: dict[str, Any] | None = None) -> int:
        if (body and any(body.get(f) for f in NAMESPACED_FIELDS)) \
                or time.monotonic() < self._down_until:
            self.stats.lookups["skipped"] += 1
            return 0
        try:
            found = await asyncio.wait_for(self._locked_lookup(ids), self.cfg.timeout_s)
        except Exception as exc:  # unreachable, slow, or an error reply: price it as absent
            self._down_until = time.monotonic() + self.cfg.backoff_s
            self.stats.lookups["error"] += 1
            logger.warning("kvstore lookup at %s:%d failed (%s: %s); not asked for %.1f s",
                           self.cfg.host, self.cfg.port, type(exc).__name__, exc,
                           self.cfg.backoff_s)
            return 0
        if found is None:
            self.stats.lookups["skipped"] += 1
            return 0
        self.stats.lookups["hit" if found else "miss"] += 1
        self.stats.tokens += found
        return found

    async def _locked_lookup(self, ids: Sequence[int]) -> int | None:
        async with self._lock:
            try:
                return await self._lookup(ids)
            except BaseException:  # a reply may be half read: the connection is unusable
                self._close()
                raise

    async def _lookup(self, ids: Sequence[int]) -> int | None:
        every = self.cfg.refresh_s if self._namespaces else min(self.cfg.refresh_s, EMPTY_REFRESH_S)
        if time.monotonic() - self._read_at >= every:
            reply = await self._call({"op": "namespaces"})
            sized = [(s, page_size_of(s)) for s in reply["namespaces"]]
            self._namespaces = [(s, p) for s, p in sized if p][:self.cfg.max_namespaces]
            self._read_at = time.monotonic()
        if not self._namespaces:
            return None
        per = max(1, self.cfg.max_keys // len(self._namespaces))
        hashes: dict[int, list[str]] = {}
        keys: list[str] = []
        spans: list[tuple[int, int, int]] = []  # (first key, count, page size)
        for suffix, size in self._namespaces:
            if size not in hashes:  # namespaces of one page size share a chain
                hashes[size] = page_hashes(ids, size, per)
            chain = hashes[size]
            spans.append((len(keys), len(chain), size))
            keys.extend(h + suffix for h in chain)
        if not keys:
            return 0
        present = (await self._call({"op": "exists", "keys": keys}))["present"]
        best = 0
        for first, count, size in spans:
            held = next((i for i in range(count) if not present[first + i]), count)
            best = max(best, held * size)
        return best

    async def _call(self, msg: dict[str, Any]) -> dict[str, Any]:
        if self._conn is None:
            self._conn = await asyncio.open_connection(self.cfg.host, self.cfg.port)
        reader, writer = self._conn
        self._next_id += 1
        writer.write(encode_frame({**msg, "id": self._next_id}))
        await writer.drain()
        (length,) = HEADER.unpack(await reader.readexactly(HEADER.size))
        reply = decode_body(await reader.readexactly(length))
        if not reply.get("ok") or reply.get("id") != self._next_id:
            raise RuntimeError(f"{msg['op']}: {reply.get('error') or 'reply out of order'}")
        return reply

    def _close(self) -> None:
        if self._conn is not None:
            self._conn[1].close()
            self._conn = None
