"""The policy seam (``router.policy.base``) and the ``round_robin`` and ``load_aware`` policies."""

from __future__ import annotations

from collections import Counter

import pytest

from router import policy
from router.policy import RequestFeatures
from router.policy.base import parse_spec, register
from router.policy.load_aware import LoadAware
from router.workers import WorkerLoad, WorkerView

REQUEST = RequestFeatures(route="chat", max_tokens=16, prompt_text="user: hi", prompt_tokens=3)


def view(url: str, in_flight: int = 0, **load: float) -> WorkerView:
    return WorkerView(url=url, healthy=True, in_flight=in_flight,
                      load=WorkerLoad(**load), total_requests=0)  # type: ignore[arg-type]


# -- the seam -----------------------------------------------------------------------------------
def test_parse_spec_splits_name_and_params() -> None:
    assert parse_spec("load_aware:w_compute=1, w_memory = 0.5") == (
        "load_aware", {"w_compute": "1", "w_memory": "0.5"})


def test_parse_spec_without_params() -> None:
    assert parse_spec("round_robin") == ("round_robin", {})
    assert parse_spec("round_robin:") == ("round_robin", {})


@pytest.mark.parametrize("spec", ["load_aware:w_compute", "load_aware:=1",
                                  "load_aware:a=1,b"])
def test_parse_spec_rejects_items_that_are_not_key_value(spec: str) -> None:
    with pytest.raises(ValueError, match="not key=value"):
        parse_spec(spec)


def test_build_unknown_policy_lists_the_available_ones() -> None:
    with pytest.raises(ValueError, match="unknown policy 'nope'") as caught:
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


def test_round_robin_takes_no_parameters() -> None:
    with pytest.raises(ValueError, match="no parameter"):
        policy.build("round_robin:weight=2")


# -- load_aware ---------------------------------------------------------------------------------
def test_load_aware_score_follows_the_documented_formula() -> None:
    la = LoadAware({})
    worker = view("http://a:1", in_flight=1, num_running_reqs=2, num_waiting_reqs=1,
                  num_waiting_uncached_tokens=100, token_usage=0.25, max_running_requests=8)
    compute = (max(2 + 1, 1) + 100 / 512) / 8
    assert la.score(worker) == pytest.approx(1.0 * compute + 0.5 * 0.25)


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


def test_load_aware_seed_makes_tie_breaking_reproducible() -> None:
    workers = [view("http://a:1"), view("http://b:1")]
    first, second = policy.build("load_aware:seed=7"), policy.build("load_aware:seed=7")
    assert [first.pick(workers, REQUEST).url for _ in range(30)] == \
        [second.pick(workers, REQUEST).url for _ in range(30)]


def test_load_aware_single_candidate_is_returned() -> None:
    only = view("http://a:1", in_flight=100, token_usage=1.0)
    assert policy.build("load_aware").pick([only], REQUEST) is only


@pytest.mark.parametrize("spec", ["load_aware:w_fast=1", "load_aware:seed=1,bogus=2"])
def test_load_aware_rejects_unknown_parameters(spec: str) -> None:
    with pytest.raises(ValueError, match="has no parameter"):
        policy.build(spec)


@pytest.mark.parametrize("spec", ["load_aware:w_compute=heavy", "load_aware:chunk=",
                                  "load_aware:tie_epsilon=1e-9x"])
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
