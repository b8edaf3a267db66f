"""The paper-comparison figure of a ``run`` result (matplotlib, Agg backend).

Who calls: ``scripts.sim.experiment.run_config`` after writing the JSON. One column per
workload; top row: output throughput vs instance count at the highest load, one line per system;
bottom row: TTFT p50 vs instance count at the lowest load (log scale).
"""

from __future__ import annotations

from typing import Any


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["comparison"]
    workloads = sorted({r["workload"] for r in rows})
    systems = list(dict.fromkeys(r["system"] for r in rows))
    fig, axes = plt.subplots(2, len(workloads), figsize=(5.5 * len(workloads), 7.5),
                             squeeze=False)
    for col, wl in enumerate(workloads):
        mine = [r for r in rows if r["workload"] == wl]
        high = max(r["rate_per_instance"] for r in mine)
        low = min(r["rate_per_instance"] for r in mine)
        for system in systems:
            for row_i, (rate, key, label) in enumerate((
                    (high, "output_tokens_per_s", "output tokens/s"),
                    (low, "ttft_p50_s", "TTFT p50 (s)"))):
                pts = sorted((r["instances"], r[key]) for r in mine
                             if r["system"] == system and r["rate_per_instance"] == rate
                             and r[key] is not None)
                if not pts:
                    continue
                ax = axes[row_i][col]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=system)
                ax.set_xscale("log", base=2)
                ax.set_xlabel("instances")
                ax.set_ylabel(label)
                ax.set_title(f"{wl}: {label} at {rate:g} req/s per instance", fontsize=9)
                if row_i == 1:
                    ax.set_yscale("log")
        axes[0][col].legend(fontsize=8)
    fig.suptitle(f"{result['name']} (simulated, profile {result['profile']['name']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
