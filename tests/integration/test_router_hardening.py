"""Hardening on real SGLang CPU workers: a worker killed under load, 429, 401, graceful drain."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from runtime_patches.launch import WorkerProcess
from tests.integration.cluster import RouterProcess, http_json, start_workers, wait_until
from tests.integration.sse import SSEStream

pytestmark = pytest.mark.integration
MODEL = "tiny-llama"
LONG = {"model": MODEL, "prompt": "def main():", "max_tokens": 200, "ignore_eos": True,
        "temperature": 0}


@pytest.fixture(scope="module")
def victim() -> Iterator[WorkerProcess]:
    (worker,) = start_workers("tiny", 1, "victim-load")
    yield worker
    worker.stop()


def test_worker_killed_under_load_loses_only_its_streams(
        tiny_workers: list[WorkerProcess], victim: WorkerProcess) -> None:
    survivor = tiny_workers[0]
    router = RouterProcess([survivor.url, victim.url], "--policy", "round_robin",
                           tag="router-kill-load")
    try:
        router.wait_ready()
        assert wait_until(lambda: all(w["healthy"] for w in http_json(
            "GET", router.url + "/workers")[1]["workers"]), 10)
        streams = [SSEStream(router.url, "/v1/completions", {**LONG, "stream": True,
                                                             "max_tokens": 2000})
                   for _ in range(2)]
        on_victim = [s for s in streams if s.headers["X-BanaServe-Worker"] == victim.url]
        assert on_victim, "round robin put one of two streams on each worker"
        for s in streams:
            next(s.events())
        results: list[tuple[int, str]] = []

        def send(_: int) -> None:
            status, body, headers = http_json("POST", router.url + "/v1/completions", LONG)
            results.append((status, headers.get("X-BanaServe-Worker", "")))

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(send, i) for i in range(16)]
            time.sleep(1.5)  # requests in flight on both workers
            victim.kill()
            for f in futures:
                f.result()
        assert [status for status, _ in results] == [200] * 16  # none lost
        assert {worker for _, worker in results} == {survivor.url}  # retried ones included
        for stream in on_victim:
            rest = list(stream.events())
            assert rest[-1] == "[DONE]" and json.loads(rest[-2])["error"]["code"] == \
                "upstream_failed"
        for stream in streams:
            stream.close()
    finally:
        router.stop()


def test_overload_answers_429_with_retry_after(tiny_workers: list[WorkerProcess]) -> None:
    router = RouterProcess([tiny_workers[0].url], "--max-concurrent-requests", "1",
                           "--max-queued-requests", "1", "--retry-after", "2",
                           tag="router-429")
    try:
        router.wait_ready()
        with ThreadPoolExecutor(5) as pool:
            results = list(pool.map(lambda _: http_json(
                "POST", router.url + "/v1/completions", {**LONG, "max_tokens": 100}), range(5)))
        statuses = sorted(status for status, _, _ in results)
        assert statuses.count(200) >= 2 and statuses.count(429) >= 2, statuses
        for status, body, headers in results:
            if status == 429:
                assert headers["Retry-After"] == "2"
                assert body["error"]["type"] == "rate_limit_error"
    finally:
        router.stop()


def test_api_key_enforced(tiny_workers: list[WorkerProcess]) -> None:
    router = RouterProcess([tiny_workers[0].url], "--api-key", "k-123", tag="router-401")
    try:
        router.wait_ready()
        body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
        status, answer, _ = http_json("POST", router.url + "/v1/completions", body)
        assert status == 401 and answer["error"]["type"] == "authentication_error"
        import urllib.request

        req = urllib.request.Request(router.url + "/v1/completions",
                                     data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": "Bearer k-123"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 200
    finally:
        router.stop()


def test_graceful_shutdown_drains_in_flight(tiny_workers: list[WorkerProcess]) -> None:
    router = RouterProcess([tiny_workers[0].url], tag="router-drain")
    router.wait_ready()
    outcome: list[int] = []
    thread = threading.Thread(target=lambda: outcome.append(http_json(
        "POST", router.url + "/v1/completions", {**LONG, "max_tokens": 300})[0]))
    thread.start()
    assert wait_until(lambda: http_json("GET", router.url + "/workers")[1]["workers"][0][
        "in_flight"] == 1, 10, interval_s=0.05)
    os.killpg(router.proc.pid, signal.SIGTERM)
    thread.join(60)
    assert outcome == [200]
    assert router.proc.wait(30) == 0
    router.stop()
