"""The router's --batching: the batcher's dispatch logic, SLO parsing, and the app end to end
against a fake worker (the real-worker test is tests/integration/test_router_batching.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from router import keys
from router.app import create_app
from router.batcher import Batcher, length_hint, request_slo_ms
from router.batching.config import BatcherConfig
from router.batching.slo_odbs import BatchingConfig
from router.config import HealthConfig, RouterConfig
from router.errors import InvalidRequest, NoHealthyWorker, Overloaded
from router.metrics import RouterMetrics
from router.validation import ParsedRequest, with_custom_params
from tests.unit.fake_upstream import FakeUpstream


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_batcher(policy: str = "fcfs", slots: int = 2, urls: tuple[str, ...] = ("w1",),
                 max_waiting: int = 100) -> tuple[Batcher, Clock, list[str]]:
    clock = Clock()
    healthy = list(urls)
    cfg = BatcherConfig(batching=BatchingConfig(policy=policy, max_batch=4), window_ms=0,
                        slots_per_worker=slots, max_waiting=max_waiting)
    return Batcher(cfg, lambda: healthy, RouterMetrics([]), clock), clock, healthy


async def enter(batcher: Batcher, job: Any, order: list[str], release: asyncio.Event) -> str:
    async with batcher.hold(job) as url:
        order.append(job.id)
        await release.wait()
        return url


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_requests_beyond_the_free_slots_wait_and_go_in_policy_order() -> None:
    batcher, clock, _ = make_batcher("spf", slots=1)
    order: list[str] = []
    release = asyncio.Event()
    lengths = {"first": 10, "long": 300, "short": 5, "mid": 50}
    tasks = []
    for i, (name, length) in enumerate(lengths.items()):
        clock.now = float(i)
        job = batcher.new_job(10_000, length, 0)
        job = type(job)(name, job.arrival_s, job.slo_s, job.predicted_len)
        tasks.append(asyncio.create_task(enter(batcher, job, order, release)))
        await settle()
        batcher.dispatch_once()
        await settle()
    assert order == ["first"]  # one slot: the rest wait in the batcher
    assert batcher.num_waiting == 3
    for expected in (["first", "short"], ["first", "short", "mid"]):
        release.set()
        await settle()
        release.clear()
        batcher.dispatch_once()
        await settle()
        assert order == expected
    release.set()
    await settle()
    batcher.dispatch_once()
    await asyncio.gather(*tasks)
    assert order == ["first", "short", "mid", "long"]
    assert batcher.running_on("w1") == 0


async def test_batches_go_to_the_worker_with_the_most_free_slots() -> None:
    batcher, _, _ = make_batcher("fcfs", slots=2, urls=("w1", "w2"))
    release = asyncio.Event()
    order: list[str] = []
    tasks = [asyncio.create_task(enter(batcher, batcher.new_job(1000, 10, 0), order, release))
             for _ in range(4)]
    await settle()
    assert batcher.dispatch_once() == 4
    await settle()
    assert batcher.running_on("w1") == 2 and batcher.running_on("w2") == 2
    release.set()
    urls = await asyncio.gather(*tasks)
    assert sorted(urls) == ["w1", "w1", "w2", "w2"]


async def test_a_client_leaving_while_held_frees_its_place() -> None:
    batcher, _, _ = make_batcher("fcfs", slots=1)
    release = asyncio.Event()
    order: list[str] = []
    first = asyncio.create_task(enter(batcher, batcher.new_job(1000, 10, 0), order, release))
    await settle()
    batcher.dispatch_once()
    second = asyncio.create_task(enter(batcher, batcher.new_job(1000, 10, 0), order, release))
    await settle()
    assert batcher.num_waiting == 1
    second.cancel()
    await settle()
    assert batcher.num_waiting == 0
    release.set()
    await first
    assert batcher.running_on("w1") == 0


async def test_full_batcher_answers_429_and_no_worker_answers_503() -> None:
    batcher, _, healthy = make_batcher("fcfs", slots=1, max_waiting=1)
    release = asyncio.Event()
    held = asyncio.create_task(enter(batcher, batcher.new_job(1000, 10, 0), [], release))
    await settle()
    with pytest.raises(Overloaded):
        async with batcher.hold(batcher.new_job(1000, 10, 0)):
            pass
    healthy.clear()
    batcher.dispatch_once()
    with pytest.raises(NoHealthyWorker):
        await held


def test_slo_and_length_hint_parsing() -> None:
    assert request_slo_ms({}, {"slo_ms": 1500}, 30000) == 1500
    assert request_slo_ms({"X-BanaServe-SLO-Ms": "2500"}, {}, 30000) == 2500
    assert request_slo_ms({}, {}, 30000) == 30000
    for bad in (0, -5, "soon", True, None):
        with pytest.raises(InvalidRequest, match="slo_ms"):
            request_slo_ms({}, {"slo_ms": bad}, 30000)
    with pytest.raises(InvalidRequest, match="SLO-Ms"):
        request_slo_ms({"X-BanaServe-SLO-Ms": "nan"}, {}, 30000)
    assert length_hint({"X-BanaServe-Output-Length": "42"}) == 42
    assert length_hint({}) is None
    with pytest.raises(InvalidRequest):
        length_hint({"X-BanaServe-Output-Length": "-1"})


def parsed(route: str, body: dict[str, Any]) -> ParsedRequest:
    return ParsedRequest(route=route, body=body, raw=json.dumps(body).encode(), stream=False,
                         max_tokens=None)


def test_custom_params_reach_the_field_sglang_reads_for_each_route() -> None:
    chat = with_custom_params(parsed("chat", {"messages": [], "slo_ms": 5,
                                              "custom_params": {"mine": 1}}),
                              {"banaserve_slo_ms": 5}, drop=("slo_ms",))
    assert json.loads(chat.raw) == {"messages": [], "custom_params": {"banaserve_slo_ms": 5,
                                                                      "mine": 1}}
    gen = with_custom_params(parsed("generate", {"text": "hi", "sampling_params": {"a": 1}}),
                             {"banaserve_slo_ms": 5})
    assert json.loads(gen.raw)["sampling_params"] == {"a": 1, "custom_params":
                                                      {"banaserve_slo_ms": 5}}
    with pytest.raises(InvalidRequest, match="custom_params"):
        with_custom_params(parsed("chat", {"custom_params": [1]}), {"x": 1})


@pytest.fixture
async def batching_router() -> AsyncIterator[tuple[str, FakeUpstream, web.Application]]:
    upstream = await FakeUpstream().start()
    cfg = RouterConfig(workers=(upstream.url,), load_poll_interval_s=0.1,
                       health=HealthConfig(interval_s=0.1, timeout_s=1, failure_threshold=1),
                       batching=BatcherConfig(batching=BatchingConfig(policy="slo-odbs"),
                                              window_ms=5, slots_per_worker=2))
    app = create_app(cfg)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            async with session.get(url + "/health") as resp:
                if resp.status == 200:
                    break
            await asyncio.sleep(0.05)
    yield url, upstream, app
    await runner.cleanup()
    await upstream.stop()


async def test_router_with_batching_tells_the_worker_the_slo_and_counts_it(
        batching_router: tuple[str, FakeUpstream, web.Application]) -> None:
    url, upstream, app = batching_router
    upstream.mode, upstream.delay_s = "slow", 0.2
    bodies = [{"model": "m", "messages": [{"role": "user", "content": f"q{i}"}],
               "max_tokens": 8 + i, "slo_ms": 60_000} for i in range(5)]
    async with aiohttp.ClientSession() as session:
        async def send(body: dict[str, Any]) -> int:
            async with session.post(url + "/v1/chat/completions", json=body,
                                    headers={"X-BanaServe-Output-Length": "7"}) as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(send(b) for b in bodies))
        async with session.post(url + "/generate", json={"text": "hi", "slo_ms": "x"}) as resp:
            error = await resp.json()
            assert resp.status == 400
        async with session.get(url + "/metrics") as resp:
            metrics = await resp.text()
    assert statuses == [200] * 5
    assert error["error"]["param"] == "slo_ms"
    assert len(upstream.received) == 5
    for body in upstream.received:
        assert "slo_ms" not in body
        assert body["custom_params"] == {"banaserve_slo_ms": 60000.0,
                                         "banaserve_predicted_len": 7}
    assert 'banaserve_router_slo_total{result="met"} 5.0' in metrics
    assert 'banaserve_router_batches_total{policy="slo-odbs"}' in metrics
    assert "banaserve_router_batcher_waiting_requests 0.0" in metrics
    assert app[keys.BATCHER].running_on(upstream.url) == 0


def test_batching_is_refused_in_prefill_decode_mode() -> None:
    from router.config import PrefillWorker

    with pytest.raises(ValueError, match="batching"):
        RouterConfig(prefill=(PrefillWorker("http://127.0.0.1:1"),),
                     decode=("http://127.0.0.1:2",), batching=BatcherConfig())


def test_cli_builds_the_batching_config() -> None:
    from router.__main__ import parse_args

    cfg = parse_args(["--workers", "http://127.0.0.1:9", "--batching", "slo-odbs",
                      "--batch-slots-per-worker", "4", "--slo-odbs-w2", "0.25",
                      "--slo-step-ms", "30"])
    assert cfg.batching is not None
    assert cfg.batching.slots_per_worker == 4
    assert cfg.batching.batching.w2 == 0.25
    assert cfg.batching.batching.service.step_s == pytest.approx(0.03)
    assert parse_args(["--workers", "http://127.0.0.1:9"]).batching is None


def test_cli_rejects_bad_batching_values_with_one_line(capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    from router.__main__ import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args(["--workers", "http://127.0.0.1:9", "--batching", "fcfs",
                    "--batch-slots-per-worker", "0"])
    assert exc.value.code == 2
    assert "slots_per_worker" in capsys.readouterr().err
