"""``KVStoreClient``: the synchronous, thread-safe client of a kvstore server.

Who calls it: ``kvstore.sglang_backend`` (SGLang's storage threads: prefetch and backup) and
tools. Every method is a bounded blocking call: it returns, or raises within about ``timeout_s``:

- ``KVStoreUnavailable``: the server could not be reached or answered too late. The caller
  treats the pages as missing and recomputes. After a failure the client backs off (0.2 s
  doubling to 5 s): calls in that window fail at once, costing nothing; the next call after it
  reconnects.
- ``KVStoreError``: the server answered with an error reply (``code`` from
  ``kvstore.protocol.ErrorCode``); the connection stays usable.

Connections are pooled (one per concurrently calling thread, up to ``max_connections``), each
speaking ``kvstore.protocol`` with one request in flight. Batches are split to respect the
server's ``max_batch`` and ``max_frame_bytes``. With shared memory (``use_shm``: ``"auto"``
means when the host is loopback) each connection owns a segment it grows as batches need;
``put`` and ``get_into`` move pages through it (one copy on each side), while ``get`` returns
``bytes`` over TCP. If the server cannot map the segment (another host) the client uses TCP.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from typing import Any, Literal, TypeVar

from kvstore.backends.base import Page
from kvstore.connection import Connection, ConnectionLost, KVStoreError, ServerInfo
from kvstore.protocol import SHM_PREFIX, ErrorCode

logger = logging.getLogger(__name__)

T = TypeVar("T")
_KEY_OVERHEAD = 32
"""Bytes of msgpack framing allowed per key beside the key and page (offsets, lengths)."""
_MIN_SEGMENT = 1 << 20

__all__ = ["KVStoreClient", "KVStoreError", "KVStoreUnavailable", "PageLease", "ServerInfo"]


class KVStoreUnavailable(ConnectionError):
    """The server could not be reached in time; treat the pages as missing."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class _Backoff:
    """When the next connection attempt may happen (guarded by the client's lock)."""

    initial_s: float
    max_s: float
    delay_s: float = 0.0
    until: float = 0.0


class KVStoreClient:
    """See the module docstring. Usable as a context manager; ``close()`` is idempotent."""

    def __init__(self, host: str, port: int, timeout_s: float = 2.0,
                 use_shm: bool | Literal["auto"] = "auto", *, connect_timeout_s: float = 0.5,
                 backoff_s: float = 0.2, max_backoff_s: float = 5.0,
                 max_connections: int = 16) -> None:
        if timeout_s <= 0 or connect_timeout_s <= 0:
            raise ValueError(f"KVStoreClient.timeout_s/connect_timeout_s: must be > 0, got "
                             f"{timeout_s}, {connect_timeout_s}")
        if not 0 <= backoff_s <= max_backoff_s:
            raise ValueError("KVStoreClient: need 0 <= backoff_s <= max_backoff_s")
        if max_connections < 1:
            raise ValueError(f"KVStoreClient.max_connections: must be >= 1, got {max_connections}")
        if use_shm not in (True, False, "auto"):
            raise ValueError(f"KVStoreClient.use_shm: must be True, False or 'auto', got "
                             f"{use_shm!r}")
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._want_shm = use_shm is True or (use_shm == "auto" and is_loopback(host))
        self._lock = threading.Lock()
        self._idle: list[Connection] = []
        self._slots = threading.BoundedSemaphore(max_connections)
        self._backoff = _Backoff(backoff_s, max_backoff_s, delay_s=backoff_s)
        self._closed = False

    # -- public calls -------------------------------------------------------------------------

    def hello(self) -> ServerInfo:
        """The server's version and limits (connecting if needed)."""
        return self._run(lambda conn, deadline: conn.info)

    def exists(self, keys: Sequence[str]) -> int:
        """How many keys, from the first, are all stored (SGLang's ``batch_exists``)."""
        def run(conn: Connection, deadline: float) -> int:
            hits = 0
            for chunk in _slices(len(keys), conn.info.max_batch):
                reply = conn.call({"op": "exists", "keys": list(keys[chunk])}, deadline)
                hits += reply["hits"]
                if reply["hits"] < chunk.stop - chunk.start:
                    break
            return hits
        return self._run(run)

    def contains(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key is stored."""
        return self._run(lambda conn, deadline: [
            present for chunk in _slices(len(keys), conn.info.max_batch)
            for present in conn.call({"op": "exists", "keys": list(keys[chunk])},
                                     deadline)["present"]])

    def get(self, keys: Sequence[str]) -> list[bytes | None]:
        """The page of each key, None for a miss."""
        return self._run(lambda conn, deadline: self._get_tcp(conn, keys, deadline))

    def get_into(self, keys: Sequence[str], dests: Sequence[Any]) -> list[int | None]:
        """Read each key's page into the writable buffer beside it; per key the page size or
        None for a miss. ``KVStoreError`` (``page_too_large``) if a page exceeds its buffer."""
        if len(keys) != len(dests):
            raise ValueError(f"get_into: {len(keys)} keys but {len(dests)} buffers")
        views = [_byte_view(dest) for dest in dests]
        return self._run(lambda conn, deadline: self._get_into(conn, keys, views, deadline))

    def get_leased(self, keys: Sequence[str], page_bytes: int) -> PageLease:
        """Read pages and keep them where they landed until ``lease.release()``: in the
        connection's shared memory segment on the same host (the connection stays checked out,
        so nothing overwrites it), else in a private buffer. For readers that consume a batch
        piecewise after the call returns (``kvstore.layerwise``); one copy fewer than
        ``get_into``. ``page_bytes``: the room per page; a larger page counts as a miss.
        Raises like ``get``."""
        if page_bytes <= 0:
            raise ValueError(f"get_leased: page_bytes must be > 0, got {page_bytes}")
        return self._run(lambda conn, deadline: self._lease(conn, keys, page_bytes, deadline),
                         keep=True)

    def put(self, items: Sequence[tuple[str, Page]]) -> list[bool]:
        """Store pages; False only for a page the store can never hold (too large)."""
        views = [(key, _byte_view(page)) for key, page in items]
        return self._run(lambda conn, deadline: self._put(conn, views, deadline))

    def delete(self, keys: Sequence[str]) -> int:
        """Remove keys; how many were present."""
        return self._run(lambda conn, deadline: sum(
            conn.call({"op": "delete", "keys": list(keys[chunk])}, deadline)["removed"]
            for chunk in _slices(len(keys), conn.info.max_batch)))

    def stats(self) -> dict[str, Any]:
        """``{"tiers": [...], "server": {...}}`` as the server's ``/stats`` shows it."""
        reply = self._run(lambda conn, deadline: conn.call({"op": "stats"}, deadline))
        return {"tiers": reply["tiers"], "server": reply["server"]}

    def namespaces(self) -> list[str]:
        """Key suffixes of pages written since the server started, most recent first."""
        reply = self._run(lambda conn, deadline: conn.call({"op": "namespaces"}, deadline))
        return list(reply["namespaces"])

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def __enter__(self) -> KVStoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- batches ------------------------------------------------------------------------------

    def _get_tcp(self, conn: Connection, keys: Sequence[str], deadline: float,
                 ) -> list[bytes | None]:
        info = conn.info
        per_request = max(1, min(info.max_batch, info.max_frame_bytes // info.max_page_bytes))
        return [page for chunk in _slices(len(keys), per_request)
                for page in conn.call({"op": "get", "keys": list(keys[chunk])},
                                      deadline)["pages"]]

    def _get_into(self, conn: Connection, keys: Sequence[str], views: list[memoryview],
                  deadline: float) -> list[int | None]:
        if not self._can_use_shm(conn):
            return [_copy_page(key, page, view) for key, page, view
                    in zip(keys, self._get_tcp(conn, keys, deadline), views, strict=True)]
        rooms = [min(view.nbytes, conn.info.max_page_bytes) for view in views]
        sizes: list[int | None] = []
        for chunk in _byte_chunks(rooms, conn.info):
            offsets = _offsets(rooms[chunk])
            segment = self._segment(conn, offsets[-1] + rooms[chunk.stop - 1], deadline)
            if segment is None:
                return self._get_into(conn, keys, views, deadline)  # shm refused: TCP
            reply = conn.call({"op": "get_into", "keys": list(keys[chunk]), "offsets": offsets,
                               "capacities": rooms[chunk]}, deadline)
            for key, size, offset, view in zip(keys[chunk], reply["sizes"], offsets,
                                               views[chunk], strict=True):
                if size > view.nbytes:
                    raise _too_large(key, size, view.nbytes)
                if size >= 0:
                    view[:size] = segment.buf[offset:offset + size]
                sizes.append(size if size >= 0 else None)
        return sizes

    def _lease(self, conn: Connection, keys: Sequence[str], page_bytes: int, deadline: float,
               ) -> PageLease:
        """Pages land back to back in the segment when one request can carry them all;
        otherwise (no shared memory, or more than one frame) they come through ``get`` over TCP
        into a private buffer."""
        info = conn.info
        rooms = [min(page_bytes, info.max_page_bytes)] * len(keys)
        if self._can_use_shm(conn) and keys and len(list(_byte_chunks(rooms, info))) == 1:
            segment = self._segment(conn, sum(rooms), deadline)
            if segment is not None:
                offsets = _offsets(rooms)
                reply = conn.call({"op": "get_into", "keys": list(keys), "offsets": offsets,
                                   "capacities": rooms}, deadline)
                sizes = [size if 0 <= size <= room else None
                         for size, room in zip(reply["sizes"], rooms, strict=True)]
                return PageLease(segment.buf, offsets, sizes)
        pages = self._get_tcp(conn, keys, deadline)
        sizes = [None if page is None or len(page) > page_bytes else len(page)
                 for page in pages]
        offsets = _offsets([size or 0 for size in sizes])
        buffer = bytearray(sum(size or 0 for size in sizes))
        for page, size, offset in zip(pages, sizes, offsets, strict=True):
            if size is not None:
                buffer[offset:offset + size] = page
        return PageLease(memoryview(buffer), offsets, sizes)

    def _put(self, conn: Connection, items: list[tuple[str, memoryview]], deadline: float,
             ) -> list[bool]:
        limit = conn.info.max_page_bytes
        fits = [view.nbytes <= limit for _, view in items]
        todo = [item for item, ok in zip(items, fits, strict=True) if ok]
        sizes = [view.nbytes for _, view in todo]
        stored: list[bool] = []
        shm = self._can_use_shm(conn)
        for chunk in _byte_chunks(sizes, conn.info):
            keys = [key for key, _ in todo[chunk]]
            segment = self._segment(conn, sum(sizes[chunk]), deadline) if shm else None
            if segment is None:
                shm = False
                reply = conn.call({"op": "put", "keys": keys,
                                   "pages": [view for _, view in todo[chunk]]}, deadline)
            else:
                offsets = _offsets(sizes[chunk])
                for offset, (_, view) in zip(offsets, todo[chunk], strict=True):
                    segment.buf[offset:offset + view.nbytes] = view
                reply = conn.call({"op": "put_from", "keys": keys, "offsets": offsets,
                                   "sizes": sizes[chunk]}, deadline)
            stored += reply["stored"]
        results = iter(stored)
        return [ok and next(results) for ok in fits]

    # -- shared memory ------------------------------------------------------------------------

    def _can_use_shm(self, conn: Connection) -> bool:
        return self._want_shm and conn.info.shm and not conn.shm_refused

    def _segment(self, conn: Connection, nbytes: int, deadline: float) -> SharedMemory | None:
        """The connection's segment, grown to ``nbytes``; None if the server cannot map one."""
        old = conn.segment
        if old is not None and old.size >= nbytes:
            return old
        size = max(nbytes, _MIN_SEGMENT, 2 * old.size if old is not None else 0)
        size = min(size, max(nbytes, conn.info.max_frame_bytes))
        try:
            segment = SharedMemory(SHM_PREFIX + secrets.token_hex(8), create=True, size=size)
        except OSError as exc:  # /dev/shm full or missing here: TCP still works
            logger.warning("kvstore: cannot create a %d-byte shared memory segment (%s); "
                           "using TCP", size, exc)
            self._want_shm = False
            return None
        try:
            conn.call({"op": "attach_shm", "name": segment.name, "size": size}, deadline)
        except KVStoreError as exc:
            _drop_segment(segment)
            if exc.code != ErrorCode.SHM_UNAVAILABLE:
                raise
            logger.info("kvstore %s:%d cannot map shared memory (%s); using TCP", self.host,
                        self.port, exc.message)
            conn.shm_refused = True
            self._want_shm = False
            return None
        except BaseException:
            _drop_segment(segment)
            raise
        conn.segment = segment
        if old is not None:
            _drop_segment(old)
        return segment

    # -- connections --------------------------------------------------------------------------

    def _run(self, call: Callable[[Connection, float], T], keep: bool = False) -> T:
        """``call`` on a pooled connection; retried once on a fresh one if a pooled connection
        turns out to be closed by the server. With ``keep`` the result is a ``PageLease`` and
        the connection (and its pool slot) stay with it until it is released."""
        deadline = time.monotonic() + self.timeout_s
        kept = False
        if not self._slots.acquire(timeout=self.timeout_s):
            raise KVStoreUnavailable(f"kvstore {self.host}:{self.port}: no free connection "
                                     f"within {self.timeout_s} s")
        try:
            for attempt in range(2):
                conn = self._checkout(deadline)
                try:
                    result = call(conn, deadline)
                except ConnectionLost as exc:
                    conn.close()
                    if conn.reused and not exc.timed_out and attempt == 0:
                        continue
                    raise self._down(exc) from exc
                except KVStoreError as exc:
                    self._checkin(conn, reusable=exc.code != ErrorCode.FRAME_TOO_LARGE)
                    raise
                except BaseException:
                    conn.close()
                    raise
                if keep:
                    assert isinstance(result, PageLease)
                    result._on_release = lambda conn=conn: self._release_lease(conn)
                    kept = True
                    return result
                self._checkin(conn, reusable=True)
                return result
            raise AssertionError("unreachable")
        finally:
            if not kept:
                self._slots.release()

    def _release_lease(self, conn: Connection) -> None:
        self._checkin(conn, reusable=True)
        self._slots.release()

    def _checkout(self, deadline: float) -> Connection:
        with self._lock:
            if self._closed:
                raise KVStoreUnavailable("kvstore client is closed")
            if self._idle:
                conn = self._idle.pop()
                conn.reused = True
                return conn
            wait_s = self._backoff.until - time.monotonic()
        if wait_s > 0:
            raise KVStoreUnavailable(f"kvstore {self.host}:{self.port} is down; next attempt "
                                     f"in {wait_s:.2f} s")
        timeout_s = min(self._connect_timeout_s, deadline - time.monotonic())
        if timeout_s <= 0:
            raise KVStoreUnavailable(f"kvstore {self.host}:{self.port}: no time left to connect")
        try:
            conn = Connection.open(self.host, self.port, timeout_s, deadline)
        except ConnectionLost as exc:
            raise self._down(exc) from exc
        with self._lock:
            if self._backoff.until:
                logger.info("kvstore %s:%d is reachable again", self.host, self.port)
            self._backoff.delay_s, self._backoff.until = self._backoff.initial_s, 0.0
        return conn

    def _checkin(self, conn: Connection, reusable: bool) -> None:
        with self._lock:
            if reusable and not self._closed:
                self._idle.append(conn)
                return
        conn.close()

    def _down(self, exc: ConnectionLost) -> KVStoreUnavailable:
        """Back off after a failure; the exception to raise."""
        with self._lock:
            backoff = self._backoff
            first = backoff.until == 0.0
            backoff.until = time.monotonic() + backoff.delay_s
            retry_s, backoff.delay_s = backoff.delay_s, min(2 * backoff.delay_s, backoff.max_s)
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        log = logger.warning if first else logger.debug
        log("kvstore %s:%d unavailable (%s); retrying in %.2f s", self.host, self.port, exc,
            retry_s)
        return KVStoreUnavailable(f"kvstore {self.host}:{self.port} unavailable: {exc}")


class PageLease:
    """Pages read by ``KVStoreClient.get_leased``, valid until ``release()`` (idempotent; also
    on garbage collection would be too late: always release, ``with`` does it)."""

    def __init__(self, buffer: memoryview, offsets: list[int], sizes: list[int | None]) -> None:
        self.buffer = buffer
        """The bytes; page ``i`` is ``buffer[offsets[i]:offsets[i] + sizes[i]]``."""
        self.offsets = offsets
        self.sizes = sizes
        """Per key the page size, None for a miss."""
        self._on_release: Callable[[], None] | None = None
        self._released = False

    def page(self, index: int) -> memoryview | None:
        size = self.sizes[index]
        if size is None or self._released:
            return None
        return self.buffer[self.offsets[index]:self.offsets[index] + size]

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        on_release, self._on_release = self._on_release, None
        if on_release is not None:
            on_release()

    def __enter__(self) -> PageLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _slices(count: int, size: int) -> Iterator[slice]:
    for start in range(0, count, size):
        yield slice(start, min(start + size, count))


def _byte_chunks(sizes: list[int], info: ServerInfo) -> Iterator[slice]:
    """Consecutive runs of at most ``max_batch`` pages whose frame stays under the limit."""
    start, total = 0, 0
    budget = info.max_frame_bytes - 1024
    for i, size in enumerate(sizes):
        cost = size + _KEY_OVERHEAD + 512  # the key (at most 512 bytes) and framing
        if i > start and (i - start == info.max_batch or total + cost > budget):
            yield slice(start, i)
            start, total = i, 0
        total += cost
    if start < len(sizes):
        yield slice(start, len(sizes))


def _offsets(sizes: list[int]) -> list[int]:
    offsets, position = [], 0
    for size in sizes:
        offsets.append(position)
        position += size
    return offsets


def _byte_view(buffer: Any) -> memoryview:
    view = memoryview(buffer)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _copy_page(key: str, page: bytes | None, view: memoryview) -> int | None:
    if page is None:
        return None
    if len(page) > view.nbytes:
        raise _too_large(key, len(page), view.nbytes)
    view[:len(page)] = page
    return len(page)


def _too_large(key: str, size: int, room: int) -> KVStoreError:
    return KVStoreError("page_too_large",
                        f"page of {key[:40]!r} is {size} bytes, its buffer {room}")


def _drop_segment(segment: SharedMemory) -> None:
    with suppress(OSError, BufferError):
        segment.close()
    with suppress(OSError):
        segment.unlink()
