"""The sidecar's HTTP API (router/sidecar/app.py) on a real aiohttp server, and its CLI."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from router.sidecar.__main__ import main
from router.sidecar.app import create_sidecar_app

TINY_CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
               "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 2048, "tie_word_embeddings": False,
               "torch_dtype": "float32", "max_position_embeddings": 4096}
CLUSTER = {"gpus": [{"id": 0, "memory_gb": 16, "tflops": 100}, {"id": 1, "memory_gb": 16,
                                                                  "tflops": 100}],
           "links": {"matrix": [["X", "PIX"], ["PIX", "X"]]}}


@dataclass
class FakePrediction:
    length: int

    def as_dict(self) -> dict[str, Any]:
        return {"bucket": 0, "label": "x", "length": self.length, "probs": [1.0]}


class FakePredictor:
    def predict_many(self, texts: Sequence[str]) -> list[FakePrediction]:
        return [FakePrediction(len(t)) for t in texts]


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


@pytest.fixture(params=[None, "fake"])
async def sidecar(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, bool]]:
    predictor = FakePredictor() if request.param else None
    runner, url = await serve(create_sidecar_app(predictor))
    yield url, predictor is not None
    await runner.cleanup()


async def post(url: str, body: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.post(
            url, data=body if isinstance(body, bytes) else json.dumps(body)) as resp:
        return resp.status, await resp.json()


async def test_health_says_whether_a_predictor_is_loaded(sidecar: tuple[str, bool]) -> None:
    url, has_predictor = sidecar
    async with aiohttp.ClientSession() as session, session.get(url + "/health") as resp:
        assert await resp.json() == {"status": "ok", "length_predictor": has_predictor}


async def test_plan_batches_orders_and_groups(sidecar: tuple[str, bool]) -> None:
    url, _ = sidecar
    body = {"policy": "slo-odbs", "params": {"max_batch": 2},
            "requests": [{"id": "loose", "slo_ms": 120000, "predicted_len": 50},
                         {"id": "tight", "slo_ms": 3000, "predicted_len": 50},
                         {"id": "mid", "slo_ms": 30000, "predicted_len": 10}]}
    status, out = await post(url + "/v1/plan/batches", body)
    assert status == 200, out
    assert out["order"][0] == "tight"
    assert sorted(out["order"]) == ["loose", "mid", "tight"]
    assert all(len(b) <= 2 for b in out["batches"])
    status, out = await post(url + "/v1/plan/batches", {**body, "policy": "fcfs"})
    assert out["order"] == ["loose", "tight", "mid"]


async def test_plan_batches_predicts_missing_lengths_when_it_can(sidecar: tuple[str, bool]
                                                                 ) -> None:
    url, has_predictor = sidecar
    body = {"requests": [{"id": "a", "slo_ms": 5000, "prompt": "hello there"},
                         {"id": "b", "slo_ms": 5000, "predicted_len": 3}]}
    status, out = await post(url + "/v1/plan/batches", body)
    if has_predictor:
        assert status == 200, out
        assert out["predicted_len"] == {"a": len("hello there")}
    else:
        assert status == 400
        assert out["error"]["code"] == "no_length_predictor"


@pytest.mark.parametrize("body, param", [
    ({"requests": []}, "requests"),
    ({"requests": [{"slo_ms": 10}]}, "requests[0]"),
    ({"requests": [{"slo_ms": -1, "predicted_len": 3}]}, "requests[0].slo_ms"),
    ({"requests": [{"slo_ms": 10, "predicted_len": 2.5}]}, "requests[0].predicted_len"),
    ({"requests": [{"id": 1, "slo_ms": 10, "predicted_len": 2},
                   {"id": 1, "slo_ms": 10, "predicted_len": 2}]}, "requests"),
    ({"policy": "edf", "requests": [{"slo_ms": 10, "predicted_len": 2}]}, "policy"),
    ({"params": {"w9": 1}, "requests": [{"slo_ms": 10, "predicted_len": 2}]}, "params"),
    ({"params": {"max_batch": 0}, "requests": [{"slo_ms": 10, "predicted_len": 2}]}, "params"),
])
async def test_plan_batches_rejects_bad_fields_with_400(sidecar: tuple[str, bool],
                                                        body: dict[str, Any], param: str) -> None:
    url, _ = sidecar
    status, out = await post(url + "/v1/plan/batches", body)
    assert status == 400
    assert out["error"]["type"] == "invalid_request_error"
    assert out["error"]["param"] == param


async def test_plan_placement_returns_a_launch_plan_or_says_what_binds(
        sidecar: tuple[str, bool]) -> None:
    url, _ = sidecar
    body = {"model": TINY_CONFIG, "cluster": CLUSTER, "mode": "lr"}
    status, out = await post(url + "/v1/plan/placement", body)
    assert status == 200, out
    assert out["feasible"] is True
    assert sum(out["sglang"]["layer_partition"] or [4]) == 4
    tiny_cluster = {"gpus": [{"id": 0, "memory_gb": 0.0001, "tflops": 1}],
                    "links": {"matrix": [["X"]]}}
    status, out = await post(url + "/v1/plan/placement", {**body, "cluster": tiny_cluster})
    assert status == 422
    assert "largest GPU" in out["error"]["message"]
    status, out = await post(url + "/v1/plan/placement", {**body, "mode": "fast"})
    assert status == 400 and out["error"]["param"] == "mode"
    status, out = await post(url + "/v1/plan/placement", b"{not json")
    assert status == 400 and out["error"]["code"] == "invalid_json"


async def test_predict_length(sidecar: tuple[str, bool]) -> None:
    url, has_predictor = sidecar
    status, out = await post(url + "/v1/predict/length", {"prompts": ["abc", "hello"]})
    if not has_predictor:
        assert status == 400
        return
    assert [p["length"] for p in out["predictions"]] == [3, 5]
    status, out = await post(url + "/v1/predict/length",
                             {"messages": [{"role": "user", "content": "four"}]})
    assert out["predictions"][0]["length"] == 4
    status, out = await post(url + "/v1/predict/length", {"prompts": [""]})
    assert status == 400 and out["error"]["param"] == "prompts"


def test_cli_plan_batches(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "reqs.json"
    data.write_text(json.dumps({"requests": [
        {"id": "a", "slo_ms": 100000, "predicted_len": 10, "arrival_ms": 0},
        {"id": "b", "slo_ms": 2000, "predicted_len": 10, "arrival_ms": 5}]}))
    assert main(["plan-batches", str(data), "--max-batch", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["batches"] == [["b"], ["a"]]
    data.write_text(json.dumps({"requests": [{"id": "a", "predicted_len": 10}]}))
    assert main(["plan-batches", str(data)]) == 2
    assert capsys.readouterr().err.strip() == "plan-batches: missing field 'slo_ms'"
    assert main(["plan-batches", str(tmp_path / "nope.json")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
