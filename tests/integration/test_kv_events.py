"""The router's KV index against real SGLang CPU workers: built from their KV events, checked
against what each worker itself reports as cached (``meta_info.cached_tokens`` of a probe sent
straight to it), through traffic, a cache flush, evictions and a worker restart.

The session's two tiny-model workers publish KV events by default (``runtime_patches.launch``)
and the session router follows them (``router.kv_events``)."""

from __future__ import annotations

import os
import random
import time
from typing import Any

import pytest

from runtime_patches.launch import LOAD_SNAPSHOT_PREFIX, WorkerProcess, mapped_files
from tests.integration.cluster import RouterProcess, http_json, wait_until

pytestmark = pytest.mark.integration
DEVICE = "GPU"


def held(router: RouterProcess, ids: list[int]) -> dict[str, int]:
    """Worker URL -> leading device-cache tokens of ``ids`` by the router's index."""
    status, body, _ = http_json("POST", router.url + "/kv_index/match", {"input_ids": ids})
    assert status == 200, body
    assert body["input_tokens"] == len(ids)
    return {url: media.get(DEVICE, 0) for url, media in body["workers"].items()
            if media.get(DEVICE, 0)}


def generate(url: str, ids: list[int], max_new_tokens: int = 2) -> dict[str, Any]:
    status, out, headers = http_json("POST", url + "/generate", {
        "input_ids": ids, "sampling_params": {"max_new_tokens": max_new_tokens,
                                              "temperature": 0}})
    assert status == 200, out
    return {**out, "worker": headers.get("X-BanaServe-Worker")}


def cached(url: str, ids: list[int]) -> int:
    """What the worker itself has of ``ids``: a probe ``ids + [token]`` straight to it, its
    ``cached_tokens`` (the probe adds itself to that worker's cache)."""
    return int(generate(url, [*ids, 7], max_new_tokens=1)["meta_info"]["cached_tokens"])


def settled(router: RouterProcess, ids: list[int], expect: dict[str, int]) -> dict[str, int]:
    """Wait (events are asynchronous) until the index says ``expect``; return what it says."""
    wait_until(lambda: held(router, ids) == expect, 15)
    return held(router, ids)


def flush(url: str) -> None:
    """SGLang's ``/flush_cache`` (refused, 400, while it has requests: retried)."""
    assert wait_until(lambda: http_json("POST", url + "/flush_cache")[0] == 200, 30, 0.5), \
        f"{url} did not flush its cache"


def prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 2000) for _ in range(n)]


def test_index_matches_the_workers_caches(router: RouterProcess,
                                          tiny_workers: list[WorkerProcess]) -> None:
    rng = random.Random(2112)
    urls = [w.url for w in tiny_workers]
    for url in urls:  # a known start: both caches empty
        flush(url)
    ids = prompt(rng, 60)
    assert held(router, ids) == {}

    # traffic through the router: the worker that served it holds the prompt, the other none
    first = generate(router.url, ids)["worker"]
    other = next(u for u in urls if u != first)
    assert settled(router, ids, {first: 60}) == {first: 60}
    assert cached(first, ids) == 60  # the worker agrees: the index's 60 tokens are there
    assert cached(other, ids) == 0  # ... and the other worker has none, as the index said
    assert settled(router, ids, {first: 60, other: 60}) == {first: 60, other: 60}

    # a prefix never sent is nowhere (negative control for the lookup)
    assert held(router, prompt(rng, 30)) == {}

    # flush: SGLang's AllBlocksCleared empties that worker's entries only
    flush(other)
    assert settled(router, ids, {first: 60}) == {first: 60}

    # evictions: fill `first`'s 4,096-token pool from `other`-free traffic until the oldest
    # prompt is (partly) evicted; the index follows SGLang's BlockRemoved events
    fillers = [prompt(rng, 400) for _ in range(14)]
    for filler in fillers:
        generate(first, filler, max_new_tokens=1)
    wait_until(lambda: held(router, ids).get(first, 0) < 60, 15)
    index_says = held(router, ids).get(first, 0)
    assert index_says < 60, "the oldest prompt should have been evicted"
    assert cached(first, ids) == index_says
    newest = fillers[-1]
    assert held(router, newest).get(first) == 400
    assert cached(first, newest) == 400

    status, body, _ = http_json("GET", router.url + "/workers")
    rows = {w["url"]: w["kv_index"] for w in body["workers"]}
    assert rows[first]["streaming"] and rows[first]["num_blocks"][DEVICE] > 0
    assert rows[first]["num_resets"] == 0 and rows[first]["num_orphans"] == 0
    status, text, _ = http_json("GET", router.url + "/metrics")
    assert f'banaserve_kv_index_blocks{{medium="GPU",worker="{first}"}}' in text


def test_index_is_rebuilt_after_a_worker_restart(router: RouterProcess,
                                                 tiny_workers: list[WorkerProcess]) -> None:
    rng = random.Random(4242)
    victim = tiny_workers[1]
    ids = prompt(rng, 50)
    generate(victim.url, ids)
    assert settled(router, ids, {victim.url: 50}).get(victim.url) == 50

    snapshots = mapped_files(victim.pid or 0, LOAD_SNAPSHOT_PREFIX)
    assert snapshots, "a running SGLang worker maps its load-snapshot file"
    victim.stop()
    # SGLang unlinks it only on a clean exit; the launcher removes it after a stop
    assert not [p for p in snapshots if os.path.exists(p)]
    restarted = WorkerProcess(victim.cfg, log_path=victim.log_path)  # same ports
    restarted.start()
    tiny_workers[1] = restarted  # the session fixture stops whatever is there at the end
    restarted.wait_ready(600)
    # its cache is empty after the restart, and so is the index's view of it
    assert settled(router, ids, {}) == {}
    assert cached(restarted.url, ids) == 0
    assert settled(router, ids, {restarted.url: 50}) == {restarted.url: 50}


def _repeats(router: RouterProcess, urls: list[str], rng: random.Random) -> list[tuple[str, str,
                                                                                       int]]:
    """Four 300-token prompts, each sent three times in a row: (first worker, repeat's worker,
    tokens the repeat found cached there) for every repeat."""
    for url in urls:
        flush(url)
    out = []
    for _ in range(4):
        ids = prompt(rng, 300)
        first = generate(router.url, ids)["worker"]
        wait_until(lambda ids=ids, first=first: held(router, ids).get(first) == 300, 15)
        for _ in range(2):
            again = generate(router.url, ids)
            out.append((first, again["worker"], int(again["meta_info"]["cached_tokens"])))
    return out


def test_cost_aware_sends_a_repeated_prompt_to_the_worker_that_holds_it(
        router: RouterProcess, tiny_workers: list[WorkerProcess]) -> None:
    """``--policy cost_aware`` reads the index: every repeat of a prompt lands on the worker
    that cached it and is served from that cache. With ``round_robin`` in the same conditions
    repeats miss (the check can fail)."""
    urls = [w.url for w in tiny_workers]
    cost = RouterProcess(urls, "--policy", "cost_aware", tag="router-cost-aware")
    blind = RouterProcess(urls, "--policy", "round_robin", tag="router-round-robin")
    try:
        cost.wait_ready()
        blind.wait_ready()
        assert wait_until(lambda: all(w["kv_index"]["streaming"] for w in http_json(
            "GET", cost.url + "/workers")[1]["workers"]), 30)
        got = _repeats(cost, urls, random.Random(7))
        assert all(again == first for first, again, _ in got), got
        assert all(hit >= 299 for _, _, hit in got), got  # all but the last token, cached
        # a text prompt, tokenized by the router: its repeat follows it too
        body = {"model": "tiny-llama", "prompt": "lorem ipsum dolor " * 40, "max_tokens": 2,
                "temperature": 0}
        status, _, first = http_json("POST", cost.url + "/v1/completions", body)
        assert status == 200
        time.sleep(1.0)  # let the worker's KV events reach the router
        status, _, again = http_json("POST", cost.url + "/v1/completions", body)
        assert status == 200 and again["X-BanaServe-Worker"] == first["X-BanaServe-Worker"]

        control = _repeats(blind, urls, random.Random(7))
        assert any(again != first for first, again, _ in control), control
        assert any(hit < 299 for _, _, hit in control), control
    finally:
        cost.stop()
        blind.stop()


def _shared_prefix_hits(routers: list[RouterProcess], urls: list[str],
                        rng: random.Random) -> tuple[int, int]:
    """Six 200-token prefixes, each asked four times with its own 8-token question, in a seeded
    shuffled order; request ``i`` goes through ``routers[i % len(routers)]`` and each waits until
    every router's index shows it cached (as a live fleet would between arrivals). Returns the
    prompt tokens the workers found cached, and all prompt tokens."""
    prefixes = [prompt(rng, 200) for _ in range(6)]
    for url in urls:
        flush(url)
    for r in routers:  # the flush reaches every router's index as an event
        assert wait_until(lambda r=r: not any(held(r, p) for p in prefixes), 15), r.url
    order = [p for p in range(len(prefixes)) for _ in range(4)]
    rng.shuffle(order)
    hit = total = 0
    for i, p in enumerate(order):
        ids = prefixes[p] + prompt(rng, 8)
        out = generate(routers[i % len(routers)].url, ids)
        hit += int(out["meta_info"]["cached_tokens"])
        total += len(ids)
        for r in routers:
            assert wait_until(lambda r=r, ids=ids, w=out["worker"]:
                              held(r, ids).get(w, 0) >= len(ids), 15), (i, r.url)
        # and until every router has polled the workers' loads since (every 0.5 s): a replica
        # does not see the other's requests finish, so a stale poll still showing this one
        # waiting would price the holder as busy (CI at 8689fcf: two repeats sent elsewhere)
        time.sleep(0.6)
    return hit, total


def test_two_cost_aware_replicas_keep_the_hit_rate_of_one_router(
        tiny_workers: list[WorkerProcess]) -> None:
    """Two router replicas in front of the same workers, traffic alternating between them, find
    as many cached prompt tokens as one router taking it all: each builds its state from the
    workers' KV events, not from the requests it happened to route. Control: ``cache_aware``,
    which remembers only its own history, loses hits when split the same way."""
    urls = [w.url for w in tiny_workers]

    def start(policy: str, tag: str) -> RouterProcess:
        proc = RouterProcess(urls, "--policy", policy, tag=tag)
        proc.wait_ready()
        assert wait_until(lambda: all(w["kv_index"]["streaming"] for w in http_json(
            "GET", proc.url + "/workers")[1]["workers"]), 30)
        return proc

    routers = [start("cost_aware", "router-replica-a"), start("cost_aware", "router-replica-b"),
               start("cache_aware:seed=1", "router-replica-c"),
               start("cache_aware:seed=2", "router-replica-d")]
    try:
        one, total = _shared_prefix_hits(routers[:1], urls, random.Random(11))
        two, total2 = _shared_prefix_hits(routers[:2], urls, random.Random(11))
        assert total == total2
        # every repeat of a prefix found it (3 repeats x 6 prefixes x 200 tokens), but one: the
        # herding guard may send a repeat elsewhere on a stale load poll (seen once in CI)
        assert one >= 17 * 200, (one, total)
        assert two >= min(one, 18 * 200) - 200, (two, one)  # the same, within that one repeat
        alone, _ = _shared_prefix_hits(routers[2:3], urls, random.Random(11))
        split, _ = _shared_prefix_hits(routers[2:], urls, random.Random(11))
        assert alone >= 18 * 200, alone  # one cache_aware router alone does as well...
        assert split < alone, (split, alone)  # ...but two replicas of it do not
    finally:
        for r in routers:
            r.stop()
