"""A worker killed mid-run: the stream on it ends with an error event, the router keeps serving
from the other worker and reports the dead one unhealthy."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from runtime_patches.launch import WorkerProcess
from tests.integration.cluster import RouterProcess, http_json, start_workers, wait_until
from tests.integration.sse import SSEStream

pytestmark = pytest.mark.integration
MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def victim() -> Iterator[WorkerProcess]:
    (worker,) = start_workers("tiny", 1, "victim-worker")
    yield worker
    worker.stop()


def test_killed_worker_mid_stream(tiny_workers: list[WorkerProcess],
                                  victim: WorkerProcess) -> None:
    survivor = tiny_workers[0]
    router = RouterProcess([survivor.url, victim.url], "--policy", "round_robin",
                           tag="router-failure")
    try:
        router.wait_ready()
        assert wait_until(lambda: _health(router) == {survivor.url: True, victim.url: True}, 10)
        body = {"model": MODEL, "prompt": "def main():", "max_tokens": 3000, "ignore_eos": True,
                "stream": True}
        stream = None
        for _ in range(2):  # round robin: one of two consecutive streams lands on the victim
            candidate = SSEStream(router.url, "/v1/completions", body)
            if candidate.headers["X-BanaServe-Worker"] == victim.url:
                stream = candidate
                break
            candidate.hang_up()
        assert stream is not None
        events = stream.events()
        for _ in range(3):
            next(events)
        victim.kill()
        started = time.monotonic()
        rest = list(events)  # must end, not hang (the socket timeout would fail the test)
        assert time.monotonic() - started < 30
        assert rest[-1] == "[DONE]"
        error = json.loads(rest[-2])["error"]
        assert error["code"] == "upstream_failed"
        stream.close()

        answers = [http_json("POST", router.url + "/v1/completions",
                             {"model": MODEL, "prompt": "x", "max_tokens": 4}) for _ in range(6)]
        assert [status for status, _, _ in answers] == [200] * 6
        assert {h["X-BanaServe-Worker"] for _, _, h in answers} == {survivor.url}
        assert wait_until(lambda: _health(router)[victim.url] is False, 10)
        assert http_json("GET", router.url + "/health")[0] == 200
    finally:
        router.stop()


def test_no_healthy_worker_is_503(victim: WorkerProcess) -> None:
    victim.kill()  # no-op if already dead
    router = RouterProcess([victim.url], tag="router-dead")
    try:
        assert wait_until(lambda: _status(router) is not None, 30)
        status, body, _ = http_json("POST", router.url + "/v1/chat/completions",
                                    {"model": MODEL, "messages": [{"role": "user",
                                                                   "content": "hi"}]})
        assert status == 503
        assert body["error"]["code"] == "no_healthy_worker"
        assert http_json("GET", router.url + "/health")[0] == 503
    finally:
        router.stop()


def _health(router: RouterProcess) -> dict[str, bool]:
    _, workers, _ = http_json("GET", router.url + "/workers")
    return {w["url"]: w["healthy"] for w in workers["workers"]}


def _status(router: RouterProcess) -> int | None:
    try:
        return http_json("GET", router.url + "/workers", timeout=2)[0]
    except OSError:
        return None
