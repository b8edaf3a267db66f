"""The REAL rebalancer's planner driven by simulated instances, and its decisions applied.

Who calls what: ``scripts.sim.engine.Engine`` calls ``SimRebalancer.period(now, loads)`` every
``RebalanceConfig.period_s`` with the router's last polled ``WorkerLoad`` of every instance.
Like ``router.rebalance.loop.Rebalancer._read``, it smooths U_c and U_kv with the real ``Ewma``,
builds each instance's ``GET /banaserve/status`` answer from its simulated state and parses it
with the real ``parse_status``, asks the real ``Planner.observe`` for decisions and applies each
action to the simulation:
- ``migrate_layers`` k of L layers hot -> peer: the hot instance computes (L-k)/L of each step
  plus the activation hand-off; the peer computes k/L of the hot's step (``Instance.helpers``);
- ``offload_heads`` n of H KV heads on m of L layers (share s = n/H * m/L): the hot's KV pool
  grows to base / (1 - s) and s of its decode attention runs on the peer, whose pool shrinks by
  the tokens it now hosts (never below half its base pool or what it has reserved);
- ``restore_layers`` / ``recall_heads`` undo them.
Every action pauses the instance it is sent to for (weights + KV bytes) / link bandwidth, and
both instances count as acting (left out of decisions) until it ends, as in the real loop.
This module owns the smoothed signals, the in-flight actions and the record of decisions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from router.policy.views import WorkerLoad
from router.rebalance.config import RebalanceConfig
from router.rebalance.decide import Decision, Planner
from router.rebalance.signals import Ewma, InstanceSignals, compute_util, kv_util, parse_status
from scripts.sim.instance import Instance


@dataclass
class _Layout:
    """What has been moved off one instance."""

    ranges: list[tuple[int, int, int]] = field(default_factory=list)
    """(start, end, peer index) of migrated layer ranges."""
    offloads: list[tuple[int, list[int], list[int], int, int]] = field(default_factory=list)
    """(id, layer ids, head ids, peer index, tokens hosted by the peer)."""


def _name(index: int) -> str:
    return f"w{index}"


def _host(index: int) -> str:
    return f"sim-{index}:lh"


class SimRebalancer:
    def __init__(self, cfg: RebalanceConfig, instances: list[Instance]) -> None:
        self.cfg = cfg
        self.instances = instances
        self.planner = Planner(cfg)
        self._compute = Ewma(cfg.ewma_alpha)
        self._kv = Ewma(cfg.ewma_alpha)
        self.layouts = [_Layout() for _ in instances]
        self.acting_until = [0.0] * len(instances)
        self.decisions: list[dict[str, Any]] = []
        self._next_offload = 1

    # -- reading --------------------------------------------------------------------------------
    def status(self, i: int) -> dict[str, Any]:
        inst, lay = self.instances[i], self.layouts[i]
        n = inst.costs.num_layers
        moved = {x for s, e, _ in lay.ranges for x in range(s, e)}
        local = [x for x in range(n) if x not in moved]
        return {
            "num_layers": n, "local_layers": local,
            "ranges": [{"layers": [s, e], "target": _name(p)} for s, e, p in lay.ranges],
            "targets": {_name(j): _host(j) for j in range(len(self.instances)) if j != i},
            "layer_host": _host(i),
            "heads": {"num_kv_heads": inst.costs.num_kv_heads,
                      "num_q_heads": inst.costs.num_kv_heads,
                      "offloads": [{"id": o, "layers": ls, "heads": hs, "target": _name(p)}
                                   for o, ls, hs, p, _ in lay.offloads]},
            "kv": {"pool_tokens": inst.pool_tokens, "base_pool_tokens": inst.costs.kv_pool_tokens,
                   "capacity_tokens": inst.pool_tokens,
                   "bytes_per_token": inst.costs.kv_bytes_per_token * len(local) // n},
            "model": {"layer_weight_bytes": inst.costs.layer_weight_bytes}}

    def signals(self, now: float, loads: list[WorkerLoad]) -> list[InstanceSignals]:
        out = []
        for i, load in enumerate(loads):
            if not load.at:
                continue
            url = self.instances[i].url
            acting = now < self.acting_until[i]
            raw_c, raw_kv = compute_util(load), kv_util(load)
            out.append(InstanceSignals(
                url=url, healthy=True, compute_util=self._compute.update(url, raw_c),
                kv_util=self._kv.update(url, raw_kv), raw_compute_util=raw_c,
                raw_kv_util=raw_kv, status=None if acting else parse_status(self.status(i)),
                acting=acting))
        return out

    # -- the period -----------------------------------------------------------------------------
    def period(self, now: float, loads: list[WorkerLoad]) -> list[Decision]:
        decisions = self.planner.observe(self.signals(now, loads), now)
        for d in decisions:
            if d.is_action:
                self.apply(d, now)
        return decisions

    def _index(self, url: str | None) -> int:
        assert url is not None
        return int(url.rsplit("-", 1)[1])

    def _pause(self, worker: int, peer: int, num_bytes: float, now: float) -> float:
        inst = self.instances[worker]
        seconds = self.cfg.overhead_ms / 1000.0 + inst.costs.transfer_s(num_bytes)
        inst.add_work(now, seconds)
        for i in (worker, peer):
            self.acting_until[i] = max(self.acting_until[i], now + seconds)
        return seconds

    def apply(self, d: Decision, now: float) -> None:
        i = self._index(d.worker)
        inst, lay = self.instances[i], self.layouts[i]
        n = inst.costs.num_layers
        if d.kind == "migrate_layers":
            start, end = d.body["layers"]
            peer = int(d.body["target"][1:])
            lay.ranges.append((start, end, peer))
            share = (end - start) / n
            inst.local_fraction -= share
            inst.helpers[peer] = inst.helpers.get(peer, 0.0) + share
            cost = inst.costs.migration_bytes(end - start, inst.kv_used())
        elif d.kind == "restore_layers":
            start, end = d.body["layers"]
            rng = next(r for r in lay.ranges if r[0] == start and r[1] == end)
            lay.ranges.remove(rng)
            peer, share = rng[2], (end - start) / n
            inst.local_fraction += share
            inst.helpers[peer] -= share
            if inst.helpers[peer] <= 1e-9:
                del inst.helpers[peer]
            cost = inst.costs.migration_bytes(end - start, inst.kv_used())
        elif d.kind == "offload_heads":
            peer = int(d.body["target"][1:])
            layers, heads = list(d.body["layers"]), list(d.body["heads"])
            share = len(heads) / inst.costs.num_kv_heads * len(layers) / n
            inst.attn_fraction -= share
            inst.pool_tokens = int(inst.costs.kv_pool_tokens / max(inst.attn_fraction, 0.05))
            other = self.instances[peer]
            # the peer hosts the offloaded heads' KV of the hot pool, as far as it has room
            room = other.pool_tokens - max(other.reserved_tokens, other.costs.kv_pool_tokens // 2)
            hosted = max(0, min(int(inst.pool_tokens * share), room))
            other.pool_tokens -= hosted
            lay.offloads.append((self._next_offload, layers, heads, peer, hosted))
            self._next_offload += 1
            cost = inst.costs.kv_bytes(inst.kv_used()) * share
        elif d.kind == "recall_heads":
            off = next(o for o in lay.offloads if o[0] == d.body["id"])
            lay.offloads.remove(off)
            _, layers, heads, peer, hosted = off
            share = len(heads) / inst.costs.num_kv_heads * len(layers) / n
            inst.attn_fraction += share
            inst.pool_tokens = max(inst.reserved_tokens,
                                   int(inst.costs.kv_pool_tokens / max(inst.attn_fraction, 0.05)))
            self.instances[peer].pool_tokens += hosted
            cost = inst.costs.kv_bytes(inst.kv_used()) * share
        else:
            return
        seconds = self._pause(i, peer, cost, now)
        self.decisions.append({"t": round(now, 3), "kind": d.kind, "worker": i, "peer": peer,
                               "body": d.body, "pause_s": round(seconds, 4)})

    def attention_helpers(self, i: int) -> dict[int, float]:
        """Peer -> share of instance i's decode attention it computes (head offloads)."""
        out: dict[int, float] = {}
        inst = self.instances[i]
        for _, layers, heads, peer, _ in self.layouts[i].offloads:
            share = len(heads) / inst.costs.num_kv_heads * len(layers) / inst.costs.num_layers
            out[peer] = out.get(peer, 0.0) + share
        return out
