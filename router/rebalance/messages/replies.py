"""The answers to the control requests other than migrate (whose answer is ``RangeInfo``).

Who calls: the worker's ``MigrationManager`` builds them and sends ``to_json()`` with the type's
``HTTP_STATUS``; a client reads them with ``from_json`` / ``parse_restore_reply``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from router.rebalance.messages.fields import ControlMessageError, Fields
from router.rebalance.messages.status import (
    AttentionStats,
    ForwardStats,
    OffloadInfo,
    attention_of,
    forward_of,
    stats_json,
)


@dataclass(frozen=True)
class OffloadHeadsReply:
    """The answer to ``offload_heads`` (200): the new offload and the grown pool."""

    offload: OffloadInfo
    pool_tokens: int

    @classmethod
    def from_json(cls, obj: Any) -> OffloadHeadsReply:
        f = Fields(obj, "offload_heads reply")
        return cls(OffloadInfo.read(f), f.count("pool_tokens"))

    def to_json(self) -> dict[str, Any]:
        return {**self.offload.to_json(), "pool_tokens": self.pool_tokens}


@dataclass(frozen=True)
class RestoredRange:
    """One range a restore brought back. With ``error`` its host failed on the way: the layers
    came back from the worker's own weights and the requests in flight were aborted."""

    layers: tuple[int, int]
    target: str | None = None
    kv_bytes_moved: int = 0
    restore_seconds: float = 0.0
    forward: ForwardStats | None = None
    """The range's steps on its host, up to the restore."""
    error: str | None = None

    @classmethod
    def read(cls, f: Fields) -> RestoredRange:
        if f.has("error"):
            return cls(f.span("layers"), error=f.string("error"))
        return cls(f.span("layers"), f.string("target"), f.count("kv_bytes_moved", 0),
                   f.number("restore_seconds", 0.0), forward_of(f))

    def to_json(self) -> dict[str, Any]:
        if self.error is not None:
            return {"layers": list(self.layers), "error": self.error}
        return {"layers": list(self.layers), "target": self.target,
                "kv_bytes_moved": self.kv_bytes_moved, "restore_seconds": self.restore_seconds,
                "forward": stats_json(self.forward)}


@dataclass(frozen=True)
class RecalledOffload:
    """One head offload a recall brought back. With ``error`` its host failed on the way: the
    heads' KV is lost and the requests in flight were aborted."""

    offload_id: int
    layer_ids: tuple[int, ...] = ()
    head_ids: tuple[int, ...] = ()
    target: str | None = None
    kv_bytes_moved: int = 0
    recall_seconds: float = 0.0
    attention: AttentionStats | None = None
    error: str | None = None

    @classmethod
    def read(cls, f: Fields) -> RecalledOffload:
        if f.has("error"):
            return cls(f.count("id"), error=f.string("error"))
        return cls(f.count("id"), f.ints("layers"), f.ints("heads"), f.string("target"),
                   f.count("kv_bytes_moved", 0), f.number("recall_seconds", 0.0),
                   attention_of(f))

    def to_json(self) -> dict[str, Any]:
        if self.error is not None:
            return {"id": self.offload_id, "error": self.error}
        return {"id": self.offload_id, "layers": list(self.layer_ids),
                "heads": list(self.head_ids), "target": self.target,
                "kv_bytes_moved": self.kv_bytes_moved, "recall_seconds": self.recall_seconds,
                "attention": stats_json(self.attention)}


@dataclass(frozen=True)
class RestoreDone:
    """The answer (200) to ``restore_layers`` or ``recall_heads`` once the pool has shrunk and
    everything is back; with nothing to bring back, only the asked-for list, empty."""

    HTTP_STATUS: ClassVar[int] = 200
    restored: tuple[RestoredRange, ...] | None = None
    recalled: tuple[RecalledOffload, ...] | None = None
    pool_tokens: int | None = None
    """The pool after the shrink (None: nothing was brought back)."""

    @classmethod
    def from_json(cls, obj: Any) -> RestoreDone:
        f = Fields(obj, "restore reply")
        if not f.has("restored") and not f.has("recalled"):
            raise ControlMessageError("restore reply: field 'restored' or 'recalled' is required")
        restored = (tuple(RestoredRange.read(item) for item in f.objects("restored"))
                    if f.has("restored") else None)
        recalled = (tuple(RecalledOffload.read(item) for item in f.objects("recalled"))
                    if f.has("recalled") else None)
        return cls(restored, recalled, f.opt_count("pool_tokens"))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.restored is not None:
            out["restored"] = [r.to_json() for r in self.restored]
        if self.recalled is not None:
            out["recalled"] = [r.to_json() for r in self.recalled]
        if self.pool_tokens is not None:
            out["pool_tokens"] = self.pool_tokens
        return out


@dataclass(frozen=True)
class RestorePending:
    """The answer (202) to ``restore_layers`` or ``recall_heads`` while the pool drains: KV is
    still held above the smaller size; the worker finishes by itself (see the status)."""

    HTTP_STATUS: ClassVar[int] = 202
    pending: tuple[tuple[int, int], ...]
    """Ranges waiting to be restored."""
    pending_recall: tuple[int, ...]
    """Offload ids waiting to be recalled."""
    pool_tokens: int
    draining_to: int | None
    slots_held_above: int
    """KV slots still in use above ``draining_to``."""

    @classmethod
    def from_json(cls, obj: Any) -> RestorePending:
        f = Fields(obj, "restore reply")
        return cls(f.spans("pending"), f.ints("pending_recall"), f.count("pool_tokens"),
                   f.opt_count("draining_to"), f.count("slots_held_above"))

    def to_json(self) -> dict[str, Any]:
        return {"pending": [list(p) for p in self.pending],
                "pending_recall": list(self.pending_recall), "pool_tokens": self.pool_tokens,
                "draining_to": self.draining_to, "slots_held_above": self.slots_held_above}


def parse_restore_reply(obj: Any) -> RestoreDone | RestorePending:
    """The answer to ``restore_layers`` or ``recall_heads``: pending when it has ``pending``."""
    if isinstance(obj, dict) and "pending" in obj:
        return RestorePending.from_json(obj)
    return RestoreDone.from_json(obj)
