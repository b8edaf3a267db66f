"""profiler_ft.evaluate: metrics, the two baselines, evaluate() and the written report."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from profiler_ft.buckets import Buckets
from profiler_ft.dataset import Example
from profiler_ft.evaluate import (
    evaluate,
    majority,
    metrics,
    plot_confusions,
    regression,
    summary_lines,
    write_report,
)
from profiler_ft.predictor import Prediction

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BUCKETS = Buckets((10, 20))  # <=10, 11-20, >20


def _example(prompt_tokens: int, output_tokens: int, buckets: Buckets = BUCKETS) -> Example:
    return Example(prompt=f"p{prompt_tokens}", text=f"text {prompt_tokens}",
                   prompt_tokens=prompt_tokens, output_tokens=output_tokens,
                   bucket=buckets.index(output_tokens))


def _hand_made() -> dict[str, Any]:
    # true 0 0 1 2, predicted 0 1 1 1: bucket 2 is never predicted
    return metrics("hand", true_buckets=[0, 0, 1, 2], true_lengths=[5, 8, 15, 30],
                   pred_buckets=[0, 1, 1, 1], pred_lengths=[6, 15, 15, 15], buckets=BUCKETS)


def test_metrics_accuracy_and_mae() -> None:
    result = _hand_made()
    assert result["method"] == "hand"
    assert result["n"] == 4
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["mae_tokens"] == pytest.approx((1 + 7 + 0 + 15) / 4)


def test_metrics_confusion_rows_are_true_columns_predicted() -> None:
    assert _hand_made()["confusion"] == [[1, 1, 0],
                                         [0, 1, 0],
                                         [0, 1, 0]]


def test_metrics_precision_and_recall_per_bucket() -> None:
    per_bucket = _hand_made()["per_bucket"]
    assert [b["bucket"] for b in per_bucket] == ["<=10", "11-20", ">20"]
    assert [b["support"] for b in per_bucket] == [2, 1, 1]
    assert per_bucket[0]["precision"] == pytest.approx(1.0)
    assert per_bucket[0]["recall"] == pytest.approx(0.5)
    assert per_bucket[1]["precision"] == pytest.approx(1 / 3)
    assert per_bucket[1]["recall"] == pytest.approx(1.0)
    assert per_bucket[2]["precision"] is None, "nothing was predicted in bucket 2"
    assert per_bucket[2]["recall"] == pytest.approx(0.0)


def test_metrics_recall_is_none_for_a_bucket_with_no_true_example() -> None:
    result = metrics("m", [0, 0], [1, 2], [0, 2], [1, 25], BUCKETS)
    assert result["per_bucket"][1] == {"bucket": "11-20", "support": 0, "precision": None,
                                       "recall": None}
    assert result["per_bucket"][2]["precision"] == pytest.approx(0.0)
    assert result["per_bucket"][2]["recall"] is None


def test_metrics_of_an_empty_split_are_zero() -> None:
    result = metrics("empty", [], [], [], [], BUCKETS)
    assert result["n"] == 0
    assert result["accuracy"] == 0.0
    assert result["mae_tokens"] == 0.0
    assert result["confusion"] == [[0] * 3 for _ in range(3)]


def test_metrics_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError):
        metrics("m", [0, 1], [1, 12], [0], [1], BUCKETS)


def test_majority_picks_the_most_frequent_training_bucket() -> None:
    train = [_example(3, 5), _example(3, 15), _example(3, 16), _example(3, 17), _example(3, 30)]
    test = [_example(3, 2), _example(3, 40), _example(3, 12)]
    result = majority(train, test, BUCKETS, bucket_lengths=[7, 14, 33])
    assert result.name == "majority"
    assert result.buckets == [1, 1, 1]
    assert result.lengths == [14, 14, 14]


def test_majority_breaks_ties_towards_the_lower_bucket() -> None:
    train = [_example(3, 30), _example(3, 5)]
    result = majority(train, [_example(3, 1)], BUCKETS, bucket_lengths=[7, 14, 33])
    assert result.buckets == [0]


def test_regression_recovers_an_exact_linear_relation() -> None:
    buckets = Buckets.parse("pow2")
    train = [_example(p, 10 + 2 * p, buckets) for p in (1, 4, 9, 20, 50, 120, 300)]
    test = [_example(p, 10 + 2 * p, buckets) for p in (0, 5, 11, 60, 250)]
    result = regression(train, test, buckets)
    assert result.name == "prompt_length_regression"
    assert result.lengths == [10, 20, 32, 130, 510]
    assert result.buckets == [buckets.index(n) for n in result.lengths]
    assert result.buckets == [0, 0, 0, 3, 4]
    assert result.buckets == [ex.bucket for ex in test]


def test_regression_with_constant_prompt_length_predicts_the_mean() -> None:
    train = [_example(7, 4), _example(7, 12), _example(7, 20)]
    result = regression(train, [_example(7, 1), _example(99, 1)], BUCKETS)
    assert result.lengths == [12, 12]
    assert result.buckets == [1, 1]


def test_regression_never_predicts_below_one_token() -> None:
    train = [_example(10, 100), _example(100, 10)]  # decreasing: negative for long prompts
    result = regression(train, [_example(1000, 1)], BUCKETS)
    assert result.lengths == [1]
    assert result.buckets == [0]


class _StubPredictor:
    """Duck-types LengthPredictor for evaluate(): always bucket 0 for 'short' texts, else 2."""

    def __init__(self) -> None:
        self.buckets = BUCKETS
        self.meta = SimpleNamespace(bucket_lengths=[5, 15, 30], backbone="stub")

    def predict_many(self, texts: Sequence[str], batch_size: int = 32) -> list[Prediction]:
        out = []
        for text in texts:
            best = 0 if "short" in text else 2
            probs = tuple(1.0 if i == best else 0.0 for i in range(3))
            out.append(Prediction(best, BUCKETS.label(best), self.meta.bucket_lengths[best], probs))
        return out


def _report() -> dict[str, Any]:
    train = [_example(p, 10 + 2 * p) for p in (1, 2, 3, 4, 8, 12)]
    test = [Example("p", "short one", 1, 4, 0), Example("p", "short two", 2, 12, 1),
            Example("p", "long", 20, 50, 2)]
    return evaluate(_StubPredictor(), train, test, batch_size=2, progress=False)


def test_evaluate_scores_the_predictor_and_both_baselines() -> None:
    report = _report()
    assert [m["method"] for m in report["methods"]] == ["predictor", "majority",
                                                        "prompt_length_regression"]
    assert report["buckets"] == ["<=10", "11-20", ">20"]
    assert report["n_test"] == 3
    assert report["n_train"] == 6
    assert report["backbone"] == "stub"
    predictor = report["methods"][0]
    assert predictor["confusion"] == [[1, 0, 0], [1, 0, 0], [0, 0, 1]]
    assert predictor["accuracy"] == pytest.approx(2 / 3)
    assert predictor["mae_tokens"] == pytest.approx((1 + 7 + 20) / 3)


def test_summary_lines_name_every_method() -> None:
    text = "\n".join(summary_lines(_report()))
    for name in ("predictor", "majority", "prompt_length_regression"):
        assert name in text
    assert "confusion" in text


def test_write_report_writes_eval_json_and_a_png(tmp_path: Path) -> None:
    report = _report()
    json_path, png_path = write_report(report, str(tmp_path / "report"))
    assert json_path == str(tmp_path / "report" / "eval.json")
    assert png_path == str(tmp_path / "report" / "confusion.png")
    with open(json_path) as f:
        assert json.load(f) == report
    data = Path(png_path).read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 1000


def test_plot_confusions_with_a_single_method(tmp_path: Path) -> None:
    report = {"buckets": BUCKETS.labels(), "methods": [_hand_made()]}
    path = tmp_path / "one.png"
    plot_confusions(report, str(path))
    assert path.read_bytes().startswith(PNG_MAGIC)
