"""The worker side of layer migration and head offload: one ``MigrationManager`` per scheduler.

Who calls what, all on the scheduler thread:
- ``handle(op, body)``: the control RPC (``runtime_patches.migration.patches`` routes SGLang's
  ``handle_rpc_request`` here; the HTTP endpoints in ``control.py`` send it). SGLang polls RPCs
  at the top of every scheduler loop iteration, so a migration or restore always happens
  between two model steps. Returns ``(http_status, body)``; nothing is changed on any error.
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

from runtime_patches.cpu_dtype import REASON_ENV
from runtime_patches.migration import OWN_HOST_ENV, TARGETS_ENV
from runtime_patches.migration.capacity import KVCapacity
from runtime_patches.migration.errors import MigrationError
from runtime_patches.migration.failure import HostLoss, evict_cache
from runtime_patches.migration.offloads import HeadOffload, HeadOffloads
from runtime_patches.migration.ranges import (
    LayerRanges,
    MigratedRange,
    layer_kv_bytes,
    parse_range,
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
        self.events: deque[dict[str, Any]] = deque(maxlen=32)

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
    def handle(self, op: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        try:
            if op == "status":
                return 200, self.status()
            if op == "migrate":
                return 200, self.migrate(body)
            if op == "offload_heads":
                return 200, self.offload_heads(body)
            if op in ("restore", "recall_heads"):
                result = self.restore(body) if op == "restore" else self.recall_heads(body)
                return int(result.pop("http_status", 200)), result
            raise MigrationError(404, f"unknown migration op {op!r}")
        except MigrationError as exc:
            return exc.status, {"error": str(exc)}

    def status(self) -> dict[str, Any]:
        pool, capacity = self.pool, self.capacity
        rows = pool.size + pool.page_size
        per_token = sum(layer_kv_bytes(pool, i) for i in range(len(self.layers))
                        if self.is_local(i)) // rows
        layer = self.layer_ranges.first_local_layer()
        return {
            "num_layers": len(self.layers),
            "local_layers": [i for i in range(len(self.layers)) if self.is_local(i)],
            "ranges": self.layer_ranges.describe(),
            "heads": self.heads.describe(),
            "targets": self.targets,
            "layer_host": os.environ.get(OWN_HOST_ENV) or None,
            "model": {"layer_weight_bytes": _module_bytes(layer) if layer is not None else 0,
                      "dtype": str(self.model_runner.dtype).removeprefix("torch."),
                      "kv_dtype": str(pool.dtype).removeprefix("torch."),
                      "dtype_reason": os.environ.get(REASON_ENV) or None},
            "kv": {"pool_tokens": capacity.size, "base_pool_tokens": capacity.base_size,
                   "capacity_tokens": int(self.scheduler.max_total_num_tokens),
                   "used_tokens": self._used_tokens(),
                   "bytes_per_token": per_token,
                   "bytes_released": sum(r.kv_bytes_released for r in self.ranges.values())
                   + sum(o.kv_bytes_released for o in self.heads.offloads.values()),
                   "draining_to": capacity.drain_limit},
            "pending_restore": [[self.ranges[s].start, self.ranges[s].end]
                                for s in self.pending_restore if s in self.ranges],
            "pending_recall": list(self.pending_recall),
            "radix_cache": {"evictable_tokens": int(self.scheduler.tree_cache.evictable_size()),
                            "protected_tokens": int(self.scheduler.tree_cache.protected_size())},
            "invalidating": self.invalidating,
            "num_aborted_on_host_loss": self.loss.num_aborted,
            "events": list(self.events),
            "cannot_move": self.cannot_move(),
        }

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

    def migrate(self, body: dict[str, Any]) -> dict[str, Any]:
        start, end, target = self.layer_ranges.parse(body)
        self._check_can_move()
        self.layer_ranges.check_supported()
        migrated: MigratedRange = self._move(
            target, lambda t: self.layer_ranges.migrate(t, start, end, target))
        self.event("migrate", migrated.describe())
        logger.info("layers [%d, %d) migrated to %s (%s) in %.3f s: %d weight bytes, %d KV "
                    "bytes, %d KV bytes released", start, end, target,
                    migrated.remote.transport.address, migrated.seconds, migrated.weight_bytes,
                    migrated.kv_bytes_moved, migrated.kv_bytes_released)
        return migrated.describe()

    def offload_heads(self, body: dict[str, Any]) -> dict[str, Any]:
        layers, heads, target = self.heads.parse(body)
        self._check_can_move()
        self.layer_ranges.check_supported()
        from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

        if not isinstance(self.model_runner.attn_backend, TorchNativeAttnBackend):
            raise MigrationError(409, "head offload needs the torch_native attention backend "
                                      f"(this worker runs "
                                      f"{type(self.model_runner.attn_backend).__name__})")
        offload: HeadOffload = self._move(
            target, lambda t: self.heads.offload(t, layers, heads, target))
        self.event("offload_heads", offload.describe())
        logger.info("KV heads %s of layers %s offloaded to %s in %.3f s: %d KV bytes moved, "
                    "%d released", heads, layers, target, offload.seconds,
                    offload.kv_bytes_moved, offload.kv_bytes_released)
        return {**offload.describe(), "pool_tokens": self.capacity.size}

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

    def restore(self, body: dict[str, Any]) -> dict[str, Any]:
        unknown = set(body) - {"layers"}
        if unknown:
            raise MigrationError(400, f"unknown fields {sorted(unknown)}")
        if "layers" in body:
            start, end = parse_range(body, len(self.layers))
            found = self.ranges.get(start)
            if found is None or found.end != end:
                migrated = [[r.start, r.end] for r in self.ranges.values()]
                raise MigrationError(400, f"layers [{start}, {end}) are not a migrated range; "
                                          f"migrated: {migrated}")
            targets = [found]
        else:
            targets = list(self.ranges.values())
        if self.pending_restore or self.pending_recall:
            return self._pending_status(202)
        if not targets:
            return {"restored": []}
        self.pending_restore = [r.start for r in targets]
        return self._start_shrink(self.local_head_layers(without=targets))

    def recall_heads(self, body: dict[str, Any]) -> dict[str, Any]:
        unknown = set(body) - {"id"}
        if unknown:
            raise MigrationError(400, f"unknown fields {sorted(unknown)}")
        if "id" in body:
            found = self.heads.offloads.get(body["id"]) if isinstance(body["id"], int) else None
            if found is None:
                raise MigrationError(400, f"no head offload with id {body['id']!r}; offloads: "
                                          f"{sorted(self.heads.offloads)}")
            targets = [found]
        else:
            targets = list(self.heads.offloads.values())
        if self.pending_restore or self.pending_recall:
            return self._pending_status(202)
        if not targets:
            return {"recalled": []}
        self.pending_recall = [o.id for o in targets]
        return self._start_shrink(self.local_head_layers(without_offloads=targets))

    # -- restore and recall: shrink the pool, then copy back --------------------------------------
    def _start_shrink(self, local_head_layers: int) -> dict[str, Any]:
        capacity = self.capacity
        limit = capacity.size_for(local_head_layers)
        if limit < capacity.size:
            capacity.drain(limit)
        done = self.finish_restore()
        return done if done is not None else self._pending_status(202)

    def _pending_status(self, status: int) -> dict[str, Any]:
        capacity = self.capacity
        return {"pending": [[self.ranges[s].start, self.ranges[s].end]
                            for s in self.pending_restore],
                "pending_recall": list(self.pending_recall),
                "pool_tokens": capacity.size, "draining_to": capacity.drain_limit,
                "slots_held_above": capacity.sweep(), "http_status": status}

    def finish_restore(self) -> dict[str, Any] | None:
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
        return {"restored": restored, "recalled": recalled, "pool_tokens": capacity.size}

    def _restore_one(self, migrated: MigratedRange) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            kv_bytes = self.layer_ranges.restore(migrated)
        except (LayerHostLost, LayerHostRefused) as exc:
            self.loss.lose_range(migrated, exc)
            self.loss.abort_inflight(f"layer host {migrated.remote.transport.address} failed "
                                 f"while layers [{migrated.start}, {migrated.end}) were "
                                 f"restored: {exc}", batch=None)
            return {"layers": [migrated.start, migrated.end],
                    "error": f"{exc}; restored from the worker's own weights, requests in "
                             "flight aborted"}
        info = {"layers": [migrated.start, migrated.end], "target": migrated.target,
                "kv_bytes_moved": kv_bytes,
                "restore_seconds": round(time.perf_counter() - started, 4),
                "forward": migrated.remote.stats()}
        self.event("restore", info)
        logger.info("layers [%d, %d) restored from %s in %.3f s", migrated.start,
                    migrated.end, migrated.target, info["restore_seconds"])
        return info

    def _recall_one(self, offload: HeadOffload) -> dict[str, Any]:
        started = time.perf_counter()
        address = offload.client.transport.address
        try:
            kv_bytes = self.heads.recall(offload)
        except (LayerHostLost, LayerHostRefused) as exc:
            self.loss.lose_heads(offload, exc)
            self.loss.abort_inflight(f"head host {address} failed while KV heads {offload.heads} "
                                 f"were recalled: {exc}", batch=None)
            return {"id": offload.id, "error": f"{exc}; their KV is lost, requests in flight "
                                               "aborted"}
        info = {"id": offload.id, "layers": offload.layers, "heads": offload.heads,
                "target": offload.target, "kv_bytes_moved": kv_bytes,
                "recall_seconds": round(time.perf_counter() - started, 4),
                "attention": offload.client.stats()}
        self.event("recall_heads", info)
        logger.info("KV heads %s of layers %s recalled from %s in %.3f s", offload.heads,
                    offload.layers, offload.target, info["recall_seconds"])
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
        self.events.append({"at": time.time(), "event": kind, **info})


def _module_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
