"""Attention offload (some KV heads of some layers on a head host) between a live SGLang CPU
worker and a host process (runtime_patches.migration.heads / offloads / head_host).

The tiny model has 8 query heads over 4 KV heads (grouped-query attention, 2 query heads per
KV head). The worker runs on core 0, hosts on core 1. Greedy outputs with heads offloaded
before a request, or switched on and off in the middle of one, must be token-for-token those of
the plain worker: both halves run SGLang's torch_native attention, per head, on the same
batch, so each head's arithmetic is the unsplit layer's. A host killed mid-request ends that
request with an error, never with a wrong token. Bad control requests get 400, nothing changed.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.integration.cluster import http_json
from tests.integration.migration_cluster import PROMPTS, TINY_POOL, Cluster, read_stream

pytestmark = pytest.mark.integration

FRESH = ("for i in range(10):", "while True:\n    x = ")


@pytest.fixture
def tiny(migration_tiny: Cluster) -> Cluster:
    """The session's tiny migration cluster (shared with ``test_layer_migration``), idle and
    reset: no offloaded head, no migrated range, both hosts up, an empty radix cache."""
    migration_tiny.reset()
    return migration_tiny


def offload(cluster: Cluster, layers: list[int], heads: list[int],
            target: str = "b") -> dict[str, Any]:
    status, out = cluster.control("POST", "/banaserve/offload_heads",
                                  {"layers": layers, "heads": heads, "target": target})
    assert status == 200, out
    return out


def recall(cluster: Cluster, body: dict[str, Any] | None = None) -> dict[str, Any]:
    status, out = cluster.control("POST", "/banaserve/recall_heads", body or {})
    assert status == 200, out
    return out


def test_outputs_with_offloaded_heads_equal_local(tiny: Cluster) -> None:
    expected = {p: tiny.complete(p, 24) for p in PROMPTS}
    tiny.flush()
    fresh_expected = {p: tiny.complete(p, 24) for p in FRESH}
    for p in PROMPTS:  # cached again: their KV must travel with the offload
        tiny.complete(p, 24)
    info = offload(tiny, [0, 1, 2, 3], [2, 3])
    assert info["kv_bytes_moved"] > 0 and info["kv_bytes_released"] > 0
    status = tiny.status()
    assert [o["heads"] for o in status["heads"]["offloads"]] == [[2, 3]]
    assert status["heads"]["num_kv_heads"] == 4 and status["heads"]["num_q_heads"] == 8
    # Half of every layer's KV heads left: the same memory holds twice the tokens.
    assert status["kv"]["pool_tokens"] == status["kv"]["capacity_tokens"] >= 2 * TINY_POOL - 1
    code, loads, _ = http_json("GET", tiny.worker.url + "/v1/loads")
    assert code == 200 and loads["loads"][0]["max_total_num_tokens"] == status["kv"][
        "pool_tokens"]
    got = {p: tiny.complete(p, 24) for p in PROMPTS}  # cached prefixes, heads split
    tiny.flush()
    fresh = {p: tiny.complete(p, 24) for p in FRESH}  # computed with the heads split
    calls = tiny.status()["heads"]["offloads"][0]["attention"]["layer_calls"]
    out = recall(tiny)
    assert out["recalled"][0]["heads"] == [2, 3]
    status = tiny.status()
    assert status["heads"]["offloads"] == [] and status["kv"]["pool_tokens"] == TINY_POOL
    assert got == expected
    assert fresh == fresh_expected
    assert calls >= 4 * 24 * len(FRESH)
    # The KV the host held came back with the recall: the cached prompts still agree.
    assert {p: tiny.complete(p, 24) for p in FRESH} == fresh_expected


def test_offloads_combine_with_each_other_and_with_layer_migration(tiny: Cluster) -> None:
    prompt = "def merge(a, b):\n"
    expected = tiny.complete(prompt, 32)
    tiny.flush()
    offload(tiny, [1, 2], [0])
    offload(tiny, [3], [1, 2, 3], target="victim")
    tiny.migrate(0, 1)
    try:
        status = tiny.status()
        assert status["local_layers"] == [1, 2, 3]
        assert [o["heads"] for o in status["heads"]["offloads"]] == [[0], [1, 2, 3]]
        # 3 local layers x 4 heads - 2 - 3 offloaded = 7 head-layers of the 16 budgeted
        assert status["kv"]["pool_tokens"] >= (16 * (TINY_POOL + 1)) // 7 - 2
        got = tiny.complete(prompt, 32)
    finally:
        tiny.restore()
        recall(tiny)
    assert got == expected
    assert tiny.status()["kv"]["pool_tokens"] == TINY_POOL


def test_offload_and_recall_in_the_middle_of_a_request(tiny: Cluster) -> None:
    prompt = "def fibonacci(n):\n"
    expected = tiny.complete(prompt, 160)
    tiny.flush()
    actions: list[dict[str, Any]] = []

    def on_chunk(i: int) -> None:
        if i == 20:
            actions.append(offload(tiny, [0, 1, 2, 3], [1, 3]))
        elif i == 90:
            actions.append(recall(tiny))

    text, errors = read_stream(tiny.stream(prompt, 160), on_chunk)
    assert not errors and len(actions) == 2
    calls = actions[1]["recalled"][0]["attention"]["layer_calls"]
    assert 0 < calls < 4 * 160, "the offload must land while the request runs"
    assert text == expected


def test_recall_waits_for_kv_above_the_original_pool(tiny: Cluster) -> None:
    second = "y = {"
    expected = tiny.complete(second, 700)
    tiny.flush()
    offload(tiny, [0, 1, 2, 3], [0, 1])
    tiny.flush()
    tiny.complete("x = [", 700)  # cached: holds slots up to about 700
    answers: list[tuple[int, Any]] = []

    def on_chunk(i: int) -> None:
        if i == 500:  # the second request now holds slots above the original pool
            answers.append(tiny.control("POST", "/banaserve/recall_heads", {}))

    text, errors = read_stream(tiny.stream(second, 700), on_chunk)
    assert not errors
    ((code, pending),) = answers
    assert code == 202, pending
    assert pending["pending_recall"] == [tiny_offload_id(pending)]
    assert pending["draining_to"] == TINY_POOL and pending["slots_held_above"] > 0
    assert text == expected
    tiny.complete("z", 4)
    status = tiny.status()
    assert status["heads"]["offloads"] == [] and status["pending_recall"] == []
    assert status["kv"]["pool_tokens"] == status["kv"]["capacity_tokens"] == TINY_POOL


def tiny_offload_id(pending: dict[str, Any]) -> int:
    return int(pending["pending_recall"][0])


def test_bad_offload_requests_change_nothing(tiny: Cluster) -> None:
    before = tiny.status()
    bad = [
        ({"layers": [0, 9], "heads": [1], "target": "b"}, "inside [0, 4)"),
        ({"layers": [], "heads": [1], "target": "b"}, "non-empty list"),
        ({"layers": [1], "heads": [4], "target": "b"}, "KV heads in [0, 4)"),
        ({"layers": [1], "heads": [0, 1, 2, 3], "target": "b"}, "leaves none here"),
        ({"layers": [1, 1], "heads": [0], "target": "b"}, "duplicates"),
        ({"layers": [1], "heads": ["0"], "target": "b"}, "list of integers"),
        ({"layers": [1], "heads": [0], "target": "nope"}, "unknown target"),
        ({"layers": [1], "heads": [0], "target": "b", "force": 1}, "unknown fields"),
    ]
    for body, message in bad:
        status, out = tiny.control("POST", "/banaserve/offload_heads", body)
        assert status == 400, (body, out)
        assert message in out["error"]["message"], out
        assert out["error"]["type"] == "invalid_request_error"
    status, out = tiny.control("POST", "/banaserve/offload_heads", raw=b"{not json")
    assert status == 400, out
    status, out = tiny.control("POST", "/banaserve/recall_heads", {"id": 99})
    assert status == 400 and "no head offload" in out["error"]["message"], out
    status, out = tiny.control("POST", "/banaserve/offload_heads",
                               {"layers": [1], "heads": [0], "target": "dead"})
    assert status == 503, out
    offload(tiny, [1, 2], [3])
    try:
        status, out = tiny.control("POST", "/banaserve/offload_heads",
                                   {"layers": [2], "heads": [1], "target": "b"})
        assert status == 400 and "already has KV heads" in out["error"]["message"], out
        status, out = tiny.control("POST", "/banaserve/migrate_layers",
                                   {"layers": [0, 2], "target": "b"})
        assert status == 400 and "recall them" in out["error"]["message"], out
        assert len(tiny.status()["heads"]["offloads"]) == 1
    finally:
        recall(tiny)
    after = tiny.status()
    assert after["heads"]["offloads"] == [] and after["local_layers"] == before["local_layers"]
    assert after["kv"]["pool_tokens"] == before["kv"]["pool_tokens"]


def test_head_host_killed_mid_request_never_emits_a_wrong_token(tiny: Cluster) -> None:
    prompt = "class Tree:\n    def insert(self, key):\n"
    expected = tiny.complete(prompt, 200)
    tiny.flush()
    victim = tiny.hosts["victim"]

    def on_chunk(i: int) -> None:
        if i == 10:
            offload(tiny, [0, 1, 2, 3], [2], target="victim")
        elif i == 40:
            victim.kill()

    text, errors = read_stream(tiny.stream(prompt, 200), on_chunk)
    assert errors, "the request must end with an error once its KV is lost"
    assert "lost" in json.dumps(errors[0])
    assert len(text) < len(expected) and expected.startswith(text)
    status = tiny.status()
    assert status["heads"]["offloads"] == []
    assert [e["event"] for e in status["events"]][-2:] == ["host_lost", "flushed"]
    assert status["kv"]["pool_tokens"] == TINY_POOL
    assert tiny.complete(prompt, 200) == expected
    victim.start()
    victim.wait_ready()


@pytest.mark.smollm2
def test_smollm2_offloaded_heads_equal_local(migration_smollm2: Cluster) -> None:
    """SmolLM2-135M (30 layers, 9 query heads over 3 KV heads): one KV head of every layer on
    the host, before and during a request."""
    cluster = migration_smollm2
    cluster.reset()
    prompts = ("The capital of France is", "List three colours:")
    cluster.flush()
    expected = {p: cluster.complete(p, 24) for p in prompts}
    long_prompt = "Write a short poem about the sea."
    long_expected = cluster.complete(long_prompt, 48)
    cluster.flush()
    offload(cluster, list(range(30)), [2])
    assert {p: cluster.complete(p, 24) for p in prompts} == expected
    recall(cluster)
    cluster.flush()
    acted: list[dict[str, Any]] = []

    def on_chunk(i: int) -> None:
        if i == 8:
            acted.append(offload(cluster, list(range(30)), [0, 1]))

    text, errors = read_stream(cluster.stream(long_prompt, 48), on_chunk)
    calls = cluster.status()["heads"]["offloads"][0]["attention"]["layer_calls"]
    recall(cluster)
    assert not errors and acted
    assert 0 < calls < 30 * 48
    assert text == long_expected
