"""Prefill/decode disaggregation through the router on real SGLang CPU workers (mooncake TCP)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from runtime_patches.launch import WorkerProcess
from tests.integration.cluster import RouterProcess, free_port, http_json, start_workers
from tests.integration.sse import collect

pytestmark = pytest.mark.integration
MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def pd_router() -> Iterator[RouterProcess]:
    bootstrap = free_port()
    # both at once, one core each (start-up is CPU-bound: one after the other took 130 s)
    prefill, decode = start_workers("tiny", 2, "pd", per_worker=[
        {"extra_args": ("--disaggregation-mode", "prefill", "--disaggregation-transfer-backend",
                        "mooncake_tcp", "--disaggregation-bootstrap-port", str(bootstrap),
                        "--disable-overlap-schedule")},
        {"extra_args": ("--disaggregation-mode", "decode", "--disaggregation-transfer-backend",
                        "mooncake_tcp")}])
    router: RouterProcess | None = None
    try:
        router = RouterProcess(["--prefill", prefill.url, str(bootstrap), "--decode",
                                decode.url], tag="router-pd")
        router.wait_ready()
        yield router
    finally:
        if router:
            router.stop()
        decode.stop()
        prefill.stop()


def test_pd_generate_equals_single_worker_greedy(
        pd_router: RouterProcess, tiny_workers: list[WorkerProcess]) -> None:
    for prompt in ("def main():", "class Foo:\n    def __init__(self):"):
        body = {"text": prompt, "sampling_params": {"max_new_tokens": 16, "temperature": 0,
                                                    "ignore_eos": True}}
        status, pd, _ = http_json("POST", pd_router.url + "/generate", body)
        assert status == 200, pd
        _, single, _ = http_json("POST", tiny_workers[0].url + "/generate", body)
        assert pd["output_ids"] == single["output_ids"]


def test_pd_chat_streaming_and_not(pd_router: RouterProcess,
                                   tiny_workers: list[WorkerProcess]) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "import os"}],
            "max_tokens": 10, "temperature": 0}
    status, answer, _ = http_json("POST", pd_router.url + "/v1/chat/completions", body)
    assert status == 200, answer
    _, single, _ = http_json("POST", tiny_workers[0].url + "/v1/chat/completions", body)
    text = answer["choices"][0]["message"]["content"]
    assert text == single["choices"][0]["message"]["content"]
    events, _ = collect(pd_router.url, "/v1/chat/completions", {**body, "stream": True})
    assert events[-1] == "[DONE]"
    streamed = "".join(json.loads(e)["choices"][0]["delta"].get("content") or ""
                       for e in events[:-1])
    assert streamed == text


def test_pd_workers_listed_by_role(pd_router: RouterProcess) -> None:
    _, workers, _ = http_json("GET", pd_router.url + "/workers")
    assert sorted(w["role"] for w in workers["workers"]) == ["decode", "prefill"]
    assert all(w["healthy"] for w in workers["workers"])
