"""``python -m scripts.bench``: the benchmark suite's command line.

  python -m scripts.bench run CONFIG.yaml [--url URL] [--out FILE.json]
      replay a trace or dataset against an OpenAI-compatible endpoint, or against clusters
      the config brings up itself (systems:) to compare them (see scripts/bench/replay/run.py
      for the config; examples in scripts/bench/configs/, compare_*.yaml bring up clusters)
  python -m scripts.bench plot RESULT.json [--out FILE.png]
      redraw the plots of a saved result
  python -m scripts.bench table RESULT.json
      a saved result as the markdown table docs/benchmarks.md shows

The single-purpose benchmarks are modules of their own: ``python -m scripts.bench.<name>``
(router_overhead, policies, kvstore_hit, kvstore_e2e, layer_migration, head_offload, ...);
``python -m scripts.bench.agree`` runs SGLang's bench_serving beside the replay tool.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="replay a workload against an endpoint")
    run_p.add_argument("config", help="YAML config (scripts/bench/configs/*.yaml)")
    run_p.add_argument("--url", help="override target.url")
    run_p.add_argument("--out", help="override out (the result JSON; the PNG goes beside it)")
    plot_p = sub.add_parser("plot", help="redraw a saved result's plots")
    plot_p.add_argument("result", help="a result JSON written by run")
    plot_p.add_argument("--out", help="PNG path (default: beside the JSON)")
    table_p = sub.add_parser("table", help="a saved result as a markdown table")
    table_p.add_argument("result", help="a result JSON written by run")
    args = parser.parse_args(argv)
    from scripts.bench.replay import run as replay
    from scripts.bench.replay.workload import WorkloadError

    try:
        if args.command in ("plot", "table"):
            with open(args.result) as fh:
                result = json.load(fh)
            if args.command == "table":
                from scripts.bench.replay.report import markdown_table

                print(markdown_table(result))
                return 0
            out = args.out or os.path.splitext(args.result)[0] + ".png"
            replay.plot(result, out)
            print(out)
            return 0
        cfg = replay.load_config(args.config)
        if args.url and cfg.systems:
            raise ValueError("--url: this config brings up its own clusters (systems)")
        if args.url:
            cfg = dataclasses.replace(cfg, target=dataclasses.replace(cfg.target, url=args.url))
        if args.out:
            cfg = dataclasses.replace(cfg, out=args.out, plot=None)
        result = replay.run(cfg)
        json_path, png = replay.save(cfg, result)
        print(f"wrote {json_path} and {png}")
        return 0 if all(r["summary"]["completed"] for r in result["runs"]) else 1
    except (ValueError, WorkloadError, OSError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
