"""Layer migration between live SGLang CPU workers and a layer host (runtime_patches.migration).

A tiny-model worker on core 0 and layer hosts on core 1 (the "less loaded device"). Greedy
outputs with layers migrated before a request, and migrated or restored in the middle of a
running request, must be token-for-token those of the worker's own layers: the host runs the
same SGLang layer code, with the same kernels, dtype (bf16) and thread count, on the same batch,
so the arithmetic is the same and the comparison is exact. Migration under concurrent load
loses no request; a host killed mid-request ends that request with an error, never with a
wrong token, and the worker serves on. Bad control requests get 400 and change nothing.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.integration.cluster import http_json
from tests.integration.migration_cluster import PROMPTS, TINY_POOL, Cluster, read_stream

pytestmark = pytest.mark.integration

FRESH = ("for i in range(10):", "while True:\n    x = ")


@pytest.fixture
def tiny(migration_tiny: Cluster) -> Cluster:
    """The session's tiny migration cluster, idle and reset: no migrated range, no offloaded
    head, both hosts up, an empty radix cache. (A prompt served from a cached prefix is not
    bitwise the prompt computed in one piece: the prefix's KV was computed in another batch
    shape. Tests compare runs that reuse the cache the same way.)"""
    migration_tiny.reset()
    return migration_tiny


def test_outputs_with_migrated_layers_equal_local(tiny: Cluster) -> None:
    expected = {p: tiny.complete(p, 24) for p in PROMPTS}
    info = tiny.migrate(1, 3)
    assert info["weight_bytes"] > 0 and info["kv_bytes_released"] > 0
    status = tiny.status()
    assert status["local_layers"] == [0, 3]
    assert status["kv"]["bytes_released"] == info["kv_bytes_released"]
    # Two of four layers' KV memory went to the other two: the pool holds twice the tokens.
    base = status["kv"]["base_pool_tokens"]
    assert status["kv"]["pool_tokens"] == status["kv"]["capacity_tokens"] >= 2 * base - 1
    status_code, loads, _ = http_json("GET", tiny.worker.url + "/v1/loads")
    assert status_code == 200, loads
    assert loads["loads"][0]["max_total_num_tokens"] == status["kv"]["pool_tokens"]
    # Cached prefixes' KV for layers 1-2 was copied to the host; fresh prompts compute there.
    got = {p: tiny.complete(p, 24) for p in PROMPTS}
    fresh_migrated = {p: tiny.complete(p, 24) for p in FRESH}
    steps = tiny.status()["ranges"][0]["forward"]["steps"]
    tiny.restore()
    assert tiny.status()["local_layers"] == [0, 1, 2, 3]
    assert tiny.status()["kv"]["pool_tokens"] == base
    assert got == expected
    assert steps >= len(PROMPTS) + len(FRESH)
    # The KV the host computed came back with the restore: cached and fresh prompts agree.
    assert {p: tiny.complete(p, 24) for p in FRESH} == fresh_migrated


@pytest.mark.parametrize("layers", [(0, 1), (1, 4), (0, 4)])
def test_edge_ranges_equal_local(tiny: Cluster, layers: tuple[int, int]) -> None:
    prompt = "print('edge')"
    expected = tiny.complete(prompt, 16)
    tiny.migrate(*layers)
    try:
        got = tiny.complete(prompt + " ", 16), tiny.complete(prompt, 16)
    finally:
        tiny.restore()
    assert got[1] == expected
    assert tiny.complete(prompt + " ", 16) == got[0]


def test_migrate_and_restore_in_the_middle_of_a_request(tiny: Cluster) -> None:
    prompt = "def fibonacci(n):\n"
    expected = tiny.complete(prompt, 160)
    actions: list[dict[str, Any]] = []

    def on_chunk(i: int) -> None:
        if i == 20:
            actions.append(tiny.migrate(1, 3))
        elif i == 90:
            actions.append(tiny.restore())

    text, errors = read_stream(tiny.stream(prompt, 160), on_chunk)
    assert not errors
    assert len(actions) == 2
    steps = actions[1]["restored"][0]["forward"]["steps"]
    assert 0 < steps < 160, "the migration must land while the request runs"
    assert text == expected


def test_restore_waits_for_kv_above_the_original_pool(tiny: Cluster) -> None:
    """After a migration the pool is twice as large; a restore must first get every request
    out of the upper half. It answers 202, new KV goes below, and it completes by itself."""
    first, second = "x = [", "y = {"
    expected = tiny.complete(second, 700)
    tiny.flush()
    tiny.migrate(1, 3)
    grown = tiny.status()["kv"]["pool_tokens"]
    assert grown > 2 * TINY_POOL - 2
    tiny.flush()  # slots are handed out from the bottom again
    tiny.complete(first, 700)  # cached: holds slots up to about 700
    answers: list[tuple[int, Any]] = []

    def on_chunk(i: int) -> None:
        if i == 500:  # the second request now holds slots above the original 1024
            answers.append(tiny.control("POST", "/banaserve/restore_layers", {}))
            answers.append(tiny.control("GET", "/banaserve/status"))

    text, errors = read_stream(tiny.stream(second, 700), on_chunk)
    assert not errors
    (code, pending), (_, during) = answers
    assert code == 202, pending
    assert pending["pending"] == [[1, 3]] and pending["draining_to"] == TINY_POOL
    assert pending["slots_held_above"] > 0
    assert during["local_layers"] == [0, 3]
    assert text == expected  # the request ran on through the drain, exactly
    # Completed before the next step once the request ended (its cache entry was evicted).
    tiny.complete("z", 4)
    status = tiny.status()
    assert status["local_layers"] == [0, 1, 2, 3] and status["pending_restore"] == []
    assert status["kv"]["pool_tokens"] == status["kv"]["capacity_tokens"] == TINY_POOL
    assert status["events"][-1]["event"] == "restore"


def test_bad_control_requests_change_nothing(tiny: Cluster) -> None:
    before = tiny.status()
    bad = [
        ({"layers": [3, 9], "target": "b"}, "not a non-empty range"),
        ({"layers": [2, 2], "target": "b"}, "not a non-empty range"),
        ({"layers": [-1, 2], "target": "b"}, "not a non-empty range"),
        ({"layers": [1], "target": "b"}, "two integers"),
        ({"layers": ["1", 2], "target": "b"}, "two integers"),
        ({"layers": [1, 3], "target": "nope"}, "unknown target"),
        ({"layers": [1, 3]}, "unknown target"),
        ({"layers": [1, 3], "target": "b", "force": True}, "unknown fields"),
    ]
    for body, message in bad:
        status, out = tiny.control("POST", "/banaserve/migrate_layers", body)
        assert status == 400, (body, out)
        assert message in out["error"]["message"], out
        assert out["error"]["type"] == "invalid_request_error"
    for raw in (b"{not json", b"[1, 2]"):
        status, out = tiny.control("POST", "/banaserve/migrate_layers", raw=raw)
        assert status == 400, out
    status, out = tiny.control("POST", "/banaserve/restore_layers", {"layers": [1, 3]})
    assert status == 400 and "not a migrated range" in out["error"]["message"]
    status, out = tiny.control("POST", "/banaserve/migrate_layers",
                               {"layers": [1, 3], "target": "dead"})
    assert status == 503 and "unreachable" in out["error"]["message"], out
    tiny.migrate(0, 2)
    try:
        status, out = tiny.control("POST", "/banaserve/migrate_layers",
                                   {"layers": [1, 3], "target": "b"})
        assert status == 400 and "overlap" in out["error"]["message"], out
        assert [r["layers"] for r in tiny.status()["ranges"]] == [[0, 2]]
    finally:
        tiny.restore()
    after = tiny.status()
    assert after["local_layers"] == before["local_layers"] and after["ranges"] == []


def test_migration_under_concurrent_load_loses_no_request(tiny: Cluster) -> None:
    prompts = [f"# task {i}\ndef f{i}(x):" for i in range(12)]
    done = threading.Event()

    def toggle() -> int:
        flips = 0
        while not done.is_set():
            tiny.migrate(1, 3)
            tiny.restore()
            flips += 1
        return flips

    with ThreadPoolExecutor(6) as pool:
        toggler = ThreadPoolExecutor(1).submit(toggle)
        try:
            results = list(pool.map(lambda p: http_json("POST", tiny.worker.url
                                                        + "/v1/completions",
                                                        tiny._body(p, 48, stream=False),
                                                        timeout=300), prompts))
        finally:
            done.set()
        flips = toggler.result(timeout=300)
    assert flips >= 1
    for status, out, _ in results:
        assert status == 200, out
        assert out["usage"]["completion_tokens"] == 48
    assert tiny.status()["ranges"] == []


def test_host_killed_mid_request_never_emits_a_wrong_token(tiny: Cluster) -> None:
    prompt = "class Tree:\n    def insert(self, key):\n"
    expected = tiny.complete(prompt, 200)
    tiny.flush()  # the answer after the loss is computed on an empty cache: compare like that
    victim = tiny.hosts["victim"]

    def on_chunk(i: int) -> None:
        if i == 10:
            tiny.migrate(1, 3, target="victim")
        elif i == 40:
            victim.kill()

    text, errors = read_stream(tiny.stream(prompt, 200), on_chunk)
    assert errors, "the request must end with an error once its KV is lost"
    assert "lost" in json.dumps(errors[0])
    assert len(text) < len(expected) and expected.startswith(text)
    status = tiny.status()
    assert status["local_layers"] == [0, 1, 2, 3] and status["ranges"] == []
    assert [e["event"] for e in status["events"]][-2:] == ["host_lost", "flushed"]
    # The worker serves on, with its own layers and a flushed cache: same answers as before.
    assert tiny.complete(prompt, 200) == expected
    victim.start()
    victim.wait_ready()


@pytest.mark.smollm2
def test_smollm2_migrated_layers_equal_local(migration_smollm2: Cluster) -> None:
    """SmolLM2-135M (30 layers): layers [10, 20) on the host, before and during a request."""
    cluster = migration_smollm2
    cluster.reset()
    prompts = ("The capital of France is", "List three colours:")
    cluster.flush()
    expected = {p: cluster.complete(p, 24) for p in prompts}
    long_prompt = "Write a short poem about the sea."
    long_expected = cluster.complete(long_prompt, 48)
    info = cluster.migrate(10, 20)
    assert cluster.status()["local_layers"] == [*range(10), *range(20, 30)]
    assert {p: cluster.complete(p, 24) for p in prompts} == expected
    cluster.restore()
    cluster.flush()
    acted: list[dict[str, Any]] = []

    def on_chunk(i: int) -> None:
        if i == 8:
            acted.append(cluster.migrate(10, 20))

    text, errors = read_stream(cluster.stream(long_prompt, 48), on_chunk)
    steps = cluster.status()["ranges"][0]["forward"]["steps"]
    cluster.restore()
    assert not errors and acted
    assert 0 < steps < 48
    assert text == long_expected
    # q, k, v, o, gate, up, down and two norms: 3,540,096 parameters a layer, in the dtype the
    # worker serves (bfloat16 where the CPU has native bf16, float32 otherwise)
    served = cluster.status()["model"]["dtype"]
    assert info["weight_bytes"] == 10 * 3_540_096 * {"bfloat16": 2, "float32": 4}[served]
