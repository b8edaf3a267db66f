"""``python -m scripts.sim.report RESULT.json``: a ``run`` result as Markdown tables.

Who calls: people writing up a run (docs/benchmarks.md). One table per workload: per instance
count and load, each system's output throughput and goodput (and their ratios to the baseline),
TTFT p50 / p90 and end-to-end p50 / p90 (and their ratios to the latency reference).
"""

from __future__ import annotations

import json
import sys
from typing import Any


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(result: dict[str, Any]) -> str:
    rows = result["comparison"]
    out = []
    for wl in dict.fromkeys(r["workload"] for r in rows):
        out += [f"**{wl}** (throughput x = vs `{result['baseline']}`, latency x = vs "
                f"`{result['latency_reference']}`)", "",
                "| inst | req/s/inst | system | out tok/s (x) | goodput req/s (x) | "
                "TTFT p50 / p90 s | e2e p50 / p90 s (x p50) |",
                "|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["workload"] != wl:
                continue
            tput = _f(r["output_tokens_per_s"], ",.0f")
            good = _f(r["goodput_requests_per_s"], ".1f")
            out.append(
                f"| {r['instances']} | {r['rate_per_instance']:g} | {r['system']} | "
                f"{tput} ({_f(r['throughput_vs_baseline'], '.2f')}) | "
                f"{good} ({_f(r['goodput_vs_baseline'], '.2f')}) | "
                f"{_f(r['ttft_p50_s'], '.2f')} / {_f(r['ttft_p90_s'], '.2f')} | "
                f"{_f(r['e2e_p50_s'], '.1f')} / {_f(r['e2e_p90_s'], '.1f')} "
                f"({_f(r['e2e_p50_vs_reference'], '.2f')}) |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m scripts.sim.report RESULT.json", file=sys.stderr)
        return 2
    try:
        with open(args[0]) as fh:
            result = json.load(fh)
    except (OSError, ValueError) as exc:
        print(f"scripts.sim.report: {exc}", file=sys.stderr)
        return 2
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
