"""The router with --batching in front of a real SGLang CPU worker: requests held beyond the
worker's slots are dispatched in the policy's order, SGLang accepts the SLO the router adds to
custom_params on every route, and the SLO metrics count what happened."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from runtime_patches.launch import WorkerProcess
from tests.integration.cluster import RouterProcess, http_json

# (name, SLO ms, output tokens), in arrival order
REQUESTS = [("loose-long", 120_000, 64), ("loose-short", 120_000, 8), ("tight", 20_000, 32),
            ("medium", 60_000, 16)]


@pytest.fixture(params=["fcfs", "slo-odbs"])
def batching_router(request: pytest.FixtureRequest, tiny_workers: list[WorkerProcess]
                    ) -> Iterator[tuple[str, RouterProcess]]:
    policy = request.param
    proc = RouterProcess([tiny_workers[0].url], "--batching", policy,
                         "--batch-slots-per-worker", "1", "--batch-window-ms", "0",
                         tag=f"router-batching-{policy}")
    proc.wait_ready()
    yield policy, proc
    proc.stop()


def chat(url: str, name: str, slo_ms: int, tokens: int, done: list[str]) -> None:
    body = {"model": "tiny-llama", "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": f"request {name}"}], "slo_ms": slo_ms}
    status, out, _ = http_json("POST", url + "/v1/chat/completions", body)
    assert status == 200, out
    assert out["usage"]["completion_tokens"] == tokens
    done.append(name)


def metric(url: str, line_start: str) -> float:
    status, text, _ = http_json("GET", url + "/metrics")
    assert status == 200
    for line in str(text).splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_held_requests_run_in_the_policy_order(batching_router: tuple[str, RouterProcess]
                                               ) -> None:
    policy, router = batching_router
    done: list[str] = []
    blocker_body: dict[str, Any] = {
        "text": "block", "sampling_params": {"max_new_tokens": 400, "temperature": 0,
                                             "ignore_eos": True}}
    blocker = threading.Thread(target=lambda: done.append(
        "blocker" if http_json("POST", router.url + "/generate", blocker_body)[0] == 200
        else "blocker-failed"))
    blocker.start()
    time.sleep(0.3)
    threads = []
    for name, slo_ms, tokens in REQUESTS:
        t = threading.Thread(target=chat, args=(router.url, name, slo_ms, tokens, done))
        t.start()
        threads.append(t)
        time.sleep(0.1)
    assert blocker.is_alive(), "the blocking request finished before the others were queued"
    for t in [blocker, *threads]:
        t.join(120)
    expected = {"fcfs": ["loose-long", "loose-short", "tight", "medium"],
                "slo-odbs": ["tight", "medium", "loose-short", "loose-long"]}[policy]
    assert done == ["blocker", *expected]
    assert metric(router.url, 'banaserve_router_slo_total{result="met"}') == 5.0
    assert metric(router.url, "banaserve_router_batcher_waiting_requests") == 0.0


def test_sglang_accepts_the_slo_fields_on_every_route(tiny_workers: list[WorkerProcess]) -> None:
    router = RouterProcess([tiny_workers[0].url], "--batching", "slo-odbs",
                           tag="router-batching-routes")
    router.wait_ready()
    try:
        status, out, _ = http_json("POST", router.url + "/generate", {
            "text": "hello", "sampling_params": {"max_new_tokens": 4, "temperature": 0,
                                                 "custom_params": {"mine": 1}}})
        assert status == 200, out
        status, out, _ = http_json("POST", router.url + "/v1/completions", {
            "model": "tiny-llama", "prompt": "hello", "max_tokens": 4, "slo_ms": 1})
        assert status == 200, out  # a 1 ms SLO cannot be met: served all the same, counted
        status, out, _ = http_json("POST", router.url + "/v1/chat/completions", {
            "model": "tiny-llama", "messages": [{"role": "user", "content": "x"}],
            "slo_ms": -3})
        assert status == 400 and out["error"]["param"] == "slo_ms"
        assert metric(router.url, 'banaserve_router_slo_total{result="missed"}') == 1.0
        assert metric(router.url, 'banaserve_router_slo_total{result="met"}') == 1.0
    finally:
        router.stop()
