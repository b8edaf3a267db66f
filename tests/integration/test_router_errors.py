"""Bad input is answered 400 by the router and never reaches a worker; disconnects abort."""

from __future__ import annotations

import json
import time

import pytest

from runtime_patches.launch import WorkerProcess
from tests.integration.cluster import RouterProcess, http_json, running_requests, wait_until
from tests.integration.sse import SSEStream

pytestmark = pytest.mark.integration
MODEL = "tiny-llama"
USER = [{"role": "user", "content": "hello"}]

BAD_INPUTS = [
    ("/v1/chat/completions", b'{"model": "tiny-llama", "messages": [', "invalid_json"),
    ("/v1/chat/completions", b'["not", "an", "object"]', None),
    ("/v1/chat/completions", json.dumps({"messages": USER}).encode(), "missing_field"),
    ("/v1/chat/completions", json.dumps({"model": MODEL}).encode(), "missing_field"),
    ("/v1/chat/completions", json.dumps({"model": "gpt-9", "messages": USER}).encode(),
     "model_not_found"),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": []}).encode(),
     "empty_messages"),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": USER,
                                         "max_tokens": "12"}).encode(), "invalid_type"),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": USER,
                                         "temperature": -1}).encode(), "invalid_value"),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "user"}],
                                         }).encode(), "invalid_type"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": ""}).encode(), "empty_prompt"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": [5, 7, 2048]}).encode(),
     "invalid_token_id"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x = 1\n" * 3000}).encode(),
     "context_length_exceeded"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "hi",
                                    "max_tokens": 5000}).encode(), "context_length_exceeded"),
    ("/generate", json.dumps({"input_ids": [1, 2, 10**6],
                              "sampling_params": {"max_new_tokens": 4}}).encode(),
     "invalid_token_id"),
    ("/generate", json.dumps({"input_ids": [-3], "sampling_params": {}}).encode(),
     "invalid_token_id"),
    ("/generate", json.dumps({"sampling_params": {"max_new_tokens": 4}}).encode(),
     "missing_field"),
]


@pytest.mark.parametrize(("path", "raw", "code"), BAD_INPUTS,
                         ids=[f"{p}-{c}" for p, _, c in BAD_INPUTS])
def test_bad_input_is_400_and_never_dispatched(
        router: RouterProcess, tiny_workers: list[WorkerProcess], path: str, raw: bytes,
        code: str | None) -> None:
    before = _dispatched(router)
    status, body, _ = http_json("POST", router.url + path, raw=raw)
    assert status == 400, body
    error = body["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if code is not None:
        assert error["code"] == code
    assert _dispatched(router) == before
    for worker in tiny_workers:  # still alive and serving
        assert worker.is_running()
        assert http_json("GET", worker.url + "/health")[0] == 200


def test_out_of_vocab_ids_would_have_reached_the_model(router: RouterProcess) -> None:
    """The vocabulary bound the router enforces is the model's: the last valid id is served."""
    body = {"input_ids": [1, 2047], "sampling_params": {"max_new_tokens": 2, "temperature": 0}}
    status, answer, _ = http_json("POST", router.url + "/generate", body)
    assert status == 200, answer


def _dispatched(router: RouterProcess) -> int:
    _, workers, _ = http_json("GET", router.url + "/workers")
    return sum(w["total_requests"] for w in workers["workers"])


def _busy_worker(tiny_workers: list[WorkerProcess], url: str) -> WorkerProcess:
    return next(w for w in tiny_workers if w.url == url)


def test_client_disconnect_mid_stream_aborts_upstream(
        router: RouterProcess, tiny_workers: list[WorkerProcess]) -> None:
    body = {"model": MODEL, "prompt": "def main():", "max_tokens": 3500, "ignore_eos": True,
            "stream": True}
    stream = SSEStream(router.url, "/v1/completions", body)
    assert stream.status == 200
    worker = _busy_worker(tiny_workers, stream.headers["X-BanaServe-Worker"])
    events = stream.events()
    for _ in range(5):
        next(events)
    assert running_requests(worker.url) == 1
    stream.hang_up()
    # 3500 tokens take over 20 s on this model; an aborted request is gone within seconds.
    assert wait_until(lambda: running_requests(worker.url) == 0, timeout_s=5)


def test_client_disconnect_while_waiting_non_streaming_aborts_upstream(
        router: RouterProcess, tiny_workers: list[WorkerProcess]) -> None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=30)
    body = {"model": MODEL, "prompt": "def main():", "max_tokens": 3500, "ignore_eos": True}
    conn.request("POST", "/v1/completions", body=json.dumps(body),
                 headers={"Content-Type": "application/json"})
    assert wait_until(lambda: sum(running_requests(w.url) for w in tiny_workers) == 1, 10)
    time.sleep(0.5)
    assert conn.sock is not None
    conn.sock.close()
    # SGLang checks non-streaming clients every 4 s; generation would take over 20 s.
    assert wait_until(lambda: sum(running_requests(w.url) for w in tiny_workers) == 0, 9)
