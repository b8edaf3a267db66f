"""SmolLM2-135M-Instruct served through the router answers a simple factual question sensibly."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.cluster import RouterProcess, http_json, start_workers

pytestmark = [pytest.mark.integration, pytest.mark.smollm2]


@pytest.fixture(scope="module")
def smollm2_router() -> Iterator[RouterProcess]:
    (worker,) = start_workers("smollm2", 1, "smollm2-worker")
    router = RouterProcess([worker.url], tag="router-smollm2")
    try:
        router.wait_ready()
        yield router
    finally:
        router.stop()
        worker.stop()


def test_capital_of_france(smollm2_router: RouterProcess) -> None:
    body = {"model": "SmolLM2-135M-Instruct", "max_tokens": 12, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    status, answer, _ = http_json("POST", smollm2_router.url + "/v1/chat/completions", body)
    assert status == 200, answer
    assert "Paris" in answer["choices"][0]["message"]["content"]
