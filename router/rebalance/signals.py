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
- ``parse_status`` turns ``GET /banaserve/status`` into a typed ``WorkerStatus``: tolerant of
  missing optional fields, a ``StatusError`` naming the field for a malformed one.
- ``InstanceSignals`` is one worker's row handed to the planner each period.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from router.workers import WorkerLoad


class StatusError(ValueError):
    """A ``/banaserve/status`` answer that cannot be understood."""


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
    """A parsed ``GET /banaserve/status``."""

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
def _int(obj: dict[str, Any], key: str, where: str, default: int | None = None) -> int:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0 \
            or int(value) != value:
        raise StatusError(f"status field '{where}{key}': expected a count, got {value!r}")
    return int(value)


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool)
                                              for v in value):
        raise StatusError(f"status field {what!r}: expected a list of integers, got {value!r}")
    return tuple(value)


def _dict(payload: dict[str, Any], key: str) -> dict[str, Any]:
    value = payload.get(key) or {}
    if not isinstance(value, dict):
        raise StatusError(f"status field {key!r}: expected an object, got {value!r}")
    return value


def _pair(value: Any, what: str) -> tuple[int, int]:
    pair = _ints(value, what)
    if len(pair) != 2 or not 0 <= pair[0] < pair[1]:
        raise StatusError(f"status field {what!r}: expected [start, end), got {value!r}")
    return pair[0], pair[1]


def _ranges(payload: dict[str, Any]) -> tuple[LayerRange, ...]:
    out = []
    for item in payload.get("ranges") or []:
        if not isinstance(item, dict) or not isinstance(item.get("target"), str):
            raise StatusError(f"status field 'ranges': bad entry {item!r}")
        start, end = _pair(item.get("layers"), "ranges[].layers")
        out.append(LayerRange(start, end, item["target"]))
    return tuple(sorted(out, key=lambda r: r.start))


def _offloads(heads: dict[str, Any]) -> tuple[HeadOffload, ...]:
    out = []
    for item in heads.get("offloads") or []:
        if not isinstance(item, dict) or not isinstance(item.get("target"), str):
            raise StatusError(f"status field 'heads.offloads': bad entry {item!r}")
        out.append(HeadOffload(_int(item, "id", "heads.offloads[]."),
                               _ints(item.get("layers"), "heads.offloads[].layers"),
                               _ints(item.get("heads"), "heads.offloads[].heads"),
                               item["target"]))
    return tuple(sorted(out, key=lambda o: o.id))


def _targets(payload: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    targets = _dict(payload, "targets")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in targets.items()):
        raise StatusError(f"status field 'targets': expected names to addresses, got {targets!r}")
    return tuple(sorted(targets.items()))


def parse_status(payload: Any) -> WorkerStatus:
    """A ``WorkerStatus`` from the JSON of ``GET /banaserve/status``; ``StatusError`` if bad.

    ``num_layers`` and ``local_layers`` are required; everything else defaults to "none"."""
    if not isinstance(payload, dict):
        raise StatusError(f"status: expected a JSON object, got {type(payload).__name__}")
    if "num_layers" not in payload or "local_layers" not in payload:
        raise StatusError("status: 'num_layers' and 'local_layers' are required")
    heads, kv, model = _dict(payload, "heads"), _dict(payload, "kv"), _dict(payload, "model")
    layer_host = payload.get("layer_host")
    if layer_host is not None and not isinstance(layer_host, str):
        raise StatusError(f"status field 'layer_host': expected host:port, got {layer_host!r}")
    weight = model.get("layer_weight_bytes")
    return WorkerStatus(
        num_layers=_int(payload, "num_layers", ""),
        local_layer_ids=_ints(payload["local_layers"], "local_layers"),
        ranges=_ranges(payload), targets=_targets(payload), layer_host=layer_host or None,
        num_kv_heads=_int(heads, "num_kv_heads", "heads.", 0),
        num_q_heads=_int(heads, "num_q_heads", "heads.", 0),
        offloads=_offloads(heads),
        pool_tokens=_int(kv, "pool_tokens", "kv.", 0),
        base_pool_tokens=_int(kv, "base_pool_tokens", "kv.", 0),
        capacity_tokens=_int(kv, "capacity_tokens", "kv.", 0),
        bytes_per_token=_int(kv, "bytes_per_token", "kv.", 0),
        layer_weight_bytes=None if weight is None else _int(model, "layer_weight_bytes",
                                                            "model."),
        pending_restore=tuple(_pair(p, "pending_restore[]")
                              for p in payload.get("pending_restore") or []),
        pending_recall=_ints(payload.get("pending_recall") or [], "pending_recall"),
        invalidating=bool(payload.get("invalidating", False)),
        cannot_move=str(payload["cannot_move"]) if payload.get("cannot_move") else None)
