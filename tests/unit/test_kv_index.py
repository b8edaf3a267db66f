"""router.policy.kv_index: the exact prefix index built from SGLang's KV events."""

from __future__ import annotations

from typing import Any

import pytest

from router.policy.kv_index import DEVICE, KvIndex

A, B = "http://a:1", "http://b:1"


def stored(hashes: list[int], parent: int | None, tokens: list[int], size: int,
           medium: str | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {"type": "BlockStored", "block_hashes": hashes,
                             "parent_block_hash": parent, "token_ids": tokens,
                             "block_size": size, "lora_id": None}
    if medium:
        event["medium"] = medium
    return event


def removed(hashes: list[int], medium: str | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {"type": "BlockRemoved", "block_hashes": hashes}
    if medium:
        event["medium"] = medium
    return event


def page1(index: KvIndex, worker: str, tokens: list[int], first_hash: int = 100,
          parent: int | None = None) -> list[int]:
    """Store ``tokens`` as SGLang does with page size 1: one event per token, chained."""
    hashes = []
    for i, token in enumerate(tokens):
        h = first_hash + i
        index.apply(worker, stored([h], parent, [token], 1))
        hashes.append(h)
        parent = h
    return hashes


def test_page_size_one_chain_matches_the_stored_prefix_only() -> None:
    index = KvIndex()
    page1(index, A, [5, 6, 7, 8])
    assert index.matched_tokens([5, 6, 7, 8, 9]) == {A: 4}
    assert index.matched_tokens([5, 6, 9]) == {A: 2}
    assert index.matched_tokens([6, 5]) == {}
    assert index.stats(A).num_blocks == {DEVICE: 4}


def test_blocks_of_several_tokens_count_only_whole_blocks() -> None:
    index = KvIndex()
    index.apply(A, stored([1], None, [1, 2, 3, 4], 4))
    index.apply(A, stored([2], 1, [5, 6, 7, 8], 4))
    # the prompt ends inside the second block: the worker holds 4 of its tokens as a whole page
    assert index.matched_tokens([1, 2, 3, 4, 5, 6]) == {A: 4}
    assert index.matched_tokens([1, 2, 3, 4, 5, 6, 7, 8, 9]) == {A: 8}
    # one event may carry several blocks (vLLM's shape): same result
    other = KvIndex()
    other.apply(A, stored([1, 2], None, [1, 2, 3, 4, 5, 6, 7, 8], 4))
    assert other.matched_tokens([1, 2, 3, 4, 5, 6, 7, 8, 9]) == {A: 8}


def test_workers_share_nodes_but_not_ownership() -> None:
    index = KvIndex()
    page1(index, A, [1, 2, 3])
    page1(index, B, [1, 2], first_hash=900)  # B's own hashes: the router never compares them
    assert index.matched_tokens([1, 2, 3]) == {A: 3, B: 2}
    index.apply(B, removed([901]))
    assert index.matched_tokens([1, 2, 3]) == {A: 3, B: 1}


def test_removal_prunes_and_leaves_other_owners_alone() -> None:
    index = KvIndex()
    hashes = page1(index, A, [1, 2, 3])
    page1(index, B, [1, 2, 3], first_hash=500)
    index.apply(A, removed(hashes[::-1]))  # SGLang evicts leaves first
    assert index.matched_tokens([1, 2, 3]) == {B: 3}
    assert index.stats(A).num_blocks == {DEVICE: 0}
    index.clear(B)
    assert index.matched_tokens([1, 2, 3]) == {}
    assert index._root.children == {}  # nothing left behind


def test_media_are_separate_owners() -> None:
    index = KvIndex()
    index.apply(A, stored([1], None, [1, 2], 2))
    index.apply(A, stored([2], 1, [3, 4], 2, medium="CPU"))  # host tier below a device block
    assert index.match([1, 2, 3, 4]) == {(A, DEVICE): 2, (A, "CPU"): 4}
    index.apply(A, removed([2], medium=DEVICE))  # not held on the device: nothing changes
    assert index.match([1, 2, 3, 4]) == {(A, DEVICE): 2, (A, "CPU"): 4}
    index.apply(A, removed([2], medium="CPU"))
    assert index.match([1, 2, 3, 4]) == {(A, DEVICE): 2}


def test_unknown_parent_is_an_orphan_not_a_wrong_prefix() -> None:
    index = KvIndex()
    index.apply(A, stored([7], 12345, [9, 9], 2))
    assert index.matched_tokens([9, 9]) == {}
    assert index.stats(A).num_orphans == 1


def test_all_blocks_cleared_and_clear_forget_the_worker() -> None:
    index = KvIndex()
    page1(index, A, [1, 2])
    page1(index, B, [1, 2], first_hash=300)
    index.apply(A, {"type": "AllBlocksCleared"})
    assert index.matched_tokens([1, 2]) == {B: 2}
    assert index.stats(A).num_clears == 0  # the worker said so: not a loss of sync
    index.clear(B)
    assert index.stats(B).num_clears == 1
    index.forget(B)
    assert list(index.workers()) == [A]


@pytest.mark.parametrize("event", [
    {"type": "Bogus"},
    {"type": "BlockStored", "block_hashes": [1], "token_ids": [1, 2, 3], "block_size": 2},
    {"type": "BlockStored", "block_hashes": [1, 2], "token_ids": [1, 2], "block_size": 2},
    {"type": "BlockStored", "block_hashes": [1], "token_ids": [1], "block_size": 0},
    {"type": "BlockStored", "block_hashes": [1], "token_ids": ["x"], "block_size": 1},
    {"type": "BlockRemoved", "block_hashes": 3},
])
def test_malformed_events_raise(event: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        KvIndex().apply(A, event)


# -- router.kv_events: the pure parts (the streams run against real workers in
#    tests/integration/test_kv_events.py)

def test_source_makes_wildcard_endpoints_concrete() -> None:
    from router.kv_events import Source

    cfg = ('{"publisher": "zmq", "endpoint": "tcp://*:5601", "replay_endpoint": '
           '"tcp://0.0.0.0:5602", "topic": "kv"}')
    src = Source.from_server_info("http://10.0.0.7:30001", {"kv_events_config": cfg})
    assert src == Source("tcp://10.0.0.7:5601", "tcp://10.0.0.7:5602", "kv")
    assert Source.from_server_info("http://h:1", {"kv_events_config": None}) is None
    assert Source.from_server_info("http://h:1", {"kv_events_config": '{"publisher": "null"}'}) \
        is None
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        Source.from_server_info("http://h:1", {"kv_events_config":
                                               '{"publisher": "zmq", "endpoint": "ipc:///x"}'})


def test_seq_tracker_applies_in_order_and_names_gaps_dups_and_restarts() -> None:
    from router.kv_events import SeqTracker

    t = SeqTracker()
    assert t.classify(0) == "apply"
    t.applied(0)
    assert t.classify(3) == "gap"  # 1, 2 missed: replayed, then 3 applied
    t.applied(1), t.applied(2), t.applied(3)
    assert t.classify(4) == "apply"
    t.applied(4)
    assert t.classify(2) == "restart"  # the live stream went backwards
    t.reset()
    assert t.next_seq == 0
    # a replay ran ahead of the live stream: live batches it already applied are duplicates
    t2 = SeqTracker()
    for seq in range(6):
        t2.applied(seq)
    assert t2.classify(4) == "dup" and t2.classify(5) == "dup" and t2.classify(6) == "apply"
