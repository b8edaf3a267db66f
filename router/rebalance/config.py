"""``--rebalance``: the rebalancing controller's thresholds, windows and timeouts.

The defaults are the suggested ones of the BanaServe decision flow (``shared/notes/papers.md``
section 2.6); ``docs/rebalancer.md`` explains each rule.
"""

from __future__ import annotations

from dataclasses import dataclass


def _check(ok: bool, name: str, value: object, need: str) -> None:
    if not ok:
        raise ValueError(f"RebalanceConfig.{name}: must be {need} (got {value!r})")


@dataclass(frozen=True)
class RebalanceConfig:
    """Everything the rebalancer (``router.rebalance.loop.Rebalancer``) needs."""

    period_s: float = 1.0
    """Seconds between two decision rounds (the window of every streak below)."""
    ewma_alpha: float = 0.3
    """Weight of the newest reading in the smoothed utilisations (1: no smoothing)."""
    compute_gap: float = 0.4
    """Layer migration starts when U_c(hot) - U_c(cold) exceeds this (theta_L)."""
    compute_windows: int = 3
    """... for at least this many consecutive periods."""
    layer_budget_ms: float = 100.0
    """Longest a layer migration may be estimated to take (T_budget); fewer layers are moved if
    the wanted number would take longer, none if even one would."""
    transfer_bytes_per_s: float = 1e9
    """Assumed transfer rate from a worker to a layer host, for the migration-time estimate."""
    overhead_ms: float = 10.0
    """Fixed cost added to every migration-time estimate (RPC round trips, pausing the loop)."""
    max_layer_fraction: float = 0.25
    """At most floor(num_layers * this) of a worker's layers are migrated at once."""
    kv_high: float = 0.85
    """Head offload starts when the hot worker's U_kv exceeds this (theta_M) ..."""
    kv_low: float = 0.6
    """... and some worker that can receive has U_kv below this (theta_C). A head offload is
    recalled once the hot worker's projected U_kv without it stays below this."""
    head_target_util: float = 0.7
    """The KV utilisation a head offload aims for: it offloads rho = (U_kv - this) / U_kv of
    the KV heads."""
    revert_gap: float = 0.1
    """A migrated layer range is restored when |U_c(worker) - U_c(its host's worker)| stays
    below this (theta_R) ..."""
    revert_windows: int = 5
    """... for at least this many consecutive periods (also the recall streak)."""
    cooldown_s: float = 10.0
    """Seconds after an action before either worker it involved is acted on again."""
    status_timeout_s: float = 5.0
    """Timeout of each ``GET /banaserve/status``."""
    action_timeout_s: float = 120.0
    """Timeout of each control ``POST`` (a migration pauses the worker while it copies)."""
    max_recent: int = 50
    """Decisions kept for ``GET /rebalance``."""
    dry_run: bool = False
    """Decide and log, but send no control request (the outcome is ``dry_run``)."""

    def __post_init__(self) -> None:
        _check(self.period_s > 0, "period_s", self.period_s, "> 0")
        _check(0 < self.ewma_alpha <= 1, "ewma_alpha", self.ewma_alpha, "in (0, 1]")
        _check(0 < self.compute_gap <= 1, "compute_gap", self.compute_gap, "in (0, 1]")
        _check(self.compute_windows >= 1, "compute_windows", self.compute_windows, ">= 1")
        _check(self.layer_budget_ms > 0, "layer_budget_ms", self.layer_budget_ms, "> 0")
        _check(self.transfer_bytes_per_s > 0, "transfer_bytes_per_s",
               self.transfer_bytes_per_s, "> 0")
        _check(self.overhead_ms >= 0, "overhead_ms", self.overhead_ms, ">= 0")
        _check(0 < self.max_layer_fraction <= 1, "max_layer_fraction",
               self.max_layer_fraction, "in (0, 1]")
        _check(0 < self.kv_low < self.kv_high <= 1, "kv_low", self.kv_low,
               f"in (0, kv_high={self.kv_high}) with kv_high <= 1")
        _check(0 < self.head_target_util < self.kv_high, "head_target_util",
               self.head_target_util, f"in (0, kv_high={self.kv_high})")
        _check(0 <= self.revert_gap < self.compute_gap, "revert_gap", self.revert_gap,
               f"in [0, compute_gap={self.compute_gap})")
        _check(self.revert_windows >= 1, "revert_windows", self.revert_windows, ">= 1")
        _check(self.cooldown_s >= 0, "cooldown_s", self.cooldown_s, ">= 0")
        _check(self.status_timeout_s > 0, "status_timeout_s", self.status_timeout_s, "> 0")
        _check(self.action_timeout_s > 0, "action_timeout_s", self.action_timeout_s, "> 0")
        _check(self.max_recent >= 1, "max_recent", self.max_recent, ">= 1")
