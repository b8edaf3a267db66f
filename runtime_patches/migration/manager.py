"""The worker side of layer migration and head offload: one ``MigrationManager`` per scheduler.

Who calls what, all on the scheduler thread:
- ``handle(op, body)``: the control RPC (``runtime_patches.migration.patches`` routes SGLang's
  ``handle_rpc_request`` here; the HTTP endpoints in ``control.py`` send it). SGLang polls RPCs
  at the top of every scheduler loop iteration, so a migration or restore always happens
  between two model steps. Returns ``(http_status, body)``; nothing is changed on any error.
  The body is read and the answer built as the typed messages of ``router.rebalance.messages``
  (one ``from_json``, one ``to_json``); a malformed body is a 400 naming the field.
- ``on_step_lost(exc, batch)``: from the ``run_batch`` patch when a layer or head host fails
  mid-step.
- ``before_schedule()``: from the ``get_new_batch_prefill`` patch, before every scheduling
  step: finishes a restore that waits for KV slots; false while KV that lived on a lost host is
  being flushed out of the worker.

State owned here: a pending restore or recall and the events; the migrated ranges live in
``ranges.LayerRanges``, the head offloads in ``offloads.HeadOffloads``, the pool's size in
``capacity.KVCapacity``, the aftermath of a lost host in ``failure.HostLoss``. A migration or
offload gives the KV memory that left to what stays, so the pool holds more tokens; a restore
or recall first drains the slots above the smaller size (HTTP 202 while it waits), then
shrinks.

A migration or an offload copies first, then switches the model over, then grows the pool;
a restore or recall drains and shrinks the pool first, then copies back and switches back.

When a host is lost, every request in flight is aborted with a 503 (never a wrong token) and
the cache is flushed before new prefills: see ``failure.py``.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from router.rebalance.messages import (
    ControlEvent,
    ControlMessageError,
    ControlRequest,
    KvInfo,
    MigrateRequest,
    ModelInfo,
    OffloadHeadsReply,
    OffloadHeadsRequest,
    RadixCacheInfo,
    RangeInfo,
    RecalledOffload,
    RecallHeadsRequest,
    RestoreDone,
    RestoredRange,
    RestorePending,
    RestoreRequest,
    StatusReply,
)
from runtime_patches.cpu_dtype import REASON_ENV
from runtime_patches.migration import OWN_HOST_ENV, TARGETS_ENV
from runtime_patches.migration.capacity import KVCapacity
from runtime_patches.migration.errors import MigrationError
from runtime_patches.migration.failure import HostLoss, evict_cache
from runtime_patches.migration.offloads import HeadOffload, HeadOffloads
from runtime_patches.migration.ranges import (
    LayerRanges,
    MigratedRange,
    check_range,
    layer_kv_bytes,
)
from runtime_patches.migration.remote import StepLost
from runtime_patches.migration.transport import (
    LayerHostLost,
    LayerHostRefused,
    LayerTransport,
    TcpTransport,
    parse_address,
)

logger = logging.getLogger(__name__)

__all__ = ["MigrationError", "MigrationManager", "parse_targets"]

_REQUESTS: dict[str, type[ControlRequest]] = {
    "migrate": MigrateRequest, "offload_heads": OffloadHeadsRequest,
    "restore": RestoreRequest, "recall_heads": RecallHeadsRequest}
"""The request type of each control op (``control.py`` sends the op for each route)."""


def parse_targets(text: str) -> dict[str, str]:
    targets: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, address = item.partition("=")
        if not sep or not name:
            raise ValueError(f"{TARGETS_ENV}: {item!r} is not NAME=HOST:PORT")
        parse_address(address)
        targets[name] = address
    return targets


class MigrationManager:
    """Coordinates this worker's migrated ranges and head offloads (see the module docstring)."""

    def __init__(self, scheduler: Any, targets: dict[str, str] | None = None,
                 transport_factory: Any = TcpTransport) -> None:
        self.scheduler = scheduler
        self.targets = targets if targets is not None else parse_targets(
            os.environ.get(TARGETS_ENV, ""))
        self.transport_factory = transport_factory
        self.layer_ranges = LayerRanges(self)
        self.heads = HeadOffloads(self)
        self.pending_restore: list[int] = []
        self.pending_recall: list[int] = []
        self.loss = HostLoss(self)
        self._capacity: KVCapacity | None = None
        self.events: deque[ControlEvent] = deque(maxlen=32)

    # -- SGLang objects -----------------------------------------------------------------------
    @property
    def model_runner(self) -> Any:
        return self.scheduler.tp_worker.model_runner

    @property
    def layers(self) -> nn.ModuleList:
        return self.model_runner.model.model.layers

    @property
    def pool(self) -> Any:
        return self.model_runner.token_to_kv_pool

    @property
    def ranges(self) -> dict[int, MigratedRange]:
        return self.layer_ranges.ranges

    @property
    def capacity(self) -> KVCapacity:
        if self._capacity is None:
            self._capacity = KVCapacity(self.scheduler)
        return self._capacity

    def is_local(self, layer_id: int) -> bool:
        return self.layer_ranges.is_local(layer_id)

    def local_head_layers(self, without: list[MigratedRange] | None = None,
                          without_offloads: list[HeadOffload] | None = None) -> int:
        """KV heads held here summed over layers, with ``without`` restored and
        ``without_offloads`` recalled: what the KV budget is divided by."""
        offloads = [o for o in self.heads.offloads.values()
                    if not without_offloads or o not in without_offloads]
        num_kv = self.heads.num_kv_heads()
        gone = self.layer_ranges.num_migrated(without) * num_kv
        gone += sum(len(o.layers) * len(o.heads) for o in offloads)
        return len(self.layers) * num_kv - gone

    def _host_transports(self) -> list[LayerTransport]:
        return [*(r.remote.transport for r in self.ranges.values()),
                *(o.client.transport for o in self.heads.offloads.values())]

    # -- control ------------------------------------------------------------------------------
    def handle(self, op: str, body: Any) -> tuple[int, dict[str, Any]]:
        """One control RPC: ``(http_status, JSON body)``; an error is ``{"error": message}``."""
        try:
            if op == "status":
                return 200, self.status().to_json()
            request_type = _REQUESTS.get(op)
            if request_type is None:
                raise MigrationError(404, f"unknown migration op {op!r}")
            try:
                request = request_type.from_json(body)
            except ControlMessageError as exc:
                raise MigrationError(400, str(exc)) from None
            if isinstance(request, MigrateRequest):
                return 200, self.migrate(request).to_json()
            if isinstance(request, OffloadHeadsRequest):
                return 200, self.offload_heads(request).to_json()
            answer = (self.restore(request) if isinstance(request, RestoreRequest)
                      else self.recall_heads(request))
            return answer.HTTP_STATUS, answer.to_json()
        except MigrationError as exc:
            return exc.status, {"error": str(exc)}

    def status(self) -> StatusReply:
        pool, capacity, tree = self.pool, self.capacity, self.scheduler.tree_cache
        rows = pool.size + pool.page_size
        per_token = sum(layer_kv_bytes(pool, i) for i in range(len(self.layers))
                        if self.is_local(i)) // rows
        layer = self.layer_ranges.first_local_layer()
        model = ModelInfo(layer_weight_bytes=_module_bytes(layer) if layer is not None else 0,
                          dtype=str(self.model_runner.dtype).removeprefix("torch."),
                          kv_dtype=str(pool.dtype).removeprefix("torch."),
                          dtype_reason=os.environ.get(REASON_ENV) or None)
        kv = KvInfo(pool_tokens=capacity.size, base_pool_tokens=capacity.base_size,
                    capacity_tokens=int(self.scheduler.max_total_num_tokens),
                    used_tokens=self._used_tokens(), bytes_per_token=per_token,
                    bytes_released=sum(r.kv_bytes_released for r in self.ranges.values())
                    + sum(o.kv_bytes_released for o in self.heads.offloads.values()),
                    draining_to=capacity.drain_limit)
        return StatusReply(
            num_layers=len(self.layers),
            local_layer_ids=tuple(i for i in range(len(self.layers)) if self.is_local(i)),
            ranges=self.layer_ranges.describe(), heads=self.heads.describe(),
            targets=tuple(self.targets.items()),
            layer_host=os.environ.get(OWN_HOST_ENV) or None, model=model, kv=kv,
            pending_restore=tuple((self.ranges[s].start, self.ranges[s].end)
                                  for s in self.pending_restore if s in self.ranges),
            pending_recall=tuple(self.pending_recall),
            radix_cache=RadixCacheInfo(int(tree.evictable_size()), int(tree.protected_size())),
            invalidating=self.invalidating, num_aborted_on_host_loss=self.loss.num_aborted,
            events=tuple(self.events), cannot_move=self.cannot_move())

    def _used_tokens(self) -> int:
        allocator = self.scheduler.token_to_kv_pool_allocator
        if allocator.page_size != 1:  # a paged allocator (--kvstore): count its free pages
            return max(0, int(allocator.size - allocator.available_size()))
        return int(len(self.capacity.used_slots()))

    def cannot_move(self) -> str | None:
        """Why this worker can never migrate layers or offload heads, every reason joined by
        "; " (None: it can); the conditions that pass with time (a flush, a pending drain) are
        not here."""
        sched = self.scheduler
        reasons = []
        if self.model_runner.device != "cpu":
            reasons.append("layer migration and head offload are implemented and tested on the "
                           "CPU engine only")
        if getattr(sched, "enable_overlap", False):
            reasons.append("layer migration needs --disable-overlap-schedule")
        if getattr(sched, "enable_hierarchical_cache", False):
            reasons.append("layer migration cannot run with the hierarchical cache (--kvstore): "
                           "the cache would back up and serve the KV of layers or heads that "
                           "left")
        if sched.token_to_kv_pool_allocator.page_size != 1:
            reasons.append("layer migration supports page size 1 only")
        from sglang.srt.runtime_context import get_parallel

        parallel = get_parallel()
        if parallel.tp_size != 1 or parallel.pp_size != 1:
            reasons.append("layer migration needs tp_size 1 and pp_size 1")
        return "; ".join(reasons) or None

    def _check_can_move(self) -> None:
        reason = self.cannot_move()
        if reason is not None:
            raise MigrationError(409, reason)
        if self.invalidating:
            raise MigrationError(409, "the worker is flushing KV lost with a layer host")
        if self.pending_restore or self.pending_recall:
            raise MigrationError(409, "a restore or recall is waiting for KV slots to free; "
                                      "try again once it has finished (see GET "
                                      "/banaserve/status)")

    def _move(self, target: str, copy: Callable[[LayerTransport], Any]) -> Any:
        """Open a session on ``target``, run ``copy`` on it (layers or heads out, model switched
        over), then grow the pool. Host errors close the session and change nothing: 503 when
        the host is unreachable or lost, 502 when it refused."""
        try:
            transport = self.transport_factory(self.targets[target])
        except LayerHostLost as exc:
            raise MigrationError(503, str(exc)) from exc
        try:
            moved = copy(transport)
        except (LayerHostLost, LayerHostRefused) as exc:
            transport.close()
            raise MigrationError(502 if isinstance(exc, LayerHostRefused) else 503,
                                 str(exc)) from exc
        except BaseException:
            transport.close()
            raise
        grow_started = time.perf_counter()
        self._grow()
        moved.grow_seconds = time.perf_counter() - grow_started
        return moved

    def migrate(self, request: MigrateRequest) -> RangeInfo:
        start, end, target = self.layer_ranges.check(request)
        self._check_can_move()
        self.layer_ranges.check_supported()
        migrated: MigratedRange = self._move(
            target, lambda t: self.layer_ranges.migrate(t, start, end, target))
        info = migrated.describe()
        self.event("migrate", info.to_json())
        logger.info("layers [%d, %d) migrated to %s (%s) in %.3f s: %d weight bytes, %d KV "
                    "bytes, %d KV bytes released", start, end, target,
                    migrated.remote.transport.address, migrated.seconds, migrated.weight_bytes,
                    migrated.kv_bytes_moved, migrated.kv_bytes_released)
        return info

    def offload_heads(self, request: OffloadHeadsRequest) -> OffloadHeadsReply:
        layers, heads, target = self.heads.check(request)
        self._check_can_move()
        self.layer_ranges.check_supported()
        from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

        if not isinstance(self.model_runner.attn_backend, TorchNativeAttnBackend):
            raise MigrationError(409, "head offload needs the torch_native attention backend "
                                      f"(this worker runs "
                                      f"{type(self.model_runner.attn_backend).__name__})")
        offload: HeadOffload = self._move(
            target, lambda t: self.heads.offload(t, layers, heads, target))
        info = offload.describe()
        self.event("offload_heads", info.to_json())
        logger.info("KV heads %s of layers %s offloaded to %s in %.3f s: %d KV bytes moved, "
                    "%d released", heads, layers, target, offload.seconds,
                    offload.kv_bytes_moved, offload.kv_bytes_released)
        return OffloadHeadsReply(info, self.capacity.size)

    def _grow(self) -> None:
        """Give the KV memory that left (layers, heads) to what stays here."""
        capacity = self.capacity
        target = capacity.size_for(self.local_head_layers())
        if target <= capacity.size:
            return
        try:
            for transport in self._host_transports():  # same slot ids: hosts grow first
                transport.call("resize_kv", {"size": target}, timeout=300)
        except (LayerHostLost, LayerHostRefused) as exc:
            logger.warning("KV pool not grown: a host could not follow (%s)", exc)
            self.event("grow_failed", {"error": str(exc)})
            return
        capacity.resize(target)

    def restore(self, request: RestoreRequest) -> RestoreDone | RestorePending:
        if request.layers is not None:
            check_range(request.layers, len(self.layers))
            start, end = request.layers
            found = self.ranges.get(start)
            if found is None or found.end != end:
                migrated = [[r.start, r.end] for r in self.ranges.values()]
                raise MigrationError(400, f"layers [{start}, {end}) are not a migrated range; "
                                          f"migrated: {migrated}")
            targets = [found]
        else:
            targets = list(self.ranges.values())
        if self.pending_restore or self.pending_recall:
            return self._pending()
        if not targets:
            return RestoreDone(restored=())
        self.pending_restore = [r.start for r in targets]
        return self._start_shrink(self.local_head_layers(without=targets))

    def recall_heads(self, request: RecallHeadsRequest) -> RestoreDone | RestorePending:
        if request.offload_id is not None:
            found = self.heads.offloads.get(request.offload_id)
            if found is None:
                raise MigrationError(400, f"no head offload with id {request.offload_id!r}; "
                                          f"offloads: {sorted(self.heads.offloads)}")
            targets = [found]
        else:
            targets = list(self.heads.offloads.values())
        if self.pending_restore or self.pending_recall:
            return self._pending()
        if not targets:
            return RestoreDone(recalled=())
        self.pending_recall = [o.id for o in targets]
        return self._start_shrink(self.local_head_layers(without_offloads=targets))

    # -- restore and recall: shrink the pool, then copy back --------------------------------------
    def _start_shrink(self, local_head_layers: int) -> RestoreDone | RestorePending:
        capacity = self.capacity
        limit = capacity.size_for(local_head_layers)
        if limit < capacity.size:
            capacity.drain(limit)
        done = self.finish_restore()
        return done if done is not None else self._pending()

    def _pending(self) -> RestorePending:
        capacity = self.capacity
        return RestorePending(tuple((self.ranges[s].start, self.ranges[s].end)
                                    for s in self.pending_restore),
                              tuple(self.pending_recall), capacity.size, capacity.drain_limit,
                              capacity.sweep())

    def finish_restore(self) -> RestoreDone | None:
        """Complete a pending restore or recall once no KV is held above the drain limit
        (called by the control RPC and before every scheduling step). None while it waits."""
        if not self.pending_restore and not self.pending_recall:
            return None
        capacity = self.capacity
        if capacity.drain_limit is not None:
            evict_cache(self.scheduler)
            if capacity.sweep() > 0:
                return None
        ranges = [self.ranges[s] for s in self.pending_restore if s in self.ranges]
        offloads = [self.heads.offloads[i] for i in self.pending_recall
                    if i in self.heads.offloads]
        self.pending_restore, self.pending_recall = [], []
        if capacity.drain_limit is not None:
            capacity.finish_drain()
        restored = [self._restore_one(migrated) for migrated in ranges]
        recalled = [self._recall_one(offload) for offload in offloads]
        for transport in self._host_transports():  # the remaining hosts follow the pool
            try:
                transport.call("resize_kv", {"size": capacity.size}, timeout=300)
            except (LayerHostLost, LayerHostRefused) as exc:
                logger.warning("host %s kept its larger pool: %s", transport.address, exc)
        return RestoreDone(tuple(restored), tuple(recalled), capacity.size)

    def _restore_one(self, migrated: MigratedRange) -> RestoredRange:
        started = time.perf_counter()
        try:
            kv_bytes = self.layer_ranges.restore(migrated)
        except (LayerHostLost, LayerHostRefused) as exc:
            self.loss.lose_range(migrated, exc)
            self.loss.abort_inflight(f"layer host {migrated.remote.transport.address} failed "
                                 f"while layers [{migrated.start}, {migrated.end}) were "
                                 f"restored: {exc}", batch=None)
            return RestoredRange((migrated.start, migrated.end),
                                 error=f"{exc}; restored from the worker's own weights, "
                                       "requests in flight aborted")
        info = RestoredRange((migrated.start, migrated.end), migrated.target, kv_bytes,
                             round(time.perf_counter() - started, 4), migrated.remote.stats())
        self.event("restore", info.to_json())
        logger.info("layers [%d, %d) restored from %s in %.3f s", migrated.start,
                    migrated.end, migrated.target, info.restore_seconds)
        return info

    def _recall_one(self, offload: HeadOffload) -> RecalledOffload:
        started = time.perf_counter()
        address = offload.client.transport.address
        try:
            kv_bytes = self.heads.recall(offload)
        except (LayerHostLost, LayerHostRefused) as exc:
            self.loss.lose_heads(offload, exc)
            self.loss.abort_inflight(f"head host {address} failed while KV heads {offload.heads} "
                                 f"were recalled: {exc}", batch=None)
            return RecalledOffload(offload.id, error=f"{exc}; their KV is lost, requests in "
                                                     "flight aborted")
        info = RecalledOffload(offload.id, tuple(offload.layers), tuple(offload.heads),
                               offload.target, kv_bytes, round(time.perf_counter() - started, 4),
                               offload.client.stats())
        self.event("recall_heads", info.to_json())
        logger.info("KV heads %s of layers %s recalled from %s in %.3f s", offload.heads,
                    offload.layers, offload.target, info.recall_seconds)
        return info

    # -- failure ------------------------------------------------------------------------------
    def on_step_lost(self, exc: StepLost, batch: Any) -> None:
        """A host failed inside a model step (see ``failure.HostLoss``)."""
        self.loss.on_step_lost(exc, batch)

    @property
    def invalidating(self) -> bool:
        return self.loss.invalidating

    def before_schedule(self) -> bool:
        """Called before every scheduling step: finishes a pending restore or recall when it
        can; False (no new prefill) while KV lost with a host is being flushed."""
        if self.pending_restore or self.pending_recall:
            self.finish_restore()
        return self.loss.flush_gate()

    # -- helpers ------------------------------------------------------------------------------
    def used_slots(self) -> torch.Tensor:
        if self.scheduler.token_to_kv_pool_allocator.page_size != 1:
            raise MigrationError(409, "layer migration supports page size 1 only")
        return self.capacity.used_slots()

    def event(self, kind: str, info: dict[str, Any]) -> None:
        self.events.append(ControlEvent(time.time(), kind, info))


def _module_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
