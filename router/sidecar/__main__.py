"""``python -m router.sidecar``: UELLM's planners for operators, as a service or one-off commands.

  serve           the HTTP sidecar (POST /v1/plan/placement, /v1/plan/batches,
                  /v1/predict/length; GET /health)
  plan-placement  HELR: layers onto GPUs from the model's config and the cluster's topology,
                  printed as a plan and the SGLang command that runs it (docs/helr.md)
  plan-batches    SLO-ODBS or a baseline on a JSON request list (docs/slo_odbs.md)

Bad input prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from router.batching.slo_odbs import POLICIES, BatchingConfig, Job, form_batches
from router.sidecar.cli_placement import add_placement_arguments, run_placement


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m router.sidecar", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP sidecar")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=30100)
    serve.add_argument("--length-predictor", metavar="PATH",
                       help="a profiler_ft predictor folder for /v1/predict/length and for "
                            "requests without predicted_len in /v1/plan/batches")
    serve.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"])
    placement = sub.add_parser("plan-placement", help="HELR layer placement")
    add_placement_arguments(placement)
    batches = sub.add_parser(
        "plan-batches", help="batch a JSON list of requests",
        description="Read {\"requests\": [{\"id\", \"slo_ms\", \"predicted_len\", "
                    "\"prompt_len\", \"arrival_ms\"}, ...]} (a file or - for stdin) and print "
                    "the batches in the order they should run.")
    batches.add_argument("input", help="JSON file, or - for stdin")
    batches.add_argument("--policy", default="slo-odbs", choices=POLICIES)
    batches.add_argument("--max-batch", type=int, default=BatchingConfig.max_batch)
    batches.add_argument("--now-ms", type=float, default=None,
                         help="the time to plan at (default: the latest arrival)")
    return parser


def _plan_batches(args: argparse.Namespace) -> int:
    try:
        text = sys.stdin.read() if args.input == "-" else open(args.input, encoding="utf-8").read()
        body: Any = json.loads(text)
        items = body["requests"] if isinstance(body, dict) else body
        jobs = [Job(str(r.get("id", i)), float(r.get("arrival_ms", 0)) / 1000.0,
                    float(r["slo_ms"]) / 1000.0, int(r["predicted_len"]),
                    int(r.get("prompt_len", 0))) for i, r in enumerate(items)]
        cfg = BatchingConfig(policy=args.policy, max_batch=args.max_batch)
        now = (args.now_ms / 1000.0 if args.now_ms is not None
               else max((j.arrival_s for j in jobs), default=0.0))
        batches = form_batches(jobs, now, cfg)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        print(f"plan-batches: {detail}", file=sys.stderr)
        return 2
    print(json.dumps({"policy": cfg.policy, "batches": [[j.id for j in b] for b in batches]}))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from router.sidecar.app import create_sidecar_app

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    predictor = None
    if args.length_predictor:
        from profiler_ft.errors import ProfilerError
        from profiler_ft.predictor import LengthPredictor

        try:
            predictor = LengthPredictor.load(args.length_predictor)
        except ProfilerError as exc:
            print(f"sidecar: --length-predictor: {exc}", file=sys.stderr)
            return 2
    web.run_app(create_sidecar_app(predictor), host=args.host, port=args.port,
                access_log=None, print=lambda _: logging.getLogger("router.sidecar").info(
                    "sidecar listening on http://%s:%d (length predictor: %s)", args.host,
                    args.port, args.length_predictor or "none"))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "plan-placement":
        return run_placement(args)
    return _plan_batches(args)


if __name__ == "__main__":
    sys.exit(main())
