"""Router hardening end to end against fake upstreams: retries, breaker, 429, 401, timeouts,
workers added and removed at run time."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from router.admission import AdmissionConfig
from router.app import create_app
from router.breaker import BreakerConfig
from router.config import HealthConfig, RetryConfig, RouterConfig
from tests.unit.fake_upstream import FakeUpstream

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
Start = Callable[..., Awaitable[str]]


@pytest.fixture
async def upstreams() -> AsyncIterator[list[FakeUpstream]]:
    fakes = [await FakeUpstream().start() for _ in range(2)]
    yield fakes
    for fake in fakes:
        await fake.stop()


@pytest.fixture
async def start_router() -> AsyncIterator[Start]:
    runners: list[web.AppRunner] = []

    async def start(*urls: str, **overrides: Any) -> str:
        base: dict[str, Any] = {
            "policy": "round_robin", "load_poll_interval_s": 0.1,
            "health": HealthConfig(interval_s=0.1, timeout_s=1, failure_threshold=1),
            "retry": RetryConfig(max_retries=2, initial_backoff_s=0.0, max_backoff_s=0.0)}
        runner = web.AppRunner(create_app(RouterConfig(workers=urls, **{**base, **overrides})),
                               handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


async def call(method: str, url: str, body: Any = None,
               headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    async with aiohttp.ClientSession() as session, session.request(
            method, url, json=body, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers


async def test_5xx_before_first_byte_is_retried_on_another_worker(
        upstreams: list[FakeUpstream], start_router: Start) -> None:
    bad, good = upstreams
    bad.mode = "http_503"
    router = await start_router(bad.url, good.url)
    results = [await call("POST", router + "/v1/chat/completions", CHAT) for _ in range(4)]
    assert all(status == 200 for status, _, _ in results)
    assert {h["X-BanaServe-Worker"] for _, _, h in results} == {good.url}
    assert len(bad.received) >= 1  # it was tried, then avoided
    async with aiohttp.ClientSession() as session, session.get(router + "/metrics") as resp:
        text = await resp.text()
    assert f'banaserve_router_retries_total{{reason="http_503",worker="{bad.url}"}}' in text


async def test_all_workers_failing_returns_the_last_error(
        upstreams: list[FakeUpstream], start_router: Start) -> None:
    for fake in upstreams:
        fake.mode = "http_503"
    router = await start_router(*(f.url for f in upstreams))
    status, body, _ = await call("POST", router + "/v1/chat/completions", CHAT)
    assert status == 503 and body["error"]["code"] == "upstream_failed"
    assert sum(len(f.received) for f in upstreams) == 2  # one attempt each, no worker twice


async def test_streams_are_never_retried_after_the_first_byte(
        upstreams: list[FakeUpstream], start_router: Start) -> None:
    upstreams[0].mode = upstreams[1].mode = "die_mid_stream"
    router = await start_router(*(f.url for f in upstreams))
    async with aiohttp.ClientSession() as session, session.post(
            router + "/v1/completions", json={"model": "m", "prompt": "x",
                                              "stream": True}) as resp:
        text = await resp.text()
    assert "upstream_failed" in text
    assert sum(len(f.received) for f in upstreams) == 1


async def test_breaker_opens_and_keeps_traffic_off_a_failing_worker(
        upstreams: list[FakeUpstream], start_router: Start) -> None:
    bad, good = upstreams
    bad.mode = "http_503"
    router = await start_router(bad.url, good.url,
                                breaker=BreakerConfig(failure_threshold=2, open_s=60),
                                retry=RetryConfig(max_retries=1, initial_backoff_s=0,
                                                  max_backoff_s=0))
    for _ in range(10):
        assert (await call("POST", router + "/v1/chat/completions", CHAT))[0] == 200
    assert len(bad.received) == 2  # then the breaker opened
    _, workers, _ = await call("GET", router + "/workers")
    state = {w["url"]: w["breaker"] for w in workers["workers"]}
    assert state == {bad.url: "open", good.url: "closed"}


async def test_overload_is_429_with_retry_after(upstreams: list[FakeUpstream],
                                                start_router: Start) -> None:
    slow = upstreams[0]
    slow.mode, slow.delay_s = "slow", 1.0
    router = await start_router(slow.url, admission=AdmissionConfig(
        max_concurrent=1, max_queued=1, queue_timeout_s=10, retry_after_s=2))
    results = await asyncio.gather(*(call("POST", router + "/v1/chat/completions", CHAT)
                                     for _ in range(4)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200, 200, 429, 429]
    rejected = [(b, h) for s, b, h in results if s == 429]
    assert all(h["Retry-After"] == "2" and b["error"]["type"] == "rate_limit_error"
               for b, h in rejected)


async def test_api_key_required_except_health_and_metrics(upstreams: list[FakeUpstream],
                                                          start_router: Start) -> None:
    router = await start_router(upstreams[0].url, api_key="s3cret")
    status, body, headers = await call("POST", router + "/v1/chat/completions", CHAT)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert (await call("POST", router + "/v1/chat/completions", CHAT,
                       {"Authorization": "Bearer wrong"}))[0] == 401
    assert (await call("GET", router + "/workers"))[0] == 401
    status, _, _ = await call("POST", router + "/v1/chat/completions", CHAT,
                              {"Authorization": "Bearer s3cret"})
    assert status == 200
    assert "authorization" not in {k.lower() for k in upstreams[0].received[-1]}
    assert (await call("GET", router + "/health"))[0] == 200
    async with aiohttp.ClientSession() as session, session.get(router + "/metrics") as resp:
        assert resp.status == 200


async def test_request_timeout_is_504(upstreams: list[FakeUpstream],
                                      start_router: Start) -> None:
    upstreams[0].mode, upstreams[0].delay_s = "slow", 2.0
    router = await start_router(upstreams[0].url, request_timeout_s=0.3)
    status, body, _ = await call("POST", router + "/v1/chat/completions", CHAT)
    assert status == 504 and body["error"]["code"] == "request_timeout"


async def test_request_timeout_mid_stream_ends_with_error_event(
        upstreams: list[FakeUpstream], start_router: Start) -> None:
    upstreams[0].mode = "slow_stream"  # 5 events, 0.2 s apart
    router = await start_router(upstreams[0].url, request_timeout_s=0.5)
    async with aiohttp.ClientSession() as session, session.post(
            router + "/v1/completions", json={"model": "m", "prompt": "x",
                                              "stream": True}) as resp:
        text = await asyncio.wait_for(resp.text(), 5)
    events = [e[6:] for e in text.splitlines() if e.startswith("data: ")]
    assert json.loads(events[-2])["error"]["code"] == "request_timeout"
    assert events[-1] == "[DONE]" and 1 <= len(events) - 2 < 5


async def test_workers_added_and_removed_at_run_time(upstreams: list[FakeUpstream],
                                                     start_router: Start) -> None:
    first, second = upstreams
    router = await start_router(first.url)
    status, body, _ = await call("POST", router + "/workers", {"url": second.url})
    assert status == 201 and body["added"]
    assert (await call("POST", router + "/workers", {"url": second.url}))[0] == 200  # idempotent

    async def both_serving() -> bool:
        _, workers, _ = await call("GET", router + "/workers")
        return all(w["healthy"] for w in workers["workers"]) and len(workers["workers"]) == 2

    for _ in range(50):
        if await both_serving():
            break
        await asyncio.sleep(0.05)
    served = {(await call("POST", router + "/v1/chat/completions", CHAT))[2][
        "X-BanaServe-Worker"] for _ in range(4)}
    assert served == {first.url, second.url}

    # removal while a slow request is in flight: it finishes, then the worker leaves
    first.mode, first.delay_s = "slow", 0.5
    in_flight = asyncio.create_task(call("POST", router + "/v1/chat/completions", CHAT))
    await asyncio.sleep(0.1)
    target = first.url
    _, workers, _ = await call("GET", router + "/workers")
    busy = [w["url"] for w in workers["workers"] if w["in_flight"]]
    assert busy
    target = busy[0]
    assert (await call("DELETE", router + "/workers", {"url": target}))[0] == 200
    status, _, headers = await in_flight
    assert status == 200 and headers["X-BanaServe-Worker"] == target
    _, workers, _ = await call("GET", router + "/workers")
    assert [w["url"] for w in workers["workers"]] == [u for u in (first.url, second.url)
                                                      if u != target]
    assert (await call("DELETE", router + "/workers", {"url": target}))[0] == 404
    assert (await call("POST", router + "/workers", {"nope": 1}))[0] == 400


