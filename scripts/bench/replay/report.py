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
    if len(runs) > 1 and all(x is not None for x in rates):
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
