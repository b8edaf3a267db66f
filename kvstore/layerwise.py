"""Layer-wise loading of store hits: the fill queue, thread-backed layer events, and the trace.

Who owns what (one SGLang scheduler process):
- ``kvstore.sglang_backend.KVStoreHiCache`` (prefetch thread) reads a batch of pages from the
  store into a ``PageLease`` and, instead of scattering them into the host (L2) pool before
  answering, submits a *fill* here and answers at once. ``LayerFills`` runs fills in submission
  order on one thread, layer by layer, and publishes how far it got.
- ``runtime_patches.hicache_layerwise`` (scheduler and loader threads) makes SGLang's host-to-device
  (L2 to L1) load asynchronous on the CPU engine: it runs the per-layer loop on a loader thread,
  waits in it for the fills of layer ``l`` (``wait_layer``), and replaces SGLang's per-layer CUDA
  events by ``ThreadEvent``, so the forward pass waits for layer ``l`` only when it reaches layer
  ``l``. Freeing host slots waits for every earlier fill (``wait_all``): a slot is never handed out
  while a fill still writes it. When it registers its patches it also hands this module the check
  of whether they are all applied (``set_gates_check``); the backend asks ``gates_applied()``
  before deferring any fill. The arrow points one way: ``kvstore`` imports nothing of
  ``runtime_patches``.

So while layer ``l`` computes, layer ``l + 1`` is being copied from the store's bytes into L2 and
from L2 into L1. The store read itself (one request per batch, into shared memory) happens before
the backend answers: once SGLang is told a page is loaded, its bytes are in this process, so a
store crash in the middle of a fill cannot leave a slot half-written (see docs/sglang-hicache.md
section 7).

Ordering contract: a load of host slots is submitted after the prefetch that filled them
returned, so every fill that can touch those slots has a sequence number at most ``mark()`` taken
when the load is submitted. Fills run strictly in order, so "fill ``n`` finished layer ``l``"
implies every earlier fill finished every layer.

A fill whose copy raises is a bug, not a store failure: waiters get ``LayerFillError`` rather
than stale bytes; the loader then marks its load failed, so the forward's next per-layer wait
raises (``ThreadLayerLoadingEvent.fail``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

ENV_ENABLE = "BANASERVE_KV_LAYERWISE"
"""``1`` turns layer-wise loading on in a CPU worker (the launcher sets it)."""
ENV_TRACE = "BANASERVE_KV_LAYERWISE_TRACE"
"""A JSONL path: one line per fill and per load (what ``scripts/bench/kvstore_hit.py`` reads)."""


class LayerFillError(RuntimeError):
    """A fill failed part-way; the slots it was writing must not be read."""


class ThreadEvent:
    """A device-event look-alike for the CPU engine: ``record()`` marks it done, ``synchronize()``
    and ``wait()`` block until it is. Like a CUDA event, a never-armed event counts as done;
    ``arm()`` makes it pending until the next ``record()``."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._done.set()

    def arm(self) -> None:
        self._done.clear()

    def record(self, stream: Any = None) -> None:
        self._done.set()

    def query(self) -> bool:
        return self._done.is_set()

    def synchronize(self) -> None:
        self._done.wait()

    def wait(self, stream: Any = None) -> None:
        self._done.wait()


@dataclass
class Fill:
    """One batch of store pages to copy into host slots, one layer at a time."""

    num_layers: int
    copy_layer: Callable[[int], None]
    """Copies layer ``l`` of every page of the batch into its host slots."""
    finish: Callable[[], None]
    """Releases the pages (always called once, after the last layer or a failure)."""
    info: dict[str, Any] = field(default_factory=dict)
    """Extra fields for the trace (pages, tokens, bytes, read_s)."""
    submitted_at: float = field(default_factory=time.perf_counter)


class LayerFills:
    """Runs fills in order on one daemon thread; ``wait_layer`` / ``wait_all`` block on them."""

    def __init__(self, trace: LayerwiseTrace | None = None) -> None:
        self._cond = threading.Condition()
        self._queue: deque[Fill] = deque()
        self._submitted = 0
        self._done = 0
        """Fills finished, all layers."""
        self._layers = 0
        """Layers finished of fill ``_done + 1``."""
        self._error: BaseException | None = None
        self.trace = trace
        """Where fills (and, through ``runtime_patches.hicache_layerwise``, loads) are logged."""
        self._thread = threading.Thread(target=self._run, name="kvstore-layer-fill", daemon=True)
        self._thread.start()

    def submit(self, fill: Fill) -> int:
        """Queue ``fill``; its sequence number (1, 2, ...)."""
        with self._cond:
            self._submitted += 1
            self._queue.append(fill)
            self._cond.notify_all()
            return self._submitted

    def mark(self) -> int:
        """The sequence number of the last fill submitted so far (0: none)."""
        with self._cond:
            return self._submitted

    def pending(self) -> int:
        with self._cond:
            return self._submitted - self._done

    def wait_layer(self, upto: int, layer: int) -> None:
        """Block until fills ``1..upto`` have written layer ``layer``."""
        with self._cond:
            self._cond.wait_for(lambda: self._error is not None or self._done >= upto or (
                self._done == upto - 1 and self._layers > layer))
            self._raise_if_failed()

    def wait_all(self, upto: int) -> None:
        """Block until fills ``1..upto`` are complete."""
        with self._cond:
            self._cond.wait_for(lambda: self._error is not None or self._done >= upto)
            self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise LayerFillError(f"a layer-wise KV fill failed: {self._error!r}")

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue))
                fill = self._queue.popleft()
            started = time.perf_counter()
            try:
                for layer in range(fill.num_layers):
                    fill.copy_layer(layer)
                    with self._cond:
                        self._layers = layer + 1
                        self._cond.notify_all()
            except BaseException as exc:  # a bug: fail every waiter loudly, never serve stale KV
                logger.exception("layer-wise KV fill failed")
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
            finally:
                fill.finish()
            done = time.perf_counter()
            with self._cond:
                self._done += 1
                self._layers = 0
                self._cond.notify_all()
            if self.trace is not None:
                self.trace.write(kind="fill", queued_s=started - fill.submitted_at,
                                  copy_s=done - started, layers=fill.num_layers, **fill.info)


class LayerwiseTrace:
    """Appends one JSON line per event to ``path`` (thread-safe); ``from_env`` reads ENV_TRACE."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls) -> LayerwiseTrace | None:
        path = os.environ.get(ENV_TRACE)
        return cls(path) if path else None

    def write(self, **record: Any) -> None:
        record.setdefault("t", time.time())
        line = json.dumps(record, sort_keys=True) + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as out:
            out.write(line)


_active: LayerFills | None = None
_active_lock = threading.Lock()


def enabled() -> bool:
    """Whether this process was started with layer-wise loading on (``ENV_ENABLE``)."""
    return os.environ.get(ENV_ENABLE) == "1"


def active_fills() -> LayerFills | None:
    """This process's fill queue, once a backend created it."""
    return _active


def start_fills() -> LayerFills:
    """The process's fill queue, created on first use (one per scheduler process)."""
    global _active
    with _active_lock:
        if _active is None:
            _active = LayerFills(LayerwiseTrace.from_env())
        return _active


_gates_check: Callable[[], bool] | None = None


def set_gates_check(check: Callable[[], bool]) -> None:
    """Called once by ``runtime_patches.hicache_layerwise.register()`` (at patch boot): how to
    tell whether every layer-wise runtime patch is in place in this process."""
    global _gates_check
    _gates_check = check


def gates_applied() -> bool:
    """True when every layer-wise runtime patch is in place in this process: only then may a
    storage backend answer a read before its bytes are in the host pool. False when the patches
    were never registered here (no patch boot) or are registered but not applied."""
    check = _gates_check
    return check is not None and check()
