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


def test_load_aware_memory_counts_what_it_sent_since_the_last_poll() -> None:
    """Between two polls the router's own in-flight tokens keep the memory term fresh: with
    256 slots a request adds only 1/256 to compute, and a stale low token_usage used to draw
    every request until the next poll."""
    def gpu(url: str, usage: float, in_flight: int, tokens: int) -> WorkerView:
        load = WorkerLoad(token_usage=usage, max_running_requests=256,
                          max_total_num_tokens=60_000, at=1.0)
        return WorkerView(url, True, in_flight, load, 0, in_flight_tokens=tokens)

    la = policy.build("load_aware:seed=1")
    assert la.pick([gpu("a", 0.30, 40, 0), gpu("b", 0.35, 40, 0)], REQ).url == "a"
    # a has since been sent 8 more requests of 1,500 tokens; its polled usage is unchanged
    assert la.pick([gpu("a", 0.30, 48, 30_000), gpu("b", 0.35, 40, 20_000)], REQ).url == "b"
    assert la.score(gpu("a", 0.30, 48, 30_000)) == pytest.approx(48 / 256 + 0.5 * 0.5)


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


def test_random_covers_all_workers() -> None:
    rnd = policy.build("random:seed=3")
    workers = [view("a"), view("b"), view("c")]
    assert {rnd.pick(workers, REQ).url for _ in range(100)} == {"a", "b", "c"}


def tview(url: str, in_flight_tokens: int = 0, waiting_tokens: int = 0, throughput: float = 0.0,
          usage: float = 0.0) -> WorkerView:
    load = WorkerLoad(num_waiting_uncached_tokens=waiting_tokens, gen_throughput=throughput,
                      token_usage=usage, max_running_requests=8, at=1.0)
    return WorkerView(url, True, 0, load, 0, in_flight_tokens)


def test_least_load_is_the_smg_formula() -> None:
    ll = policy.build("least_load:lam=2,min_throughput=10")
    score = ll.scorer.score(tview("a", in_flight_tokens=300, waiting_tokens=100,
                                  throughput=50.0, usage=0.5))
    assert score == pytest.approx(400 / 50 + 2 * 0.5 / 0.5)
    # the throughput floor applies before the first measurement
    assert ll.scorer.score(tview("b", in_flight_tokens=100)) == pytest.approx(100 / 10)


def test_least_load_prefers_less_queued_work_per_throughput() -> None:
    ll = policy.build("least_load:seed=1")
    fast = tview("fast", in_flight_tokens=1000, throughput=1000.0)
    slow = tview("slow", in_flight_tokens=500, throughput=100.0)
    assert ll.pick([fast, slow], REQ).url == "fast"
    assert ll.pick([tview("full", usage=0.95), tview("empty")], REQ).url == "empty"


def test_least_load_rejects_max_usage_of_one() -> None:
    with pytest.raises(ValueError, match="max_usage"):
        policy.build("least_load:max_usage=1")


def test_power_of_two_never_picks_the_worst_of_three() -> None:
    p2 = policy.build("power_of_two:seed=5")
    workers = [tview("a"), tview("b", in_flight_tokens=50), tview("worst", in_flight_tokens=999)]
    picks = Counter(p2.pick(workers, REQ).url for _ in range(300))
    assert picks["worst"] == 0 and picks["a"] > picks["b"] > 0


def chat(text: str) -> RequestFeatures:
    return RequestFeatures(route="chat", max_tokens=16, prompt_text=text, prompt_tokens=10)


def test_cache_aware_sends_a_shared_prefix_to_the_same_worker() -> None:
    ca = policy.build("cache_aware:seed=2")
    workers = [view("a"), view("b")]
    doc_a, doc_b = "alpha " * 100, "bravo " * 100
    first_a = ca.pick(workers, chat(doc_a + "q1")).url
    first_b = ca.pick(workers, chat(doc_b + "q1")).url
    assert first_a != first_b  # a new prefix goes to the emptier index
    assert {ca.pick(workers, chat(doc_a + f"q{i}")).url for i in range(2, 10)} == {first_a}
    assert {ca.pick(workers, chat(doc_b + f"q{i}")).url for i in range(2, 10)} == {first_b}


def test_cache_aware_falls_back_to_least_loaded_when_imbalanced() -> None:
    ca = policy.build("cache_aware:seed=2,balance_abs=4")
    doc = "alpha " * 100
    workers = [view("a"), view("b")]
    home = ca.pick(workers, chat(doc)).url
    other = "b" if home == "a" else "a"
    busy = [view(home, in_flight=10), view(other, in_flight=1)]
    assert ca.pick(busy, chat(doc + "again")).url == other
    near = [view(home, in_flight=4), view(other, in_flight=1)]  # within balance_abs
    assert ca.pick(near, chat(doc + "more")).url == home


def test_cache_aware_index_is_bounded_lru() -> None:
    from router.policy.cache_aware import PrefixIndex, prefix_keys

    index = PrefixIndex(max_blocks=4)
    old, new = prefix_keys("o" * 256, 64), prefix_keys("n" * 256, 64)
    index.insert(old)
    assert index.match(old) == 4
    index.insert(new)
    assert len(index) == 4 and index.match(old) == 0 and index.match(new) == 4
    assert prefix_keys("ab" * 64, 64)[0] == prefix_keys("ab" * 40, 64)[0]  # shared first block
