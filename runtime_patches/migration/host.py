"""The layer host: a process that owns migrated decoder layers of other workers and runs them.

Started beside a less loaded worker (``python -m runtime_patches layer-host --port P``, or by the
launcher with ``--layer-host-port``), sharing its device and cores. A worker that migrates
layers [s, e) here opens one TCP connection for that range; the connection is the session:
when it closes (the worker restored the layers, or died), the range and its KV are freed.

Ops, one request and one reply each (``runtime_patches.migration.wire`` frames; every reply has
``ok`` and, when false, ``error``: ``{"code", "message"}``):

- ``hello`` -> ``version``, ``pid``, ``threads``
- ``open`` (a :class:`~runtime_patches.migration.host_runtime.RangeSpec`) -> ``weight_bytes``,
  ``kv_bytes``: builds the layers and an empty KV pool
- ``load_layer`` (``layer_id``; tensors: that layer's state dict)
- ``put_kv`` (tensors ``slots``, ``k``, ``v``) / ``get_kv`` (``slots`` -> ``k``, ``v``)
- ``resize_kv`` (``size``) -> ``kv_bytes``: follow the worker's pool when it grows or shrinks
- ``open_heads`` (a :class:`~runtime_patches.migration.head_host.HeadSpec`) -> ``kv_bytes``:
  instead of a layer range, hold some KV heads of some layers (attention offload); ``put_kv``,
  ``get_kv`` and ``resize_kv`` then move those heads' KV
- ``attend`` (``layer_id``, ``mode``, ``meta``; tensors ``q``, ``k``, ``v`` [, the step's batch
  metadata as for ``forward``]) -> tensor ``o``: one offloaded layer's attention for its heads
- ``forward`` (``mode``; tensors ``hidden_states`` [, ``residual``], ``positions``,
  ``out_cache_loc``, ``seq_lens``, ``req_to_token`` [, ``extend_prefix_lens``,
  ``extend_seq_lens``]) -> tensors ``hidden_states``, ``residual``
- ``stats`` -> this host's sessions and counters
- ``close``

Ranges of different workers run one at a time (one compute lock): they share one device.
"""

from __future__ import annotations

import logging
import os
import socket
import socketserver
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from runtime_patches.migration.head_host import HeadShard, HeadSpec
from runtime_patches.migration.host_runtime import HostRefusal, LayerRange, RangeSpec
from runtime_patches.migration.wire import WireError, recv_message, send_message

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1


@dataclass
class _Session:
    peer: str
    opened_at: float = field(default_factory=time.time)
    range: LayerRange | HeadShard | None = None
    num_forwards: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    forward_seconds: float = 0.0

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"peer": self.peer, "opened_at": self.opened_at,
                               "num_forwards": self.num_forwards, "bytes_in": self.bytes_in,
                               "bytes_out": self.bytes_out,
                               "forward_seconds": round(self.forward_seconds, 6)}
        if isinstance(self.range, HeadShard):
            out.update(self.range.describe())
        elif self.range is not None:
            out.update(layers=[self.range.start, self.range.end],
                       weight_bytes=self.range.weight_bytes(), kv_bytes=self.range.kv_bytes())
        return out


class LayerHostServer(socketserver.ThreadingTCPServer):
    """Owns the sessions; one handler thread per connected worker."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, _Handler)
        self.compute_lock = threading.Lock()
        self.sessions_lock = threading.Lock()
        self.sessions: dict[int, _Session] = {}

    def stats(self) -> dict[str, Any]:
        with self.sessions_lock:
            sessions = [s.describe() for s in self.sessions.values()]
        return {"pid": os.getpid(), "threads": torch.get_num_threads(), "sessions": sessions}


class _Handler(socketserver.BaseRequestHandler):
    server: LayerHostServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session = _Session(peer=f"{self.client_address[0]}:{self.client_address[1]}")
        with self.server.sessions_lock:
            self.server.sessions[id(session)] = session
        logger.info("session from %s opened", session.peer)
        try:
            while True:
                try:
                    fields, tensors, nbytes = recv_message(sock)
                except (ConnectionError, OSError) as exc:
                    if not isinstance(exc, WireError):
                        return
                    logger.warning("session %s: %s", session.peer, exc)
                    return
                session.bytes_in += nbytes
                op = fields.get("op")
                try:
                    reply, out = self._dispatch(session, str(op), fields, tensors)
                    reply["ok"] = True
                except HostRefusal as exc:
                    reply, out = {"ok": False, "error": {"code": "refused",
                                                         "message": str(exc)}}, {}
                except Exception as exc:  # a bug or OOM: say so, keep the host up
                    logger.exception("session %s: op %s failed", session.peer, op)
                    reply, out = {"ok": False, "error": {
                        "code": "internal", "message": f"{type(exc).__name__}: {exc}"}}, {}
                try:
                    session.bytes_out += send_message(sock, reply, out)
                except OSError:
                    return
                if op == "close":
                    return
        finally:
            with self.server.sessions_lock:
                self.server.sessions.pop(id(session), None)
            session.range = None
            logger.info("session from %s closed after %d forwards", session.peer,
                        session.num_forwards)

    def _dispatch(self, session: _Session, op: str, fields: dict[str, Any],
                  tensors: dict[str, torch.Tensor]) -> tuple[dict[str, Any],
                                                             dict[str, torch.Tensor]]:
        if op == "hello":
            return {"version": PROTOCOL_VERSION, "pid": os.getpid(),
                    "threads": torch.get_num_threads()}, {}
        if op == "stats":
            return self.server.stats(), {}
        if op == "close":
            session.range = None
            return {}, {}
        if op == "open":
            if session.range is not None:
                raise HostRefusal("open: this connection already holds a range")
            spec = RangeSpec.from_fields(fields)
            with self.server.compute_lock:
                session.range = LayerRange(spec)
            logger.info("session %s holds layers [%d, %d): %d weight bytes, %d KV bytes",
                        session.peer, spec.start, spec.end, session.range.weight_bytes(),
                        session.range.kv_bytes())
            return {"weight_bytes": session.range.weight_bytes(),
                    "kv_bytes": session.range.kv_bytes()}, {}
        if op == "open_heads":
            if session.range is not None:
                raise HostRefusal("open_heads: this connection already holds a range")
            head_spec = HeadSpec.from_fields(fields)
            session.range = HeadShard(head_spec)
            logger.info("session %s holds KV heads %s of layers %s: %d KV bytes", session.peer,
                        head_spec.heads, head_spec.layers, session.range.kv_bytes())
            return {"kv_bytes": session.range.kv_bytes()}, {}
        layer_range = session.range
        if layer_range is None:
            raise HostRefusal(f"{op}: no range is open on this connection")
        if op == "attend":
            if not isinstance(layer_range, HeadShard):
                raise HostRefusal("attend: this connection holds layers, not heads")
            started = time.perf_counter()
            with self.server.compute_lock:
                out = layer_range.attend(fields, tensors)
            session.forward_seconds += time.perf_counter() - started
            session.num_forwards += 1
            return {}, out
        if op in ("load_layer", "forward") and not isinstance(layer_range, LayerRange):
            raise HostRefusal(f"{op}: this connection holds heads, not layers")
        if op == "load_layer":
            assert isinstance(layer_range, LayerRange)
            layer_range.load_layer(int(fields["layer_id"]), tensors)
            return {}, {}
        if op == "put_kv":
            layer_range.put_kv(tensors["slots"], tensors["k"], tensors["v"])
            return {}, {}
        if op == "resize_kv":
            with self.server.compute_lock:
                layer_range.resize_kv(int(fields["size"]))
            return {"kv_bytes": layer_range.kv_bytes()}, {}
        if op == "get_kv":
            k, v = layer_range.get_kv(tensors["slots"])
            return {}, {"k": k, "v": v}
        if op == "forward":
            started = time.perf_counter()
            assert isinstance(layer_range, LayerRange)
            with self.server.compute_lock:
                out = layer_range.forward(fields, tensors)
            session.forward_seconds += time.perf_counter() - started
            session.num_forwards += 1
            return {}, out
        raise HostRefusal(f"unknown op {op!r}")


def serve(host: str, port: int, threads: int | None = None,
          warm_model: str | None = None, warm_dtype: str | None = None) -> None:
    """Run a layer host until interrupted (``warm_model``: initialise SGLang's runtime from that
    model folder before listening, instead of at the first migration, in ``warm_dtype``: by
    default the dtype the launcher would give a worker on this machine)."""
    if threads:
        torch.set_num_threads(threads)
    if warm_model:
        from runtime_patches.migration.host_runtime import warm_up

        warm_up(warm_model, warm_dtype)
    with LayerHostServer((host, port)) as server:
        logger.info("layer host listening on %s:%d (pid %d, %d torch threads)", host,
                    server.server_address[1], os.getpid(), torch.get_num_threads())
        server.serve_forever(poll_interval=0.5)
