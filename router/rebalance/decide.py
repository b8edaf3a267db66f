"""The rebalancer's decisions: pure logic, no I/O (``docs/rebalancer.md`` states every rule).

Who calls what: ``router.rebalance.loop.Rebalancer`` builds one ``Planner`` and, once per
period, calls ``Planner.observe(signals, now)`` with every worker's ``InstanceSignals``; it
carries out the returned ``Decision``s (at most one action, plus ``skip`` notes) over HTTP:
each action carries its typed control request (``router.rebalance.messages``). The rules read
only ``Usable`` workers, whose status is known. The planner owns the streak counters,
cooldowns and the record of skips already reported; nobody else mutates them.

Rules, first match wins, one action per period:
1. layers: sustained compute gap between the hottest worker and the coldest one it can send
   to -> restore the cold worker's layers from the hot one's host if it has any there, else
   migrate the hot worker's tail layers (sized by the gap, capped, within the time budget).
2. heads: KV pressure on the hottest worker and a cold peer -> offload its last KV heads.
3. restore: a migrated range whose two workers stay balanced -> restore it.
4. recall: a head offload the worker no longer needs (projected KV use low) -> recall it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from router.rebalance.config import RebalanceConfig
from router.rebalance.messages import (
    REQUEST_TYPES,
    ControlRequest,
    MigrateRequest,
    OffloadHeadsRequest,
    RecallHeadsRequest,
    RestoreRequest,
)
from router.rebalance.signals import InstanceSignals, WorkerStatus, host_key

logger = logging.getLogger(__name__)

KINDS = (*REQUEST_TYPES, "skip")
"""``migrate_layers``, ``restore_layers``, ``offload_heads``, ``recall_heads``, ``skip``."""


@dataclass(frozen=True)
class Decision:
    """One decision: a control request to POST to ``worker``, or a ``skip`` explaining a blocked
    rule."""

    kind: str
    """One of ``KINDS``; the action's path is ``/banaserve/<kind>``, its request's ``KIND``."""
    worker: str
    """URL of the worker the request goes to (for a skip: the worker the rule was about)."""
    reason: str
    """Why, with the numbers behind it."""
    target: str | None = None
    """Layer-host name in ``worker``'s targets (migrate / offload)."""
    peer: str | None = None
    """URL of the other worker involved (whose layer host receives or hosts)."""
    request: ControlRequest | None = None
    """The control request of an action (its type is ``REQUEST_TYPES[kind]``); None for a skip."""
    est_cost_ms: float | None = None
    """Estimated transfer time of the action."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Decision.kind: must be one of {KINDS} (got {self.kind!r})")
        want = REQUEST_TYPES.get(self.kind)
        got = None if self.request is None else type(self.request)
        if got is not want:
            raise ValueError(f"Decision.request: a {self.kind} decision carries "
                             f"{want.__name__ if want else 'no request'} (got "
                             f"{got.__name__ if got else None})")

    @property
    def body(self) -> dict[str, Any]:
        """The JSON body of the control request (``{}`` for a skip)."""
        return {} if self.request is None else self.request.to_json()

    @property
    def is_action(self) -> bool:
        return self.kind != "skip"

    @property
    def path(self) -> str:
        return f"/banaserve/{self.kind}"

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "worker": self.worker, "target": self.target,
                "peer": self.peer, "body": self.body, "reason": self.reason,
                "est_cost_ms": None if self.est_cost_ms is None else round(self.est_cost_ms, 1)}


@dataclass(frozen=True)
class Usable:
    """A worker the rules may act on or send to this period (``InstanceSignals.usable``): every
    rule reads these, so the status is known by construction."""

    url: str
    compute_util: float
    kv_util: float
    status: WorkerStatus

    @classmethod
    def of(cls, signals: list[InstanceSignals]) -> list[Usable]:
        """The usable workers among ``signals``, by URL."""
        return sorted((cls(s.url, s.compute_util, s.kv_util, s.status) for s in signals
                       if s.usable and s.status is not None), key=lambda u: u.url)

    @property
    def can_send(self) -> bool:
        """May migrate its layers or offload its heads (its status names no reason it cannot)."""
        return not self.status.cannot_move


def _receivers(hot: Usable, peers: list[Usable]) -> list[tuple[Usable, str]]:
    """Peers whose layer host ``hot`` can reach, with the target name ``hot`` knows it by."""
    out = []
    for peer in peers:
        name = hot.status.target_for(peer.status.layer_host)
        if name is not None:
            out.append((peer, name))
    return out


class Planner:
    def __init__(self, cfg: RebalanceConfig) -> None:
        self.cfg = cfg
        self._compute: tuple[tuple[str, str], int] | None = None  # (hot, cold) and its streak
        self._revert: dict[tuple[str, int, int], int] = {}  # (worker, start, end) -> streak
        self._recall: dict[str, int] = {}  # worker -> streak
        self._last_action: dict[str, float] = {}
        self._reported: set[str] = set()  # skip keys already logged and still blocking
        self._blocking: set[str] = set()
        self._skips: list[Decision] = []

    # -- helpers ------------------------------------------------------------------------------
    def _skip(self, key: str, worker: str, reason: str, peer: str | None = None) -> None:
        """Report a blocked rule once while it stays blocked."""
        self._blocking.add(key)
        if key not in self._reported:
            self._skips.append(Decision("skip", worker, reason, peer=peer))

    def cooling(self, url: str, now: float) -> bool:
        last = self._last_action.get(url)
        return last is not None and now - last < self.cfg.cooldown_s

    def _ms(self, num_bytes: float) -> float:
        return self.cfg.overhead_ms + 1000.0 * num_bytes / self.cfg.transfer_bytes_per_s

    @staticmethod
    def _kv_bytes_per_layer(s: Usable) -> float:
        """KV bytes of one local layer in use now (moved along with a migrated layer)."""
        st = s.status
        used_tokens = s.kv_util * st.capacity_tokens
        return used_tokens * st.bytes_per_token / max(1, len(st.local_layer_ids))

    # -- the period ---------------------------------------------------------------------------
    def observe(self, signals: list[InstanceSignals], now: float) -> list[Decision]:
        """One period: update streaks, return skips to report and at most one action."""
        self._skips, self._blocking = [], set()
        usable = Usable.of(signals)
        by_host = {host_key(s.status.layer_host): s for s in usable if s.status.layer_host}
        pair = self._update_compute(usable)
        self._update_revert(usable, by_host)
        self._update_recall(usable)
        action = (self._layer_rule(pair, now) or self._head_rule(usable, now)
                  or self._restore_rule(usable, by_host, now) or self._recall_rule(usable, now))
        self._reported = self._blocking
        if action is None:
            return self._skips
        self._last_action[action.worker] = now
        if action.peer is not None:
            self._last_action[action.peer] = now
        return [*self._skips, action]

    # -- streaks ------------------------------------------------------------------------------
    def _update_compute(self, usable: list[Usable],
                        ) -> tuple[Usable, Usable, str, int] | None:
        """The (hot, cold, target name, streak) pair of this period, if its gap is over."""
        cfg = self.cfg
        senders = [s for s in usable if s.can_send]
        if len(usable) < 2 or not senders:
            self._compute = None
            return None
        hot = max(senders, key=lambda s: s.compute_util)
        others = [s for s in usable if s is not hot]
        receivers = _receivers(hot, others)
        reachable = {peer.url for peer, _ in receivers}
        for peer in others:
            if peer.url not in reachable and hot.compute_util - peer.compute_util > cfg.compute_gap:
                self._skip(f"pair:{hot.url}>{peer.url}", hot.url,
                           f"pair {hot.url} -> {peer.url} cannot be used: the layer host beside "
                           f"{peer.url} ({peer.status.layer_host}) is not among {hot.url}'s "
                           "targets", peer.url)
        if not receivers:
            self._compute = None
            return None
        cold, name = min(receivers, key=lambda r: r[0].compute_util)
        if hot.compute_util - cold.compute_util <= cfg.compute_gap:
            self._compute = None
            return None
        key = (hot.url, cold.url)
        streak = self._compute[1] + 1 if self._compute and self._compute[0] == key else 1
        self._compute = (key, streak)
        return hot, cold, name, streak

    def _update_revert(self, usable: list[Usable], by_host: dict[str, Usable]) -> None:
        streaks: dict[tuple[str, int, int], int] = {}
        for s in usable:
            for r in s.status.ranges:
                address = s.status.target_address(r.target)
                peer = by_host.get(host_key(address)) if address else None
                if peer is not None and abs(s.compute_util - peer.compute_util) \
                        < self.cfg.revert_gap:
                    key = (s.url, r.start, r.end)
                    streaks[key] = self._revert.get(key, 0) + 1
        self._revert = streaks

    def projected_kv_util(self, s: InstanceSignals | Usable) -> float:
        """U_kv once every head offload is recalled: the pool shrinks back to its base size
        (U_kv as it is while the status, hence the pool sizes, is unknown)."""
        st = s.status
        if st is None or st.base_pool_tokens <= 0 or st.capacity_tokens <= 0:
            return s.kv_util
        return s.kv_util * st.capacity_tokens / st.base_pool_tokens

    def _update_recall(self, usable: list[Usable]) -> None:
        streaks: dict[str, int] = {}
        for s in usable:
            if s.status.offloads and self.projected_kv_util(s) < self.cfg.kv_low:
                streaks[s.url] = self._recall.get(s.url, 0) + 1
        self._recall = streaks

    # -- rules --------------------------------------------------------------------------------
    def _layer_rule(self, pair: tuple[Usable, Usable, str, int] | None,
                    now: float) -> Decision | None:
        cfg = self.cfg
        if pair is None or pair[3] < cfg.compute_windows:
            return None
        hot, cold, name, streak = pair
        if self.cooling(hot.url, now) or self.cooling(cold.url, now):
            logger.debug("layer rule: %s or %s cooling down", hot.url, cold.url)
            return None
        gap = hot.compute_util - cold.compute_util
        why = (f"compute gap {gap:.2f} (U_c {hot.compute_util:.2f} on {hot.url} vs "
               f"{cold.compute_util:.2f} on {cold.url}) > {cfg.compute_gap} for {streak} periods")
        back = [r for r in cold.status.ranges
                if host_key(cold.status.target_address(r.target) or "")
                == host_key(hot.status.layer_host or "-")]
        if back:  # the cold worker's layers run beside the hot one: take them home first
            r = back[0]
            self._compute = None
            per_layer = (cold.status.layer_weight_bytes or 0) + self._kv_bytes_per_layer(cold)
            return Decision("restore_layers", cold.url,
                            f"{why}; {cold.url}'s layers [{r.start}, {r.end}) run on the layer "
                            f"host beside {hot.url}", peer=hot.url,
                            request=RestoreRequest((r.start, r.end)),
                            est_cost_ms=self._ms(r.num_layers * per_layer))
        plan = self._size_migration(hot, gap)
        if plan is None:
            return None
        start, end, cost, note = plan
        self._compute = None
        return Decision("migrate_layers", hot.url,
                        f"{why}; moving layers [{start}, {end}) to {name} ({note})",
                        target=name, peer=cold.url, request=MigrateRequest((start, end), name),
                        est_cost_ms=cost)

    def _size_migration(self, hot: Usable, gap: float,
                        ) -> tuple[int, int, float, str] | None:
        """(start, end, estimated ms, note) of the tail range to move, or None (skip noted)."""
        cfg, st = self.cfg, hot.status
        key = f"layers:{hot.url}"
        cap = math.floor(st.num_layers * cfg.max_layer_fraction)
        room = cap - st.num_migrated_layers
        if room <= 0:
            self._skip(key, hot.url, f"{hot.url} already has {st.num_migrated_layers} of "
                       f"{st.num_layers} layers migrated (cap {cap} = floor(L * "
                       f"{cfg.max_layer_fraction}))")
            return None
        if st.layer_weight_bytes is None:
            self._skip(key, hot.url, f"{hot.url} does not report model.layer_weight_bytes, so "
                       "a migration's time cannot be estimated")
            return None
        offloaded = st.offloaded_layer_ids
        free = {i for i in st.local_layer_ids if i not in offloaded}
        if not free:
            self._skip(key, hot.url, f"{hot.url} has no local layer free of head offloads")
            return None
        end = max(free) + 1
        run = 1
        while end - run - 1 in free:
            run += 1
        wanted = max(1, math.ceil(st.num_layers * gap / (2 * hot.compute_util)))
        k = min(wanted, room, run)
        per_layer = st.layer_weight_bytes + self._kv_bytes_per_layer(hot)
        per_layer_ms = 1000.0 * per_layer / cfg.transfer_bytes_per_s
        fit = (math.floor((cfg.layer_budget_ms - cfg.overhead_ms) / per_layer_ms)
               if per_layer_ms > 0 else k)
        if fit < 1:
            self._skip(key, hot.url, f"moving even 1 layer of {hot.url} would take about "
                       f"{self._ms(per_layer):.0f} ms > budget {cfg.layer_budget_ms:g} ms")
            return None
        k = min(k, fit)
        note = (f"wanted {wanted} = ceil(L * gap / (2 * U_c)), room {room} under the cap, "
                f"{run} free tail layers, {fit} fit the {cfg.layer_budget_ms:g} ms budget")
        return end - k, end, self._ms(k * per_layer), note

    def _head_rule(self, usable: list[Usable], now: float) -> Decision | None:
        cfg = self.cfg
        senders = [s for s in usable if s.can_send]
        if len(usable) < 2 or not senders:
            return None
        hot = max(senders, key=lambda s: s.kv_util)
        cold_peers = [s for s in usable if s is not hot and s.kv_util < cfg.kv_low]
        if hot.kv_util <= cfg.kv_high or not cold_peers:
            return None
        receivers = _receivers(hot, cold_peers)
        reachable = {peer.url for peer, _ in receivers}
        for peer in cold_peers:
            if peer.url not in reachable:
                self._skip(f"pair:{hot.url}>{peer.url}", hot.url,
                           f"pair {hot.url} -> {peer.url} cannot be used: the layer host beside "
                           f"{peer.url} is not among {hot.url}'s targets", peer.url)
        if not receivers:
            return None
        cold, name = min(receivers, key=lambda r: r[0].kv_util)
        if self.cooling(hot.url, now) or self.cooling(cold.url, now):
            return None
        st = hot.status
        key = f"heads:{hot.url}"
        num_heads = st.num_kv_heads
        if num_heads < 2:
            self._skip(key, hot.url, f"{hot.url} reports {num_heads} KV heads: nothing to split")
            return None
        offloaded = st.offloaded_layer_ids
        layer_ids = [i for i in sorted(st.local_layer_ids) if i not in offloaded]
        if not layer_ids:
            self._skip(key, hot.url, f"every local layer of {hot.url} already has a head offload")
            return None
        rho = (hot.kv_util - cfg.head_target_util) / hot.kv_util
        n = min(num_heads - 1, max(1, round(rho * num_heads)))
        head_ids = list(range(num_heads - n, num_heads))
        moved = self._kv_bytes_per_layer(hot) * len(layer_ids) * n / num_heads
        return Decision(
            "offload_heads", hot.url,
            f"U_kv {hot.kv_util:.2f} on {hot.url} > {cfg.kv_high} and {cold.kv_util:.2f} on "
            f"{cold.url} < {cfg.kv_low}; rho {rho:.2f} -> {n} of {num_heads} KV heads on "
            f"{len(layer_ids)} layers to {name}",
            target=name, peer=cold.url,
            request=OffloadHeadsRequest(tuple(layer_ids), tuple(head_ids), name),
            est_cost_ms=self._ms(moved))

    def _restore_rule(self, usable: list[Usable], by_host: dict[str, Usable],
                      now: float) -> Decision | None:
        cfg = self.cfg
        for s in usable:
            for r in s.status.ranges:  # lowest start first: the most recent migration
                streak = self._revert.get((s.url, r.start, r.end), 0)
                if streak < cfg.revert_windows:
                    continue
                peer = by_host[host_key(s.status.target_address(r.target) or "")]
                if self.cooling(s.url, now) or self.cooling(peer.url, now):
                    continue
                del self._revert[(s.url, r.start, r.end)]
                per_layer = (s.status.layer_weight_bytes or 0) + self._kv_bytes_per_layer(s)
                return Decision(
                    "restore_layers", s.url,
                    f"|U_c {s.compute_util:.2f} - {peer.compute_util:.2f} on {peer.url}| < "
                    f"{cfg.revert_gap} for {streak} periods; layers [{r.start}, {r.end}) come "
                    f"back from {r.target}", target=r.target, peer=peer.url,
                    request=RestoreRequest((r.start, r.end)),
                    est_cost_ms=self._ms(r.num_layers * per_layer))
        return None

    def _recall_rule(self, usable: list[Usable], now: float) -> Decision | None:
        cfg = self.cfg
        for s in usable:
            streak = self._recall.get(s.url, 0)
            if streak < cfg.revert_windows or self.cooling(s.url, now):
                continue
            st = s.status
            offload = st.offloads[-1]  # the newest first
            del self._recall[s.url]
            moved = (self._kv_bytes_per_layer(s) * len(offload.layer_ids)
                     * len(offload.head_ids) / max(1, st.num_kv_heads))
            return Decision(
                "recall_heads", s.url,
                f"projected U_kv without head offloads {self.projected_kv_util(s):.2f} (U_kv "
                f"{s.kv_util:.2f} x capacity {st.capacity_tokens} / base "
                f"{st.base_pool_tokens}) < {cfg.kv_low} for {streak} periods; recalling "
                f"offload {offload.id} from {offload.target}", target=offload.target,
                request=RecallHeadsRequest(offload.id), est_cost_ms=self._ms(moved))
        return None
