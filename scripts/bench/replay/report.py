"""The replay benchmark's plots: latency CDFs, throughput and goodput against rate, load over time.

Who calls: ``scripts.bench.replay.run`` once per config, after every run, with the result JSON;
``python -m scripts.bench plot RESULT.json`` redraws a saved one. One PNG, three panels.
"""

from __future__ import annotations

from typing import Any


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
    for run in runs:
        label = run["label"]
        ttft = sorted(r["ttft"] for r in run["requests"] if r["ok"] and r["ttft"] is not None)
        tpot = sorted(1000 * r["tpot"] for r in run["requests"]
                      if r["ok"] and r["tpot"] is not None)
        if ttft:
            a.plot(ttft, [(i + 1) / len(ttft) for i in range(len(ttft))], label=f"{label} TTFT")
        if tpot:
            b.plot(tpot, [(i + 1) / len(tpot) for i in range(len(tpot))], label=label)
    a.set(xlabel="time to first token (s)", ylabel="share of requests", title="TTFT CDF")
    b.set(xlabel="time per output token (ms)", ylabel="share of requests", title="TPOT CDF")
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    rates = [run.get("rate") for run in runs]
    if any(run.get("system") for run in runs):
        _systems_panel(c, runs)
    elif len(runs) > 1 and all(x is not None for x in rates):
        c.plot(rates, [run["summary"]["output_tokens_per_s"] or 0 for run in runs], "o-",
               label="output tok/s")
        c.set(xlabel="offered rate (requests/s)", ylabel="output tokens/s",
              title="throughput and goodput")
        c2 = c.twinx()
        c2.plot(rates, [100 * (run["summary"]["goodput_share"] or 0) for run in runs], "s--",
                color="tab:green")
        c2.set_ylabel("% requests meeting the SLO", color="tab:green")
        c2.set_ylim(0, 105)
    else:
        samples = runs[-1].get("load", []) if runs else []
        workers = sorted({w for s in samples for w in s["workers"]})
        for w in workers:
            c.plot([s["t"] for s in samples],
                   [(s["workers"].get(w) or {}).get("running") or 0 for s in samples],
                   label=f"{w.rsplit(':', 1)[-1]} running")
        c.set(xlabel="seconds into the run", ylabel="requests running",
              title=f"load over time ({runs[-1]['label'] if runs else ''})")
        if workers:
            c.legend(fontsize=7)
    fig.suptitle(result.get("name", ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _systems_panel(ax: Any, runs: list[dict[str, Any]]) -> None:
    """Output tokens/s per system (mean over repeats), bars grouped by rate; goodput on top."""
    systems = list(dict.fromkeys(run["system"] for run in runs))
    rates = list(dict.fromkeys(run.get("rate") for run in runs))
    width = 0.8 / max(1, len(systems))
    for k, system in enumerate(systems):
        xs, tput, good = [], [], []
        for i, rate in enumerate(rates):
            mine = [r["summary"] for r in runs if r["system"] == system and r.get("rate") == rate]
            if mine:
                xs.append(i + k * width)
                tput.append(sum(m["output_tokens_per_s"] or 0 for m in mine) / len(mine))
                good.append(sum(m["goodput_share"] or 0 for m in mine) / len(mine))
        bars = ax.bar(xs, tput, width, label=system)
        for bar, share in zip(bars, good, strict=True):
            ax.annotate(f"{100 * share:.0f}%", (bar.get_x() + bar.get_width() / 2,
                                                bar.get_height()),
                        ha="center", va="bottom", fontsize=6)
    ax.set_xticks([i + width * (len(systems) - 1) / 2 for i in range(len(rates))],
                  ["trace" if r is None else f"{r}/s" for r in rates])
    ax.set(xlabel="arrivals", ylabel="output tokens/s",
           title="throughput per system (label: % meeting the SLO)")
    ax.legend(fontsize=7)


def markdown_table(result: dict[str, Any]) -> str:
    """One row per run: what ``docs/benchmarks.md`` shows (``python -m scripts.bench table``)."""

    def s(v: float | None, scale: float = 1.0, digits: int = 2) -> str:
        return "-" if v is None else f"{v * scale:.{digits}f}"

    lines = ["| run | ok | output tok/s | TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) "
             "| e2e p50 (s) | goodput |", "|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        m = run["summary"]
        lines.append(
            f"| {run['label']} | {m['completed']}/{m['requests']} | "
            f"{s(m['output_tokens_per_s'], digits=1)} | {s(m['ttft_s']['p50'])} / "
            f"{s(m['ttft_s']['p99'])} | {s(m['tpot_s']['p50'], 1000, 1)} / "
            f"{s(m['tpot_s']['p99'], 1000, 1)} | {s(m['e2e_s']['p50'])} | "
            f"{s(m['goodput_share'], 100, 0)}% |")
    return "\n".join(lines)
