"""The control requests the rebalancer POSTs to a worker, one type per route.

Who calls: ``router.rebalance.decide.Planner`` builds them (inside a ``Decision``),
``router.rebalance.loop.Rebalancer`` sends ``to_json()``, and the worker's
``MigrationManager.handle`` reads them with ``from_json`` (strict: an unknown field is an error).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from router.rebalance.messages.fields import (
    ControlMessageError,
    Fields,
    check_ids,
    check_span,
    check_target,
)


@dataclass(frozen=True)
class MigrateRequest:
    """``POST /banaserve/migrate_layers``: run layers ``[start, end)`` on layer host ``target``."""

    KIND: ClassVar[str] = "migrate_layers"
    layers: tuple[int, int]
    """``(start, end)``, end exclusive."""
    target: str
    """A layer-host name in the worker's ``targets``."""

    def __post_init__(self) -> None:  # a request built in code is checked as a parsed one
        object.__setattr__(self, "layers", check_span(self.KIND, "layers", self.layers))
        check_target(self.KIND, self.target)

    @classmethod
    def from_json(cls, obj: Any) -> MigrateRequest:
        f = Fields(obj, cls.KIND, known=frozenset({"layers", "target"}))
        return cls(f.span("layers"), check_target(cls.KIND, f.obj.get("target")))

    def to_json(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "target": self.target}


@dataclass(frozen=True)
class RestoreRequest:
    """``POST /banaserve/restore_layers``: bring one migrated range back, or every range."""

    KIND: ClassVar[str] = "restore_layers"
    layers: tuple[int, int] | None = None
    """The range exactly as migrated; None: every range."""

    def __post_init__(self) -> None:
        if self.layers is not None:
            object.__setattr__(self, "layers", check_span(self.KIND, "layers", self.layers))

    @classmethod
    def from_json(cls, obj: Any) -> RestoreRequest:
        f = Fields(obj, cls.KIND, known=frozenset({"layers"}))
        return cls(f.span("layers") if f.has("layers") else None)

    def to_json(self) -> dict[str, Any]:
        return {} if self.layers is None else {"layers": list(self.layers)}


@dataclass(frozen=True)
class OffloadHeadsRequest:
    """``POST /banaserve/offload_heads``: attend KV heads ``head_ids`` of ``layer_ids`` on
    layer host ``target`` (query heads follow their KV head)."""

    KIND: ClassVar[str] = "offload_heads"
    layer_ids: tuple[int, ...]
    head_ids: tuple[int, ...]
    target: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_ids", check_ids(self.KIND, "layers", self.layer_ids))
        object.__setattr__(self, "head_ids", check_ids(self.KIND, "heads", self.head_ids))
        check_target(self.KIND, self.target)

    @classmethod
    def from_json(cls, obj: Any) -> OffloadHeadsRequest:
        f = Fields(obj, cls.KIND, known=frozenset({"layers", "heads", "target"}))
        return cls(f.id_list("layers"), f.id_list("heads"),
                   check_target(cls.KIND, f.obj.get("target")))

    def to_json(self) -> dict[str, Any]:
        return {"layers": list(self.layer_ids), "heads": list(self.head_ids),
                "target": self.target}


@dataclass(frozen=True)
class RecallHeadsRequest:
    """``POST /banaserve/recall_heads``: bring one head offload back, or every offload."""

    KIND: ClassVar[str] = "recall_heads"
    offload_id: int | None = None
    """The offload's ``id`` in the status; None: every offload."""

    @classmethod
    def from_json(cls, obj: Any) -> RecallHeadsRequest:
        f = Fields(obj, cls.KIND, known=frozenset({"id"}))
        return cls(f.integer("id") if f.has("id") else None)

    def to_json(self) -> dict[str, Any]:
        return {} if self.offload_id is None else {"id": self.offload_id}


ControlRequest = MigrateRequest | RestoreRequest | OffloadHeadsRequest | RecallHeadsRequest
REQUEST_TYPES: dict[str, type[ControlRequest]] = {
    cls.KIND: cls for cls in (MigrateRequest, RestoreRequest, OffloadHeadsRequest,
                              RecallHeadsRequest)}
"""Each request type by its ``KIND``, the last part of its path ``/banaserve/<KIND>``."""


def parse_request(kind: str, obj: Any) -> ControlRequest:
    """The request of ``kind`` (a ``REQUEST_TYPES`` key) in ``obj``."""
    cls = REQUEST_TYPES.get(kind)
    if cls is None:
        raise ControlMessageError(f"unknown control request kind {kind!r}; expected one of "
                                  f"{sorted(REQUEST_TYPES)}")
    return cls.from_json(obj)


