"""The router with a real trained length predictor in front of real SGLang CPU workers, and the
operators' sidecar (inside the router with --sidecar, and standalone) using the same predictor."""

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
                         "--sidecar", tag="router-length")
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


def test_the_routers_sidecar_predicts_and_plans_with_the_real_predictor(
        length_router: str, predictor_dir: str) -> None:
    from runtime_patches import models

    status, out, _ = http_json("POST", length_router + "/v1/predict/length",
                               {"prompts": QUESTIONS[:2]})
    assert status == 200, out
    assert [p["label"] for p in out["predictions"]] == [
        expected(predictor_dir, q)[0] for q in QUESTIONS[:2]]
    status, out, _ = http_json("POST", length_router + "/v1/plan/batches", {
        "requests": [{"id": "a", "slo_ms": 60000, "prompt": QUESTIONS[2]},
                     {"id": "b", "slo_ms": 2000, "predicted_len": 4}]})
    assert status == 200, out
    assert out["predicted_len"] == {"a": int(expected(predictor_dir, QUESTIONS[2])[1])}
    assert sorted(out["order"]) == ["a", "b"]
    cluster = {"gpus": [{"id": 0, "memory_gb": 1, "tflops": 10}, {"id": 1, "memory_gb": 1,
                                                                   "tflops": 10}],
               "links": {"matrix": [["X", "SYS"], ["SYS", "X"]]}}
    status, out, _ = http_json("POST", length_router + "/v1/plan/placement", {
        "model": models.model_dir("tiny"), "cluster": cluster, "mode": "lr"})
    assert status == 200, out
    assert out["sglang"]["command"].startswith(("SGLANG_PP_LAYER_PARTITION", "CUDA_VISIBLE"))


def test_the_standalone_sidecar_serves_the_same_api(predictor_dir: str) -> None:
    from tests.integration.cluster import free_port, wait_until

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "router.sidecar", "serve", "--port",
                             str(port), "--length-predictor", predictor_dir], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return http_json("GET", url + "/health", timeout=2)[0] == 200
        except OSError:
            return False

    try:
        assert wait_until(up, 120), "sidecar did not start"
        status, out, _ = http_json("GET", url + "/health")
        assert out == {"status": "ok", "length_predictor": True}
        status, out, _ = http_json("POST", url + "/v1/predict/length",
                                   {"messages": [{"role": "user", "content": QUESTIONS[3]}]})
        assert status == 200
        assert out["predictions"][0]["label"] == expected(predictor_dir, QUESTIONS[3])[0]
        status, out, _ = http_json("POST", url + "/v1/plan/batches", {"requests": "none"})
        assert status == 400 and out["error"]["param"] == "requests"
    finally:
        proc.terminate()
        proc.wait(20)
    done = subprocess.run([sys.executable, "-m", "router.sidecar", "serve", "--length-predictor",
                           "/nonexistent"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
