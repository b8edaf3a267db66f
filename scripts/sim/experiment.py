"""``python -m scripts.sim run CONFIG.yaml``: systems x instance counts x loads, JSON and PNG.

Who calls: the CLI. ``load_config`` parses the YAML into an ``ExperimentConfig`` (one line of
error naming the bad field otherwise); ``run_config`` simulates every (workload, system,
instance count, load) cell with ``Engine``, summarises it like a measured run, computes each
system's output throughput and goodput relative to ``baseline`` and its latencies relative to
``latency_reference`` per cell, writes the JSON and plots it (``scripts.sim.plot``).

Load scales with the instance count: a workload's ``rates_per_instance`` are Poisson request
rates per instance (the trace's lengths and prefix blocks are kept, its arrival times
replaced) and ``requests_per_instance`` requests are sent per instance.

Config (see scripts/sim/configs/paper_llama13b.yaml)::

    profile: llama13b_a100          # scripts/sim/profiles/<name>.json
    instances: [8, 16, 32, 64]
    baseline: vllm_colocated        # throughput ratios are against this system
    latency_reference: distserve_static
    slo: {ttft_ms: 2000, tpot_ms: 200}
    workloads:
      azure_conv: {source: azure_conv, rates_per_instance: [1.0, 2.0], requests_per_instance: 40}
    systems:
      vllm_colocated: {policy: round_robin}
      distserve_static: {policy: load_aware, prefill_fraction: 0.5}
      banaserve: {policy: load_aware, global_store: true, rebalance: {}}
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field, fields
from typing import Any

import yaml
from tqdm import tqdm

from router.batching.config import BatcherConfig
from router.batching.slo_odbs import BatchingConfig, ServiceModel
from router.rebalance.config import RebalanceConfig
from scripts.bench.replay.metrics import SLO
from scripts.bench.replay.workload import WorkloadConfig
from scripts.sim.costs import load_profile
from scripts.sim.engine import ClusterConfig, Engine
from scripts.sim.metrics import summarise_sim
from scripts.sim.placement import HelrSpec, helr_costs
from scripts.sim.workload import from_trace

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass(frozen=True)
class WorkloadSpec:
    """One trace, replayed at several loads."""

    name: str
    """Label in the results."""
    trace: WorkloadConfig
    """Source, lengths, caps (``rate`` and ``num_requests`` are set per cell)."""
    rates_per_instance: tuple[float, ...]
    """Poisson request rates per instance."""
    requests_per_instance: int
    """Requests sent per instance in each cell."""
    slo_s: float = 30.0
    """End-to-end SLO given to each request (router batching only)."""

    def __post_init__(self) -> None:
        if not self.rates_per_instance or min(self.rates_per_instance) <= 0:
            raise ValueError(f"workloads.{self.name}.rates_per_instance: need rates > 0 "
                             f"(got {self.rates_per_instance})")
        if self.requests_per_instance < 1:
            raise ValueError(f"workloads.{self.name}.requests_per_instance: must be >= 1 "
                             f"(got {self.requests_per_instance})")


@dataclass(frozen=True)
class SystemSpec:
    """One serving system: how to build its ``ClusterConfig`` for n instances."""

    name: str
    """Label in the results."""
    policy: str = "load_aware"
    """Router policy spec."""
    prefill_fraction: float = 0.0
    """> 0: static PD split with round(n * this) prefill instances (at least 1)."""
    decode_policy: str | None = None
    """Decode-side policy of a PD split (default: ``policy``)."""
    global_store: bool = False
    """Global KV store on."""
    rebalance: RebalanceConfig | None = None
    """Rebalancer config (None: off)."""
    batching: BatcherConfig | None = None
    """Router-side batching (None: off)."""
    poll_interval_s: float = 0.5
    """Router load-poll interval."""
    helr: HelrSpec | None = None
    """Each instance spreads over several smaller GPUs, placed by the real HELR solver."""

    def __post_init__(self) -> None:
        if not 0 <= self.prefill_fraction < 1:
            raise ValueError(f"systems.{self.name}.prefill_fraction: must be in [0, 1) "
                             f"(got {self.prefill_fraction})")

    def cluster(self, n: int, seed: int) -> ClusterConfig:
        npf = 0
        if self.prefill_fraction > 0:
            npf = min(n - 1, max(1, round(n * self.prefill_fraction)))
        return ClusterConfig(num_instances=n, policy=self.policy, num_prefill=npf,
                             decode_policy=self.decode_policy, global_store=self.global_store,
                             rebalance=self.rebalance, batching=self.batching,
                             poll_interval_s=self.poll_interval_s, seed=seed)


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole comparison."""

    name: str
    profile: str
    """Cost profile name or JSON path."""
    instances: tuple[int, ...]
    """Instance counts."""
    workloads: tuple[WorkloadSpec, ...]
    systems: tuple[SystemSpec, ...]
    baseline: str
    """System the throughput ratios are against."""
    latency_reference: str
    """System the latency ratios are against."""
    slo: SLO = field(default_factory=SLO)
    seed: int = 0
    out: str = "results/sim/experiment.json"

    def __post_init__(self) -> None:
        names = [s.name for s in self.systems]
        for key in ("baseline", "latency_reference"):
            if getattr(self, key) not in names:
                raise ValueError(f"{key}: {getattr(self, key)!r} is not a system ({names})")
        if not self.instances or min(self.instances) < 1:
            raise ValueError(f"instances: need counts >= 1 (got {self.instances})")


def _strict(cls: type, data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {data!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}")
    return data


def _system(name: str, data: dict[str, Any]) -> SystemSpec:
    data = dict(_strict(SystemSpec, data or {}, f"systems.{name}"))
    if "rebalance" in data:
        data["rebalance"] = RebalanceConfig(**_strict(RebalanceConfig, data["rebalance"] or {},
                                                      f"systems.{name}.rebalance"))
    if "helr" in data:
        data["helr"] = HelrSpec(**_strict(HelrSpec, data["helr"] or {}, f"systems.{name}.helr"))
    if "batching" in data:
        b = dict(_strict(BatcherConfig, data["batching"] or {}, f"systems.{name}.batching"))
        if "batching" in b:
            inner = dict(b["batching"])
            if "service" in inner:
                inner["service"] = ServiceModel(**inner["service"])
            b["batching"] = BatchingConfig(**inner)
        data["batching"] = BatcherConfig(**b)
    return SystemSpec(name=name, **data)


def _workload(name: str, data: dict[str, Any]) -> WorkloadSpec:
    data = dict(data or {})
    rates = tuple(float(x) for x in data.pop("rates_per_instance", ()))
    per = int(data.pop("requests_per_instance", 50))
    slo_s = float(data.pop("slo_s", 30.0))
    trace = WorkloadConfig(**_strict(WorkloadConfig, data, f"workloads.{name}"))
    return WorkloadSpec(name, trace, rates, per, slo_s)


def load_config(path: str) -> ExperimentConfig:
    if not os.path.exists(path):
        raise FileNotFoundError(f"config {path} not found")
    with open(path) as fh:
        raw = yaml.safe_load(fh)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top")
    known = {"name", "profile", "instances", "workloads", "systems", "baseline",
             "latency_reference", "slo", "seed", "out"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {', '.join(unknown)}")
    for key in ("profile", "instances", "workloads", "systems", "baseline"):
        if key not in raw:
            raise ValueError(f"{path}: missing field {key!r}")
    return ExperimentConfig(
        name=str(raw.get("name", os.path.basename(path))), profile=str(raw["profile"]),
        instances=tuple(int(x) for x in raw["instances"]),
        workloads=tuple(_workload(k, v) for k, v in raw["workloads"].items()),
        systems=tuple(_system(k, v) for k, v in raw["systems"].items()),
        baseline=str(raw["baseline"]),
        latency_reference=str(raw.get("latency_reference", raw["baseline"])),
        slo=SLO(**(raw.get("slo") or {})), seed=int(raw.get("seed", 0)),
        out=str(raw.get("out", "results/sim/experiment.json")))


def run_cell(cfg: ExperimentConfig, wl: WorkloadSpec, system: SystemSpec, n: int, rate: float,
             scale: float = 1.0) -> dict[str, Any]:
    num = max(1, round(wl.requests_per_instance * n * scale))
    trace = WorkloadConfig(**{**wl.trace.__dict__, "rate": rate * n, "num_requests": num,
                              "seed": cfg.seed})
    requests = from_trace(trace, wl.slo_s)
    costs = load_profile(cfg.profile)
    placement = None
    if system.helr is not None:
        costs, placement = helr_costs(costs, system.helr)
    started = time.perf_counter()
    sim = Engine(system.cluster(n, cfg.seed), costs, requests).run()
    summary = summarise_sim(sim, cfg.slo)
    summary.pop("instances", None)
    return {"workload": wl.name, "system": system.name, "instances": n,
            "rate_per_instance": rate, "rate": rate * n, "requests": num,
            "sim_seconds": round(time.perf_counter() - started, 2),
            "decisions": sim.decisions[:20], "helr": placement, "summary": summary}


def _p(summary: dict[str, Any], key: str, q: str) -> float | None:
    value = (summary.get(key) or {}).get(q)
    return None if value is None else float(value)


def comparisons(cfg: ExperimentConfig, cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per cell: throughput / goodput vs the baseline, latencies vs the latency reference."""
    index = {(c["workload"], c["system"], c["instances"], c["rate_per_instance"]): c
             for c in cells}
    out = []
    for c in cells:
        key = (c["workload"], c["instances"], c["rate_per_instance"])
        base = index.get((key[0], cfg.baseline, key[1], key[2]))
        ref = index.get((key[0], cfg.latency_reference, key[1], key[2]))
        s = c["summary"]
        row: dict[str, Any] = {"workload": key[0], "system": c["system"], "instances": key[1],
                               "rate_per_instance": key[2],
                               "output_tokens_per_s": s.get("output_tokens_per_s"),
                               "goodput_requests_per_s": s.get("goodput_requests_per_s"),
                               "ttft_p50_s": _p(s, "ttft_s", "p50"),
                               "ttft_p90_s": _p(s, "ttft_s", "p90"),
                               "tpot_p50_s": _p(s, "tpot_s", "p50"),
                               "e2e_p50_s": _p(s, "e2e_s", "p50"),
                               "e2e_p90_s": _p(s, "e2e_s", "p90")}
        for name, other, metric in (("throughput_vs_baseline", base, "output_tokens_per_s"),
                                    ("goodput_vs_baseline", base, "goodput_requests_per_s")):
            mine, theirs = s.get(metric), other["summary"].get(metric) if other else None
            row[name] = mine / theirs if mine and theirs else None
        for name, metric, q in (("ttft_p50_vs_reference", "ttft_s", "p50"),
                                ("e2e_p50_vs_reference", "e2e_s", "p50"),
                                ("e2e_p90_vs_reference", "e2e_s", "p90")):
            mine_l = _p(s, metric, q)
            theirs_l = _p(ref["summary"], metric, q) if ref else None
            row[name] = mine_l / theirs_l if mine_l and theirs_l else None
        out.append(row)
    return out


def run_config(args: argparse.Namespace) -> int:
    from scripts.sim.plot import plot

    cfg = load_config(args.config)
    instances = cfg.instances[:1] if args.quick else cfg.instances
    scale = 0.1 if args.quick else 1.0
    cells_todo = [(wl, s, n, r) for wl in cfg.workloads for n in instances
                  for r in wl.rates_per_instance for s in cfg.systems]
    for wl in cfg.workloads:  # fail early, before hours of simulation
        from_trace(WorkloadConfig(**{**wl.trace.__dict__, "num_requests": 1}))
    cells = []
    for wl, s, n, r in tqdm(cells_todo, desc=cfg.name, unit="cell"):
        cells.append(run_cell(cfg, wl, s, n, r, scale))
    out = args.out or os.path.join(ROOT, cfg.out)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    result = {"name": cfg.name, "config": args.config, "profile": load_profile(cfg.profile)
              .as_dict(), "quick": bool(args.quick), "baseline": cfg.baseline,
              "latency_reference": cfg.latency_reference, "cells": cells,
              "comparison": comparisons(cfg, cells)}
    with open(out, "w") as fh:
        json.dump(result, fh, indent=2)
    png = args.plot or os.path.splitext(out)[0] + ".png"
    plot(result, png)
    print(f"run: wrote {out} and {png}")
    return 0
