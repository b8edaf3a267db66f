"""``GET /banaserve/status``: ``StatusReply`` and its parts, as the worker sends them.

Who calls: the worker's ``MigrationManager.status`` builds one (its ranges and offloads come from
``MigratedRange.describe`` and ``HeadOffload.describe``); ``router.rebalance.signals.parse_status``
reads one with ``StatusReply.from_json``. ``RangeInfo`` is also the migrate reply.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from router.rebalance.messages.fields import Fields


@dataclass(frozen=True)
class ForwardStats:
    """The model steps a migrated range has run on its layer host."""

    steps: int = 0
    step_seconds: float = 0.0
    handoff_bytes: int = 0
    """Activation bytes sent to and back from the host."""
    mean_step_ms: float | None = None
    """None before the first step."""

    @classmethod
    def read(cls, f: Fields) -> ForwardStats:
        return cls(f.count("steps", 0), f.number("step_seconds", 0.0),
                   f.count("handoff_bytes", 0), f.opt_number("mean_step_ms"))

    def to_json(self) -> dict[str, Any]:
        return {"steps": self.steps, "step_seconds": self.step_seconds,
                "handoff_bytes": self.handoff_bytes, "mean_step_ms": self.mean_step_ms}


@dataclass(frozen=True)
class AttentionStats:
    """The layer calls a head offload has sent to its head host."""

    layer_calls: int = 0
    bytes_exchanged: int = 0
    wait_seconds: float = 0.0
    """Time the worker waited for the remote half after its own."""

    @classmethod
    def read(cls, f: Fields) -> AttentionStats:
        return cls(f.count("layer_calls", 0), f.count("bytes_exchanged", 0),
                   f.number("wait_seconds", 0.0))

    def to_json(self) -> dict[str, Any]:
        return {"layer_calls": self.layer_calls, "bytes_exchanged": self.bytes_exchanged,
                "wait_seconds": self.wait_seconds}


def forward_of(f: Fields) -> ForwardStats | None:
    return None if f.obj.get("forward") is None else ForwardStats.read(f.obj_of("forward"))


def attention_of(f: Fields) -> AttentionStats | None:
    return None if f.obj.get("attention") is None else AttentionStats.read(f.obj_of("attention"))


def stats_json(part: ForwardStats | AttentionStats | None) -> dict[str, Any] | None:
    return None if part is None else part.to_json()


@dataclass(frozen=True)
class RangeInfo:
    """One migrated range: an entry of the status's ``ranges`` and the migrate reply."""

    layers: tuple[int, int]
    target: str
    address: str | None = None
    """The layer host's host:port."""
    weight_bytes: int = 0
    kv_bytes_moved: int = 0
    kv_bytes_released: int = 0
    migration_seconds: float = 0.0
    """Copy-out until the stand-ins were in; ``grow_seconds`` came on top."""
    grow_seconds: float = 0.0
    migrated_at: float | None = None
    """Wall-clock time (Unix seconds)."""
    forward: ForwardStats | None = None

    @classmethod
    def read(cls, f: Fields) -> RangeInfo:
        return cls(f.span("layers"), f.string("target"), f.opt_string("address"),
                   f.count("weight_bytes", 0), f.count("kv_bytes_moved", 0),
                   f.count("kv_bytes_released", 0), f.number("migration_seconds", 0.0),
                   f.number("grow_seconds", 0.0), f.opt_number("migrated_at"), forward_of(f))

    @classmethod
    def from_json(cls, obj: Any) -> RangeInfo:
        return cls.read(Fields(obj, "migrate_layers reply"))

    def to_json(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "target": self.target, "address": self.address,
                "weight_bytes": self.weight_bytes, "kv_bytes_moved": self.kv_bytes_moved,
                "kv_bytes_released": self.kv_bytes_released,
                "migration_seconds": self.migration_seconds, "grow_seconds": self.grow_seconds,
                "migrated_at": self.migrated_at, "forward": stats_json(self.forward)}


@dataclass(frozen=True)
class OffloadInfo:
    """One head offload: an entry of the status's ``heads.offloads``."""

    offload_id: int
    """``id`` on the wire; ``RecallHeadsRequest`` names it."""
    layer_ids: tuple[int, ...]
    head_ids: tuple[int, ...]
    """KV heads (query heads follow their KV head)."""
    target: str
    address: str | None = None
    kv_bytes_moved: int = 0
    kv_bytes_released: int = 0
    offload_seconds: float = 0.0
    grow_seconds: float = 0.0
    offloaded_at: float | None = None
    attention: AttentionStats | None = None

    @classmethod
    def read(cls, f: Fields) -> OffloadInfo:
        return cls(f.count("id"), f.ints("layers"), f.ints("heads"), f.string("target"),
                   f.opt_string("address"), f.count("kv_bytes_moved", 0),
                   f.count("kv_bytes_released", 0), f.number("offload_seconds", 0.0),
                   f.number("grow_seconds", 0.0), f.opt_number("offloaded_at"), attention_of(f))

    def to_json(self) -> dict[str, Any]:
        return {"id": self.offload_id, "layers": list(self.layer_ids),
                "heads": list(self.head_ids), "target": self.target, "address": self.address,
                "kv_bytes_moved": self.kv_bytes_moved,
                "kv_bytes_released": self.kv_bytes_released,
                "offload_seconds": self.offload_seconds, "grow_seconds": self.grow_seconds,
                "offloaded_at": self.offloaded_at, "attention": stats_json(self.attention)}


@dataclass(frozen=True)
class HeadsInfo:
    """The status's ``heads``: the worker's head counts and its head offloads."""

    num_kv_heads: int = 0
    num_q_heads: int | None = None
    """None: the worker found no attention layer."""
    offloads: tuple[OffloadInfo, ...] = ()

    @classmethod
    def read(cls, f: Fields) -> HeadsInfo:
        return cls(f.count("num_kv_heads", 0), f.opt_count("num_q_heads"),
                   tuple(OffloadInfo.read(item) for item in f.objects("offloads")))

    def to_json(self) -> dict[str, Any]:
        return {"num_kv_heads": self.num_kv_heads, "num_q_heads": self.num_q_heads,
                "offloads": [o.to_json() for o in self.offloads]}


@dataclass(frozen=True)
class ModelInfo:
    """The status's ``model``."""

    layer_weight_bytes: int | None = None
    """Bytes of one local decoder layer's weights (None: not reported)."""
    dtype: str | None = None
    kv_dtype: str | None = None
    dtype_reason: str | None = None
    """Why the CPU engine chose ``dtype`` (None: as configured)."""

    @classmethod
    def read(cls, f: Fields) -> ModelInfo:
        return cls(f.opt_count("layer_weight_bytes"), f.opt_string("dtype"),
                   f.opt_string("kv_dtype"), f.opt_string("dtype_reason"))

    def to_json(self) -> dict[str, Any]:
        return {"layer_weight_bytes": self.layer_weight_bytes, "dtype": self.dtype,
                "kv_dtype": self.kv_dtype, "dtype_reason": self.dtype_reason}


@dataclass(frozen=True)
class KvInfo:
    """The status's ``kv``: the KV pool, which grows as layers or heads leave."""

    pool_tokens: int = 0
    base_pool_tokens: int = 0
    """The pool the worker started with."""
    capacity_tokens: int = 0
    """SGLang's ``max_total_num_tokens`` now."""
    used_tokens: int = 0
    bytes_per_token: int = 0
    """KV bytes of one token over all local layers."""
    bytes_released: int = 0
    draining_to: int | None = None
    """The size a pending restore or recall shrinks the pool to."""

    @classmethod
    def read(cls, f: Fields) -> KvInfo:
        return cls(f.count("pool_tokens", 0), f.count("base_pool_tokens", 0),
                   f.count("capacity_tokens", 0), f.count("used_tokens", 0),
                   f.count("bytes_per_token", 0), f.count("bytes_released", 0),
                   f.opt_count("draining_to"))

    def to_json(self) -> dict[str, Any]:
        return {"pool_tokens": self.pool_tokens, "base_pool_tokens": self.base_pool_tokens,
                "capacity_tokens": self.capacity_tokens, "used_tokens": self.used_tokens,
                "bytes_per_token": self.bytes_per_token, "bytes_released": self.bytes_released,
                "draining_to": self.draining_to}


@dataclass(frozen=True)
class RadixCacheInfo:
    """The status's ``radix_cache``."""

    evictable_tokens: int = 0
    protected_tokens: int = 0

    @classmethod
    def read(cls, f: Fields) -> RadixCacheInfo:
        return cls(f.count("evictable_tokens", 0), f.count("protected_tokens", 0))

    def to_json(self) -> dict[str, Any]:
        return {"evictable_tokens": self.evictable_tokens,
                "protected_tokens": self.protected_tokens}


_EVENT_KEYS = frozenset({"at", "event"})


@dataclass(frozen=True)
class ControlEvent:
    """One of the worker's recent events (``migrate``, ``restore``, ``host_lost``, ...)."""

    at: float
    """Wall-clock time (Unix seconds)."""
    event: str
    info: Mapping[str, Any] = field(default_factory=dict)
    """The event's own fields, free-form (shown to operators, read by no program)."""

    @classmethod
    def read(cls, f: Fields) -> ControlEvent:
        return cls(f.number("at"), f.string("event"), f.rest(_EVENT_KEYS))

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "event": self.event, **self.info}


@dataclass(frozen=True)
class StatusReply:
    """``GET /banaserve/status``. Only ``num_layers`` and ``local_layers`` are required."""

    num_layers: int
    local_layer_ids: tuple[int, ...]
    ranges: tuple[RangeInfo, ...] = ()
    heads: HeadsInfo = HeadsInfo()
    targets: tuple[tuple[str, str], ...] = ()
    """(name, host:port) of the layer hosts this worker may send layers or heads to."""
    layer_host: str | None = None
    """host:port of the layer host beside this worker (where others send theirs)."""
    model: ModelInfo = ModelInfo()
    kv: KvInfo = KvInfo()
    pending_restore: tuple[tuple[int, int], ...] = ()
    pending_recall: tuple[int, ...] = ()
    radix_cache: RadixCacheInfo = RadixCacheInfo()
    invalidating: bool = False
    """KV lost with a host is being flushed out."""
    num_aborted_on_host_loss: int = 0
    events: tuple[ControlEvent, ...] = ()
    cannot_move: str | None = None
    """Why the worker can never migrate or offload (None: it can)."""

    @classmethod
    def from_json(cls, obj: Any) -> StatusReply:
        f = Fields(obj, "status")
        return cls(
            num_layers=f.count("num_layers"), local_layer_ids=f.ints("local_layers"),
            ranges=tuple(RangeInfo.read(item) for item in f.objects("ranges")),
            heads=HeadsInfo.read(f.obj_of("heads")), targets=f.names("targets"),
            layer_host=f.opt_string("layer_host"), model=ModelInfo.read(f.obj_of("model")),
            kv=KvInfo.read(f.obj_of("kv")), pending_restore=f.spans("pending_restore"),
            pending_recall=f.ints("pending_recall", ()),
            radix_cache=RadixCacheInfo.read(f.obj_of("radix_cache")),
            invalidating=f.boolean("invalidating", False),
            num_aborted_on_host_loss=f.count("num_aborted_on_host_loss", 0),
            events=tuple(ControlEvent.read(item) for item in f.objects("events")),
            cannot_move=f.opt_string("cannot_move"))

    def to_json(self) -> dict[str, Any]:
        return {"num_layers": self.num_layers, "local_layers": list(self.local_layer_ids),
                "ranges": [r.to_json() for r in self.ranges], "heads": self.heads.to_json(),
                "targets": dict(self.targets), "layer_host": self.layer_host,
                "model": self.model.to_json(), "kv": self.kv.to_json(),
                "pending_restore": [list(p) for p in self.pending_restore],
                "pending_recall": list(self.pending_recall),
                "radix_cache": self.radix_cache.to_json(), "invalidating": self.invalidating,
                "num_aborted_on_host_loss": self.num_aborted_on_host_loss,
                "events": [e.to_json() for e in self.events], "cannot_move": self.cannot_move}
