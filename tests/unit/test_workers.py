"""``router.workers``: load parsing, health thresholds (busy workers included), in-flight
accounting, connect failures.

Health checks run against a real aiohttp server on port 0 whose ``/health`` status is set per
test.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from router.breaker import BreakerConfig, BreakerState
from router.config import HealthConfig
from router.policy.views import WorkerLoad
from router.workers import WorkerPool

LOADS = {"loads": [{"num_running_reqs": 2, "num_waiting_reqs": 1,
                    "num_waiting_uncached_tokens": 100, "token_usage": 0.25,
                    "max_running_requests": 8, "max_total_num_tokens": 4096,
                    "gen_throughput": 3.5}]}
TWO_RANKS = {"loads": [
    {"num_running_reqs": 2, "num_waiting_reqs": 1, "num_waiting_uncached_tokens": 100,
     "token_usage": 0.25, "max_running_requests": 8, "max_total_num_tokens": 4096,
     "gen_throughput": 3.5},
    {"num_running_reqs": 1, "num_waiting_reqs": 0, "num_waiting_uncached_tokens": 0,
     "token_usage": 0.5, "max_running_requests": 8, "max_total_num_tokens": 4096,
     "gen_throughput": 1.5},
]}


class HealthServer:
    """A worker that only answers the pool's own GETs; ``status`` is what ``/health`` says."""

    def __init__(self) -> None:
        self.status = 200
        self.health_delay_s = 0.0
        self.loads_status = 200
        self.loads: dict[str, Any] = LOADS
        self.url = ""
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/loads", self.get_loads)
        app.router.add_get("/model_info", self.model_info)
        app.router.add_get("/v1/models", self.models)
        self.runner = web.AppRunner(app)

    async def health(self, request: web.Request) -> web.Response:
        if self.health_delay_s:
            await asyncio.sleep(self.health_delay_s)
        return web.Response(status=self.status)

    async def model_info(self, request: web.Request) -> web.Response:
        return web.json_response({"served_model_name": "m", "tokenizer_path": None,
                                  "model_path": "/nonexistent"})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "m", "max_model_len": 4096}]})

    async def get_loads(self, request: web.Request) -> web.Response:
        return web.json_response(self.loads, status=self.loads_status)


@pytest.fixture
async def server() -> AsyncIterator[HealthServer]:
    fake = HealthServer()
    await fake.runner.setup()
    await web.TCPSite(fake.runner, "127.0.0.1", 0).start()
    fake.url = f"http://127.0.0.1:{fake.runner.addresses[0][1]}"
    yield fake
    await fake.runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"  # closed again: nothing listens


def make_pool(*urls: str, failure_threshold: int = 2, success_threshold: int = 2,
              timeout_s: float = 1.0, breaker: BreakerConfig | None = None) -> WorkerPool:
    health = HealthConfig(interval_s=0.1, timeout_s=timeout_s,
                          failure_threshold=failure_threshold,
                          success_threshold=success_threshold)
    return WorkerPool(urls, health, load_poll_interval_s=0.1, breaker=breaker)


def is_healthy(pool: WorkerPool, url: str) -> bool:
    return next(v.healthy for v in pool.snapshot() if v.url == url)


# -- WorkerLoad.from_loads ----------------------------------------------------------------------
def test_from_loads_reads_every_field() -> None:
    load = WorkerLoad.from_loads(LOADS, at=12.5)
    assert load == WorkerLoad(num_running_reqs=2, num_waiting_reqs=1,
                              num_waiting_uncached_tokens=100, token_usage=0.25,
                              max_running_requests=8, max_total_num_tokens=4096,
                              gen_throughput=3.5, at=12.5)


def test_from_loads_sums_ranks_and_takes_the_highest_usage() -> None:
    ranks = [{**LOADS["loads"][0], "token_usage": 0.25}, {**LOADS["loads"][0], "token_usage": 0.75}]
    load = WorkerLoad.from_loads({"loads": ranks}, at=1.0)
    assert (load.num_running_reqs, load.num_waiting_reqs, load.max_running_requests) == (4, 2, 16)
    assert load.num_waiting_uncached_tokens == 200 and load.max_total_num_tokens == 8192
    assert load.gen_throughput == pytest.approx(7.0)
    assert load.token_usage == pytest.approx(0.75)
    load = WorkerLoad.from_loads(TWO_RANKS, at=5.0)  # ranks with different loads
    assert (load.num_running_reqs, load.num_waiting_reqs) == (3, 1)
    assert load.num_waiting_uncached_tokens == 100
    assert load.token_usage == 0.5
    assert load.max_running_requests == 16
    assert load.gen_throughput == 5.0 and load.at == 5.0


@pytest.mark.parametrize("payload", [{}, {"loads": []}, {"loads": None}])
def test_from_loads_without_ranks_is_an_empty_reading(payload: dict[str, Any]) -> None:
    assert WorkerLoad.from_loads(payload, at=3.0) == WorkerLoad(at=3.0)


def test_from_loads_treats_missing_and_null_fields_as_zero() -> None:
    load = WorkerLoad.from_loads({"loads": [{"num_running_reqs": 3, "token_usage": None}]}, 1.0)
    assert load == WorkerLoad(num_running_reqs=3, at=1.0)


# -- health thresholds --------------------------------------------------------------------------
async def test_worker_starts_unhealthy() -> None:
    pool = make_pool("http://127.0.0.1:1")
    assert not is_healthy(pool, "http://127.0.0.1:1") and pool.healthy() == []


async def test_success_threshold_checks_mark_a_worker_healthy(
        server: HealthServer, session: aiohttp.ClientSession) -> None:
    pool = make_pool(server.url, success_threshold=2)
    heard: list[tuple[str, bool]] = []
    pool.on_health_change(lambda url, healthy: heard.append((url, healthy)))
    await pool.check_health(session, server.url)
    assert not is_healthy(pool, server.url) and heard == []
    await pool.check_health(session, server.url)
    assert is_healthy(pool, server.url) and heard == [(server.url, True)]
    assert [v.url for v in pool.healthy()] == [server.url]


async def test_failure_threshold_checks_mark_a_worker_unhealthy(
        server: HealthServer, session: aiohttp.ClientSession) -> None:
    pool = make_pool(server.url, failure_threshold=2, success_threshold=1)
    heard: list[tuple[str, bool]] = []
    pool.on_health_change(lambda url, healthy: heard.append((url, healthy)))
    await pool.check_health(session, server.url)
    server.status = 500
    await pool.check_health(session, server.url)
    assert is_healthy(pool, server.url)  # one failure is tolerated
    assert heard == [(server.url, True)]
    await pool.check_health(session, server.url)
    assert not is_healthy(pool, server.url)
    assert heard == [(server.url, True), (server.url, False)]


async def test_a_success_resets_the_failure_count(server: HealthServer,
                                                  session: aiohttp.ClientSession) -> None:
    pool = make_pool(server.url, failure_threshold=2, success_threshold=1)
    await pool.check_health(session, server.url)
    for status in (500, 200, 500, 200, 500):
        server.status = status
        await pool.check_health(session, server.url)
    assert is_healthy(pool, server.url)


async def test_a_failure_resets_the_success_count(server: HealthServer,
                                                  session: aiohttp.ClientSession) -> None:
    pool = make_pool(server.url, success_threshold=2)
    for status in (200, 500, 200):
        server.status = status
        await pool.check_health(session, server.url)
    assert not is_healthy(pool, server.url)


async def test_a_slow_health_check_counts_as_a_failure(server: HealthServer,
                                                       session: aiohttp.ClientSession) -> None:
    pool = make_pool(server.url, failure_threshold=1, success_threshold=1, timeout_s=0.1)
    await pool.check_health(session, server.url)
    server.health_delay_s = 0.3
    await pool.check_health(session, server.url)
    assert not is_healthy(pool, server.url)


async def test_a_refused_health_check_counts_as_a_failure(
        session: aiohttp.ClientSession) -> None:
    url = dead_url()
    pool = make_pool(url, success_threshold=1)
    await pool.check_health(session, url)
    assert not is_healthy(pool, url) and pool.model_info() is None
    await pool.poll_load(session, url)  # a refused poll keeps the old (never polled) reading
    assert pool.snapshot()[0].load.at == 0.0


async def test_listeners_hear_only_changes(server: HealthServer,
                                           session: aiohttp.ClientSession) -> None:
    pool = make_pool(server.url, failure_threshold=1, success_threshold=1)
    heard: list[tuple[str, bool]] = []
    pool.on_health_change(lambda url, healthy: heard.append((url, healthy)))
    for status in (200, 200, 500, 500, 200):
        server.status = status
        await pool.check_health(session, server.url)
    assert heard == [(server.url, True), (server.url, False), (server.url, True)]


async def test_first_healthy_check_loads_model_info(server: HealthServer,
                                                    session: aiohttp.ClientSession) -> None:
    pool = make_pool(server.url, success_threshold=1)
    assert pool.model_info() is None
    await pool.check_health(session, server.url)
    info = pool.model_info()
    assert info is not None
    assert info.served_names == frozenset({"m"}) and info.context_length == 4096
    assert info.vocab_size is None and info.counter is None  # /nonexistent is not readable


async def test_unhealthy_worker_does_not_load_model_info(server: HealthServer,
                                                         session: aiohttp.ClientSession) -> None:
    server.status = 503
    pool = make_pool(server.url)
    await pool.check_health(session, server.url)
    assert pool.model_info() is None


# -- busy workers: SGLang answers /health only between forward passes ---------------------------
async def test_health_timeout_while_busy_is_not_a_failure(
        server: HealthServer, session: aiohttp.ClientSession) -> None:
    """A worker in the middle of a long batch with our requests in flight is busy, not dead,
    until it has been silent for busy_grace_s."""
    url = server.url
    pool = WorkerPool((url,), HealthConfig(timeout_s=0.2, failure_threshold=1,
                                           busy_grace_s=60.0), 0.5)
    await pool.check_health(session, url)
    assert pool.snapshot()[0].healthy
    server.health_delay_s = 1.0
    with pool.track(url):
        await pool.check_health(session, url)
        assert pool.snapshot()[0].healthy  # busy: requests in flight, heard from recently
    await pool.check_health(session, url)
    assert not pool.snapshot()[0].healthy  # idle and silent: a failure


async def test_busy_worker_silent_past_the_grace_is_unhealthy(
        server: HealthServer, session: aiohttp.ClientSession) -> None:
    url = server.url
    pool = WorkerPool((url,), HealthConfig(timeout_s=0.2, failure_threshold=1,
                                           busy_grace_s=0.0), 0.5)
    await pool.check_health(session, url)
    server.health_delay_s = 1.0
    with pool.track(url):
        await pool.check_health(session, url)
        assert not pool.snapshot()[0].healthy


async def test_error_status_while_busy_still_fails(server: HealthServer,
                                                   session: aiohttp.ClientSession) -> None:
    url = server.url
    pool = WorkerPool((url,), HealthConfig(failure_threshold=1, busy_grace_s=60.0), 0.5)
    await pool.check_health(session, url)
    server.status = 503
    with pool.track(url):
        await pool.check_health(session, url)
        assert not pool.snapshot()[0].healthy


# -- load polling -------------------------------------------------------------------------------
async def test_poll_load_stores_the_reading(server: HealthServer,
                                            session: aiohttp.ClientSession) -> None:
    pool = make_pool(server.url)
    await pool.poll_load(session, server.url)
    load = pool.snapshot()[0].load
    assert (load.num_running_reqs, load.token_usage, load.max_running_requests) == (2, 0.25, 8)
    assert load.at > 0
    server.loads = TWO_RANKS
    await pool.poll_load(session, server.url)
    assert pool.snapshot()[0].load.num_running_reqs == 3


async def test_prefill_dispatched_counts_until_a_later_reading_shows_it(
        server: HealthServer, session: aiohttp.ClientSession) -> None:
    pool = make_pool(server.url)
    await pool.poll_load(session, server.url)
    with pool.track(server.url), pool.track(server.url):
        pool.note_dispatch(server.url, 300)
        pool.note_dispatch(server.url, 200)
        pool.note_dispatch("http://127.0.0.1:1", 50)  # not in the pool: ignored
        assert pool.snapshot()[0].prefill_since_load == 500
        await pool.poll_load(session, server.url)  # this reading includes both
        assert pool.snapshot()[0].prefill_since_load == 0
        pool.note_dispatch(server.url, 70)
        assert pool.snapshot()[0].prefill_since_load == 70


def test_prefill_dispatched_stops_counting_once_its_request_is_done() -> None:
    url = "http://127.0.0.1:1"
    pool = make_pool(url)
    with pool.track(url):
        pool.note_dispatch(url, 300)
        with pool.track(url):
            pool.note_dispatch(url, 200)
            assert pool.snapshot()[0].prefill_since_load == 500
        assert pool.snapshot()[0].prefill_since_load == 200  # the oldest counts as finished
    assert pool.snapshot()[0].prefill_since_load == 0


async def test_requests_finished_since_a_reading_are_counted_until_the_next(
        server: HealthServer, session: aiohttp.ClientSession) -> None:
    pool = make_pool(server.url)
    await pool.poll_load(session, server.url)
    with pool.track(server.url):
        with pool.track(server.url):
            pass
        assert pool.snapshot()[0].finished_since_load == 1
    assert pool.snapshot()[0].finished_since_load == 2
    await pool.poll_load(session, server.url)
    assert pool.snapshot()[0].finished_since_load == 0


async def test_failed_poll_keeps_the_last_reading(server: HealthServer,
                                                  session: aiohttp.ClientSession) -> None:
    pool = make_pool(server.url)
    await pool.poll_load(session, server.url)
    before = pool.snapshot()[0].load
    server.loads_status = 500
    server.loads = {"loads": [{"num_running_reqs": 99}]}
    await pool.poll_load(session, server.url)
    assert pool.snapshot()[0].load == before


# -- in-flight accounting -----------------------------------------------------------------------
def test_track_counts_requests_and_tokens_while_open() -> None:
    pool = make_pool("http://127.0.0.1:1")
    with pool.track("http://127.0.0.1:1", tokens=30):
        with pool.track("http://127.0.0.1:1", tokens=12):
            view = pool.snapshot()[0]
            assert (view.in_flight, view.in_flight_tokens, view.total_requests) == (2, 42, 2)
        view = pool.snapshot()[0]
        assert (view.in_flight, view.in_flight_tokens, view.total_requests) == (1, 30, 2)
    view = pool.snapshot()[0]
    assert (view.in_flight, view.in_flight_tokens, view.total_requests) == (0, 0, 2)


def test_track_releases_on_error() -> None:
    pool = make_pool("http://127.0.0.1:1")
    with pytest.raises(RuntimeError), pool.track("http://127.0.0.1:1", tokens=5):
        raise RuntimeError("boom")
    view = pool.snapshot()[0]
    assert (view.in_flight, view.in_flight_tokens, view.total_requests) == (0, 0, 1)


def test_snapshot_is_read_only() -> None:
    pool = make_pool("http://127.0.0.1:1")
    with pytest.raises(AttributeError):
        pool.snapshot()[0].in_flight = 5  # type: ignore[misc]


# -- connect failures and the breaker -----------------------------------------------------------
async def test_connect_failure_marks_a_healthy_worker_unhealthy_at_once(
        server: HealthServer, session: aiohttp.ClientSession) -> None:
    pool = make_pool(server.url, failure_threshold=3, success_threshold=1)
    await pool.check_health(session, server.url)
    pool.report_connect_failure(server.url)
    assert not is_healthy(pool, server.url) and pool.healthy() == []
    await pool.check_health(session, server.url)  # the health loop brings it back
    assert is_healthy(pool, server.url)


def test_connect_failure_of_an_unknown_worker_is_ignored() -> None:
    pool = make_pool("http://127.0.0.1:1")
    pool.report_connect_failure("http://127.0.0.1:2")
    pool.report_result("http://127.0.0.1:2", ok=False)
    assert pool.urls == ("http://127.0.0.1:1",)


async def test_open_breaker_takes_the_worker_out_of_dispatch(
        server: HealthServer, session: aiohttp.ClientSession) -> None:
    pool = make_pool(server.url, success_threshold=1,
                     breaker=BreakerConfig(failure_threshold=2, open_s=60))
    await pool.check_health(session, server.url)
    pool.report_result(server.url, ok=False)
    assert len(pool.healthy()) == 1
    pool.report_result(server.url, ok=False)
    assert pool.healthy() == []
    assert pool.snapshot()[0].breaker is BreakerState.OPEN
    assert is_healthy(pool, server.url)  # health and breaker are separate


async def test_running_checks_every_worker_before_yielding(
        server: HealthServer, session: aiohttp.ClientSession) -> None:
    dead = dead_url()
    pool = make_pool(server.url, dead, success_threshold=1)
    async with pool.running(session):
        assert [v.url for v in pool.healthy()] == [server.url]
        assert pool.model_info() is not None
