"""The policy seam and the built-in policies."""

from __future__ import annotations

from collections import Counter

import pytest

from router import policy
from router.policy.base import RequestFeatures, parse_spec
from router.workers import WorkerLoad, WorkerView

REQ = RequestFeatures(route="chat", max_tokens=16)


def view(url: str, in_flight: int = 0, running: int = 0, waiting: int = 0,
         usage: float = 0.0, capacity: int = 8, waiting_tokens: int = 0) -> WorkerView:
    load = WorkerLoad(num_running_reqs=running, num_waiting_reqs=waiting,
                      num_waiting_uncached_tokens=waiting_tokens, token_usage=usage,
                      max_running_requests=capacity, at=1.0)
    return WorkerView(url, True, in_flight, load, 0)


def test_registry_lists_builtins() -> None:
    assert {"load_aware", "round_robin"} <= set(policy.names())


def test_unknown_policy_names_the_available_ones() -> None:
    with pytest.raises(ValueError, match="unknown policy 'nope'.*load_aware"):
        policy.build("nope")


def test_parse_spec() -> None:
    assert parse_spec("load_aware:w_memory=0.2, seed=3") == (
        "load_aware", {"w_memory": "0.2", "seed": "3"})
    with pytest.raises(ValueError, match="not key=value"):
        parse_spec("load_aware:w_memory")


@pytest.mark.parametrize("spec", ["round_robin:x=1", "load_aware:bogus=1",
                                  "load_aware:w_memory=abc", "load_aware:w_memory=-1"])
def test_bad_parameters_are_rejected(spec: str) -> None:
    with pytest.raises(ValueError):
        policy.build(spec)


def test_round_robin_cycles() -> None:
    rr = policy.build("round_robin")
    workers = [view("a"), view("b"), view("c")]
    assert [rr.pick(workers, REQ).url for _ in range(6)] == ["a", "b", "c"] * 2


def test_load_aware_prefers_fewer_requests_in_flight() -> None:
    la = policy.build("load_aware:seed=1")
    assert la.pick([view("a", in_flight=3), view("b", in_flight=1)], REQ).url == "b"


def test_load_aware_uses_polled_load_when_it_exceeds_in_flight() -> None:
    la = policy.build("load_aware:seed=1")
    busy_elsewhere = view("a", in_flight=0, running=6, waiting=2)
    assert la.pick([busy_elsewhere, view("b", in_flight=2)], REQ).url == "b"


def test_load_aware_weighs_kv_usage() -> None:
    la = policy.build("load_aware:seed=1")
    assert la.pick([view("a", usage=0.9), view("b", usage=0.1)], REQ).url == "b"
    compute_only = policy.build("load_aware:w_memory=0,seed=1")
    picks = Counter(compute_only.pick([view("a", usage=0.9), view("b", usage=0.1)], REQ).url
                    for _ in range(200))
    assert set(picks) == {"a", "b"}  # memory ignored -> a tie


def test_load_aware_counts_waiting_prompt_tokens() -> None:
    la = policy.build("load_aware:seed=1,chunk=100")
    assert la.pick([view("a", waiting_tokens=500), view("b", running=2)], REQ).url == "b"


def test_load_aware_normalises_by_capacity() -> None:
    la = policy.build("load_aware:seed=1")
    assert la.pick([view("small", in_flight=3, capacity=4),
                    view("big", in_flight=4, capacity=16)], REQ).url == "big"


def test_load_aware_breaks_ties_randomly_but_reproducibly() -> None:
    workers = [view("a"), view("b"), view("c")]
    first = [policy.build("load_aware:seed=7").pick(workers, REQ).url for _ in range(1)]
    la = policy.build("load_aware:seed=7")
    picks = [la.pick(workers, REQ).url for _ in range(300)]
    assert set(picks) == {"a", "b", "c"}
    assert picks[0] == first[0]


def test_load_aware_score_formula() -> None:
    la = policy.build("load_aware:w_compute=1,w_memory=0.5,chunk=512")
    score = la.score(view("a", in_flight=1, running=2, waiting=2, usage=0.4, capacity=8,
                          waiting_tokens=1024))
    assert score == pytest.approx((4 + 2) / 8 + 0.5 * 0.4)
