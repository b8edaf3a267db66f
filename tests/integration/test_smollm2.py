"""SmolLM2-135M-Instruct served through the router answers a simple factual question sensibly, in
the dtype the launcher picks for this CPU and in the other one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from runtime_patches import cpu_dtype
from runtime_patches.launch import WorkerProcess
from tests.integration.cluster import RouterProcess, http_json, start_workers

pytestmark = [pytest.mark.integration, pytest.mark.smollm2]

AUTO = cpu_dtype.choose_cpu_dtype(cpu_dtype.cpu_flags()).dtype
OTHER = "float32" if AUTO == "bfloat16" else "bfloat16"
QUESTION = {"model": "SmolLM2-135M-Instruct", "max_tokens": 12, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]}


@pytest.fixture(scope="module")
def smollm2_workers() -> Iterator[list[WorkerProcess]]:
    """Worker 0 with no dtype (the launcher's choice), worker 1 in the other dtype."""
    workers = start_workers("smollm2", 2, "smollm2-worker", per_worker=[{}, {"dtype": OTHER}])
    yield workers
    for w in workers:
        w.stop()


@pytest.fixture(scope="module")
def smollm2_router(smollm2_workers: list[WorkerProcess]) -> Iterator[RouterProcess]:
    router = RouterProcess([smollm2_workers[0].url], tag="router-smollm2")
    try:
        router.wait_ready()
        yield router
    finally:
        router.stop()


def test_capital_of_france(smollm2_router: RouterProcess) -> None:
    status, answer, _ = http_json("POST", smollm2_router.url + "/v1/chat/completions", QUESTION)
    assert status == 200, answer
    assert "Paris" in answer["choices"][0]["message"]["content"]


def test_capital_of_france_in_the_other_dtype(smollm2_workers: list[WorkerProcess]) -> None:
    status, answer, _ = http_json("POST", smollm2_workers[1].url + "/v1/chat/completions",
                                  QUESTION)
    assert status == 200, answer
    assert "Paris" in answer["choices"][0]["message"]["content"]


def test_workers_serve_the_dtype_they_were_given(smollm2_workers: list[WorkerProcess]) -> None:
    """The launcher's choice reaches SGLang: weights and KV in that dtype, the reason shown, and
    the KV byte counts follow it (30 layers x K and V x 3 heads x 64 x 2 or 4 bytes)."""
    per_token = {}
    for worker, want, reason in ((smollm2_workers[0], AUTO, "auto: CPU has"),
                                 (smollm2_workers[1], OTHER, "set by the operator")):
        status, body, _ = http_json("GET", worker.url + "/banaserve/status")
        assert status == 200, body
        model = body["model"]
        assert (model["dtype"], model["kv_dtype"]) == (want, want), model
        assert model["dtype_reason"].startswith(reason), model
        per_token[want] = body["kv"]["bytes_per_token"]
    assert per_token == {"bfloat16": 23040, "float32": 46080}
