"""The router with a real trained length predictor in front of real SGLang CPU workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import pytest

from runtime_patches.launch import WorkerProcess
from tests.integration.cluster import RouterProcess, http_json

pytestmark = pytest.mark.integration
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUESTIONS = ["Name a colour.", "Is water wet? Answer yes or no.", "Write a long story about a "
             "dragon who learns to cook, with five chapters.", "Explain how a CPU cache works."]


def profiler(*args: str) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "profiler_ft", "-q", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def predictor_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A predictor trained for a few steps on synthetic answers of three lengths."""
    root = tmp_path_factory.mktemp("length-predictor")
    records = [{"instruction": f"{QUESTIONS[i % len(QUESTIONS)]} (variant {i})", "input": "",
                "output": " ".join(["word"] * (5 + 60 * (i % 3)))} for i in range(48)]
    data = root / "data.json"
    data.write_text(json.dumps(records))
    profiler("build-dataset", str(data), "--out", str(root / "ds"), "--tokenizer", "tiny")
    profiler("train", "--data", str(root / "ds"), "--out", str(root / "pred"), "--max-steps", "3",
             "--batch-size", "8", "--max-length", "32")
    return str(root / "pred")


@pytest.fixture(scope="module")
def length_router(tiny_workers: list[WorkerProcess], predictor_dir: str) -> Iterator[str]:
    proc = RouterProcess([w.url for w in tiny_workers], "--length-predictor", predictor_dir,
                         tag="router-length")
    proc.wait_ready()
    yield proc.url
    proc.stop()


def expected(predictor_dir: str, text: str) -> tuple[str, str]:
    from profiler_ft.predictor import LengthPredictor

    pred = LengthPredictor.load(predictor_dir).predict([text])[0]
    return pred.label, str(pred.length)


def test_chat_answers_carry_the_predictors_estimate(length_router: str,
                                                    predictor_dir: str) -> None:
    text = QUESTIONS[2]
    status, out, headers = http_json("POST", length_router + "/v1/chat/completions", {
        "model": "tiny-llama", "max_tokens": 4,
        "messages": [{"role": "user", "content": text}]})
    assert status == 200, out
    assert out["choices"][0]["message"]["content"] is not None
    label, length = expected(predictor_dir, text)
    assert headers["X-BanaServe-Predicted-Bucket"] == label
    assert headers["X-BanaServe-Predicted-Length"] == length


def test_streams_and_completions_are_annotated_too(length_router: str,
                                                  predictor_dir: str) -> None:
    body = {"model": "tiny-llama", "prompt": QUESTIONS[0], "max_tokens": 4, "stream": True}
    req = urllib.request.Request(length_router + "/v1/completions", json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        events = resp.read().decode()
        headers = dict(resp.headers)
    assert "data: [DONE]" in events
    assert (headers["X-BanaServe-Predicted-Bucket"],
            headers["X-BanaServe-Predicted-Length"]) == expected(predictor_dir, QUESTIONS[0])
    status, metrics, _ = http_json("GET", length_router + "/metrics")
    assert status == 200
    assert 'banaserve_router_length_predictions_total{result="ok"}' in metrics
