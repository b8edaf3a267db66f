"""The policy seam (``router.policy.base``) and every built-in policy: ``round_robin``,
``load_aware``, ``random``, ``least_load``, ``power_of_two`` and ``cache_aware``."""

from __future__ import annotations

from collections import Counter

import pytest

from router import policy
from router.policy import RequestFeatures
from router.policy.base import parse_spec, register
from router.policy.load_aware import LoadAware
from router.policy.views import WorkerLoad, WorkerView

REQUEST = RequestFeatures(route="chat", max_tokens=16, prompt_text="user: hi", prompt_tokens=3)


def view(url: str, in_flight: int = 0, in_flight_tokens: int = 0, **load: float) -> WorkerView:
    """A healthy worker; ``load`` are ``WorkerLoad`` fields (none: never polled)."""
    return WorkerView(url=url, healthy=True, in_flight=in_flight,
                      load=WorkerLoad(**load),  # type: ignore[arg-type]
                      total_requests=0, in_flight_tokens=in_flight_tokens)


def polled(url: str, in_flight: int = 0, running: int = 0, waiting: int = 0,
           usage: float = 0.0, capacity: int = 8, waiting_tokens: int = 0) -> WorkerView:
    """A worker whose ``/v1/loads`` has been read (``at`` set)."""
    return view(url, in_flight, num_running_reqs=running, num_waiting_reqs=waiting,
                num_waiting_uncached_tokens=waiting_tokens, token_usage=usage,
                max_running_requests=capacity, at=1.0)


def tview(url: str, in_flight_tokens: int = 0, waiting_tokens: int = 0, throughput: float = 0.0,
          usage: float = 0.0) -> WorkerView:
    """A polled worker described by tokens and throughput (``least_load``'s inputs)."""
    return view(url, 0, in_flight_tokens, num_waiting_uncached_tokens=waiting_tokens,
                gen_throughput=throughput, token_usage=usage, max_running_requests=8, at=1.0)


def chat(text: str) -> RequestFeatures:
    return RequestFeatures(route="chat", max_tokens=16, prompt_text=text, prompt_tokens=10)


# -- the seam -----------------------------------------------------------------------------------
def test_parse_spec_splits_name_and_params() -> None:
    assert parse_spec("load_aware:w_compute=1, w_memory = 0.5") == (
        "load_aware", {"w_compute": "1", "w_memory": "0.5"})
    assert parse_spec("load_aware:w_memory=0.2, seed=3") == (
        "load_aware", {"w_memory": "0.2", "seed": "3"})


def test_parse_spec_without_params() -> None:
    assert parse_spec("round_robin") == ("round_robin", {})
    assert parse_spec("round_robin:") == ("round_robin", {})


@pytest.mark.parametrize("spec", ["load_aware:w_compute", "load_aware:w_memory",
                                  "load_aware:=1", "load_aware:a=1,b"])
def test_parse_spec_rejects_items_that_are_not_key_value(spec: str) -> None:
    with pytest.raises(ValueError, match="not key=value"):
        parse_spec(spec)


def test_build_unknown_policy_lists_the_available_ones() -> None:
    with pytest.raises(ValueError, match="unknown policy 'nope'.*load_aware") as caught:
        policy.build("nope")
    for name in ("load_aware", "round_robin"):
        assert name in str(caught.value)


def test_registry_holds_the_built_in_policies() -> None:
    assert {"load_aware", "round_robin"} <= set(policy.names())


def test_build_returns_an_instance_named_after_its_type() -> None:
    assert isinstance(policy.build("load_aware"), LoadAware)
    assert policy.build("load_aware").name == "load_aware"
    assert policy.build("round_robin").name == "round_robin"


def test_registering_a_name_twice_is_rejected() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        register("round_robin")(type("Dup", (), {}))


# -- round_robin --------------------------------------------------------------------------------
def test_round_robin_cycles_through_the_candidates() -> None:
    rr = policy.build("round_robin")
    workers = [view("http://a:1"), view("http://b:1"), view("http://c:1")]
    picked = [rr.pick(workers, REQUEST).url for _ in range(7)]
    assert picked == ["http://a:1", "http://b:1", "http://c:1"] * 2 + ["http://a:1"]


def test_round_robin_ignores_load() -> None:
    rr = policy.build("round_robin")
    workers = [view("http://a:1", in_flight=50, token_usage=1.0), view("http://b:1")]
    assert [rr.pick(workers, REQUEST).url for _ in range(2)] == ["http://a:1", "http://b:1"]


def test_round_robin_survives_a_shrinking_candidate_list() -> None:
    rr = policy.build("round_robin")
    workers = [view("http://a:1"), view("http://b:1"), view("http://c:1")]
    rr.pick(workers, REQUEST)
    rr.pick(workers, REQUEST)
    assert rr.pick(workers[:1], REQUEST).url == "http://a:1"


@pytest.mark.parametrize("spec", ["round_robin:weight=2", "round_robin:x=1"])
def test_round_robin_takes_no_parameters(spec: str) -> None:
    with pytest.raises(ValueError, match="no parameter"):
        policy.build(spec)


# -- load_aware ---------------------------------------------------------------------------------
def test_load_aware_score_follows_the_documented_formula() -> None:
    la = LoadAware({})
    worker = view("http://a:1", in_flight=1, num_running_reqs=2, num_waiting_reqs=1,
                  num_waiting_uncached_tokens=100, token_usage=0.25, max_running_requests=8)
    compute = (max(2 + 1, 1) + 100 / 512) / 8
    assert la.score(worker) == pytest.approx(1.0 * compute + 0.5 * 0.25)
    explicit = policy.build("load_aware:w_compute=1,w_memory=0.5,chunk=512")
    score = explicit.score(polled("a", in_flight=1, running=2, waiting=2, usage=0.4, capacity=8,
                                  waiting_tokens=1024))
    assert score == pytest.approx((4 + 2) / 8 + 0.5 * 0.4)


def test_load_aware_in_flight_counts_beyond_the_polled_load() -> None:
    la = LoadAware({})
    assert la.score(view("http://a:1", in_flight=6, num_running_reqs=2)) == pytest.approx(6 / 8)


def test_load_aware_uses_default_capacity_before_the_first_poll() -> None:
    la = LoadAware({"default_capacity": "4"})
    assert la.score(view("http://a:1", in_flight=2)) == pytest.approx(2 / 4)


def test_load_aware_clamps_token_usage_to_one() -> None:
    la = LoadAware({"w_compute": "0", "w_memory": "1"})
    assert la.score(view("http://a:1", token_usage=3.0)) == pytest.approx(1.0)


def test_load_aware_parameters_change_the_weights() -> None:
    la = LoadAware({"w_compute": "2", "w_memory": "0", "chunk": "100"})
    worker = view("http://a:1", num_waiting_uncached_tokens=200, token_usage=0.9,
                  max_running_requests=4)
    assert la.score(worker) == pytest.approx(2 * (2 / 4))


def test_load_aware_picks_the_worker_with_fewest_in_flight() -> None:
    la = policy.build("load_aware")
    workers = [view("http://a:1", in_flight=3), view("http://b:1", in_flight=1),
               view("http://c:1", in_flight=2)]
    assert {la.pick(workers, REQUEST).url for _ in range(20)} == {"http://b:1"}
    seeded = policy.build("load_aware:seed=1")
    assert seeded.pick([polled("a", in_flight=3), polled("b", in_flight=1)], REQUEST).url == "b"


def test_load_aware_picks_the_worker_with_lower_token_usage() -> None:
    la = policy.build("load_aware")
    workers = [view("http://a:1", token_usage=0.9), view("http://b:1", token_usage=0.1)]
    assert {la.pick(workers, REQUEST).url for _ in range(20)} == {"http://b:1"}


def test_load_aware_weighs_compute_against_memory() -> None:
    # a: 1 request of 8 (0.125) + full KV (0.5) = 0.625; b: 4 of 8 (0.5) + empty KV = 0.5
    la = policy.build("load_aware")
    workers = [view("http://a:1", in_flight=1, token_usage=1.0), view("http://b:1", in_flight=4)]
    assert la.pick(workers, REQUEST).url == "http://b:1"
    memory_only = policy.build("load_aware:w_compute=0,w_memory=1")
    assert memory_only.pick(workers, REQUEST).url == "http://b:1"
    compute_only = policy.build("load_aware:w_memory=0")
    assert compute_only.pick(workers, REQUEST).url == "http://a:1"


def test_load_aware_breaks_ties_randomly_among_the_tied_only() -> None:
    la = policy.build("load_aware:seed=3")
    workers = [view("http://a:1"), view("http://b:1"), view("http://c:1", in_flight=1)]
    counts = Counter(la.pick(workers, REQUEST).url for _ in range(200))
    assert set(counts) == {"http://a:1", "http://b:1"}
    assert min(counts.values()) > 50
    three_tied = policy.build("load_aware:seed=7")
    workers = [polled("a"), polled("b"), polled("c")]
    assert {three_tied.pick(workers, REQUEST).url for _ in range(300)} == {"a", "b", "c"}


def test_load_aware_seed_makes_tie_breaking_reproducible() -> None:
    workers = [view("http://a:1"), view("http://b:1")]
    first, second = policy.build("load_aware:seed=7"), policy.build("load_aware:seed=7")
    assert [first.pick(workers, REQUEST).url for _ in range(30)] == \
        [second.pick(workers, REQUEST).url for _ in range(30)]


def test_load_aware_single_candidate_is_returned() -> None:
    only = view("http://a:1", in_flight=100, token_usage=1.0)
    assert policy.build("load_aware").pick([only], REQUEST) is only


@pytest.mark.parametrize("spec", ["load_aware:w_fast=1", "load_aware:seed=1,bogus=2",
                                  "load_aware:bogus=1"])
def test_load_aware_rejects_unknown_parameters(spec: str) -> None:
    with pytest.raises(ValueError, match="has no parameter"):
        policy.build(spec)


@pytest.mark.parametrize("spec", ["load_aware:w_compute=heavy", "load_aware:chunk=",
                                  "load_aware:tie_epsilon=1e-9x", "load_aware:w_memory=abc"])
def test_load_aware_rejects_non_numeric_parameters(spec: str) -> None:
    with pytest.raises(ValueError):
        policy.build(spec)


def test_non_numeric_parameter_error_names_the_parameter() -> None:
    with pytest.raises(ValueError, match="w_compute='heavy' is not a number"):
        policy.build("load_aware:w_compute=heavy")


def test_non_integer_seed_is_rejected() -> None:
    with pytest.raises(ValueError):
        policy.build("load_aware:seed=abc")


@pytest.mark.parametrize("spec", ["load_aware:w_memory=-1", "load_aware:chunk=0",
                                  "load_aware:default_capacity=0.5"])
def test_load_aware_rejects_out_of_range_parameters(spec: str) -> None:
    with pytest.raises(ValueError, match="must be >="):
        policy.build(spec)


@pytest.mark.parametrize("spec", ["load_aware:w_compute=nan", "load_aware:w_memory=inf"])
def test_load_aware_rejects_non_finite_parameters(spec: str) -> None:
    with pytest.raises(ValueError):
        policy.build(spec)


def test_load_aware_uses_polled_load_when_it_exceeds_in_flight() -> None:
    la = policy.build("load_aware:seed=1")
    busy_elsewhere = polled("a", in_flight=0, running=6, waiting=2)
    assert la.pick([busy_elsewhere, polled("b", in_flight=2)], REQUEST).url == "b"


def test_load_aware_weighs_kv_usage() -> None:
    la = policy.build("load_aware:seed=1")
    assert la.pick([polled("a", usage=0.9), polled("b", usage=0.1)], REQUEST).url == "b"
    compute_only = policy.build("load_aware:w_memory=0,seed=1")
    picks = Counter(compute_only.pick([polled("a", usage=0.9), polled("b", usage=0.1)],
                                      REQUEST).url for _ in range(200))
    assert set(picks) == {"a", "b"}  # memory ignored -> a tie


def test_load_aware_memory_counts_what_it_sent_since_the_last_poll() -> None:
    """Between two polls the router's own in-flight tokens keep the memory term fresh: with
    256 slots a request adds only 1/256 to compute, and a stale low token_usage used to draw
    every request until the next poll."""
    def gpu(url: str, usage: float, in_flight: int, tokens: int) -> WorkerView:
        return view(url, in_flight, tokens, token_usage=usage, max_running_requests=256,
                    max_total_num_tokens=60_000, at=1.0)

    la = policy.build("load_aware:seed=1")
    assert la.pick([gpu("a", 0.30, 40, 0), gpu("b", 0.35, 40, 0)], REQUEST).url == "a"
    # a has since been sent 8 more requests of 1,500 tokens; its polled usage is unchanged
    assert la.pick([gpu("a", 0.30, 48, 30_000), gpu("b", 0.35, 40, 20_000)], REQUEST).url == "b"
    assert la.score(gpu("a", 0.30, 48, 30_000)) == pytest.approx(48 / 256 + 0.5 * 0.5)


def test_load_aware_counts_waiting_prompt_tokens() -> None:
    la = policy.build("load_aware:seed=1,chunk=100")
    assert la.pick([polled("a", waiting_tokens=500), polled("b", running=2)], REQUEST).url == "b"


def test_load_aware_normalises_by_capacity() -> None:
    la = policy.build("load_aware:seed=1")
    assert la.pick([polled("small", in_flight=3, capacity=4),
                    polled("big", in_flight=4, capacity=16)], REQUEST).url == "big"


# -- random -------------------------------------------------------------------------------------
def test_random_covers_all_workers() -> None:
    rnd = policy.build("random:seed=3")
    workers = [polled("a"), polled("b"), polled("c")]
    assert {rnd.pick(workers, REQUEST).url for _ in range(100)} == {"a", "b", "c"}


# -- least_load and power_of_two ----------------------------------------------------------------
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
    assert ll.pick([fast, slow], REQUEST).url == "fast"
    assert ll.pick([tview("full", usage=0.95), tview("empty")], REQUEST).url == "empty"


def test_least_load_rejects_max_usage_of_one() -> None:
    with pytest.raises(ValueError, match="max_usage"):
        policy.build("least_load:max_usage=1")


def test_power_of_two_never_picks_the_worst_of_three() -> None:
    p2 = policy.build("power_of_two:seed=5")
    workers = [tview("a"), tview("b", in_flight_tokens=50), tview("worst", in_flight_tokens=999)]
    picks = Counter(p2.pick(workers, REQUEST).url for _ in range(300))
    assert picks["worst"] == 0 and picks["a"] > picks["b"] > 0


# -- cache_aware --------------------------------------------------------------------------------
def test_cache_aware_sends_a_shared_prefix_to_the_same_worker() -> None:
    ca = policy.build("cache_aware:seed=2")
    workers = [polled("a"), polled("b")]
    doc_a, doc_b = "alpha " * 100, "bravo " * 100
    first_a = ca.pick(workers, chat(doc_a + "q1")).url
    first_b = ca.pick(workers, chat(doc_b + "q1")).url
    assert first_a != first_b  # a new prefix goes to the emptier index
    assert {ca.pick(workers, chat(doc_a + f"q{i}")).url for i in range(2, 10)} == {first_a}
    assert {ca.pick(workers, chat(doc_b + f"q{i}")).url for i in range(2, 10)} == {first_b}


def test_cache_aware_falls_back_to_least_loaded_when_imbalanced() -> None:
    ca = policy.build("cache_aware:seed=2,balance_abs=4")
    doc = "alpha " * 100
    workers = [polled("a"), polled("b")]
    home = ca.pick(workers, chat(doc)).url
    other = "b" if home == "a" else "a"
    busy = [polled(home, in_flight=10), polled(other, in_flight=1)]
    assert ca.pick(busy, chat(doc + "again")).url == other
    near = [polled(home, in_flight=4), polled(other, in_flight=1)]  # within balance_abs
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
