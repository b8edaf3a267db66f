"""``MooncakeStore``: the cluster backend, a client of one shared Mooncake Store.

Who calls it: ``kvstore.config.build_store`` makes one per ``python -m kvstore --backend
mooncake`` server; ``kvstore.server`` then calls every ``PageStore`` method from its thread pool,
as for any backend (see ``kvstore.backends.base``). SGLang workers keep talking to their host's
own kvstore server (shared memory, layer-wise loading, unchanged); only the server's storage is
shared. ``scripts/cluster`` starts the master with ``mooncake_master_command``. The config, the
master's command line and the client set-up live in ``kvstore.backends.mooncake_setup`` (both
re-exported here); the object key and value layout in ``kvstore.backends.mooncake_pages``.

Deployment: one ``mooncake_master`` per cluster, started as ``mooncake_master_command`` gives::

    mooncake_master -rpc_port=50051 -rpc_address=HOST -enable_http_metadata_server=true \\
        -http_metadata_server_port=8080 -http_metadata_server_host=HOST -metrics_host=HOST \\
        -default_kv_lease_ttl=1000

It is ready when ``http://HOST:8080/health`` answers 200 (``/metadata?key=...`` answers 404 for
a key nobody wrote). Every host then runs ``python -m kvstore --backend mooncake
--mooncake-master HOST:50051 --mooncake-metadata http://HOST:8080/metadata
--mooncake-local-host <this host's address> --mooncake-segment-bytes N``: its server joins the
store and lends it ``N`` bytes of RAM (its *segment*, committed as pages are written). A page put
on host A is readable on host B. ``metadata_server="P2PHANDSHAKE"`` (the default) works too and
needs no metadata service: transfer engines then handshake with each other directly.

Mapping (``kvstore.backends.mooncake_pages``): a key becomes the object ``KEY_PREFIX +
sha256(key)``; the value is a checksummed header, the key and the page. Calls, all batched:

- ``put_many``: ``batch_put_from`` of the encoded values, preferring this host's segment
  (``prefer_local``; Mooncake falls back to other segments when it is full). Putting an existing
  key succeeds without changing it (Mooncake's own rule, as ours).
- ``get_many``: ``batch_get_replica_desc`` (one master round trip) gives each object's size, then
  ``batch_get_into`` reads them, from RAM on this host or over TCP from the host holding them.
- ``contains_many`` / ``prefix_hits``: ``batch_is_exist``. ``delete_many``: ``batch_remove`` with
  ``force`` (a reader's lease does not stop a delete; its checksum catches a torn read).

What differs from ``TieredStore``:

- Capacity is the cluster's: Mooncake's master evicts (past its high watermark, objects whose
  lease expired: 1 s after their last read with ``mooncake_master_command``'s default, not
  Mooncake's 10 s, see there) and places pages in any host's segment. A put it still cannot
  place after ``no_space_retry_s`` (eviction lags a burst of puts) returns ``False`` and is
  counted in ``extra["no_space"]``: the contract's "never fails a put for lack of space" holds
  only eventually, and such a page is simply not cached.
- Durability: nothing is written to disk. Pages live in the segments of running servers; a server
  that stops takes its segment's pages with it. Reads of a peer that died fail (``TRANSFER_FAIL``)
  until the master drops its segment (``-client_ttl``, 10 s): they are misses, counted in
  ``extra["read_failures"]``.
- Errors: a checksum mismatch is a miss, counted in ``errors`` and removed; a Mooncake RPC failure
  (master unreachable) or an unknown error code raises ``StoreError``.
- Stats: hits, misses, puts, errors are this server's. Pages, bytes, capacity and evictions are
  the cluster's when ``master_metrics_url`` points at the master's ``/metrics``; otherwise pages
  and bytes are 0 and capacity is this host's segment.

Transport: TCP only. This backend hands Mooncake plain Python buffers, which the TCP transport
copies from and into; RDMA would need them registered. The Mooncake client is thread-safe (SGLang
calls it from several threads), so calls are not serialised; counters have their own lock. The
Python API has no per-call timeout: a dead master costs a few seconds of retries per call (the
kvstore client's own timeout bounds what a worker waits).
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from kvstore.backends.base import Page, PageStore, StoreError, TierStats, check_key
from kvstore.backends.mooncake_pages import (
    PageCheck,
    decode_page,
    encode_page,
    mooncake_key,
    page_nbytes,
)
from kvstore.backends.mooncake_setup import (
    MooncakeConfig,
    connect,
    master_figures,
    mooncake_master_command,
    replicate_config,
)

__all__ = ["MooncakeConfig", "MooncakeStore", "mooncake_master_command"]

logger = logging.getLogger(__name__)

# Mooncake ErrorCode values (mooncake-store/include/types.h) this backend tells apart.
OK = 0
NO_AVAILABLE_HANDLE = -200
"""No segment has room (eviction has not caught up)."""
INVALID_PARAMS = -600
"""For example a value larger than any segment."""
OBJECT_NOT_FOUND = -704
OBJECT_ALREADY_EXISTS = -705
TRANSFER_FAIL = -800
"""The host holding the replica is gone (until the master drops its segment)."""
_RPC_ERRORS = range(-999, -899)
"""Master RPC failures (unreachable, timed out)."""


class MooncakeStore(PageStore):
    """See the module docstring. ``client``: an already set-up Mooncake client (tests);
    None connects per ``cfg`` (``StoreError`` if the package is missing or the store is
    unreachable)."""

    def __init__(self, cfg: MooncakeConfig, max_page_bytes: int | None = None,
                 client: Any | None = None) -> None:
        self.cfg = cfg
        self._max_page = max_page_bytes or (1 << 62)
        self._client = client if client is not None else connect(cfg)
        self._replicate = replicate_config(self._client, cfg) if client is None else None
        self._lock = threading.Lock()
        self._closed = False
        self._stats = TierStats("mooncake", cfg.segment_bytes, extra={
            "segment_bytes": cfg.segment_bytes, "bytes_put": 0, "bytes_read": 0,
            "no_space": 0, "too_large": 0, "read_failures": 0, "write_failures": 0,
            "other_key": 0, "master_metrics_errors": 0})

    # -- PageStore ----------------------------------------------------------------------------
    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        out: list[bytes | None] = [None] * len(keys)
        if not keys:
            return out
        mkeys = [mooncake_key(k) for k in keys]
        sizes = self._sizes(mkeys)
        found = [i for i, mkey in enumerate(mkeys) if mkey in sizes]
        values = [bytearray(sizes[mkeys[i]]) for i in found]
        codes = self._get_into([mkeys[i] for i in found], values) if found else []
        count = {"hits": 0, "read_failures": 0, "errors": 0, "other_key": 0, "bytes_read": 0}
        corrupt: list[str] = []
        for i, value, code in zip(found, values, codes, strict=True):
            if code < 0:
                if code != OBJECT_NOT_FOUND:  # removed or evicted since the lookup: a miss
                    count["read_failures"] += 1
                    logger.debug("mooncake read of %s failed: code %d", keys[i], code)
                continue
            check, page = decode_page(keys[i], memoryview(value)[:code])
            if check is PageCheck.CORRUPT:
                count["errors"] += 1
                corrupt.append(mkeys[i])
            elif check is PageCheck.OTHER_KEY:
                count["other_key"] += 1
                logger.warning("mooncake object %s holds another key than %r", mkeys[i], keys[i])
            else:
                out[i] = page
                count["hits"] += 1
                count["bytes_read"] += len(page or b"")
        if corrupt:
            logger.warning("removing %d corrupted page(s) from mooncake", len(corrupt))
            self._call("batch_remove", corrupt, True)
        with self._lock:
            self._stats.hits += count["hits"]
            self._stats.misses += len(keys) - count["hits"]
            self._stats.errors += count["errors"]
            for name in ("read_failures", "other_key", "bytes_read"):
                self._stats.extra[name] += count[name]
        return out

    def put_many(self, items: Sequence[tuple[str, Page]]) -> list[bool]:
        for key, _ in items:  # a bad key fails the whole batch before anything is stored
            check_key(key)
        results = [False] * len(items)
        todo: list[int] = []
        too_large = 0
        for i, (_, page) in enumerate(items):
            if page_nbytes(page) > self._max_page:
                too_large += 1
            else:
                todo.append(i)
        mkeys = [mooncake_key(items[i][0]) for i in todo]
        values = [encode_page(items[i][0], items[i][1]) for i in todo]
        codes = self._put_from(mkeys, values) if todo else []
        retry = [j for j, code in enumerate(codes) if code == NO_AVAILABLE_HANDLE]
        if retry and self.cfg.no_space_retry_s > 0:
            time.sleep(self.cfg.no_space_retry_s)
            again = self._put_from([mkeys[j] for j in retry], [values[j] for j in retry])
            for j, code in zip(retry, again, strict=True):
                codes[j] = code
        count = {"puts": 0, "bytes_put": 0, "no_space": 0, "write_failures": 0}
        for j, code in enumerate(codes):
            if code in (OK, OBJECT_ALREADY_EXISTS):
                results[todo[j]] = True
                count["puts"] += 1
                count["bytes_put"] += page_nbytes(items[todo[j]][1])
            elif code == NO_AVAILABLE_HANDLE:
                count["no_space"] += 1
            elif code == INVALID_PARAMS:  # larger than any segment can hold
                too_large += 1
            elif code == TRANSFER_FAIL:  # the segment's host went away mid-put
                count["write_failures"] += 1
            else:
                raise StoreError(f"mooncake put of {items[todo[j]][0]!r} failed: code {code}")
        with self._lock:
            self._stats.puts += count["puts"]
            self._stats.extra["too_large"] += too_large
            for name in ("bytes_put", "no_space", "write_failures"):
                self._stats.extra[name] += count[name]
        return results

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        if not keys:
            return []
        codes = self._call("batch_is_exist", [mooncake_key(k) for k in keys])
        if any(code < 0 for code in codes):
            raise StoreError(f"mooncake exists failed: codes {sorted(set(codes))}")
        return [code == 1 for code in codes]

    def delete_many(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        codes = self._call("batch_remove", [mooncake_key(k) for k in keys], True)
        if any(code in _RPC_ERRORS for code in codes):
            raise StoreError(f"mooncake remove failed: codes {sorted(set(codes))}")
        odd = {code for code in codes if code not in (OK, OBJECT_NOT_FOUND)}
        if odd:
            logger.warning("mooncake remove: codes %s", sorted(odd))
        return sum(1 for code in codes if code == OK)

    def stats(self) -> list[TierStats]:
        url = self.cfg.master_metrics_url
        cluster = master_figures(url) if url is not None else None
        with self._lock:
            if cluster is None and self.cfg.master_metrics_url is not None:
                self._stats.extra["master_metrics_errors"] += 1
            snapshot = TierStats(**{**self._stats.__dict__, "extra": dict(self._stats.extra)})
        for name, value in (cluster or {}).items():
            setattr(snapshot, name, value)
        return [snapshot]

    def close(self) -> None:
        """Leave the store; this host's segment, and the pages in it, go with it."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._client.close()
        except Exception as exc:  # closing is best effort: the process is stopping
            logger.warning("mooncake close failed: %s", exc)

    # -- Mooncake calls -----------------------------------------------------------------------
    def _call(self, method: str, *args: Any) -> Any:
        if self._closed:
            raise StoreError("mooncake store is closed")
        try:
            return getattr(self._client, method)(*args)
        except Exception as exc:
            raise StoreError(f"mooncake {method} failed: {exc}") from exc

    def _sizes(self, mkeys: list[str]) -> dict[str, int]:
        """Value size of each object found (one master round trip)."""
        sizes: dict[str, int] = {}
        for mkey, replicas in self._call("batch_get_replica_desc", mkeys).items():
            for replica in replicas:
                if replica.is_memory_replica():
                    sizes[mkey] = int(replica.get_memory_descriptor().buffer_descriptor.size)
                    break
        if not sizes:  # nothing found, or the master is unreachable: tell them apart
            codes = self._call("batch_is_exist", mkeys[:1])
            if codes and codes[0] < 0:
                raise StoreError(f"mooncake lookup failed: code {codes[0]}")
        return sizes

    def _get_into(self, mkeys: list[str], values: list[bytearray]) -> list[int]:
        arrays = [(ctypes.c_char * len(v)).from_buffer(v) for v in values]
        codes = self._call("batch_get_into", mkeys, [ctypes.addressof(a) for a in arrays],
                           [len(v) for v in values])
        del arrays  # release the buffers' exports
        if any(code in _RPC_ERRORS for code in codes):
            raise StoreError(f"mooncake get failed: codes {sorted(set(codes))}")
        return list(codes)

    def _put_from(self, mkeys: list[str], values: list[bytearray]) -> list[int]:
        arrays = [(ctypes.c_char * len(v)).from_buffer(v) for v in values]
        args: list[Any] = [mkeys, [ctypes.addressof(a) for a in arrays], [len(v) for v in values]]
        if self._replicate is not None:
            args.append(self._replicate)
        codes = self._call("batch_put_from", *args)
        del arrays
        return list(codes)
