"""WorkerPool: load parsing, in-flight accounting, health thresholds against a fake worker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from router.config import HealthConfig
from router.workers import WorkerLoad, WorkerPool

LOADS = {"loads": [
    {"num_running_reqs": 2, "num_waiting_reqs": 1, "num_waiting_uncached_tokens": 100,
     "token_usage": 0.25, "max_running_requests": 8, "max_total_num_tokens": 4096,
     "gen_throughput": 3.5},
    {"num_running_reqs": 1, "num_waiting_reqs": 0, "num_waiting_uncached_tokens": 0,
     "token_usage": 0.5, "max_running_requests": 8, "max_total_num_tokens": 4096,
     "gen_throughput": 1.5},
]}


def test_loads_are_summed_over_ranks_and_usage_is_the_max() -> None:
    load = WorkerLoad.from_loads(LOADS, at=5.0)
    assert (load.num_running_reqs, load.num_waiting_reqs) == (3, 1)
    assert load.num_waiting_uncached_tokens == 100
    assert load.token_usage == 0.5
    assert load.max_running_requests == 16
    assert load.gen_throughput == 5.0 and load.at == 5.0


def test_empty_loads_payload() -> None:
    assert WorkerLoad.from_loads({"loads": []}, at=1.0).num_running_reqs == 0


def test_track_counts_in_flight_and_totals() -> None:
    pool = WorkerPool(("http://a:1",), HealthConfig(), 0.5)
    with pool.track("http://a:1"):
        with pool.track("http://a:1"):
            assert pool.snapshot()[0].in_flight == 2
        assert pool.snapshot()[0].in_flight == 1
    view = pool.snapshot()[0]
    assert (view.in_flight, view.total_requests) == (0, 2)


def test_track_releases_on_error() -> None:
    pool = WorkerPool(("http://a:1",), HealthConfig(), 0.5)
    with pytest.raises(RuntimeError), pool.track("http://a:1"):
        raise RuntimeError("boom")
    assert pool.snapshot()[0].in_flight == 0


def json_handler(payload: dict[str, object]) -> Any:
    async def handle(request: web.Request) -> web.Response:
        return web.json_response(payload)

    return handle


class FakeWorker:
    def __init__(self) -> None:
        self.health_status = 200
        self.health_delay_s = 0.0
        self.app = web.Application()
        self.app.router.add_get("/health", self.health)
        self.app.router.add_get("/v1/loads", json_handler(LOADS))
        self.app.router.add_get("/model_info", json_handler(
            {"served_model_name": "m", "model_path": "/nonexistent"}))
        self.app.router.add_get("/v1/models", json_handler(
            {"data": [{"id": "m", "max_model_len": 2048}]}))

    async def health(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.health_delay_s)
        return web.Response(status=self.health_status)


@pytest.fixture
async def fake_worker() -> AsyncIterator[tuple[FakeWorker, str]]:
    worker = FakeWorker()
    runner = web.AppRunner(worker.app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield worker, f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_health_thresholds_and_model_info(fake_worker: tuple[FakeWorker, str]) -> None:
    worker, url = fake_worker
    pool = WorkerPool((url,), HealthConfig(failure_threshold=2, success_threshold=2), 0.5)
    changes: list[tuple[str, bool]] = []
    pool.on_health_change(lambda u, healthy: changes.append((u, healthy)))
    async with aiohttp.ClientSession() as session:
        await pool.check_health(session, url)
        assert not pool.snapshot()[0].healthy  # needs 2 successes
        await pool.check_health(session, url)
        assert pool.snapshot()[0].healthy
        info = pool.model_info()
        assert info is not None and info.served_names == {"m"} and info.context_length == 2048
        worker.health_status = 503
        await pool.check_health(session, url)
        assert pool.snapshot()[0].healthy  # one failure is tolerated
        await pool.check_health(session, url)
        assert not pool.snapshot()[0].healthy
    assert changes == [(url, True), (url, False)]


async def test_poll_load_and_connect_failure(fake_worker: tuple[FakeWorker, str]) -> None:
    _, url = fake_worker
    pool = WorkerPool((url,), HealthConfig(failure_threshold=3), 0.5)
    async with aiohttp.ClientSession() as session:
        await pool.check_health(session, url)
        await pool.poll_load(session, url)
    assert pool.snapshot()[0].load.num_running_reqs == 3
    pool.report_connect_failure(url)
    assert pool.healthy() == []


async def test_unreachable_worker_stays_unhealthy() -> None:
    url = "http://127.0.0.1:9"  # discard port: nothing listens
    pool = WorkerPool((url,), HealthConfig(failure_threshold=1, timeout_s=1), 0.5)
    async with aiohttp.ClientSession() as session:
        await pool.check_health(session, url)
        await pool.poll_load(session, url)  # a failed poll keeps the old reading
    view = pool.snapshot()[0]
    assert not view.healthy and view.load.at == 0.0



async def test_health_timeout_while_busy_is_not_a_failure(
        fake_worker: tuple[FakeWorker, str]) -> None:
    """SGLang answers /health only between forward passes: a worker in the middle of a long batch
    with our requests in flight is busy, not dead, until it has been silent for busy_grace_s."""
    worker, url = fake_worker
    pool = WorkerPool((url,), HealthConfig(timeout_s=0.2, failure_threshold=1,
                                           busy_grace_s=60.0), 0.5)
    async with aiohttp.ClientSession() as session:
        await pool.check_health(session, url)
        assert pool.snapshot()[0].healthy
        worker.health_delay_s = 1.0
        with pool.track(url):
            await pool.check_health(session, url)
            assert pool.snapshot()[0].healthy  # busy: requests in flight, heard from recently
        await pool.check_health(session, url)
        assert not pool.snapshot()[0].healthy  # idle and silent: a failure


async def test_busy_worker_silent_past_the_grace_is_unhealthy(
        fake_worker: tuple[FakeWorker, str]) -> None:
    worker, url = fake_worker
    pool = WorkerPool((url,), HealthConfig(timeout_s=0.2, failure_threshold=1,
                                           busy_grace_s=0.0), 0.5)
    async with aiohttp.ClientSession() as session:
        await pool.check_health(session, url)
        worker.health_delay_s = 1.0
        with pool.track(url):
            await pool.check_health(session, url)
            assert not pool.snapshot()[0].healthy


async def test_error_status_while_busy_still_fails(fake_worker: tuple[FakeWorker, str]) -> None:
    worker, url = fake_worker
    pool = WorkerPool((url,), HealthConfig(failure_threshold=1, busy_grace_s=60.0), 0.5)
    async with aiohttp.ClientSession() as session:
        await pool.check_health(session, url)
        worker.health_status = 503
        with pool.track(url):
            await pool.check_health(session, url)
            assert not pool.snapshot()[0].healthy
