"""``--rebalance``: the rebalancing controller's thresholds, windows and timeouts.

The defaults are the suggested ones of the BanaServe decision flow (``shared/notes/papers.md``
section 2.6); ``docs/rebalancer.md`` explains each rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from router.cli_fields import Flag, flag


def _check(ok: bool, name: str, value: object, need: str) -> None:
    if not ok:
        raise ValueError(f"RebalanceConfig.{name}: must be {need} (got {value!r})")


def _flag(name: str, help_text: str, metavar: str) -> dict[str, Flag]:
    """``--rebalance-NAME``, its default shown as ``%g``."""
    return flag(f"--rebalance-{name}", f"{help_text} (%(default)g)", metavar=metavar)


@dataclass(frozen=True)
class RebalanceConfig:
    """Everything the rebalancer (``router.rebalance.loop.Rebalancer``) needs."""

    period_s: float = field(default=1.0, metadata=_flag(
        "period", "seconds between decision rounds", "S"))
    """Seconds between two decision rounds (the window of every streak below)."""
    ewma_alpha: float = field(default=0.3, metadata=_flag(
        "ewma-alpha", "weight of the newest reading in the smoothed utilisations", "X"))
    """Weight of the newest reading in the smoothed utilisations (1: no smoothing)."""
    compute_gap: float = field(default=0.4, metadata=_flag(
        "compute-gap", "U_c(hot) - U_c(cold) above which layers move", "X"))
    """Layer migration starts when U_c(hot) - U_c(cold) exceeds this (theta_L)."""
    compute_windows: int = field(default=3, metadata=_flag(
        "compute-windows", "consecutive periods the compute gap must last", "N"))
    """... for at least this many consecutive periods."""
    layer_budget_ms: float = field(default=100.0, metadata=_flag(
        "layer-budget-ms", "longest estimated layer migration; fewer layers are moved to fit",
        "MS"))
    """Longest a layer migration may be estimated to take (T_budget); fewer layers are moved if
    the wanted number would take longer, none if even one would."""
    transfer_bytes_per_s: float = field(default=1e9, metadata=_flag(
        "transfer-bytes-per-s", "assumed worker-to-host transfer rate for the estimate", "S"))
    """Assumed transfer rate from a worker to a layer host, for the migration-time estimate."""
    overhead_ms: float = field(default=10.0, metadata=_flag(
        "overhead-ms", "fixed cost added to every estimate", "MS"))
    """Fixed cost added to every migration-time estimate (RPC round trips, pausing the loop)."""
    max_layer_fraction: float = field(default=0.25, metadata=_flag(
        "max-layer-fraction", "most of a worker's layers migrated at once, as a fraction of all",
        "X"))
    """At most floor(num_layers * this) of a worker's layers are migrated at once."""
    kv_high: float = field(default=0.85, metadata=_flag(
        "kv-high", "U_kv above which a worker offloads heads", "X"))
    """Head offload starts when the hot worker's U_kv exceeds this (theta_M) ..."""
    kv_low: float = field(default=0.6, metadata=_flag(
        "kv-low", "U_kv below which a worker may receive heads; projected U_kv below which heads "
        "are recalled", "X"))
    """... and some worker that can receive has U_kv below this (theta_C). A head offload is
    recalled once the hot worker's projected U_kv without it stays below this."""
    head_target_util: float = field(default=0.7, metadata=_flag(
        "head-target", "U_kv a head offload aims for", "X"))
    """The KV utilisation a head offload aims for: it offloads rho = (U_kv - this) / U_kv of
    the KV heads."""
    revert_gap: float = field(default=0.1, metadata=_flag(
        "revert-gap", "|U_c gap| below which migrated layers come back", "X"))
    """A migrated layer range is restored when |U_c(worker) - U_c(its host's worker)| stays
    below this (theta_R) ..."""
    revert_windows: int = field(default=5, metadata=_flag(
        "revert-windows", "consecutive periods before a restore or recall", "N"))
    """... for at least this many consecutive periods (also the recall streak)."""
    cooldown_s: float = field(default=10.0, metadata=_flag(
        "cooldown", "seconds between two actions on the same worker", "S"))
    """Seconds after an action before either worker it involved is acted on again."""
    status_timeout_s: float = field(default=5.0, metadata=_flag(
        "status-timeout", "timeout of GET /banaserve/status, s", "S"))
    """Timeout of each ``GET /banaserve/status``."""
    action_timeout_s: float = field(default=120.0, metadata=_flag(
        "action-timeout", "timeout of a control POST, s", "S"))
    """Timeout of each control ``POST`` (a migration pauses the worker while it copies)."""
    max_recent: int = 50
    """Decisions kept for ``GET /rebalance``."""
    dry_run: bool = field(default=False, metadata=flag(
        "--rebalance-dry-run", "decide and log, but send no control request"))
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
