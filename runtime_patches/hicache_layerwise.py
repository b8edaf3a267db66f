"""Layer-wise loading on SGLang 0.5.23's CPU engine: asynchronous L2->L1 with per-layer events.

Why: SGLang pipelines the host-to-device (L2->L1) load of a cache hit layer by layer only on an
accelerator (one CUDA event per layer on a copy stream; attention waits on the event of its
layer). On the CPU engine ``torch.cpu`` streams and events are synchronous, so the whole load
finishes inside ``start_loading`` before the forward starts. These patches, active in a CPU worker
started with ``BANASERVE_KV_LAYERWISE=1`` (the launcher's ``--kvstore-layerwise``), make it what
it is on a GPU:

- ``layerwise.thread_layer_events``: ``cache_controller.LayerLoadingEvent`` becomes
  ``ThreadLayerLoadingEvent`` (``kvstore.layerwise.ThreadEvent`` per layer), so the forward's
  ``wait_until(l)`` blocks only until layer ``l`` is in place.
- ``layerwise.producer_reuse``: ``LayerDoneCounter.update_producer`` waits for the previous load
  of the slot it reuses and re-arms its events (SGLang asserts it is done, which on a GPU the
  stream order guarantees).
- ``layerwise.async_host_to_device``: ``L2TransferEngine.submit_host_to_device`` runs its layer
  loop on a loader thread; before layer ``l`` it waits until every store fill submitted before the
  load (``kvstore.layerwise.LayerFills``) has written layer ``l`` into the host pool.
- ``layerwise.host_free_gate``: ``HostKVCache.free`` waits for pending fills, so a host slot is
  never reused while a fill still writes it.

Safety: the loader copies into device slots that were just allocated for the load and whose tree
nodes stay locked until its completion event fires (SGLang's own protocol for the asynchronous
GPU path); the CPU forward runs synchronously in the scheduler thread, so no earlier forward can
still be reading them. Host layouts shared between pools (unified memory) are not supported: such
a load takes SGLang's synchronous path unchanged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from runtime_patches import SGLANG_VERSION
from runtime_patches.cpu import cpu_engine_enabled
from runtime_patches.registry import REGISTRY, Patch

logger = logging.getLogger(__name__)

PATCH_NAMES = ("layerwise.thread_layer_events", "layerwise.producer_reuse",
               "layerwise.async_host_to_device", "layerwise.host_free_gate")


def layerwise_enabled() -> bool:
    from kvstore.layerwise import enabled

    return cpu_engine_enabled() and enabled()


def gates_applied() -> bool:
    """True when every layer-wise patch is in place in this process: only then may a storage
    backend answer a read before its bytes are in the host pool."""
    return all(REGISTRY.is_applied(name) for name in PATCH_NAMES)


class _LoadRecord:
    """Timings of one L2->L1 load, written to the trace when the forward has waited for its
    last layer."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.submitted_at = time.perf_counter()
        self.copy_s = 0.0
        self.fill_wait_s = 0.0
        self.blocked_s = 0.0
        self.finished_at = 0.0
        self.reported = False


class ThreadLayerLoadingEvent:
    """``cache_controller.LayerLoadingEvent`` with thread events (same attributes and methods)."""

    def __init__(self, num_layers: int) -> None:
        from kvstore.layerwise import ThreadEvent

        self._num_layers = num_layers
        self.load_events = [ThreadEvent() for _ in range(num_layers)]
        self.start_event = ThreadEvent()
        self.load: _LoadRecord | None = None
        self.error: BaseException | None = None

    def arm(self) -> None:
        for event in self.load_events:
            event.arm()
        self.load = None
        self.error = None

    def fail(self, error: BaseException) -> None:
        """The load cannot finish: wake every waiter, which then raises."""
        self.error = error
        for event in self.load_events:
            event.record()

    def complete(self, layer_index: int) -> None:
        assert 0 <= layer_index < self._num_layers
        self.load_events[layer_index].record()

    def wait(self, layer_index: int) -> None:
        event = self.load_events[layer_index]
        if not event.query():
            started = time.perf_counter()
            event.synchronize()
            if self.load is not None:
                self.load.blocked_s += time.perf_counter() - started
        if self.error is not None:
            raise RuntimeError(f"layer-wise KV load failed, layer {layer_index} is not in place: "
                               f"{self.error!r}") from self.error
        load = self.load
        if load is not None and layer_index == self._num_layers - 1 and not load.reported:
            load.reported = True
            _report(load)

    @property
    def finish_event(self) -> Any:
        return self.load_events[-1]


def _report(load: _LoadRecord) -> None:
    from kvstore.layerwise import active_fills

    fills = active_fills()
    trace = fills.trace if fills is not None else None
    if trace is not None:
        trace.write(kind="load", tokens=load.tokens, copy_s=load.copy_s,
                    fill_wait_s=load.fill_wait_s, blocked_s=load.blocked_s,
                    span_s=load.finished_at - load.submitted_at)


def _producer_reuse(original: Callable[..., int]) -> Callable[..., int]:
    def update_producer(self: Any) -> int:
        event = self.events[(self.producer_index + 1) % self.num_counters]
        event.finish_event.synchronize()  # the load that last used this slot is done
        index = original(self)
        self.events[index].arm()
        return index

    return update_producer


_loader: ThreadPoolExecutor | None = None
_loader_lock = threading.Lock()


def _loader_pool() -> ThreadPoolExecutor:
    global _loader
    with _loader_lock:
        if _loader is None:
            _loader = ThreadPoolExecutor(1, thread_name_prefix="hicache-l2-l1")
        return _loader


def _async_host_to_device(original: Callable[..., Any]) -> Callable[..., Any]:
    def submit_host_to_device(self: Any, transfers: list[Any], *, transfer_layer_id_max: int,
                              start_event: Any = None, on_layer_done: Any = None) -> Any:
        from sglang.srt.mem_cache.l2_transfer import TransferCompletion
        from sglang.srt.mem_cache.pool_host.base import shared_host_layout_domains

        from kvstore.layerwise import ThreadEvent, active_fills

        producer = getattr(on_layer_done, "__self__", None)
        if (not isinstance(producer, ThreadLayerLoadingEvent)
                or shared_host_layout_domains(t.host_pool for t in transfers)):
            return original(self, transfers, transfer_layer_id_max=transfer_layer_id_max,
                            start_event=start_event, on_layer_done=on_layer_done)
        prepared = self._prepare_transfers(transfers)
        fills = active_fills()
        upto = fills.mark() if fills is not None else 0
        load = _LoadRecord(len(transfers[0].device_indices) if transfers else 0)
        producer.load = load
        ack_start, ack_finish = ThreadEvent(), ThreadEvent()
        ack_finish.arm()
        ack_start.record()
        io_backend = self.io_backend
        primary = prepared[0] if prepared else None

        def run() -> None:
            try:
                for layer_id in range(transfer_layer_id_max):
                    if fills is not None and upto:
                        waited = time.perf_counter()
                        fills.wait_layer(upto, layer_id)
                        load.fill_wait_s += time.perf_counter() - waited
                    copied = time.perf_counter()
                    for transfer in prepared:
                        local = (transfer.layer_mapper(layer_id)
                                 if transfer.layer_mapper is not None else layer_id)
                        if local is None or (transfer is not primary
                                             and transfer.layer_mapper is None
                                             and layer_id >= transfer.host_pool.layer_num):
                            continue
                        transfer.host_pool.load_to_device_per_layer_physical(
                            transfer.device_pool, transfer.host_indices, transfer.device_indices,
                            local, io_backend, is_draft=transfer.is_draft)
                    load.copy_s += time.perf_counter() - copied
                    producer.complete(layer_id)
            except BaseException as exc:
                # The forward must not read half-loaded KV: its next wait raises instead.
                logger.exception("layer-wise L2->L1 load failed")
                producer.fail(exc)
                raise
            load.finished_at = time.perf_counter()
            ack_finish.record()

        _loader_pool().submit(run)
        return TransferCompletion(ack_start, ack_finish, False)

    return submit_host_to_device


def _host_free_gate(original: Callable[..., int]) -> Callable[..., int]:
    def free(self: Any, indices: Any) -> int:
        from kvstore.layerwise import active_fills

        fills = active_fills()
        if fills is not None and fills.pending():
            fills.wait_all(fills.mark())
        return original(self, indices)

    return free


_PATCHES = (
    ("layerwise.thread_layer_events", "sglang.srt.managers.cache_controller:LayerLoadingEvent",
     "replace", ThreadLayerLoadingEvent,
     "Per-layer load events the CPU forward can wait on (torch.cpu events are no-ops)."),
    ("layerwise.producer_reuse",
     "sglang.srt.managers.cache_controller:LayerDoneCounter.update_producer", "wrap",
     _producer_reuse, "Wait for, then re-arm, the load slot being reused."),
    ("layerwise.async_host_to_device",
     "sglang.srt.mem_cache.l2_transfer:L2TransferEngine.submit_host_to_device", "wrap",
     _async_host_to_device, "Run the per-layer L2->L1 loop on a loader thread, gated per layer "
     "on store fills, so it overlaps the forward."),
    ("layerwise.host_free_gate", "sglang.srt.mem_cache.pool_host.base:HostKVCache.free", "wrap",
     _host_free_gate, "Never reuse a host slot a store fill is still writing."),
)
assert tuple(name for name, *_ in _PATCHES) == PATCH_NAMES


def register() -> None:
    """Add the layer-wise patches to the registry and tell ``kvstore.layerwise`` how to check
    that they are applied (called once by ``runtime_patches.boot``)."""
    from kvstore.layerwise import set_gates_check

    for name, target, kind, new, rationale in _PATCHES:
        REGISTRY.add(Patch(name=name, target=target, kind=kind, new=new, rationale=rationale,
                           package="sglang", version=SGLANG_VERSION, when=layerwise_enabled))
    set_gates_check(gates_applied)
