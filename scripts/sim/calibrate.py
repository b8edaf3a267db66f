"""``python -m scripts.sim calibrate``: predict a measured CPU run and report the error.

Who calls: the CLI. For each run of each replay-benchmark result JSON it replays the requests
the real run sent (``workload.from_measured``: same send times, same token counts) on a
simulated copy of the measured cluster (``--instances`` colocated instances, the router's
``--policy``, the profile's per-step costs, the router's 0.5 s load polling) and compares the
measured and predicted TTFT p50 and output throughput (``compare``). The profile must come from
``profile`` (isolated probes of one worker), never from the run being predicted, or the check
would be circular.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any

from scripts.bench.replay.metrics import SLO
from scripts.sim.costs import load_profile
from scripts.sim.engine import ClusterConfig, Engine
from scripts.sim.metrics import summarise_sim
from scripts.sim.workload import from_measured

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_MEASURED = os.path.join(ROOT, "results", "bench", "azure_smollm2.json")
METRICS = (("ttft_p50_s", ("ttft_s", "p50")), ("output_tokens_per_s", ("output_tokens_per_s",)))


def _get(summary: dict[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = summary
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return None if value is None else float(value)


def compare(measured: dict[str, Any], predicted: dict[str, Any],
            tolerance: float) -> dict[str, Any]:
    """Per metric: measured, predicted, relative error (predicted / measured - 1) and whether
    it is within ``tolerance``; ``ok`` when every metric is."""
    rows: dict[str, Any] = {}
    ok = True
    for name, path in METRICS:
        m, p = _get(measured, path), _get(predicted, path)
        if m is None or p is None or m == 0:
            rows[name] = {"measured": m, "predicted": p, "error": None, "ok": False}
            ok = False
            continue
        err = p / m - 1.0
        rows[name] = {"measured": m, "predicted": p, "error": err, "ok": abs(err) <= tolerance}
        ok = ok and abs(err) <= tolerance
    return {"metrics": rows, "ok": ok}


def predict_run(run: dict[str, Any], workload: dict[str, Any] | None, cluster: ClusterConfig,
                profile: str, slo: SLO, shared_prefix_tokens: int = 0,
                seeds: int = 1) -> dict[str, Any]:
    """The simulated summary of ``run``; with several seeds (the policy's random tie-breaks and
    the poll phases, both random in the real router too), the compared metrics are the mean
    over seeds and ``per_seed`` lists each seed's."""
    costs = load_profile(profile)
    summaries = []
    for seed in range(seeds):
        requests = from_measured(run, workload, shared_prefix_tokens)
        engine = Engine(dataclasses.replace(cluster, seed=cluster.seed + seed), costs, requests)
        summaries.append(summarise_sim(engine.run(), slo))
    out = dict(summaries[0])
    per_seed: dict[str, list[float | None]] = {}
    for name, path in METRICS:
        values = [_get(s, path) for s in summaries]
        per_seed[name] = values
        known = [v for v in values if v is not None]
        mean = sum(known) / len(known) if known else None
        if path == ("ttft_s", "p50"):
            out["ttft_s"] = {**out["ttft_s"], "p50": mean}
        else:
            out[path[0]] = mean
    out["per_seed"] = per_seed
    return out


def _load(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"measured result {path} not found")
    with open(path) as fh:
        data: dict[str, Any] = json.load(fh)
    if not data.get("runs"):
        raise ValueError(f"{path}: no 'runs' (not a replay-benchmark result)")
    return data


def calibrate_file(path: str, cluster: ClusterConfig, profile: str, tolerance: float,
                   only: set[int] | None = None, shared_prefix_tokens: int = 0,
                   seeds: int = 1) -> list[dict[str, Any]]:
    data = _load(path)
    cfg = data.get("config") or {}
    slo_cfg = cfg.get("slo") or {}
    slo = SLO(**slo_cfg) if slo_cfg else SLO()
    rows = []
    for i, run in enumerate(data["runs"]):
        if only is not None and i not in only:
            continue
        predicted = predict_run(run, cfg.get("workload"), cluster, profile, slo,
                                shared_prefix_tokens, seeds)
        result = compare(run["summary"], predicted, tolerance)
        rows.append({"file": os.path.relpath(path, ROOT), "run": i, "label": run.get("label"),
                     **result, "predicted_summary": {
                         k: predicted.get(k) for k in ("wall_s", "output_tokens_per_s",
                                                       "ttft_s", "tpot_s", "e2e_s", "per_seed")},
                     "measured_tpot_s": run["summary"].get("tpot_s")})
    return rows


def render(rows: list[dict[str, Any]], tolerance: float) -> str:
    lines = [f"{'file':<34} {'run':<14} {'metric':<20} {'measured':>9} {'predicted':>9} "
             f"{'error':>7}  within {tolerance:.0%}"]
    for row in rows:
        for name, m in row["metrics"].items():
            err = "n/a" if m["error"] is None else f"{m['error']:+.1%}"
            meas = "n/a" if m["measured"] is None else f"{m['measured']:.3f}"
            pred = "n/a" if m["predicted"] is None else f"{m['predicted']:.3f}"
            lines.append(f"{row['file']:<34} {str(row['label']):<14} {name:<20} {meas:>9} "
                         f"{pred:>9} {err:>7}  {'yes' if m['ok'] else 'NO'}")
    return "\n".join(lines)


def run_calibration(args: argparse.Namespace) -> int:
    cluster = ClusterConfig(num_instances=args.instances, policy=args.policy)
    only = {int(x) for x in args.runs.split(",")} if args.runs else None
    rows = []
    for path in args.measured or [DEFAULT_MEASURED]:
        rows += calibrate_file(path, cluster, args.profile, args.tolerance, only,
                               args.shared_prefix_tokens, args.seeds)
    print(render(rows, args.tolerance))
    ok = all(r["ok"] for r in rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"profile": load_profile(args.profile).as_dict(), "tolerance": args.tolerance,
                   "cluster": {"instances": args.instances, "policy": args.policy,
                               "shared_prefix_tokens": args.shared_prefix_tokens,
                               "seeds": args.seeds},
                   "rows": rows, "ok": ok}, fh, indent=2)
    print(f"calibrate: {'OK' if ok else 'OUTSIDE TOLERANCE'}; wrote {args.out}")
    return 0 if ok else 1
