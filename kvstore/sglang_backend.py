"""SGLang HiCache storage backend that uses the kvstore server as every worker's shared L3.

How SGLang 0.5.23 reaches it (``--hicache-storage-backend dynamic``, see ``worker_args``):
- the cache controller builds ``KVStoreHiCache(storage_config, {})`` once per scheduler process,
  then calls ``register_mem_pool_host(pool)`` with the host (L2) KV pool;
- its prefetch thread calls ``batch_exists(page_hashes)`` (how many leading pages are stored) and
  then ``batch_get_v1(page_hashes, host_indices)`` (fill those host slots), 128 pages at a time;
- its backup thread calls ``batch_set_v1(page_hashes, host_indices)`` after pages reach L2;
- without ``"interface_v1": 1`` the older ``batch_get`` / ``batch_set`` (flat page tensors) are
  used instead; both paths are implemented.

Pages travel as SGLang's own flat page (``get_data_page(index, flat=True)``), so the bytes are
tied to the host layout, dtype and shape: ``kvstore.keys.PageNamespace`` puts all of that, plus
model and tensor-parallel shard, into every key, and a page of the wrong size is refused.
Reads go through the client's ``get_into`` into a reused staging buffer (shared memory on the
same host), then ``set_from_flat_data_page`` scatters them into the host pool: with SmolLM2's
1,024-token prefix (23.6 MB) that took 13-15 ms against 48 ms through plain TCP ``get``
(in-process A/B, 2026-11-30). With layer-wise loading on (``--kvstore-layerwise``, CPU engine
with ``runtime_patches.hicache_layerwise``), ``batch_get_v1`` instead reads the batch into a
``PageLease`` and answers at once; ``kvstore.layerwise`` copies it into the host pool layer by
layer while SGLang's loader and the forward consume earlier layers.

Failure: the store is an optimisation. If it is down, slow (every call is bounded by the client's
timeout) or answers an error, the backend reports misses / failed writes and SGLang recomputes:
a worker never waits on the store longer than the timeout and never loads bytes it did not
verify the size of (the store checks page checksums on its SSD tier).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import warnings
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig

from kvstore import layerwise
from kvstore.client import KVStoreClient, KVStoreError, KVStoreUnavailable, PageLease
from kvstore.keys import PageNamespace
from kvstore.sglang_args import ENV_ADDRESS, worker_args

logger = logging.getLogger(__name__)
__all__ = ["KVStoreHiCache", "worker_args"]

_WARN_EVERY_S = 30.0


def _parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"kvstore address must be host:port, got {address!r}")
    return host, int(port)


class KVStoreHiCache(HiCacheStorage):
    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: dict[str, Any]) -> None:
        extra = dict(storage_config.extra_config or {})
        address = extra.get("kvstore_address") or os.environ.get(ENV_ADDRESS)
        if not address:
            raise ValueError("KVStoreHiCache: no kvstore address: set kvstore_address in "
                             f"--hicache-storage-backend-extra-config or {ENV_ADDRESS}")
        host, port = _parse_address(str(address))
        self.storage_config = storage_config
        self.client = KVStoreClient(host, port, timeout_s=float(extra.get("kvstore_timeout_s",
                                                                          2.0)))
        self.namespace: PageNamespace | None = None
        self._page_bytes = 0
        self._staging_lock = threading.Lock()
        self._staging_buf: torch.Tensor | None = None
        self._last_warning = 0.0
        self._metrics = _TransferLog(bool(getattr(storage_config, "enable_storage_metrics",
                                                  False)))
        self._layerwise_wanted = bool(extra.get("kvstore_layerwise")) or layerwise.enabled()
        self._fills: layerwise.LayerFills | None = None
        logger.info("KVStoreHiCache: shared L3 at %s:%d (tp rank %d of %d)", host, port,
                    storage_config.tp_rank, storage_config.tp_size)

    # -- set-up ---------------------------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        super().register_mem_pool_host(mem_pool_host)
        pool = mem_pool_host
        missing = [a for a in ("layout", "dtype", "page_size", "layer_num", "head_num",
                               "head_dim") if not hasattr(pool, a)]
        if missing or self.storage_config.is_mla_model:
            raise ValueError(f"KVStoreHiCache supports MHA host pools only ({type(pool).__name__}"
                             f" lacks {missing or 'MHA layout'})")
        cfg = self.storage_config
        self.namespace = PageNamespace(
            model=cfg.model_name or "model", layout=str(pool.layout),
            dtype=str(pool.dtype).removeprefix("torch."), page_size=int(pool.page_size),
            num_layers=int(pool.layer_num), num_kv_heads=int(pool.head_num),
            head_dim=int(pool.head_dim), tp_rank=cfg.tp_rank, tp_size=cfg.tp_size)
        self._page_bytes = pool.get_dummy_flat_data_page().numel() * pool.dtype.itemsize
        logger.info("KVStoreHiCache: pages of %d bytes, keys end %s", self._page_bytes,
                    self.namespace.suffix)
        if self._layerwise_wanted:
            self._fills = self._start_layerwise(pool)

    @staticmethod
    def _start_layerwise(pool: Any) -> layerwise.LayerFills | None:
        """The fill queue, if this process can load layer by layer safely; else None (reads
        then fill the host pool before answering, as without the option)."""
        why = None
        if not layerwise.gates_applied():  # set by runtime_patches.hicache_layerwise at boot
            why = (f"the layer-wise runtime patches are not active (CPU engine and "
                   f"{layerwise.ENV_ENABLE}=1 are needed)")
        elif pool.layout != "layer_first" or not hasattr(pool, "kv_buffer"):
            why = f"host layout {pool.layout!r} (needs layer_first)"
        if why:
            logger.warning("KVStoreHiCache: layer-wise loading off: %s", why)
            return None
        logger.info("KVStoreHiCache: layer-wise loading on (%d layers)", pool.layer_num)
        return layerwise.start_fills()

    def _keys(self, keys: list[str]) -> list[str]:
        assert self.namespace is not None, "register_mem_pool_host comes first"
        return self.namespace.keys(keys)

    def _store_failed(self, what: str, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY_S:
            self._last_warning = now
            logger.warning("kvstore %s failed (%s: %s); recomputing instead", what,
                           type(exc).__name__, exc)

    # -- queries --------------------------------------------------------------------------------
    def batch_exists(self, keys: list[str], extra_info: Any = None) -> int:
        if not keys:
            return 0
        try:
            return self.client.exists(self._keys(keys))
        except (KVStoreUnavailable, KVStoreError) as exc:
            self._store_failed("exists", exc)
            return 0

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    # -- reads ----------------------------------------------------------------------------------
    def _fetch(self, keys: list[str]) -> list[bytes | None]:
        try:
            return self.client.get(self._keys(keys))
        except (KVStoreUnavailable, KVStoreError) as exc:
            self._store_failed("get", exc)
            return [None] * len(keys)

    def _as_page(self, data: bytes | None) -> torch.Tensor | None:
        if data is None or len(data) != self._page_bytes:
            return None
        pool = self.mem_pool_host
        with warnings.catch_warnings():  # read-only buffer: torch only reads from it
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(data, dtype=torch.uint8).view(pool.dtype)

    def _staging(self, pages: int) -> torch.Tensor:
        """A reused ``(pages, page_bytes)`` uint8 buffer the store writes pages into (caller holds
        ``_staging_lock``); grown on demand, so steady-state reads fault in no fresh memory."""
        if self._staging_buf is None or self._staging_buf.shape[0] < pages:
            self._staging_buf = torch.empty((pages, self._page_bytes), dtype=torch.uint8)
        return self._staging_buf[:pages]

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: Any = None) -> list[bool]:
        """Pages land in a staging buffer through the client's ``get_into`` (shared memory on
        the same host, TCP otherwise), then SGLang's ``set_from_flat_data_page`` scatters each
        into its host slots. Only the leading run of full-size pages counts as loaded."""
        if not keys:
            return []
        if self._fills is not None:
            return self._get_layerwise(keys, host_indices)
        pool = self.mem_pool_host
        page_size = pool.page_size
        results: list[bool] = []
        with self._staging_lock:
            staging = self._staging(len(keys))
            started = time.perf_counter()
            try:
                sizes = self.client.get_into(self._keys(keys), list(staging.numpy()))
            except (KVStoreUnavailable, KVStoreError) as exc:
                self._store_failed("get", exc)
                return [False] * len(keys)
            self._metrics.prefetch(sum(size is not None for size in sizes), self._page_bytes,
                                   time.perf_counter() - started)
            loaded = True
            for i, size in enumerate(sizes):
                loaded = loaded and size == self._page_bytes
                if loaded:
                    pool.set_from_flat_data_page(int(host_indices[i * page_size]),
                                                 staging[i].view(pool.dtype))
                results.append(loaded)
        return results

    def _get_layerwise(self, keys: list[str], host_indices: torch.Tensor) -> list[bool]:
        """Read the pages into a lease (one store request), answer, and let the fill queue
        copy them into their host slots layer by layer (``kvstore.layerwise``)."""
        assert self._fills is not None
        started = time.perf_counter()
        try:
            lease = self.client.get_leased(self._keys(keys), self._page_bytes)
        except (KVStoreUnavailable, KVStoreError) as exc:
            self._store_failed("get", exc)
            return [False] * len(keys)
        read_s = time.perf_counter() - started
        pages = 0
        for i, size in enumerate(lease.sizes):
            if size != self._page_bytes or lease.offsets[i] != i * self._page_bytes:
                break
            pages += 1
        if pages == 0:
            lease.release()
            return [False] * len(keys)
        self._metrics.prefetch(pages, self._page_bytes, read_s)
        fill = _HostFill(self.mem_pool_host, lease, pages, host_indices)
        self._fills.submit(layerwise.Fill(
            num_layers=int(self.mem_pool_host.layer_num), copy_layer=fill.copy_layer,
            finish=fill.close, info={"pages": pages, "tokens": fill.tokens,
                                     "bytes": pages * self._page_bytes, "read_s": read_s}))
        return [True] * pages + [False] * (len(keys) - pages)

    def batch_get(self, keys: list[str], target_locations: Any = None,
                  target_sizes: Any = None) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = []
        for i, data in enumerate(self._fetch(keys)):
            page = self._as_page(data)
            if page is not None and target_locations is not None:
                target_locations[i].view(torch.uint8).copy_(page.view(torch.uint8))
                page = target_locations[i]
            out.append(page)
        return out

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> Any:
        return self.batch_get([key], [target_location] if target_location is not None
                              else None)[0]

    # -- writes ---------------------------------------------------------------------------------
    @staticmethod
    def _page_bytes_of(page: torch.Tensor) -> memoryview:
        return memoryview(page.contiguous().view(torch.uint8).numpy())

    def _store(self, keys: list[str], pages: list[torch.Tensor]) -> list[bool]:
        store_keys = self._keys(keys)
        try:
            present = self.client.contains(store_keys)
            todo = [(k, self._page_bytes_of(p)) for k, p, here
                    in zip(store_keys, pages, present, strict=True) if not here]
            started = time.perf_counter()
            stored_now = self.client.put(todo) if todo else []
            self._metrics.backup(sum(stored_now), self._page_bytes,
                                 time.perf_counter() - started)
            stored = iter(stored_now)
            return [True if here else next(stored) for here in present]
        except (KVStoreUnavailable, KVStoreError) as exc:
            self._store_failed("put", exc)
            return [False] * len(keys)

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: Any = None) -> list[bool]:
        if self._fills is not None:  # pages still being filled are not readable yet
            self._fills.wait_all(self._fills.mark())
        page_size = self.mem_pool_host.page_size
        pages = [self.mem_pool_host.get_data_page(int(host_indices[i * page_size]), flat=True)
                 for i in range(len(keys))]
        return self._store(keys, pages)

    def batch_set(self, keys: list[str], values: Any = None, target_locations: Any = None,
                  target_sizes: Any = None) -> bool:
        return all(self._store(keys, list(values or [])))

    def set(self, key: str, value: Any = None, target_location: Any = None,
            target_sizes: Any = None) -> bool:
        return self.batch_set([key], [value])

    # -- lifecycle ------------------------------------------------------------------------------
    def get_stats(self) -> Any:
        """SGLang's ``StorageMetrics`` since the last call: pages and GB/s per prefetch and per
        backup (fed to ``sglang:prefetch_pgs``, ``sglang:prefetch_bandwidth``, ... when the
        worker runs with ``--enable-metrics``). None when storage metrics are off."""
        return self._metrics.drain()

    def clear(self) -> None:
        """The store is shared by every worker: one worker's flush must not empty it."""
        logger.info("KVStoreHiCache: clear() leaves the shared store untouched")

    def close(self) -> None:
        self.client.close()


class _HostFill:
    """Copies leased flat pages into a ``layer_first`` host pool one layer at a time.

    A flat page is ``(2, layers, page_size, heads, head_dim)``; the host pool's ``kv_buffer`` is
    ``(2, layers, slots, heads, head_dim)``, so layer ``l`` of every page goes to
    ``kv_buffer[:, l, slots]`` in one indexed copy."""

    def __init__(self, pool: Any, lease: PageLease, pages: int, host_indices: torch.Tensor,
                 ) -> None:
        self.tokens = pages * int(pool.page_size)
        shape = (pages, 2, int(pool.layer_num), int(pool.page_size), int(pool.head_num),
                 int(pool.head_dim))
        page_bytes = math.prod(shape[1:]) * pool.dtype.itemsize
        with warnings.catch_warnings():  # the lease's buffer is writable shared memory
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.frombuffer(lease.buffer, dtype=torch.uint8, count=pages * page_bytes)
        self._src: torch.Tensor | None = raw.view(pool.dtype).view(shape)
        self._kv = pool.kv_buffer
        self._slots = host_indices[:self.tokens].to(torch.long).clone()
        self._lease = lease

    def copy_layer(self, layer: int) -> None:
        assert self._src is not None
        src = self._src[:, :, layer].transpose(0, 1)  # (2, pages, page_size, heads, dim)
        self._kv[:, layer].index_copy_(1, self._slots, src.reshape(
            2, self.tokens, *src.shape[3:]))

    def close(self) -> None:
        self._src = None  # drop the view before the lease's buffer is handed back
        self._lease.release()


class _TransferLog:
    """Per-call page counts and bandwidths for SGLang's storage metrics (the prefetch and backup
    threads append, the scheduler drains; bounded so nothing grows if nobody drains)."""

    _MAX = 4096

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._lock = threading.Lock()
        self._prefetch: list[tuple[int, float]] = []
        self._backup: list[tuple[int, float]] = []

    @staticmethod
    def _record(log: list[tuple[int, float]], pages: int, page_bytes: int,
                seconds: float) -> None:
        if pages and seconds > 0 and len(log) < _TransferLog._MAX:
            log.append((pages, pages * page_bytes / seconds / 1e9))

    def prefetch(self, pages: int, page_bytes: int, seconds: float) -> None:
        if self.enabled:
            with self._lock:
                self._record(self._prefetch, pages, page_bytes, seconds)

    def backup(self, pages: int, page_bytes: int, seconds: float) -> None:
        if self.enabled:
            with self._lock:
                self._record(self._backup, pages, page_bytes, seconds)

    def drain(self) -> Any:
        if not self.enabled:
            return None
        from sglang.srt.observability.metrics_collector import StorageMetrics

        with self._lock:
            prefetch, self._prefetch = self._prefetch, []
            backup, self._backup = self._backup, []
        return StorageMetrics(prefetch_pgs=[p for p, _ in prefetch],
                              backup_pgs=[p for p, _ in backup],
                              prefetch_bandwidth=[b for _, b in prefetch],
                              backup_bandwidth=[b for _, b in backup])
