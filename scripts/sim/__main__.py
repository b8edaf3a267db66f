"""``python -m scripts.sim``: run, calibrate and profile the cluster simulator.

  run CONFIG.yaml         systems x instance counts x rates from a config; JSON + PNG out
  calibrate               replay a measured CPU run (results/bench/*.json) in simulation and
                          compare TTFT p50 and throughput (non-zero exit outside the tolerance)
  profile                 measure a real SGLang worker (--url, or --launch smollm2) and fit a
                          cost-model profile JSON

Errors caused by input (a missing file, a bad config field) end with one line on stderr and
exit code 2; a calibration outside its tolerance exits 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from scripts.sim.costs import PROFILE_DIR, ProfileError, load_profile, profile_path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _add_run(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("run", help="run a comparison config (systems x instances x rates)",
                       description="Run every system of CONFIG at every instance count and "
                       "load; write the results JSON and a PNG (see scripts/sim/configs/).")
    p.add_argument("config", help="YAML config (e.g. scripts/sim/configs/paper_llama13b.yaml)")
    p.add_argument("--out", help="results JSON (default: the config's 'out')")
    p.add_argument("--plot", help="PNG (default: the JSON path with .png)")
    p.add_argument("--quick", action="store_true",
                   help="only the smallest instance count and a tenth of the requests (smoke test)")


def _add_calibrate(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("calibrate", help="predict a measured CPU run and report the error",
                       description="Replay the measured requests of a replay-benchmark JSON on "
                       "a simulated copy of its cluster; print measured vs predicted TTFT p50 "
                       "and output throughput per run; exit 1 if any error is over --tolerance.")
    p.add_argument("--measured", action="append",
                   help="replay-benchmark result JSON (repeatable; default: "
                        "results/bench/azure_smollm2.json)")
    p.add_argument("--profile", default="cpu_smollm2", help="cost profile (default cpu_smollm2)")
    p.add_argument("--instances", type=int, default=2, help="workers of the measured cluster")
    p.add_argument("--policy", default="load_aware", help="router policy of the measured run")
    p.add_argument("--tolerance", type=float, default=0.15, help="allowed relative error")
    p.add_argument("--runs", help="comma-separated run indexes to check (default: all)")
    p.add_argument("--seeds", type=int, default=10,
                   help="simulate each run with this many seeds (policy tie-breaks, poll "
                        "phases) and compare the mean (default 10)")
    p.add_argument("--shared-prefix-tokens", type=int, default=24,
                   help="leading tokens every chat request shares, cached by SGLang's radix "
                        "tree after the first request (SmolLM2's chat template: system prompt "
                        "+ user header = 24 tokens; 0 to ignore)")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "sim", "calibrate.json"))


def _add_profile(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("profile", help="measure a real SGLang worker and fit a cost profile",
                       description="Probe prefill latency vs prompt length and decode step "
                       "time vs batch size and KV length, fit the cost model, write a profile "
                       "JSON. Start the worker yourself (--url) or let this start one "
                       "(--launch smollm2, pinned to --cpus). On a shared machine wrap it in "
                       "flock.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", help="a running worker, e.g. http://127.0.0.1:31000")
    where.add_argument("--launch", help="start a CPU worker for this model (smollm2 or a folder)")
    p.add_argument("--cpus", default="0", help="cores of the launched worker (default 0)")
    p.add_argument("--base", default="cpu_smollm2",
                   help="profile whose non-fitted fields (pool, layers, bytes) are kept")
    p.add_argument("--name", help="name of the new profile (default: the base's)")
    p.add_argument("--out", help="profile JSON (default scripts/sim/profiles/NAME.json)")
    p.add_argument("--reps", type=int, default=3, help="repetitions per probe")
    p.add_argument("--refit", action="store_true",
                   help="no probes: refit the base profile from the raw probes it stores")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m scripts.sim", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = top.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_calibrate(sub)
    _add_profile(sub)
    return top


def cmd_profile(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from scripts.sim.costs import fit_profile, save_profile
    from scripts.sim.profile import ProfilePlan, measure, num_probes

    base = load_profile(args.base)
    if args.refit:
        with open(profile_path(args.base)) as fh:
            raw = json.load(fh).get("fit")
        if not raw:
            raise ValueError(f"profile {args.base}: no raw probes ('fit') to refit from")
        fitted = fit_profile(raw, base)
        out = args.out or profile_path(args.base)
        save_profile(fitted, out, {"fit": raw})
        print(f"profile: refitted {out}")
        return 0
    if not (args.url or args.launch):
        raise ValueError("profile: give --url or --launch (or --refit)")
    plan = ProfilePlan(reps=args.reps)
    worker = None
    url = args.url
    if args.launch:
        from runtime_patches.launch import WorkerConfig, WorkerProcess
        from runtime_patches.models import resolve
        from scripts.bench.procs import free_port

        path, served = resolve(args.launch)
        worker = WorkerProcess(WorkerConfig(
            model_path=path, port=free_port(), served_model_name=served, device="cpu",
            cpus=args.cpus, max_total_tokens=base.kv_pool_tokens,
            max_running_requests=base.max_running_requests),
            log_path=os.path.join(ROOT, "logs", "sim", "profile-worker.log"))
        worker.start()
        worker.wait_ready()
        url = worker.url
    try:
        with tqdm(total=num_probes(plan), desc="profile", unit="probe") as bar:
            raw = measure(url, plan, bar)
    finally:
        if worker is not None:
            worker.stop()
    fitted = fit_profile(raw, base)
    name = args.name or base.name
    what = f"a launched {args.launch} worker on cores {args.cpus}" if args.launch else url
    fitted = fitted.replace(name=name, source=(
        f"fitted by `python -m scripts.sim profile` from {what}; raw probes under 'fit'"))
    out = args.out or os.path.join(PROFILE_DIR, f"{name}.json")
    save_profile(fitted, out, {"fit": raw})
    coeffs = {k: v for k, v in fitted.as_dict().items()
              if k.startswith(("prefill_", "decode_", "request_"))}
    print(json.dumps(coeffs, indent=2))
    print(f"profile: wrote {out}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from scripts.sim.calibrate import run_calibration

    return run_calibration(args)


def cmd_run(args: argparse.Namespace) -> int:
    from scripts.sim.experiment import run_config

    return run_config(args)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    handlers = {"run": cmd_run, "calibrate": cmd_calibrate, "profile": cmd_profile}
    try:
        return handlers[args.command](args)
    except (ProfileError, ValueError, FileNotFoundError) as exc:  # incl. HELR's InfeasibleError
        print(f"scripts.sim {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
