"""The simulator's cost model: how long a step, a KV transfer or a migration takes.

Who calls what: ``scripts.sim.instance.Instance`` asks ``prefill_s`` / ``decode_s`` for the time
of each scheduler step it runs and ``store_load_s`` for prefix hits in the global KV store;
``scripts.sim.cluster`` asks ``transfer_s`` for prefill-to-decode KV hand-offs and layer
migrations. ``load_profile`` reads a named profile from ``scripts/sim/profiles/<name>.json``;
``fit_profile`` (``python -m scripts.sim profile``) writes one from measurements.

The model (times in seconds, token counts per step)::

    prefill(batch) = p0 + p1 * new_tokens + p2 * sum_i(new_i * context_i)
    decode(batch)  = d0 + d1 * num_seqs + d2 * kv_tokens
    transfer(b)    = b / link_bytes_per_s
    store load     = max(compute, transfer) + min(compute, transfer) / num_layers

The store load is layer-wise pipelined (layer i's KV arrives while layer i-1 computes), so a hit
costs the larger of the two plus one layer of the smaller, not their sum.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

PROFILE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profiles")


class ProfileError(ValueError):
    """A profile that cannot be found or read (one line for the CLI)."""


@dataclass(frozen=True)
class CostModel:
    """Per-step costs of one serving instance (one model replica) on one kind of hardware."""

    name: str
    """Profile name (``llama13b_a100``...)."""
    num_layers: int
    """Decoder layers of the model."""
    prefill_overhead_s: float
    """p0: fixed time of a prefill step (launches, sampling, scheduler work)."""
    prefill_per_token_s: float
    """p1: time per new prompt token (the GEMMs)."""
    prefill_attn_s: float
    """p2: time per (new token x context token) pair of one sequence (attention)."""
    decode_overhead_s: float
    """d0: fixed time of a decode step (on a GPU: reading the weights once)."""
    decode_per_seq_s: float
    """d1: extra time per running sequence in the step."""
    decode_per_kv_token_s: float
    """d2: time per KV token read by the step's attention."""
    kv_bytes_per_token: int
    """KV cache bytes of one token over all layers."""
    layer_weight_bytes: int
    """Weights of one decoder layer (moved by a layer migration)."""
    activation_bytes_per_token: int
    """Hidden-state bytes handed between pipeline halves per token (layer migration)."""
    num_kv_heads: int
    """KV heads per layer (head offload splits these)."""
    link_bytes_per_s: float
    """Instance-to-instance bandwidth: prefill->decode KV transfer, layer migration."""
    store_bytes_per_s: float
    """Bandwidth of loading a prefix from the global KV store."""
    kv_pool_tokens: int
    """KV pool of one instance in tokens (SGLang's ``max_total_num_tokens``)."""
    max_running_requests: int
    """Most requests in one decode batch."""
    chunked_prefill_tokens: int
    """Most new prompt tokens in one prefill step (SGLang's ``chunked_prefill_size``)."""
    overlap_schedule: bool = True
    """SGLang's overlap scheduler on a GPU (``Scheduler.event_loop_overlap``: each iteration
    takes new requests, decides and launches step k+1 without waiting, then processes step k's
    results): a request arriving while step k runs is first run in step k+2 (about 1.5 steps of
    wait on a busy instance instead of 0.5). False where the forward is synchronous (CPU):
    arrivals then join the next step."""
    delivery_lag_steps: int = 0
    """Steps that run, back to back, after a step before its tokens reach the client. On a
    CPU worker the overlap loop runs step k+1 before it processes step k's results, and the
    detokenizer and HTTP server share the worker's one core with the next forward; the profile's
    busy probe measures it. 0 on a GPU (results are processed while the next step runs)."""
    request_overhead_s: float = 0.0
    """Per request, outside the scheduler (HTTP round trip): added to TTFT and end to end."""
    frontend_s: float = 0.0
    """Front-end work per request before it reaches the scheduler (HTTP server, chat template,
    tokenizer): the request waits for it, in FIFO order per instance."""
    frontend_per_token_s: float = 0.0
    """... plus this per prompt token."""
    frontend_shares_core: bool = False
    """The front end runs on the instance's own core (a CPU worker pinned to one core): its
    work delays the scheduler's next step, so a burst of arrivals is tokenized before the
    scheduler looks and is prefilled in one batch. GPU servers have host cores for it."""
    source: str = ""
    """Where the numbers come from."""
    dtype: str = "bfloat16"
    """The dtype the instance serves in (weights and KV): the byte counts above are in it. A
    CPU worker serves float32 on a CPU without native bf16 (``runtime_patches.cpu_dtype``)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("name", "source", "dtype", "overlap_schedule", "frontend_shares_core"):
                continue
            if not isinstance(value, int | float) or value < 0:
                raise ValueError(f"CostModel.{f.name}: must be a number >= 0 (got {value!r})")
        for name in ("num_layers", "kv_pool_tokens", "max_running_requests",
                     "chunked_prefill_tokens", "num_kv_heads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"CostModel.{name}: must be >= 1 (got {getattr(self, name)})")
        for name in ("link_bytes_per_s", "store_bytes_per_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"CostModel.{name}: must be > 0 (got {getattr(self, name)})")

    # -- steps ----------------------------------------------------------------------------------
    def prefill_s(self, new_tokens: Sequence[int], context_tokens: Sequence[int]) -> float:
        """One prefill step: sequence i computes ``new_tokens[i]`` tokens whose attention spans
        ``context_tokens[i]`` tokens (its cached prefix plus the new ones)."""
        total = sum(new_tokens)
        if total == 0:
            return 0.0
        pairs = sum(n * c for n, c in zip(new_tokens, context_tokens, strict=True))
        return (self.prefill_overhead_s + self.prefill_per_token_s * total
                + self.prefill_attn_s * pairs)

    def decode_s(self, num_seqs: int, kv_tokens: int) -> float:
        """One decode step of ``num_seqs`` sequences holding ``kv_tokens`` KV tokens in all."""
        if num_seqs <= 0:
            return 0.0
        return (self.decode_overhead_s + self.decode_per_seq_s * num_seqs
                + self.decode_per_kv_token_s * kv_tokens)

    # -- data movement --------------------------------------------------------------------------
    def kv_bytes(self, tokens: int) -> int:
        return tokens * self.kv_bytes_per_token

    def transfer_s(self, num_bytes: float) -> float:
        """Moving ``num_bytes`` between instances."""
        return num_bytes / self.link_bytes_per_s

    def store_load_s(self, tokens: int, compute_s: float) -> float:
        """A prefill whose ``tokens`` cached tokens come from the global store, layer-wise
        pipelined with ``compute_s`` of compute: extra time beyond ``compute_s``."""
        if tokens <= 0:
            return 0.0
        transfer = self.kv_bytes(tokens) / self.store_bytes_per_s
        total = max(compute_s, transfer) + min(compute_s, transfer) / self.num_layers
        return total - compute_s

    def migration_bytes(self, num_layers: int, kv_tokens: int) -> float:
        """Weights of ``num_layers`` layers plus their share of ``kv_tokens`` tokens' KV."""
        return num_layers * (self.layer_weight_bytes
                             + self.kv_bytes(kv_tokens) / self.num_layers)

    # -- files ----------------------------------------------------------------------------------
    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes: Any) -> CostModel:
        return CostModel(**{**asdict(self), **changes})


def from_dict(data: dict[str, Any], where: str = "profile") -> CostModel:
    known = {f.name for f in fields(CostModel)}
    unknown = sorted(set(data) - known - {"fit"})
    if unknown:
        raise ProfileError(f"{where}: unknown field(s) {', '.join(unknown)}")
    try:
        return CostModel(**{k: v for k, v in data.items() if k in known})
    except TypeError as exc:
        raise ProfileError(f"{where}: {exc}") from None


def profile_path(name: str) -> str:
    return name if name.endswith(".json") else os.path.join(PROFILE_DIR, f"{name}.json")


def profile_names() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(PROFILE_DIR) if f.endswith(".json"))


def load_profile(name: str) -> CostModel:
    """A profile by name (``scripts/sim/profiles/NAME.json``) or by path to a JSON file."""
    path = profile_path(name)
    if not os.path.exists(path):
        raise ProfileError(f"profile {name!r} not found (known: {', '.join(profile_names())})")
    with open(path) as fh:
        try:
            data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ProfileError(f"profile {path}: not JSON ({exc})") from None
    return from_dict(data, path)


def save_profile(model: CostModel, path: str, extra: dict[str, Any] | None = None) -> None:
    with open(path, "w") as fh:
        json.dump({**model.as_dict(), **(extra or {})}, fh, indent=2)
        fh.write("\n")


def _lstsq(rows: list[list[float]], ys: list[float]) -> list[float]:
    """Least squares on relative error (each row weighted by 1 / y), so short prompts and
    small batches, where most requests are, weigh as much as the long probes."""
    import numpy as np

    w = 1.0 / np.maximum(np.abs(np.array(ys)), 1e-6)
    coef, *_ = np.linalg.lstsq(np.array(rows) * w[:, None], np.array(ys) * w, rcond=None)
    return [float(c) for c in coef]


def _served_bytes(base: CostModel, served: dict[str, Any]) -> CostModel:
    from router.placement.costs import DTYPE_BYTES, normalise_dtype

    dtype = str(served["dtype"])
    try:
        new_size = DTYPE_BYTES[normalise_dtype(dtype)]
        old_size = DTYPE_BYTES[normalise_dtype(base.dtype)]
    except ValueError as exc:
        raise ProfileError(f"profile: served dtype {dtype!r} / base dtype {base.dtype!r}: "
                           f"{exc}") from None
    activation = base.activation_bytes_per_token * new_size // old_size
    return base.replace(dtype=dtype, kv_bytes_per_token=int(served["kv_bytes_per_token"]),
                        layer_weight_bytes=int(served["layer_weight_bytes"]),
                        activation_bytes_per_token=activation)


def fit_profile(raw: dict[str, Any], base: CostModel) -> CostModel:
    """``base`` with its step coefficients fitted to ``profile``'s measurements (``raw``).

    Prefill probes are single requests of n tokens: latency = overhead + p0 + p1 n + p2 n^2
    (plus, with ``delivery_lag_steps``, the decode step an idle worker runs before the token
    is handed out).
    Decode probes give step times for (batch, kv tokens). The fit minimises relative error.
    Negative coefficients (noise) are clipped to 0 and the fit redone without that term.
    Where the probes recorded the worker's served dtype and byte counts (``raw["served"]``, from
    its ``/banaserve/status``), those replace ``base``'s: the KV and weight bytes follow the dtype
    the worker actually served, and the hidden-state bytes scale with its element size."""
    served = raw.get("served")
    if served:
        base = _served_bytes(base, served)
    overhead = float(raw["request_overhead_s"])
    rows = [[1.0, float(d["batch"]), float(d["kv_tokens"])] for d in raw["decode"]]
    steps = [float(d["step_s"]) for d in raw["decode"]]
    d0, d1, d2 = _lstsq(rows, steps)
    if d2 < 0:
        d0, d1 = _lstsq([r[:2] for r in rows], steps)
        d2 = 0.0
    if d1 < 0:
        d0, d2 = _lstsq([[r[0], r[2]] for r in rows], steps)
        d1 = 0.0
    xs = [float(p["tokens"]) for p in raw["prefill"]]
    ys = [float(p["latency_s"]) - overhead for p in raw["prefill"]]
    if base.delivery_lag_steps:
        # an idle worker runs one more (decode) step before the token is handed out
        ys = [y - (d0 + d1 + d2 * x) for x, y in zip(xs, ys, strict=True)]
    p0, p1, p2 = _lstsq([[1.0, x, x * x] for x in xs], ys)
    if p2 < 0:
        p0, p1 = _lstsq([[1.0, x] for x in xs], ys)
        p2 = 0.0
    fe0 = fe1 = 0.0
    if raw.get("frontend"):
        xs_fe = [float(f["prompt_tokens"]) for f in raw["frontend"]]
        ys_fe = [max(float(f["frontend_s"]), 1e-4) for f in raw["frontend"]]
        fe0, fe1 = _lstsq([[1.0, x] for x in xs_fe], ys_fe)
        if fe1 < 0:
            fe0, fe1 = sum(ys_fe) / len(ys_fe), 0.0
    return base.replace(prefill_overhead_s=max(p0, 0.0), prefill_per_token_s=max(p1, 0.0),
                        prefill_attn_s=p2, decode_overhead_s=max(d0, 0.0),
                        decode_per_seq_s=d1, decode_per_kv_token_s=max(d2, 0.0),
                        request_overhead_s=overhead, frontend_s=max(fe0, 0.0),
                        frontend_per_token_s=max(fe1, 0.0))
