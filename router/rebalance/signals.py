"""What the rebalancer knows about each worker: smoothed utilisations and its migration status.

- ``compute_util(load)``: U_c = clamp((running + waiting) / max(1, max_running_requests), 0, 1)
  from the worker's last ``/v1/loads`` (``WorkerPool`` polls it).
- U_kv is the KV demand from the same reading: SGLang's ``num_total_tokens`` (tokens in use plus
  the prompts of waiting requests) over ``max_total_num_tokens``, or ``token_usage`` (used /
  total, cache excluded) where the demand is not reported. SGLang admits a request only when its
  prompt and its reserved output fit, so a worker short of KV memory shows a queue of waiting
  prompts while its ``token_usage`` stays well under 1: the demand sees that, the usage alone
  does not.
- ``Ewma`` smooths both, per worker, once per period.
- ``parse_status`` turns ``GET /banaserve/status`` into a ``WorkerStatus``, the planner's view
  of the typed ``messages.StatusReply``: tolerant of missing optional fields, a ``StatusError``
  (``messages.ControlMessageError``) naming the field for a malformed one.
- ``InstanceSignals`` is one worker's row handed to the planner each period.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from router.policy.views import WorkerLoad
from router.rebalance.messages import ControlMessageError, StatusReply

StatusError = ControlMessageError
"""A ``/banaserve/status`` answer that cannot be understood (the control messages' error)."""


def compute_util(load: WorkerLoad) -> float:
    """U_c: requests running or waiting per running slot, clamped to [0, 1]."""
    busy = load.num_running_reqs + load.num_waiting_reqs
    return min(1.0, max(0.0, busy / max(1, load.max_running_requests)))


def kv_util(load: WorkerLoad) -> float:
    """U_kv: KV demand (tokens in use + waiting prompts) / capacity, clamped to [0, 1]."""
    if load.num_total_tokens and load.max_total_num_tokens:
        demand = load.num_total_tokens / load.max_total_num_tokens
        return min(1.0, max(0.0, demand, load.token_usage))
    return min(1.0, max(0.0, load.token_usage))


def host_key(address: str) -> str:
    """``http://Host:7101/`` and ``host:7101`` compare equal."""
    address = address.strip().lower()
    if "://" in address:
        address = address.split("://", 1)[1]
    return address.rstrip("/")


class Ewma:
    """Per-key exponentially weighted moving average; the first reading is taken as is."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self._values: dict[str, float] = {}

    def update(self, key: str, value: float) -> float:
        old = self._values.get(key)
        new = value if old is None else self.alpha * value + (1 - self.alpha) * old
        self._values[key] = new
        return new

    def retain(self, keys: set[str]) -> None:
        """Forget every key not in ``keys`` (workers that left the pool)."""
        for key in [k for k in self._values if k not in keys]:
            del self._values[key]


@dataclass(frozen=True)
class LayerRange:
    """A migrated range ``[start, end)`` running on layer host ``target``."""

    start: int
    end: int
    target: str

    @property
    def num_layers(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class HeadOffload:
    """KV heads ``head_ids`` of layers ``layer_ids`` attended on layer host ``target``."""

    id: int
    layer_ids: tuple[int, ...]
    head_ids: tuple[int, ...]
    target: str


@dataclass(frozen=True)
class WorkerStatus:
    """What the planner reads of a parsed ``GET /banaserve/status`` (see ``from_reply``)."""

    num_layers: int
    local_layer_ids: tuple[int, ...]
    ranges: tuple[LayerRange, ...] = ()
    targets: tuple[tuple[str, str], ...] = ()
    """(name, address) of the layer hosts this worker may send layers or heads to."""
    layer_host: str | None = None
    """Address of the layer host beside this worker (where others send theirs)."""
    num_kv_heads: int = 0
    num_q_heads: int = 0
    offloads: tuple[HeadOffload, ...] = ()
    pool_tokens: int = 0
    base_pool_tokens: int = 0
    capacity_tokens: int = 0
    bytes_per_token: int = 0
    """KV bytes of one token over all local layers."""
    layer_weight_bytes: int | None = None
    """Bytes of one decoder layer's weights (None: not reported)."""
    pending_restore: tuple[tuple[int, int], ...] = ()
    pending_recall: tuple[int, ...] = ()
    invalidating: bool = False
    cannot_move: str | None = None
    """Why the worker can never migrate or offload (e.g. it runs the hierarchical cache)."""

    @classmethod
    def from_reply(cls, reply: StatusReply) -> WorkerStatus:
        """The planner's view of a worker's status message: ranges by start, offloads by id."""
        ranges = (LayerRange(r.layers[0], r.layers[1], r.target) for r in reply.ranges)
        offloads = (HeadOffload(o.offload_id, o.layer_ids, o.head_ids, o.target)
                    for o in reply.heads.offloads)
        kv = reply.kv
        return cls(
            num_layers=reply.num_layers, local_layer_ids=reply.local_layer_ids,
            ranges=tuple(sorted(ranges, key=lambda r: r.start)),
            targets=tuple(sorted(reply.targets)), layer_host=reply.layer_host or None,
            num_kv_heads=reply.heads.num_kv_heads, num_q_heads=reply.heads.num_q_heads or 0,
            offloads=tuple(sorted(offloads, key=lambda o: o.id)),
            pool_tokens=kv.pool_tokens, base_pool_tokens=kv.base_pool_tokens,
            capacity_tokens=kv.capacity_tokens, bytes_per_token=kv.bytes_per_token,
            layer_weight_bytes=reply.model.layer_weight_bytes,
            pending_restore=reply.pending_restore, pending_recall=reply.pending_recall,
            invalidating=reply.invalidating, cannot_move=reply.cannot_move or None)

    @property
    def busy(self) -> bool:
        """A restore, recall or flush is under way: leave the worker alone."""
        return bool(self.pending_restore or self.pending_recall or self.invalidating)

    @property
    def num_migrated_layers(self) -> int:
        return sum(r.num_layers for r in self.ranges)

    @property
    def num_offloaded_heads(self) -> int:
        """KV heads offloaded, summed over offloads (each covers its listed layers)."""
        return sum(len(o.head_ids) for o in self.offloads)

    @property
    def offloaded_layer_ids(self) -> frozenset[int]:
        return frozenset(i for o in self.offloads for i in o.layer_ids)

    def target_address(self, name: str) -> str | None:
        return next((addr for n, addr in self.targets if n == name), None)

    def target_for(self, address: str | None) -> str | None:
        """The name under which this worker reaches the layer host at ``address``."""
        if address is None:
            return None
        key = host_key(address)
        return next((n for n, addr in self.targets if host_key(addr) == key), None)


@dataclass(frozen=True)
class InstanceSignals:
    """One worker as the planner sees it in one period."""

    url: str
    healthy: bool
    """Passes health checks and is not draining."""
    compute_util: float
    """Smoothed U_c."""
    kv_util: float
    """Smoothed U_kv."""
    raw_compute_util: float = 0.0
    raw_kv_util: float = 0.0
    status: WorkerStatus | None = None
    """None: not read this period (unhealthy, no migration patches, or an error)."""
    status_error: str | None = None
    acting: bool = False
    """A control request to or involving this worker is in flight."""

    @property
    def can_send(self) -> bool:
        """May migrate its layers or offload its heads (its status names no reason it cannot)."""
        return self.status is not None and not self.status.cannot_move

    @property
    def usable(self) -> bool:
        """May be acted on or receive: healthy, status known and idle, no action in flight."""
        return (self.healthy and not self.acting and self.status is not None
                and not self.status.busy)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "url": self.url, "healthy": self.healthy, "acting": self.acting,
            "compute_util": round(self.compute_util, 4), "kv_util": round(self.kv_util, 4),
            "raw_compute_util": round(self.raw_compute_util, 4),
            "raw_kv_util": round(self.raw_kv_util, 4)}
        if self.status_error:
            out["status_error"] = self.status_error
        st = self.status
        if st is not None:
            out.update(
                layer_host=st.layer_host, num_layers=st.num_layers,
                migrated=[{"layers": [r.start, r.end], "target": r.target} for r in st.ranges],
                offloads=[{"id": o.id, "layers": list(o.layer_ids), "heads": list(o.head_ids),
                           "target": o.target} for o in st.offloads],
                busy=st.busy)
        return out


# -- parsing -----------------------------------------------------------------------------------
def parse_status(payload: Any) -> WorkerStatus:
    """A ``WorkerStatus`` from the JSON of ``GET /banaserve/status``; ``StatusError`` if bad.

    ``num_layers`` and ``local_layers`` are required; everything else defaults to "none"
    (``messages.StatusReply.from_json`` checks every field)."""
    return WorkerStatus.from_reply(StatusReply.from_json(payload))
