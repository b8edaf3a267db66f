"""The router in front of two real SGLang CPU workers (tiny random Llama)."""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from runtime_patches.launch import WorkerProcess
from tests.integration.cluster import RouterProcess, http_json
from tests.integration.sse import collect

pytestmark = pytest.mark.integration
MODEL = "tiny-llama"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "def fibonacci(n):"}],
        "max_tokens": 12, "temperature": 0}


def test_chat_non_streaming(router: RouterProcess) -> None:
    status, body, headers = http_json("POST", router.url + "/v1/chat/completions", CHAT)
    assert status == 200, body
    assert body["object"] == "chat.completion"
    assert body["usage"]["completion_tokens"] == 12
    assert headers["X-BanaServe-Worker"].startswith("http://127.0.0.1:")


def test_chat_streaming_relays_chunks(router: RouterProcess) -> None:
    events, headers = collect(router.url, "/v1/chat/completions", {**CHAT, "stream": True})
    assert headers["Content-Type"].startswith("text/event-stream")
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len(chunks) >= 12  # one chunk per generated token, at least


def test_completion_streaming_and_not(router: RouterProcess) -> None:
    body = {"model": MODEL, "prompt": "import os\n", "max_tokens": 8, "temperature": 0}
    status, answer, _ = http_json("POST", router.url + "/v1/completions", body)
    assert status == 200 and answer["object"] == "text_completion"
    events, _ = collect(router.url, "/v1/completions", {**body, "stream": True})
    streamed = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert streamed == answer["choices"][0]["text"]


def test_greedy_output_through_router_equals_direct(
        router: RouterProcess, tiny_workers: list[WorkerProcess]) -> None:
    for worker in tiny_workers:
        for prompt in ("class Foo:\n    def __init__(self):", "import sys\n"):
            body = {"text": prompt, "sampling_params": {"max_new_tokens": 16, "temperature": 0,
                                                        "ignore_eos": True}}
            _, direct, _ = http_json("POST", worker.url + "/generate", body)
            _, routed, _ = http_json("POST", router.url + "/generate", body)
            assert routed["output_ids"] == direct["output_ids"]
            assert routed["text"] == direct["text"]
        chat_direct = http_json("POST", worker.url + "/v1/chat/completions", CHAT)[1]
        chat_routed = http_json("POST", router.url + "/v1/chat/completions", CHAT)[1]
        assert (chat_routed["choices"][0]["message"]["content"]
                == chat_direct["choices"][0]["message"]["content"])


def test_load_spreads_across_both_workers(
        router: RouterProcess, tiny_workers: list[WorkerProcess]) -> None:
    body = {**CHAT, "max_tokens": 48, "ignore_eos": True}

    def send(_: int) -> str:
        status, answer, headers = http_json("POST", router.url + "/v1/chat/completions", body)
        assert status == 200, answer
        return headers["X-BanaServe-Worker"]

    with ThreadPoolExecutor(16) as pool:
        served = Counter(pool.map(send, range(32)))
    assert set(served) == {w.url for w in tiny_workers}
    assert min(served.values()) >= 8, served  # neither worker starved (32 requests)


def test_models_workers_and_metrics(router: RouterProcess) -> None:
    status, models, _ = http_json("GET", router.url + "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == [MODEL]
    status, workers, _ = http_json("GET", router.url + "/workers")
    assert status == 200 and workers["policy"] == "cost_aware"
    assert all(w["healthy"] for w in workers["workers"])
    assert all(w["load"]["max_running_requests"] == 8 for w in workers["workers"])
    status, text, headers = http_json("GET", router.url + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert 'banaserve_router_requests_total{route="chat",status="200"}' in text
    assert "banaserve_router_worker_healthy" in text


def test_each_worker_process_is_pinned_to_its_core(tiny_workers: list[WorkerProcess]) -> None:
    """Every process of a worker (server, scheduler, detokenizer) runs only on its own core, so
    two workers on a 2-core box do not spin their thread pools against each other."""
    import os

    for worker in tiny_workers:
        expected = set(worker.cpu_affinity() or [])
        assert expected, "the test cluster pins each worker to one core"
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()
                and _session_of(int(p)) == worker.pid]
        assert len(pids) >= 3  # launch_server, scheduler, detokenizer
        for pid in pids:
            assert os.sched_getaffinity(pid) == expected, pid


def _session_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[3])
    except (OSError, IndexError, ValueError):
        return None
