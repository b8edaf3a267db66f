"""One blocking client connection to a kvstore server (used only by ``kvstore.client``).

A ``Connection`` is owned by one thread at a time (the client's pool hands it out): it sends one
request, waits for its reply within a deadline, and raises ``ConnectionLost`` when the socket
fails, the deadline passes or the reply cannot belong to the request; the pool then discards it.
An error reply becomes ``KVStoreError`` and leaves the connection usable.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import msgpack

from kvstore.protocol import HEADER, PROTOCOL_VERSION, ErrorCode, ProtocolError, decode_body, pack

_SMALL_FRAME = 64 << 10
"""Frames below this are sent as one buffer; larger bodies are not copied behind the header."""


class KVStoreError(RuntimeError):
    """The server answered with an error reply; ``code`` is a ``protocol.ErrorCode`` value."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ConnectionLost(Exception):
    """The connection is unusable (refused, reset, timed out, out of step)."""

    def __init__(self, message: str, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


@dataclass(frozen=True)
class ServerInfo:
    """What ``hello`` told the client."""

    version: int
    server: str
    max_frame_bytes: int
    max_batch: int
    max_page_bytes: int
    shm: bool
    """Whether the server can map shared memory (it may still fail for a given segment)."""


class Connection:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._next_id = 0
        self.info = ServerInfo(PROTOCOL_VERSION, "", 1 << 20, 1, 1 << 20, False)
        """The server's limits; replaced by ``open``'s ``hello``."""
        self.reused = False
        """True once the connection has been taken from the pool (it may have gone stale)."""
        self.segment: SharedMemory | None = None
        """This connection's shared memory segment, attached on the server."""
        self.shm_refused = False

    @classmethod
    def open(cls, host: str, port: int, connect_timeout_s: float, deadline: float) -> Connection:
        """Connect and say ``hello``; ``ConnectionLost`` if that fails in time."""
        if connect_timeout_s <= 0:
            raise ConnectionLost("no time left to connect", timed_out=True)
        try:
            sock = socket.create_connection((host, port), timeout=connect_timeout_s)
        except TimeoutError:
            raise ConnectionLost(f"connect timed out after {connect_timeout_s} s",
                                 timed_out=True) from None
        except OSError as exc:
            raise ConnectionLost(f"connect failed: {exc.strerror or exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = cls(sock)
        try:
            reply = conn.call({"op": "hello", "version": PROTOCOL_VERSION}, deadline)
            conn.info = ServerInfo(reply["version"], reply["server"], reply["max_frame_bytes"],
                                   reply["max_batch"], reply["max_page_bytes"], reply["shm"])
        except (KeyError, TypeError):
            conn.close()
            raise ConnectionLost("the server's hello reply lacks its limits") from None
        except BaseException:
            conn.close()
            raise
        return conn

    def call(self, msg: dict[str, Any], deadline: float) -> dict[str, Any]:
        """Send ``msg`` (its ``id`` is set here) and return the ok reply."""
        self._next_id += 1
        msg["id"] = self._next_id
        body = pack(msg)
        if len(body) > self.info.max_frame_bytes:
            raise KVStoreError(ErrorCode.FRAME_TOO_LARGE,
                               f"request of {len(body)} bytes exceeds the server's "
                               f"max_frame_bytes {self.info.max_frame_bytes}")
        header = HEADER.pack(len(body))
        try:
            if len(body) < _SMALL_FRAME:
                self._timed(deadline).sendall(b"".join((header, body)))
            else:
                self._timed(deadline).sendall(header)
                self._timed(deadline).sendall(body)
            reply = decode_body(self._recv_frame(deadline))
        except TimeoutError:
            raise ConnectionLost("timed out waiting for the server", timed_out=True) from None
        except OSError as exc:
            raise ConnectionLost(f"connection failed: {exc.strerror or exc}") from None
        except (ProtocolError, msgpack.UnpackException) as exc:
            raise ConnectionLost(f"unreadable reply: {exc}") from None
        if not isinstance(reply, dict) or reply.get("id") != msg["id"]:
            raise ConnectionLost(f"reply out of step with request {msg['id']}")
        if reply.get("ok") is not True:
            error = reply.get("error")
            if not isinstance(error, dict):
                raise ConnectionLost("error reply without an error")
            raise KVStoreError(str(error.get("code")), str(error.get("message")))
        return reply

    def _timed(self, deadline: float) -> socket.socket:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        self._sock.settimeout(remaining)
        return self._sock

    def _recv_frame(self, deadline: float) -> bytearray:
        (length,) = HEADER.unpack(self._recv_exact(HEADER.size, deadline))
        return self._recv_exact(length, deadline)

    def _recv_exact(self, count: int, deadline: float) -> bytearray:
        buffer = bytearray(count)
        view = memoryview(buffer)
        received = 0
        while received < count:
            got = self._timed(deadline).recv_into(view[received:])
            if got == 0:
                raise ConnectionLost("the server closed the connection")
            received += got
        return buffer

    def close(self) -> None:
        """Close the socket and remove the segment. Idempotent."""
        self._sock.close()
        if self.segment is not None:
            segment, self.segment = self.segment, None
            try:
                segment.close()
            except BufferError:
                pass
            try:
                segment.unlink()
            except FileNotFoundError:
                pass
