"""``KVStoreServer``: one ``PageStore`` served to every SGLang instance over TCP (and shm).

Who calls it: ``python -m kvstore`` builds the store and a ``ServerConfig``, then ``start()``s a
server and ``stop()``s it on SIGTERM; tests do the same on port 0. Clients speak
``kvstore.protocol`` (see ``kvstore.client``).

Concurrency: one asyncio task per connection reads a frame, has it answered, sends the reply,
then reads the next (so replies keep request order and a pipelining client is served in turn).
Everything past the frame header (decoding, the store call, shm copies, encoding the reply) runs
in ``kvstore.handlers`` on a bounded thread pool, so a slow disk or a large batch never stalls
other connections: the event loop only moves bytes. Sockets are driven with ``loop.sock_*``
straight into and out of the frame buffers (asyncio streams copy every chunk and move about a
quarter as many bytes per second on loopback). The HTTP side port (``kvstore.metrics``) serves
``/stats`` and ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from aiohttp import web

from kvstore.backends.base import PageStore
from kvstore.handlers import RequestHandlers, Session
from kvstore.metrics import ServerCounters, create_http_app
from kvstore.protocol import (
    HEADER,
    MAX_FRAME_LIMIT,
    NO_ID,
    ProtocolError,
    error_reply,
    frame_length,
    pack,
)

logger = logging.getLogger(__name__)

_STOP_GRACE_S = 5.0
"""How long ``stop()`` lets connections finish the request they are serving."""
_DISCARD_S = 1.0
"""How long an oversized frame's body is read and dropped before the connection closes."""
_SMALL_FRAME = 64 << 10
"""Replies below this are sent in one piece with their header (no copy for larger ones)."""
_BACKLOG = 512


@dataclass(frozen=True)
class ServerConfig:
    """The network side of a kvstore server (the store itself has its own config)."""

    host: str = "127.0.0.1"
    """Listen address for clients; ``0.0.0.0`` to serve other hosts (no auth: trusted nets)."""
    port: int = 7300
    """TCP port for clients; 0 picks a free one (see ``KVStoreServer.port``)."""
    http_port: int | None = 7301
    """Port of the HTTP side (``/stats``, ``/metrics``) on ``host``; 0 picks one, None: off."""
    max_frame_bytes: int = 256 << 20
    """Largest frame body accepted; a larger one gets an error and the connection is closed."""
    max_batch: int = 4096
    """Most keys in one request."""
    threads: int = 8
    """Threads running store calls and shm copies (bounds concurrent store work)."""

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"ServerConfig.host: must be a non-empty string, got {self.host!r}")
        for name in ("port", "http_port"):
            value = getattr(self, name)
            if value is None and name == "http_port":
                continue
            if not isinstance(value, int) or not 0 <= value <= 65535:
                raise ValueError(f"ServerConfig.{name}: must be a port in 0..65535, got {value!r}")
        if self.port and self.port == self.http_port:
            raise ValueError(f"ServerConfig.http_port: must differ from port {self.port}")
        if not isinstance(self.max_frame_bytes, int) or not (
                1024 <= self.max_frame_bytes <= MAX_FRAME_LIMIT):
            raise ValueError(f"ServerConfig.max_frame_bytes: must be in 1024..{MAX_FRAME_LIMIT}, "
                             f"got {self.max_frame_bytes!r}")
        for name in ("max_batch", "threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ServerConfig.{name}: must be an int >= 1, got {value!r}")


class _Connection:
    """One client socket and its session, owned by its task."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.session = Session()
        self.busy = False
        """True while a request is being answered (``stop()`` lets it finish)."""


class KVStoreServer:
    """Serves ``store`` per ``cfg``; ``start()`` then ``stop()`` (which closes the store)."""

    def __init__(self, store: PageStore, cfg: ServerConfig,
                 max_page_bytes: int | None = None) -> None:
        """``max_page_bytes``: the store's page limit, advertised in ``hello`` and enforced on
        puts (None: pages are bounded by the frame size only)."""
        self.store = store
        self.cfg = cfg
        self.counters = ServerCounters()
        self.handlers = RequestHandlers(store, self.counters, cfg.max_batch, cfg.max_frame_bytes,
                                        max_page_bytes)
        self.port = cfg.port
        """The bound client port (differs from ``cfg.port`` when that is 0)."""
        self.http_port = cfg.http_port
        """The bound HTTP port, or None without the side port."""
        self._pool: ThreadPoolExecutor | None = None
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._http: web.AppRunner | None = None
        self._connections: dict[asyncio.Task[None], _Connection] = {}
        self._stopped = False

    async def start(self) -> None:
        """Bind both ports; raises ``OSError`` if one is taken."""
        loop = asyncio.get_running_loop()
        self._pool = ThreadPoolExecutor(self.cfg.threads, thread_name_prefix="kvstore-io")
        try:
            family = (await loop.getaddrinfo(self.cfg.host, self.cfg.port,
                                             type=socket.SOCK_STREAM))[0][0]
            self._listener = socket.create_server((self.cfg.host, self.cfg.port), family=family,
                                                  backlog=_BACKLOG)
            self._listener.setblocking(False)
            self.port = self._listener.getsockname()[1]
            self._accepting = loop.create_task(self._accept())
            if self.cfg.http_port is not None:
                self._http = web.AppRunner(
                    create_http_app(self.store, self.counters, self._pool), access_log=None)
                await self._http.setup()
                await web.TCPSite(self._http, self.cfg.host, self.cfg.http_port).start()
                self.http_port = self._http.addresses[0][1]
        except BaseException:
            await self._close_listeners()
            self._pool.shutdown(wait=False)
            raise

    async def stop(self) -> None:
        """Stop accepting, close connections after their current request, close the store."""
        if self._stopped:
            return
        self._stopped = True
        await self._close_listeners()
        for task, conn in list(self._connections.items()):
            if not conn.busy:
                task.cancel()  # waiting for a request: nothing to finish
        if self._connections:
            _, pending = await asyncio.wait(list(self._connections), timeout=_STOP_GRACE_S)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        await asyncio.get_running_loop().run_in_executor(None, self._close_store)

    async def _close_listeners(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        if self._listener is not None:
            self._listener.close()
        if self._http is not None:
            await self._http.cleanup()
            self._http = None

    def _close_store(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.store.close()

    async def _accept(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(self._listener)
            except OSError as exc:  # out of file descriptors, for example: try again soon
                logger.warning("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(sock)
            task = loop.create_task(self._serve(conn))
            self._connections[task] = conn
            task.add_done_callback(self._connections.pop)

    async def _serve(self, conn: _Connection) -> None:
        self.counters.connection_opened()
        try:
            await self._serve_frames(conn)
        except (ConnectionError, EOFError):
            pass  # the client went away mid-frame
        except Exception:
            logger.exception("connection failed")
        finally:
            self.counters.connection_closed()
            conn.session.close()
            conn.sock.close()

    async def _serve_frames(self, conn: _Connection) -> None:
        loop = asyncio.get_running_loop()
        header = bytearray(HEADER.size)
        while not self._stopped:
            if not await _recv_into(conn.sock, memoryview(header), eof_ok=True):
                return  # the client closed the connection between frames
            try:
                length = frame_length(header, self.cfg.max_frame_bytes)
            except ProtocolError as exc:
                await self._reject_frame(conn.sock, exc)
                return
            body = bytearray(length)
            await _recv_into(conn.sock, memoryview(body))
            conn.busy = True
            outcome = await loop.run_in_executor(self._pool, self.handlers.answer, conn.session,
                                                 body)
            self.counters.record(outcome.op, outcome.error, outcome.num_keys,
                                 HEADER.size + length, HEADER.size + len(outcome.reply))
            await _send_frame(conn.sock, outcome.reply)
            conn.busy = False

    async def _reject_frame(self, sock: socket.socket, exc: ProtocolError) -> None:
        """Answer a frame too large to read, then end the connection without a reset."""
        reply = pack(error_reply(NO_ID, exc.code, exc.message))
        self.counters.record(None, exc.code, 0, HEADER.size, HEADER.size + len(reply))
        logger.warning("closing a connection: %s", exc.message)
        await _send_frame(sock, reply)
        sock.shutdown(socket.SHUT_WR)
        # Closing with unread input would reset the connection and could destroy the reply
        # before the client reads it, so drop what the client is still sending, for a while.
        scratch = memoryview(bytearray(1 << 20))
        loop = asyncio.get_running_loop()
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(_DISCARD_S):
                while await loop.sock_recv_into(sock, scratch):
                    pass


async def _recv_into(sock: socket.socket, view: memoryview, eof_ok: bool = False) -> bool:
    """Fill ``view``; False on a clean end of stream before the first byte if ``eof_ok``."""
    loop = asyncio.get_running_loop()
    received = 0
    while received < len(view):
        count = await loop.sock_recv_into(sock, view[received:])
        if count == 0:
            if eof_ok and received == 0:
                return False
            raise EOFError(f"connection closed after {received} of {len(view)} bytes")
        received += count
    return True


async def _send_frame(sock: socket.socket, body: bytes | memoryview) -> None:
    loop = asyncio.get_running_loop()
    header = HEADER.pack(len(body))
    if len(body) < _SMALL_FRAME:
        await loop.sock_sendall(sock, b"".join((header, body)))
    else:
        await loop.sock_sendall(sock, header)
        await loop.sock_sendall(sock, body)
