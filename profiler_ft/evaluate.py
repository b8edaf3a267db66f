"""Evaluation: the predictor against two baselines on one held-out split, in one run.

Who calls what: ``python -m profiler_ft eval`` calls `evaluate`, then `write_report`. The
baselines are fitted on the same training split the predictor saw: ``majority`` always answers
the most frequent training bucket; ``prompt_length_regression`` fits output tokens = a + b x
prompt tokens by least squares and buckets its answer. Every method gets the same metrics:
accuracy, per-bucket precision/recall, a confusion matrix (rows: true bucket, columns: predicted)
and the mean absolute error of its implied length in tokens.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from profiler_ft.buckets import Buckets
from profiler_ft.dataset import Example


@dataclass(frozen=True)
class MethodResult:
    name: str
    buckets: list[int]
    lengths: list[int]


def metrics(name: str, true_buckets: Sequence[int], true_lengths: Sequence[int],
            pred_buckets: Sequence[int], pred_lengths: Sequence[int],
            buckets: Buckets) -> dict[str, Any]:
    k = buckets.num_buckets
    confusion = [[0] * k for _ in range(k)]
    for t, p in zip(true_buckets, pred_buckets, strict=True):
        confusion[t][p] += 1
    per_bucket = []
    for i in range(k):
        predicted = sum(confusion[r][i] for r in range(k))
        actual = sum(confusion[i])
        per_bucket.append({"bucket": buckets.label(i), "support": actual,
                           "precision": confusion[i][i] / predicted if predicted else None,
                           "recall": confusion[i][i] / actual if actual else None})
    n = len(true_buckets)
    return {"method": name, "n": n,
            "accuracy": sum(confusion[i][i] for i in range(k)) / n if n else 0.0,
            "mae_tokens": sum(abs(a - b) for a, b in zip(true_lengths, pred_lengths,
                                                           strict=True)) / n if n else 0.0,
            "per_bucket": per_bucket, "confusion": confusion}


def majority(train: list[Example], test: list[Example], buckets: Buckets,
             bucket_lengths: list[int]) -> MethodResult:
    counts = [0] * buckets.num_buckets
    for ex in train:
        counts[ex.bucket] += 1
    top = max(range(len(counts)), key=counts.__getitem__)
    return MethodResult("majority", [top] * len(test), [bucket_lengths[top]] * len(test))


def regression(train: list[Example], test: list[Example], buckets: Buckets) -> MethodResult:
    xs = [float(ex.prompt_tokens) for ex in train]
    ys = [float(ex.output_tokens) for ex in train]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    cov = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    slope = cov / var if var else 0.0
    intercept = mean_y - slope * mean_x
    lengths = [max(1, round(intercept + slope * ex.prompt_tokens)) for ex in test]
    return MethodResult("prompt_length_regression", [buckets.index(n) for n in lengths], lengths)


def evaluate(predictor: Any, train: list[Example], test: list[Example],
             batch_size: int = 32, progress: bool = True) -> dict[str, Any]:
    """Predict ``test`` with ``predictor`` (a LengthPredictor) and score it and the baselines."""
    from tqdm import tqdm

    buckets = predictor.buckets
    started = time.monotonic()
    preds = []
    for start in tqdm(range(0, len(test), batch_size), desc="predicting", unit="batch",
                      disable=not progress):
        preds += predictor.predict_many([ex.text for ex in test[start:start + batch_size]],
                                        batch_size)
    seconds = time.monotonic() - started
    methods = [MethodResult("predictor", [p.bucket for p in preds], [p.length for p in preds]),
               majority(train, test, buckets, predictor.meta.bucket_lengths),
               regression(train, test, buckets)]
    true_b = [ex.bucket for ex in test]
    true_n = [ex.output_tokens for ex in test]
    results = [metrics(m.name, true_b, true_n, m.buckets, m.lengths, buckets) for m in methods]
    return {"buckets": buckets.labels(), "bucket_lengths": predictor.meta.bucket_lengths,
            "n_test": len(test), "n_train": len(train), "predict_seconds": round(seconds, 2),
            "backbone": predictor.meta.backbone, "methods": results}


def summary_lines(report: dict[str, Any]) -> list[str]:
    lines = [f"{'method':<26} {'accuracy':>9} {'MAE (tokens)':>13}"]
    for m in report["methods"]:
        lines.append(f"{m['method']:<26} {m['accuracy']:>9.3f} {m['mae_tokens']:>13.1f}")
    best = report["methods"][0]
    lines.append("per bucket (predictor): " + ", ".join(
        f"{b['bucket']} P={_pct(b['precision'])} R={_pct(b['recall'])} n={b['support']}"
        for b in best["per_bucket"]))
    lines.append("confusion (rows true, columns predicted): " + " | ".join(
        " ".join(f"{c:>4}" for c in row) for row in best["confusion"]))
    return lines


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def plot_confusions(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = report["buckets"]
    methods = report["methods"]
    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 4.6), squeeze=False)
    for ax, m in zip(axes[0], methods, strict=True):
        grid = m["confusion"]
        ax.imshow(grid, cmap="Blues")
        for r, row in enumerate(grid):
            for c, value in enumerate(row):
                ax.text(c, r, str(value), ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(labels)), labels, rotation=45, fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_xlabel("predicted bucket (tokens)")
        ax.set_ylabel("true bucket (tokens)")
        ax.set_title(f"{m['method']}\naccuracy {m['accuracy']:.3f}, MAE {m['mae_tokens']:.1f}",
                     fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], out_dir: str) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "eval.json")
    png_path = os.path.join(out_dir, "confusion.png")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
    plot_confusions(report, png_path)
    return json_path, png_path
