"""The worker side of layer migration: one ``MigrationManager`` per SGLang scheduler.

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

State owned here: the migrated ranges (stand-in modules, parked layers, transports), the head
offloads (through ``offloads.HeadOffloads``), a pending restore or recall, and (through
``capacity.KVCapacity``) the pool's size: a migration gives the KV memory
the migrated layers leave behind to the local layers, so the pool holds more tokens; a restore
first drains the slots above the smaller size (HTTP 202 while it waits) and then shrinks.

A migration moves, in order: the layers' weights, the KV of every slot in use (running
requests and the radix cache) for those layers, then swaps the stand-ins in, drops the
worker's KV buffers of those layers and grows the pool. Restore drains and shrinks the pool,
copies the KV of slots in use back, puts the parked layers back and closes the session.

When a host is lost, the worker cannot recompute the lost KV in place: every request in
flight is aborted with a 503 and a message naming the host (never a wrong token), new prefills
wait until those requests have released their KV, the radix cache is emptied (its prefixes'
KV for the lost layers is gone), and the worker serves on with its layers back.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import torch
from torch import nn

from runtime_patches.migration import OWN_HOST_ENV, TARGETS_ENV
from runtime_patches.migration.capacity import KVCapacity
from runtime_patches.migration.heads import HeadsLost
from runtime_patches.migration.offloads import HeadOffload, HeadOffloads, OffloadError
from runtime_patches.migration.remote import PassThroughLayer, RangeLost, RemoteLayers, StepLost
from runtime_patches.migration.transport import (
    LayerHostLost,
    LayerHostRefused,
    LayerTransport,
    TcpTransport,
    parse_address,
)
from runtime_patches.migration.wire import dtype_name

logger = logging.getLogger(__name__)

KV_CHUNK_SLOTS = 2048
"""Slots per KV message during migrate and restore."""


class MigrationError(Exception):
    """A control request that cannot be carried out; nothing was changed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_targets(text: str) -> dict[str, str]:
    targets: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, address = item.partition("=")
        if not sep or not name:
            raise ValueError(f"{TARGETS_ENV}: {item!r} is not NAME=HOST:PORT")
        parse_address(address)
        targets[name] = address
    return targets


@dataclass
class MigratedRange:
    start: int
    end: int
    target: str
    remote: RemoteLayers
    parked: list[nn.Module]
    kv_shapes: list[tuple[torch.Size, torch.Size]]
    weight_bytes: int
    kv_bytes_moved: int
    kv_bytes_released: int
    seconds: float
    """Copy-out (weights, then KV) until the stand-ins are in; ``grow_seconds`` comes on top."""
    grow_seconds: float = 0.0
    migrated_at: float = field(default_factory=time.time)

    def describe(self) -> dict[str, Any]:
        return {"layers": [self.start, self.end], "target": self.target,
                "address": self.remote.transport.address, "weight_bytes": self.weight_bytes,
                "kv_bytes_moved": self.kv_bytes_moved,
                "kv_bytes_released": self.kv_bytes_released,
                "migration_seconds": round(self.seconds, 4),
                "grow_seconds": round(self.grow_seconds, 4), "migrated_at": self.migrated_at,
                "forward": self.remote.stats()}


def parse_range(body: dict[str, Any], num_layers: int) -> tuple[int, int]:
    layers = body.get("layers")
    if (not isinstance(layers, list) or len(layers) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)):
        raise MigrationError(400, "'layers' must be [start, end]: two integers, end exclusive")
    start, end = layers
    if not 0 <= start < end <= num_layers:
        raise MigrationError(400, f"layers [{start}, {end}) are not a non-empty range inside "
                                  f"[0, {num_layers})")
    return start, end


class MigrationManager:
    """Owns this worker's migrated ranges (see the module docstring)."""

    def __init__(self, scheduler: Any, targets: dict[str, str] | None = None,
                 transport_factory: Any = TcpTransport) -> None:
        self.scheduler = scheduler
        self.targets = targets if targets is not None else parse_targets(
            os.environ.get(TARGETS_ENV, ""))
        self.transport_factory = transport_factory
        self.ranges: dict[int, MigratedRange] = {}
        self.pending_restore: list[int] = []
        self.heads = HeadOffloads(self)
        self.pending_recall: list[int] = []
        self.invalidating = False
        self._capacity: KVCapacity | None = None
        self.events: deque[dict[str, Any]] = deque(maxlen=32)
        self.num_aborted = 0

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
    def capacity(self) -> KVCapacity:
        if self._capacity is None:
            self._capacity = KVCapacity(self.scheduler)
        return self._capacity

    def local_head_layers(self, without: list[MigratedRange] | None = None,
                          without_offloads: list[HeadOffload] | None = None) -> int:
        """KV heads held here summed over layers, with ``without`` restored and
        ``without_offloads`` recalled: what the KV budget is divided by."""
        ranges = [r for r in self.ranges.values() if not without or r not in without]
        offloads = [o for o in self.heads.offloads.values()
                    if not without_offloads or o not in without_offloads]
        num_kv = self.heads.num_kv_heads()
        gone = sum(r.end - r.start for r in ranges) * num_kv
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
            if op == "restore":
                result = self.restore(body)
                return int(result.pop("http_status", 200)), result
            if op == "offload_heads":
                return 200, self.offload_heads(body)
            if op == "recall_heads":
                result = self.recall_heads(body)
                return int(result.pop("http_status", 200)), result
            raise MigrationError(404, f"unknown migration op {op!r}")
        except (MigrationError, OffloadError) as exc:
            return exc.status, {"error": str(exc)}

    def status(self) -> dict[str, Any]:
        pool, capacity = self.pool, self.capacity
        rows = pool.size + pool.page_size
        per_token = sum(_layer_kv_bytes(pool, i) for i in range(len(self.layers))
                        if self.is_local(i)) // rows
        layer = next((m for m in self.layers if not isinstance(m, PassThroughLayer | RemoteLayers)),
                     None)
        return {
            "num_layers": len(self.layers),
            "local_layers": [i for i in range(len(self.layers)) if self.is_local(i)],
            "ranges": [r.describe() for r in sorted(self.ranges.values(), key=lambda r: r.start)],
            "heads": self.heads.describe(),
            "targets": self.targets,
            "layer_host": os.environ.get(OWN_HOST_ENV) or None,
            "model": {"layer_weight_bytes": _module_bytes(layer) if layer is not None else 0},
            "kv": {"pool_tokens": capacity.size, "base_pool_tokens": capacity.base_size,
                   "capacity_tokens": int(self.scheduler.max_total_num_tokens),
                   "used_tokens": int(len(capacity.used_slots())),
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
            "num_aborted_on_host_loss": self.num_aborted,
            "events": list(self.events),
        }

    def is_local(self, layer_id: int) -> bool:
        return not any(r.start <= layer_id < r.end for r in self.ranges.values())

    def _check_can_migrate(self) -> None:
        sched = self.scheduler
        if self.model_runner.device != "cpu":
            raise MigrationError(409, "layer migration is implemented and tested on the CPU "
                                      "engine only")
        if getattr(sched, "enable_overlap", False):
            raise MigrationError(409, "layer migration needs --disable-overlap-schedule")
        if getattr(sched, "enable_hierarchical_cache", False):
            raise MigrationError(409, "layer migration cannot run with the hierarchical cache")
        from sglang.srt.runtime_context import get_parallel

        parallel = get_parallel()
        if parallel.tp_size != 1 or parallel.pp_size != 1:
            raise MigrationError(409, "layer migration needs tp_size 1 and pp_size 1")
        if self.invalidating:
            raise MigrationError(409, "the worker is flushing KV lost with a layer host")
        if self.pending_restore or self.pending_recall:
            raise MigrationError(409, "a restore or recall is waiting for KV slots to free; "
                                      "try again once it has finished (see GET "
                                      "/banaserve/status)")
        layer = next((m for m in self.layers if not isinstance(m, PassThroughLayer | RemoteLayers)),
                     None)
        name = f"{type(layer).__module__}.{type(layer).__qualname__}" if layer else "?"
        from runtime_patches.migration.host_runtime import SUPPORTED_LAYER_CLASSES

        if name not in SUPPORTED_LAYER_CLASSES:
            raise MigrationError(409, f"layer migration does not support {name}")

    def migrate(self, body: dict[str, Any]) -> dict[str, Any]:
        unknown = set(body) - {"layers", "target"}
        if unknown:
            raise MigrationError(400, f"unknown fields {sorted(unknown)}")
        start, end = parse_range(body, len(self.layers))
        target = body.get("target")
        if not isinstance(target, str) or target not in self.targets:
            raise MigrationError(400, f"unknown target {target!r}; this worker knows "
                                      f"{sorted(self.targets) or 'no layer hosts'} "
                                      f"(set with --layer-host NAME=HOST:PORT)")
        for r in self.ranges.values():
            if start < r.end and r.start < end:
                raise MigrationError(400, f"layers [{start}, {end}) overlap the migrated range "
                                          f"[{r.start}, {r.end})")
        split = [i for i in range(start, end) if self.heads.heads_on(i)]
        if split:
            raise MigrationError(400, f"layers {split} have KV heads offloaded; recall them "
                                      "before migrating the layers")
        self._check_can_migrate()
        started = time.perf_counter()
        try:
            transport = self.transport_factory(self.targets[target])
        except LayerHostLost as exc:
            raise MigrationError(503, str(exc)) from exc
        try:
            moved = self._copy_out(transport, start, end)
        except (LayerHostLost, LayerHostRefused) as exc:
            transport.close()
            raise MigrationError(502 if isinstance(exc, LayerHostRefused) else 503,
                                 str(exc)) from exc
        except BaseException:
            transport.close()
            raise
        weight_bytes, kv_moved = moved
        migrated = self._swap_in(transport, start, end, target, weight_bytes, kv_moved,
                                 time.perf_counter() - started)
        grow_started = time.perf_counter()
        self._grow()
        migrated.grow_seconds = time.perf_counter() - grow_started
        self._event("migrate", migrated.describe())
        logger.info("layers [%d, %d) migrated to %s (%s) in %.3f s: %d weight bytes, %d KV "
                    "bytes, %d KV bytes released", start, end, target, transport.address,
                    migrated.seconds, weight_bytes, kv_moved, migrated.kv_bytes_released)
        return migrated.describe()

    def _copy_out(self, transport: LayerTransport, start: int, end: int) -> tuple[int, int]:
        pool = self.pool
        config = self.model_runner.model_config.hf_config
        layer = self.layers[start]
        transport.call("hello")
        transport.call("open", {
            "layer_class": f"{type(layer).__module__}.{type(layer).__qualname__}",
            "hf_config": config.to_dict(), "start": start, "end": end,
            "dtype": dtype_name(self.model_runner.model_config.dtype),
            "kv_size": pool.size, "kv_page_size": pool.page_size,
            "kv_dtype": dtype_name(pool.store_dtype), "kv_head_num": pool.head_num,
            "kv_head_dim": pool.head_dim, "kv_v_head_dim": pool.v_head_dim,
        })
        weight_bytes = 0
        for i in range(start, end):
            state = {k: v.detach() for k, v in self.layers[i].state_dict().items()}
            weight_bytes += sum(t.numel() * t.element_size() for t in state.values())
            transport.call("load_layer", {"layer_id": i}, state, timeout=300)
        kv_moved = 0
        for slots in _chunks(self.used_slots(), KV_CHUNK_SLOTS):
            k = torch.stack([pool.k_buffer[i - pool.start_layer][slots] for i in range(start, end)])
            v = torch.stack([pool.v_buffer[i - pool.start_layer][slots] for i in range(start, end)])
            transport.call("put_kv", {}, {"slots": slots, "k": k, "v": v}, timeout=300)
            kv_moved += k.numel() * k.element_size() + v.numel() * v.element_size()
        return weight_bytes, kv_moved

    def _swap_in(self, transport: LayerTransport, start: int, end: int, target: str,
                 weight_bytes: int, kv_moved: int, seconds: float) -> MigratedRange:
        layers, pool = self.layers, self.pool
        parked = [layers[i] for i in range(start, end)]
        resume = (layers[end] if end < len(layers) else parked[0]).attn_boundary
        remote = RemoteLayers(transport, start, end, resume, self.model_runner.req_to_token_pool)
        layers[start] = remote
        for i in range(start + 1, end):
            layers[i] = PassThroughLayer(i)
        shapes, released = [], 0
        for i in range(start, end):
            li = i - pool.start_layer
            k, v = pool.k_buffer[li], pool.v_buffer[li]
            shapes.append((k.shape, v.shape))
            released += _layer_kv_bytes(pool, i)
            pool.k_buffer[li] = _placeholder(k)
            pool.v_buffer[li] = _placeholder(v)
        migrated = MigratedRange(start, end, target, remote, parked, shapes, weight_bytes,
                                 kv_moved, released, seconds)
        self.ranges[start] = migrated
        return migrated

    def _grow(self) -> None:
        """Give the KV memory the migrated layers left behind to the local layers."""
        capacity = self.capacity
        target = capacity.size_for(self.local_head_layers())
        if target <= capacity.size:
            return
        try:
            for transport in self._host_transports():  # same slot ids: hosts grow first
                transport.call("resize_kv", {"size": target}, timeout=300)
        except (LayerHostLost, LayerHostRefused) as exc:
            logger.warning("KV pool not grown: a layer host could not follow (%s)", exc)
            self._event("grow_failed", {"error": str(exc)})
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

    # -- head offload ---------------------------------------------------------------------------
    def offload_heads(self, body: dict[str, Any]) -> dict[str, Any]:
        layers, heads, target = self.heads.parse(body)
        self._check_can_migrate()
        from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

        if not isinstance(self.model_runner.attn_backend, TorchNativeAttnBackend):
            raise MigrationError(409, "head offload needs the torch_native attention backend "
                                      f"(this worker runs "
                                      f"{type(self.model_runner.attn_backend).__name__})")
        try:
            transport = self.transport_factory(self.targets[target])
        except LayerHostLost as exc:
            raise MigrationError(503, str(exc)) from exc
        try:
            offload = self.heads.offload(transport, layers, heads, target)
        except (LayerHostLost, LayerHostRefused) as exc:
            transport.close()
            raise MigrationError(502 if isinstance(exc, LayerHostRefused) else 503,
                                 str(exc)) from exc
        except BaseException:
            transport.close()
            raise
        grow_started = time.perf_counter()
        self._grow()
        offload.grow_seconds = time.perf_counter() - grow_started
        self._event("offload_heads", offload.describe())
        logger.info("KV heads %s of layers %s offloaded to %s in %.3f s: %d KV bytes moved, "
                    "%d released", heads, layers, target, offload.seconds,
                    offload.kv_bytes_moved, offload.kv_bytes_released)
        return {**offload.describe(), "pool_tokens": self.capacity.size}

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
            _evict_cache(self.scheduler)
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
            kv_bytes = self._copy_back(migrated)
        except (LayerHostLost, LayerHostRefused) as exc:
            self._lose(migrated, exc)
            self._abort_inflight(f"layer host {migrated.remote.transport.address} failed "
                                 f"while layers [{migrated.start}, {migrated.end}) were "
                                 f"restored: {exc}", batch=None)
            return {"layers": [migrated.start, migrated.end],
                    "error": f"{exc}; restored from the worker's own weights, requests in "
                             "flight aborted"}
        info = {"layers": [migrated.start, migrated.end], "target": migrated.target,
                "kv_bytes_moved": kv_bytes,
                "restore_seconds": round(time.perf_counter() - started, 4),
                "forward": migrated.remote.stats()}
        self._event("restore", info)
        logger.info("layers [%d, %d) restored from %s in %.3f s", migrated.start,
                    migrated.end, migrated.target, info["restore_seconds"])
        return info

    def _recall_one(self, offload: HeadOffload) -> dict[str, Any]:
        started = time.perf_counter()
        address = offload.client.transport.address
        try:
            kv_bytes = self.heads.recall(offload)
        except (LayerHostLost, LayerHostRefused) as exc:
            self._lose_heads(offload, exc)
            self._abort_inflight(f"head host {address} failed while KV heads {offload.heads} "
                                 f"were recalled: {exc}", batch=None)
            return {"id": offload.id, "error": f"{exc}; their KV is lost, requests in flight "
                                               "aborted"}
        info = {"id": offload.id, "layers": offload.layers, "heads": offload.heads,
                "target": offload.target, "kv_bytes_moved": kv_bytes,
                "recall_seconds": round(time.perf_counter() - started, 4),
                "attention": offload.client.stats()}
        self._event("recall_heads", info)
        logger.info("KV heads %s of layers %s recalled from %s in %.3f s", offload.heads,
                    offload.layers, offload.target, info["recall_seconds"])
        return info

    def _copy_back(self, migrated: MigratedRange) -> int:
        pool, transport = self.pool, migrated.remote.transport
        fresh = [_fresh_buffers(*self._kv_shapes(shapes), pool.store_dtype)
                 for shapes in migrated.kv_shapes]
        kv_bytes = 0
        for slots in _chunks(self.used_slots(), KV_CHUNK_SLOTS):
            _, out = transport.call("get_kv", {}, {"slots": slots}, timeout=300)
            for j, (k_buf, v_buf) in enumerate(fresh):
                k_buf[slots] = out["k"][j].to(k_buf.dtype)
                v_buf[slots] = out["v"][j].to(v_buf.dtype)
            kv_bytes += out["k"].numel() * out["k"].element_size() * 2
        self._swap_out(migrated, fresh)
        transport.close()
        return kv_bytes

    def _swap_out(self, migrated: MigratedRange,
                  buffers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        layers, pool = self.layers, self.pool
        for offset, i in enumerate(range(migrated.start, migrated.end)):
            layers[i] = migrated.parked[offset]
            li = i - pool.start_layer
            pool.k_buffer[li], pool.v_buffer[li] = buffers[offset]
        del self.ranges[migrated.start]

    # -- failure ------------------------------------------------------------------------------
    def on_step_lost(self, exc: StepLost, batch: Any) -> None:
        """A host failed inside a model step: restore locally, abort what was in flight."""
        if isinstance(exc, HeadsLost):
            offload = self.heads.offloads.get(exc.offload_id)
            if offload is None:
                raise exc
            address = offload.client.transport.address
            self._lose_heads(offload, exc.cause)
            self._abort_inflight(f"head host {address} holding KV heads {offload.heads} of "
                                 f"layers {offload.layers} of this worker was lost "
                                 f"({exc.cause}); the request was aborted rather than "
                                 "continued on lost KV", batch=batch)
            return
        assert isinstance(exc, RangeLost)
        migrated = self.ranges.get(exc.layers.start)
        if migrated is None or migrated.remote is not exc.layers:
            raise exc
        self._lose(migrated, exc.cause)
        self._abort_inflight(f"layer host {exc.layers.transport.address} serving layers "
                             f"[{exc.layers.start}, {exc.layers.end}) of this worker was lost "
                             f"({exc.cause}); the request was aborted rather than continued "
                             f"on lost KV", batch=batch)

    def _lose(self, migrated: MigratedRange, cause: Exception) -> None:
        fresh = [_fresh_buffers(*self._kv_shapes(shapes), self.pool.store_dtype)
                 for shapes in migrated.kv_shapes]
        self._swap_out(migrated, fresh)
        migrated.remote.transport.close()
        self.invalidating = True
        self._event("host_lost", {"layers": [migrated.start, migrated.end],
                                  "target": migrated.target, "error": str(cause)})
        logger.error("layer host %s lost (%s): layers [%d, %d) restored from local weights; "
                     "their KV is gone", migrated.remote.transport.address, cause,
                     migrated.start, migrated.end)

    def _lose_heads(self, offload: HeadOffload, cause: Exception) -> None:
        self.heads.lose(offload)
        self.invalidating = True
        self._event("host_lost", {"offload": offload.id, "heads": offload.heads,
                                  "layers": offload.layers, "target": offload.target,
                                  "error": str(cause)})
        logger.error("head host %s lost (%s): KV heads %s of layers %s are local again; "
                     "their KV is gone", offload.client.transport.address, cause,
                     offload.heads, offload.layers)

    def _abort_inflight(self, message: str, batch: Any) -> None:
        from sglang.srt.managers.schedule_batch import FINISH_ABORT

        sched = self.scheduler
        reqs = set(sched.collect_inflight_reqs())
        if batch is not None:
            reqs.update(batch.reqs)
        if sched.chunked_req is not None:
            reqs.add(sched.chunked_req)
            sched._pending_chunked_abort_req = sched.chunked_req
        for req in reqs:
            if not req.finished():
                req.to_finish = FINISH_ABORT(message, HTTPStatus.SERVICE_UNAVAILABLE,
                                             "ServiceUnavailable")
                self.num_aborted += 1
        logger.error("aborted %d in-flight requests: %s", len(reqs), message)

    def before_schedule(self) -> bool:
        """Called before every scheduling step. Finishes a pending restore when it can; after
        a host loss, returns False (no new prefill) until every aborted request has released
        its KV, then empties the radix cache once and sizes the pool to its budget."""
        if self.pending_restore or self.pending_recall:
            self.finish_restore()
        if not self.invalidating:
            return True
        sched = self.scheduler
        if sched.chunked_req is not None or any(
                not req.finished() for req in sched.collect_inflight_reqs()):
            return False
        evicted = _evict_cache(sched)
        capacity = self.capacity
        if not self.pending_restore and not self.pending_recall:
            capacity.undrain()
            target = capacity.size_for(self.local_head_layers())
            if target < capacity.size and len(capacity.used_slots()) == 0:
                capacity.resize(target)
        self.invalidating = False
        self._event("flushed", {"evicted_tokens": evicted, "pool_tokens": capacity.size})
        logger.info("KV cache flushed after a lost layer host (%d cached tokens evicted)",
                    evicted)
        return True

    # -- helpers ------------------------------------------------------------------------------
    def used_slots(self) -> torch.Tensor:
        if self.scheduler.token_to_kv_pool_allocator.page_size != 1:
            raise MigrationError(409, "layer migration supports page size 1 only")
        return self.capacity.used_slots()

    def _kv_shapes(self, shapes: tuple[torch.Size, torch.Size]) -> tuple[torch.Size, torch.Size]:
        """A migrated layer's KV buffer shapes at the pool's current size."""
        rows = self.pool.size + self.pool.page_size
        k, v = shapes
        return torch.Size((rows, *k[1:])), torch.Size((rows, *v[1:]))

    def _event(self, kind: str, info: dict[str, Any]) -> None:
        self.events.append({"at": time.time(), "event": kind, **info})


def _evict_cache(scheduler: Any) -> int:
    """Evict every unlocked radix-cache entry; returns the tokens evicted."""
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    tree = scheduler.tree_cache
    evictable = int(tree.evictable_size())
    if evictable:
        tree.evict(EvictParams(num_tokens=evictable))
    return evictable


def _chunks(slots: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [slots[i:i + size] for i in range(0, slots.numel(), size)]


def _module_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _layer_kv_bytes(pool: Any, layer_id: int) -> int:
    li = layer_id - pool.start_layer
    return sum(b.numel() * b.element_size() for b in (pool.k_buffer[li], pool.v_buffer[li]))


def _placeholder(buffer: torch.Tensor) -> torch.Tensor:
    """A buffer of the same shape backed by one zero row: reads see zeros, writes fail."""
    return torch.zeros((1, *buffer.shape[1:]), dtype=buffer.dtype).expand(buffer.shape)


def _fresh_buffers(k_shape: torch.Size, v_shape: torch.Size,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if k_shape == v_shape:  # SGLang's layout: K and V as halves of one allocation
        fused = torch.zeros((2, *k_shape), dtype=dtype)
        return fused[0], fused[1]
    return torch.zeros(k_shape, dtype=dtype), torch.zeros(v_shape, dtype=dtype)
