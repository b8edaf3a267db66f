"""``cost_aware`` (``router.policy.cost_aware``): the predicted prefill work before a request's
first token, from the KV index, the workers' queues and what the router dispatched since the
last poll; and the router's side of it (``WorkerPool.note_dispatch``, the prompt's token ids)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from router import policy
from router.handlers import _prompt_ids
from router.policy import RequestFeatures
from router.policy.cost_aware import CostAware, RecentPrefixes
from router.policy.views import WorkerLoad, WorkerView
from router.validation import ParsedRequest

IDS = tuple(range(1000, 2000))  # a 1,000-token prompt


def worker(url: str, waiting_tokens: int = 0, running: int = 0, in_flight: int = 0,
           usage: float = 0.0, pool: int = 100_000, since: int = 0, waiting: int = 0,
           finished: int = 0) -> WorkerView:
    load = WorkerLoad(num_running_reqs=running, num_waiting_reqs=waiting,
                      num_waiting_uncached_tokens=waiting_tokens, token_usage=usage,
                      max_running_requests=8, max_total_num_tokens=pool, at=1.0)
    return WorkerView(url=url, healthy=True, in_flight=in_flight, load=load, total_requests=0,
                      prefill_since_load=since, finished_since_load=finished)


def request(cached: dict[str, int] | None = None, host: dict[str, int] | None = None,
            ids: tuple[int, ...] | None = IDS, max_tokens: int = 16) -> RequestFeatures:
    return RequestFeatures(route="completion", max_tokens=max_tokens, prompt_tokens=len(IDS),
                           prompt_ids=ids, cached_tokens=cached, host_tokens=host)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(clock: Clock | None = None, **params: str) -> CostAware:
    return CostAware({"seed": "1", **params}, clock=clock or Clock())


def test_it_is_registered_and_takes_the_prefix_index() -> None:
    built = policy.build("cost_aware:host_cost=0.5,decode_cost=8")
    assert built.name == "cost_aware" and built.wants_prefix_index is True  # type: ignore[attr-defined]


@pytest.mark.parametrize("spec, message", [
    ("cost_aware:host_cost=-1", "host_cost"), ("cost_aware:block=0", "block"),
    ("cost_aware:recent_s=x", "recent_s"), ("cost_aware:slot_cost=-5", "slot_cost"),
    ("cost_aware:store_cost=-1", "store_cost"), ("cost_aware:dup_cost=-1", "dup_cost"),
    ("cost_aware:stall_cost=x", "stall_cost"),
    ("cost_aware:nope=1", "nope")])
def test_bad_parameters_are_named(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        policy.build(spec)


def test_the_worker_holding_the_prefix_wins_when_both_are_idle() -> None:
    a, b = worker("a"), worker("b")
    assert make().pick([a, b], request(cached={"b": 900})).url == "b"
    assert make().score(b, request(cached={"b": 900})) == 100


def test_without_token_ids_it_dispatches_on_load_alone() -> None:
    busy, idle = worker("a", waiting_tokens=3000), worker("b")
    assert make().pick([busy, idle], request(ids=None)).url == "b"
    # a cache hit the router cannot see (no ids) changes nothing
    assert make().pick([busy, idle], request(ids=None, cached={"a": 1000})).url == "b"


def test_a_queue_longer_than_the_recompute_sends_the_request_elsewhere() -> None:
    """The herding guard: the cache holder wins only while waiting there is cheaper (the
    request's own wait alone: ``dup_cost=0``)."""
    req = request(cached={"a": 900})
    own = make(dup_cost="0")
    assert own.pick([worker("a", since=800), worker("b")], req).url == "a"  # 900 < 1000
    assert own.pick([worker("a", since=1000), worker("b")], req).url == "b"  # 1100 > 1000
    assert own.pick([worker("a", waiting_tokens=1000), worker("b")], req).url == "b"


def test_recomputing_a_prefix_another_worker_holds_is_priced_for_everyone() -> None:
    """``dup``: the other worker would prefill the holder's 900 tokens a second time. At the
    default ``dup_cost`` (1.0) an idle holder keeps the request until its queue outgrows the
    recompute twice over; with ``dup_cost=0`` (negative control) it loses it at once."""
    req = request(cached={"a": 900})
    assert make().score(worker("b"), req, elsewhere=900) == 1000 + 900
    assert make().score(worker("a"), req, elsewhere=0) == 100  # nothing held elsewhere
    # the second prefill is waited for by the request and by each of the 4 running there
    assert make(decode_cost="0").score(worker("b", running=4), req,
                                       elsewhere=900) == 1000 + 900 * 5
    # past a full batch on both, a group stays with its holder until its queue is longer by
    # more than the second prefill is worth to the batch (control: dup_cost=0)
    both_full = [worker("a", in_flight=11), worker("b", in_flight=9)]
    assert make(dup_cost="0").pick(both_full, req).url == "b"
    assert make().pick(both_full, req).url == "a"
    assert make().pick([worker("a", in_flight=20), worker("b", in_flight=9)], req).url == "b"
    busy_holder = [worker("a", since=1000), worker("b")]
    assert make(dup_cost="0").pick(busy_holder, req).url == "b"
    assert make().pick(busy_holder, req).url == "a"  # 1,100 against 1,000 + 900
    assert make().pick([worker("a", since=1900), worker("b")], req).url == "b"
    # what the store holds is loaded, not recomputed: no second prefill to price
    stored = dataclasses.replace(req, store_tokens=900)
    assert make().score(worker("b"), stored, elsewhere=900) == 100 + 0.25 * 900


def test_a_burst_sharing_a_prefix_spreads_once_the_holder_is_queued() -> None:
    """Replaying what the router does between two polls: each pick is noted as dispatched."""
    pol = make(recent_s="0", dup_cost="0")
    since = {"a": 0, "b": 0}
    picks = []
    for _ in range(12):
        views = [worker(u, since=since[u]) for u in ("a", "b")]
        req = request(cached={"a": 900})
        chosen = pol.pick(views, req).url
        since[chosen] += len(IDS) - (req.cached_tokens or {}).get(chosen, 0)
        picks.append(chosen)
    assert picks[:3] == ["a"] * 3  # 100 tokens each to prefill at the holder
    assert "b" in picks and picks.count("a") > picks.count("b")


def test_host_tier_tokens_cost_less_than_recompute_and_more_than_the_device() -> None:
    pol = make(host_cost="0.25")
    req = request(cached={"c": 800}, host={"b": 800})
    scores = {w.url: pol.score(w, req) for w in (worker("a"), worker("b"), worker("c"))}
    assert scores == {"a": 1000, "b": 200 + 0.25 * 800, "c": 200}
    # the host tier holds what the device holds and more: only the rest is priced as host
    assert pol.prefix(worker("b"), request(cached={"b": 500}, host={"b": 800})) == (500, 300, 0)


def test_store_tokens_are_priced_on_every_worker_beyond_its_own_tiers() -> None:
    pol = make(store_cost="0.25", decode_cost="0")
    req = dataclasses.replace(request(cached={"c": 600}, host={"b": 400}), store_tokens=800)
    scores = {w.url: pol.score(w, req) for w in (worker("a"), worker("b"), worker("c"))}
    # a: 800 from the store, 200 computed; b: 400 host + 400 store; c: 600 device + 200 store
    assert scores == {"a": 200 + 0.25 * 800, "b": 200 + 0.25 * 400 + 0.25 * 400,
                      "c": 200 + 0.25 * 200}
    assert pol.prefix(worker("b"), req) == (0, 400, 400)
    assert pol.prefix(worker("c"), req) == (600, 0, 200)


def test_a_prefix_in_the_store_lets_a_busy_holder_be_passed_over() -> None:
    """The holder of a cached 800-token prefix has 300 tokens queued. Without the store the
    other worker must recompute the prefix, so the holder wins; with the store, the other loads
    it for a quarter of the price and wins (negative control: the same request without
    ``store_tokens``)."""
    holder, other = worker("a", waiting_tokens=300, waiting=1), worker("b")
    alone = request(cached={"a": 800})
    assert make(decode_cost="0").pick([holder, other], alone).url == "a"
    with_store = dataclasses.replace(alone, store_tokens=800)
    assert make(decode_cost="0").pick([holder, other], with_store).url == "b"


def test_decode_pressure_and_memory_count() -> None:
    pol = make(decode_cost="16", stall_cost="0")
    assert pol.score(worker("a", running=4), request()) == 1000 + 4 * 16
    assert pol.score(worker("a", in_flight=6, running=4), request()) == 1000 + 6 * 16
    # 1,016 tokens needed, 500 free of a 1,000-token pool: it waits for 516 tokens of memory
    assert pol.score(worker("a", pool=1000, usage=0.5), request()) == 1000 + 516


def test_a_prefill_stalls_the_batch_it_interrupts() -> None:
    """``stall`` (off by default): each request decoding on the worker waits for the request's
    uncached tokens (the requests waiting ahead of it count: they run by then; at most the
    batch size)."""
    pol = make(decode_cost="0", stall_cost="1")
    assert make(decode_cost="0").score(worker("a", running=4), request()) == 1000  # default
    assert pol.score(worker("a", running=4), request()) == 1000 + 4 * 1000
    assert pol.score(worker("a", running=3, waiting=1), request()) == 1000 + 4 * 1000 + 1000 * 0
    assert pol.score(worker("a", in_flight=12), request()) == 1000 + 8 * 1000 + 1000 * 5
    cached = request(cached={"a": 900})
    assert pol.score(worker("a", running=4), cached) == 100 + 4 * 100
    # past a full batch on both, a group stays with its prefix's holder until its queue is
    # longer by more than the stall and the recompute are worth (control: stall_cost=0)
    both_full = [worker("a", in_flight=11), worker("b", in_flight=9)]
    assert make(dup_cost="0").pick(both_full, cached).url == "b"
    assert make(dup_cost="0", stall_cost="1").pick(both_full, cached).url == "a"
    assert make(dup_cost="0", stall_cost="1").pick(
        [worker("a", in_flight=20), worker("b", in_flight=9)], cached).url == "b"


def test_a_full_batch_sends_the_request_past_the_cache_holder() -> None:
    """Past ``max_running_requests`` (8 here) a request waits for a whole decode to finish, not
    for a prefill: the holder's 900 cached tokens no longer pay for that (the request's own
    wait: ``dup_cost=0``; with the default, recomputing the 900 tokens elsewhere is priced too,
    and the holder keeps three requests more)."""
    req = request(cached={"a": 900})

    def own() -> CostAware:  # a fresh policy each time: no memory of earlier picks
        return make(dup_cost="0", stall_cost="0")

    assert own().pick([worker("a", in_flight=7), worker("b", in_flight=2)], req).url == "a"
    assert own().pick([worker("a", in_flight=8), worker("b", in_flight=2)], req).url == "b"
    assert own().score(worker("a", in_flight=9), req) == 100 + 16 * 9 + 1000 * 2
    # negative control: without the slot price the holder keeps taking requests it cannot run
    assert make(slot_cost="0", dup_cost="0").pick(
        [worker("a", in_flight=12), worker("b", in_flight=2)], req).url == "a"
    # every worker full: the one with fewer requests ahead wins unless the prefix pays for it
    assert own().pick([worker("a", in_flight=10), worker("b", in_flight=9)], req).url == "b"
    # the default also prices the other worker's second prefill for its 2 running requests
    assert make().pick([worker("a", in_flight=10), worker("b", in_flight=2)], req).url == "a"
    assert make().pick([worker("a", in_flight=11), worker("b", in_flight=2)], req).url == "b"


def test_requests_finished_since_the_poll_no_longer_wait() -> None:
    """A stale poll saw a request waiting that has finished since (a sequential client's last
    turn): its queued tokens must not send the next turn away from the cache holder."""
    req = request(cached={"a": 900})
    stale = dict(waiting=1, waiting_tokens=1000, running=0)
    assert make(dup_cost="0").pick([worker("a", **stale), worker("b")], req).url == "b"  # control
    assert make().pick([worker("a", **stale, finished=1), worker("b")], req).url == "a"
    assert make().score(worker("a", **stale, finished=1), req) == 100
    # two waiting, one finished: half the polled queue is still ahead (and runs by then)
    half = worker("a", waiting=2, waiting_tokens=1000, finished=1)
    assert make(stall_cost="0").score(half, req) == 500 + 100 + 16 * 1


def test_a_prefix_it_just_sent_counts_until_the_index_reports_it_or_it_expires() -> None:
    clock = Clock()
    pol = make(clock, recent_s="5", block="16")
    first = pol.pick([worker("a"), worker("b")], request())
    other = "b" if first.url == "a" else "a"
    # the KV events have not arrived yet: the policy remembers where the prompt went
    assert pol.pick([worker("a"), worker("b")], request()).url == first.url
    assert pol.prefix(worker(first.url), request()) == (992, 0, 0)  # whole 16-token blocks
    assert pol.prefix(worker(other), request()) == (0, 0, 0)
    clock.now += 6
    assert pol.prefix(worker(first.url), request()) == (0, 0, 0)


def test_recent_prefixes_match_whole_leading_blocks_only() -> None:
    recent = RecentPrefixes(block=4, ttl_s=10, max_blocks=100, clock=Clock())
    recent.add("w", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert recent.matched("w", [1, 2, 3, 4, 5, 6, 7, 8]) == 8
    assert recent.matched("w", [1, 2, 3, 4, 5, 6, 0, 8]) == 4
    assert recent.matched("w", [0, 2, 3, 4, 5, 6, 7, 8]) == 0
    assert recent.matched("x", [1, 2, 3, 4]) == 0
    small = RecentPrefixes(block=1, ttl_s=10, max_blocks=3, clock=Clock())
    small.add("w", [1, 2, 3, 4, 5])
    assert small.matched("w", [1, 2, 3, 4, 5]) == 0  # the oldest blocks were dropped


# -- the router's side --------------------------------------------------------------------------
class Counter:
    def text_ids(self, text: str) -> list[int]:
        return [1] + [ord(c) for c in text]

    def chat_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        if any(not isinstance(m.get("content"), str) for m in messages):
            raise ValueError("template wants text")
        return [2] + [ord(c) for m in messages for c in m["content"]]


class Info:
    counter = Counter()


def parsed(route: str, body: dict[str, Any]) -> ParsedRequest:
    return ParsedRequest(route, body, b"", False, 8)


def test_prompt_ids_are_made_the_way_the_worker_makes_them() -> None:
    info: Any = Info()
    assert _prompt_ids(parsed("generate", {"input_ids": [5, 6]}), info) == [5, 6]
    assert _prompt_ids(parsed("completion", {"prompt": [7, 8]}), info) == [7, 8]
    assert _prompt_ids(parsed("completion", {"prompt": "hi"}), info) == [1, 104, 105]
    assert _prompt_ids(parsed("generate", {"text": "hi"}), info) == [1, 104, 105]
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert _prompt_ids(parsed("chat", chat), info) == [2, 104, 105]
    # batches, tools and templates that fail: no ids (the policy falls back to load)
    assert _prompt_ids(parsed("completion", {"prompt": ["a", "b"]}), info) is None
    assert _prompt_ids(parsed("chat", {**chat, "tools": [{"type": "function"}]}), info) is None
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert _prompt_ids(parsed("chat", parts), info) is None
    assert _prompt_ids(parsed("completion", {"prompt": "hi"}), None) is None
