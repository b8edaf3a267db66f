"""The seam between a worker and a layer host: one request, one reply, tensors both ways.

Contract (``LayerTransport``). Who calls: the worker's scheduler thread only, through
:class:`runtime_patches.migration.manager.MigrationManager` (``open``, weights, KV, ``close``)
and :class:`runtime_patches.migration.remote.RemoteLayers` (one ``forward`` per model step).
Calls never overlap on one transport. ``call`` returns the reply's fields and tensors, raises
:class:`LayerHostRefused` when the host answered with an error (the host is fine, the request
was not), and :class:`LayerHostLost` when the host cannot be reached, the connection broke or
no reply came within the timeout (the host and everything it held must be presumed gone).

Reference implementation: :class:`TcpTransport`, one TCP connection per migrated range
(``runtime_patches.migration.wire`` frames, ``TCP_NODELAY``). Why not torch.distributed: a
gloo/NCCL process group fixes its world at rendezvous, so every (worker, host) pair would need
its own group set up and torn down at each migration, and a dead peer surfaces as a hang or a
process abort rather than an exception the worker can turn into "restore the layers"; a socket
gives a per-call timeout and a clean error. A GPU deployment would add an NCCL- or
NIXL-backed transport behind this same interface for the tensors, keeping TCP for control.
"""

from __future__ import annotations

import socket
import threading
from typing import Any, Protocol

import torch

from runtime_patches.migration.wire import recv_message, send_message


class LayerHostLost(ConnectionError):
    """The layer host is unreachable, closed the connection, or did not answer in time."""


class LayerHostRefused(RuntimeError):
    """The layer host answered with an error; the connection is still usable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class LayerTransport(Protocol):
    address: str
    bytes_sent: int
    bytes_received: int

    def call(self, op: str, fields: dict[str, Any] | None = None,
             tensors: dict[str, torch.Tensor] | None = None,
             timeout: float | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        ...

    def close(self) -> None:
        ...


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"layer host address {address!r} is not HOST:PORT")
    return host, int(port)


class TcpTransport:
    """One TCP connection to a layer host (see the module docstring)."""

    def __init__(self, address: str, connect_timeout: float = 5.0,
                 call_timeout: float = 60.0) -> None:
        self.address = address
        self.call_timeout = call_timeout
        self.bytes_sent = 0
        self.bytes_received = 0
        self._lock = threading.Lock()
        host, port = parse_address(address)
        try:
            self._sock: socket.socket | None = socket.create_connection(
                (host, port), timeout=connect_timeout)
        except OSError as exc:
            raise LayerHostLost(f"layer host {address} is unreachable: {exc}") from exc
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def call(self, op: str, fields: dict[str, Any] | None = None,
             tensors: dict[str, torch.Tensor] | None = None,
             timeout: float | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        with self._lock:
            sock = self._sock
            if sock is None:
                raise LayerHostLost(f"layer host {self.address}: connection already closed")
            try:
                sock.settimeout(timeout or self.call_timeout)
                self.bytes_sent += send_message(sock, {"op": op, **(fields or {})}, tensors)
                reply, out, nbytes = recv_message(sock)
            except (OSError, ValueError) as exc:
                self._drop()
                reason = "no reply in time" if isinstance(exc, TimeoutError) else str(exc)
                raise LayerHostLost(f"layer host {self.address}: {op} failed: {reason}") from exc
            self.bytes_received += nbytes
        if not reply.get("ok"):
            error = reply.get("error") or {}
            raise LayerHostRefused(str(error.get("code", "error")),
                                   f"layer host {self.address}: {error.get('message', '?')}")
        return reply, out

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def close(self) -> None:
        with self._lock:
            if self._sock is None:
                return
            try:
                self._sock.settimeout(2.0)
                send_message(self._sock, {"op": "close"})
                recv_message(self._sock)
            except (OSError, ValueError):
                pass
            self._drop()
