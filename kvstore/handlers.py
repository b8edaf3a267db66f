"""Request handlers: the one place a request becomes store calls and an exception becomes an
error reply.

Who calls it: ``kvstore.server`` hands every complete frame body to ``RequestHandlers.answer``
in its thread pool, with the ``Session`` of the connection it came from; one connection's frames
are answered one at a time, so a session is never used by two threads at once. ``answer`` never
raises: protocol errors, store failures (``StoreError``) and unexpected faults all become error
replies, and the last two are logged.

Shared memory: ``attach_shm`` maps the client's segment from ``SHM_DIR`` (POSIX shared memory as
``multiprocessing.shared_memory`` creates it). ``get_into`` copies each page from the store
straight into the segment; ``put_from`` hands the store views of the segment, from which it takes
its own copy (the ``PageStore`` contract), so each page is copied once on the server side.
"""

from __future__ import annotations

import logging
import mmap
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kvstore.backends.base import PageStore, StoreError
from kvstore.keys import suffix_of
from kvstore.metrics import ServerCounters, stats_document
from kvstore.protocol import (
    MAX_FRAME_LIMIT,
    MIN_PROTOCOL_VERSION,
    NO_ID,
    PROTOCOL_VERSION,
    ErrorCode,
    ProtocolError,
    Request,
    decode_body,
    error_reply,
    ok_reply,
    pack,
    parse_request,
    request_id_of,
)

logger = logging.getLogger(__name__)

SERVER_NAME = "banaserve-kvstore"
SHM_DIR = "/dev/shm"


class _Segment:
    """A client's shared memory segment, mapped by name from ``SHM_DIR``."""

    def __init__(self, name: str, size: int) -> None:
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise ProtocolError(ErrorCode.SHM_UNAVAILABLE,
                                f"cannot open shared memory {name!r}: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size < size:
                raise ProtocolError(ErrorCode.SHM_UNAVAILABLE,
                                    f"shared memory {name!r} is not a segment of {size} bytes")
            self._mmap = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.name = name
        self.size = size
        self.view = memoryview(self._mmap)

    def check_ranges(self, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> None:
        for offset, size in zip(offsets, sizes, strict=True):
            if offset + size > self.size:
                raise ProtocolError(ErrorCode.OUT_OF_BOUNDS,
                                    f"range {offset}+{size} outside the {self.size}-byte segment")

    def close(self) -> None:
        self.view.release()
        try:
            self._mmap.close()
        except BufferError:  # a page view still held by a store thread; unmapped when freed
            logger.debug("shm segment %s still in use at close", self.name)


class Session:
    """The state of one client connection (its segment); used by one request at a time."""

    def __init__(self) -> None:
        self.segment: _Segment | None = None

    def close(self) -> None:
        if self.segment is not None:
            self.segment.close()
            self.segment = None


@dataclass(frozen=True)
class Outcome:
    """One answered frame, for the counters and the writer."""

    reply: bytes | memoryview
    op: str | None
    error: str | None
    num_keys: int


class NamespaceLog:
    """The key suffixes (``kvstore.keys``) of pages written, most recent first, at most
    ``limit``; thread-safe. The store's contents are not scanned: a suffix appears once a page
    with it is written after the server starts."""

    def __init__(self, limit: int = 64) -> None:
        self.limit = limit
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def note(self, keys: Iterable[str]) -> None:
        suffixes = {s for s in map(suffix_of, keys) if s is not None}
        if not suffixes:
            return
        with self._lock:
            for suffix in suffixes:
                self._seen[suffix] = None
                self._seen.move_to_end(suffix, last=False)
            while len(self._seen) > self.limit:
                self._seen.popitem(last=True)

    def recent(self) -> list[str]:
        with self._lock:
            return list(self._seen)


class RequestHandlers:
    """Answers decoded requests against ``store``; thread-safe (the store is)."""

    def __init__(self, store: PageStore, counters: ServerCounters, max_batch: int,
                 max_frame_bytes: int, max_page_bytes: int | None) -> None:
        self.store = store
        self.counters = counters
        self.max_batch = max_batch
        self.max_frame_bytes = max_frame_bytes
        self.max_page_bytes = max_page_bytes
        self.namespaces = NamespaceLog()
        self._ops: dict[str, Callable[[Session, Request], dict[str, Any]]] = {
            "hello": self._hello, "exists": self._exists, "get": self._get, "put": self._put,
            "delete": self._delete, "stats": self._stats,
            "namespaces": self._namespaces, "attach_shm": self._attach_shm,
            "get_into": self._get_into, "put_from": self._put_from}

    def answer(self, session: Session, body: bytes | bytearray) -> Outcome:
        """Decode, run and encode one request (in the thread pool)."""
        request_id, op = NO_ID, None
        try:
            msg = decode_body(body)
            request_id = request_id_of(msg)
            request = parse_request(msg, self.max_batch)
            op = request.op
            reply = pack(ok_reply(request_id, **self._ops[op](session, request)))
            if len(reply) <= MAX_FRAME_LIMIT:
                return Outcome(reply, op, None, len(request.keys))
            code, message = ErrorCode.TOO_MANY_KEYS, (
                f"the reply ({len(reply)} bytes) exceeds the frame limit; ask for fewer keys")
        except ProtocolError as exc:
            code, message = exc.code, exc.message
        except StoreError as exc:
            logger.warning("%s failed in the store: %s", op, exc)
            code, message = ErrorCode.STORE_ERROR, str(exc)
        except Exception as exc:
            logger.exception("%s failed", op)
            code, message = ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"
        return Outcome(pack(error_reply(request_id, code, message)), op, str(code), 0)

    def _hello(self, session: Session, request: Request) -> dict[str, Any]:
        version = min(request.version, PROTOCOL_VERSION)
        if version < MIN_PROTOCOL_VERSION:
            raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION,
                                f"client speaks up to version {request.version}, server "
                                f"{MIN_PROTOCOL_VERSION}..{PROTOCOL_VERSION}")
        max_page = self.max_page_bytes or self.max_frame_bytes
        return {"version": version, "server": SERVER_NAME,
                "max_frame_bytes": self.max_frame_bytes, "max_batch": self.max_batch,
                "max_page_bytes": max_page, "shm": os.path.isdir(SHM_DIR)}

    def _exists(self, session: Session, request: Request) -> dict[str, Any]:
        present = self.store.contains_many(request.keys)
        hits = next((i for i, found in enumerate(present) if not found), len(present))
        return {"hits": hits, "present": present}

    def _get(self, session: Session, request: Request) -> dict[str, Any]:
        return {"pages": self.store.get_many(request.keys)}

    def _put(self, session: Session, request: Request) -> dict[str, Any]:
        return {"stored": self._store_pages(request.keys, request.pages)}

    def _store_pages(self, keys: tuple[str, ...], pages: tuple[bytes | memoryview, ...],
                     ) -> list[bool]:
        """``put_many`` of the pages within ``max_page_bytes``; False for the others."""
        limit = self.max_page_bytes
        fits = [limit is None or len(page) <= limit for page in pages]
        stored = iter(self.store.put_many(
            [(key, page) for key, page, ok in zip(keys, pages, fits, strict=True) if ok]))
        result = [ok and next(stored) for ok in fits]
        self.namespaces.note(key for key, ok in zip(keys, result, strict=True) if ok)
        return result

    def _delete(self, session: Session, request: Request) -> dict[str, Any]:
        return {"removed": self.store.delete_many(request.keys)}

    def _stats(self, session: Session, request: Request) -> dict[str, Any]:
        return stats_document(self.store, self.counters)

    def _namespaces(self, session: Session, request: Request) -> dict[str, Any]:
        return {"namespaces": self.namespaces.recent()}

    def _attach_shm(self, session: Session, request: Request) -> dict[str, Any]:
        segment = _Segment(request.shm_name, request.shm_size)
        session.close()
        session.segment = segment
        return {"size": segment.size}

    def _segment(self, session: Session, request: Request) -> _Segment:
        if session.segment is None:
            raise ProtocolError(ErrorCode.NO_SHM, f"{request.op} needs attach_shm first")
        session.segment.check_ranges(request.offsets, request.sizes)
        return session.segment

    def _get_into(self, session: Session, request: Request) -> dict[str, Any]:
        segment = self._segment(session, request)
        sizes = []
        for page, offset, room in zip(self.store.get_many(request.keys), request.offsets,
                                      request.sizes, strict=True):
            if page is None:
                sizes.append(-1)
                continue
            if len(page) <= room:
                segment.view[offset:offset + len(page)] = page
            sizes.append(len(page))
        return {"sizes": sizes}

    def _put_from(self, session: Session, request: Request) -> dict[str, Any]:
        segment = self._segment(session, request)
        views = tuple(segment.view[offset:offset + size]
                      for offset, size in zip(request.offsets, request.sizes, strict=True))
        try:
            return {"stored": self._store_pages(request.keys, views)}
        finally:
            for view in views:
                view.release()
