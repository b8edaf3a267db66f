"""The whole router app (real aiohttp server on port 0) against fake upstream workers."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from router.app import create_app
from router.config import HealthConfig, RouterConfig
from tests.unit.fake_upstream import FakeUpstream

Start = Callable[..., Awaitable[str]]
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again: nothing listens


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = await FakeUpstream().start()
    yield fake
    await fake.stop()


@pytest.fixture
async def start_router() -> AsyncIterator[Start]:
    runners: list[web.AppRunner] = []

    async def start(*urls: str, policy: str = "round_robin") -> str:
        cfg = RouterConfig(workers=urls, policy=policy, load_poll_interval_s=0.1,
                           health=HealthConfig(interval_s=0.1, timeout_s=1,
                                               failure_threshold=1))
        runner = web.AppRunner(create_app(cfg), handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


async def post(url: str, body: object = None, raw: bytes | None = None,
               ) -> tuple[int, dict[str, object], aiohttp.typedefs.LooseHeaders]:
    data = raw if raw is not None else json.dumps(body).encode()
    async with aiohttp.ClientSession() as session, session.post(
            url, data=data, headers={"Content-Type": "application/json"}) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers


async def test_non_streaming_is_forwarded_byte_for_byte(upstream: FakeUpstream,
                                                        start_router: Start) -> None:
    router = await start_router(upstream.url)
    status, body, headers = await post(router + "/v1/chat/completions", {**CHAT, "x_extra": 1})
    assert status == 200 and body["echo"] == {**CHAT, "x_extra": 1}
    assert headers["X-BanaServe-Worker"] == upstream.url


@pytest.mark.parametrize(("raw", "code"), [
    (b"{nope", "invalid_json"),
    (b'"a string"', None),
    (json.dumps({"messages": CHAT["messages"]}).encode(), "missing_field"),
    (json.dumps({"model": "x", "messages": CHAT["messages"]}).encode(), "model_not_found"),
    (json.dumps({"model": "m", "messages": []}).encode(), "empty_messages"),
    (json.dumps({**CHAT, "max_tokens": "5"}).encode(), "invalid_type"),
    (json.dumps({**CHAT, "stream": "yes"}).encode(), "invalid_type"),
])
async def test_bad_input_gets_openai_400_and_never_reaches_upstream(
        upstream: FakeUpstream, start_router: Start, raw: bytes, code: str | None) -> None:
    router = await start_router(upstream.url)
    status, body, _ = await post(router + "/v1/chat/completions", raw=raw)
    assert status == 400
    error = body["error"]
    assert isinstance(error, dict)
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    if code:
        assert error["code"] == code
    assert upstream.received == []


async def test_sse_is_relayed_chunk_by_chunk(upstream: FakeUpstream, start_router: Start) -> None:
    upstream.mode = "slow_stream"
    router = await start_router(upstream.url)
    arrivals: list[float] = []
    async with aiohttp.ClientSession() as session, session.post(
            router + "/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["X-BanaServe-Worker"] == upstream.url
        loop = asyncio.get_running_loop()
        lines = []
        async for line in resp.content:
            if line.strip():
                lines.append(line.decode().strip())
                arrivals.append(loop.time())
    assert lines[-1] == "data: [DONE]" and len(lines) == 6
    # the upstream sleeps 0.2 s between events: they must arrive spread out, not at once
    assert arrivals[4] - arrivals[0] > 0.5


async def test_worker_dying_mid_stream_ends_with_error_event(
        upstream: FakeUpstream, start_router: Start) -> None:
    upstream.mode = "die_mid_stream"
    router = await start_router(upstream.url)
    async with aiohttp.ClientSession() as session, session.post(
            router + "/v1/completions", json={"model": "m", "prompt": "x",
                                              "stream": True}) as resp:
        text = await asyncio.wait_for(resp.text(), timeout=10)
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events[:2] == ['{"i": 0}', '{"i": 1}']
    assert json.loads(events[-2])["error"]["code"] == "upstream_failed"
    assert events[-1] == "[DONE]"


async def test_client_disconnect_closes_the_upstream_request(
        upstream: FakeUpstream, start_router: Start) -> None:
    upstream.mode = "slow_stream"
    router = await start_router(upstream.url)
    async with aiohttp.ClientSession() as session:
        resp = await session.post(router + "/v1/completions",
                                  json={"model": "m", "prompt": "x", "stream": True})
        await resp.content.readline()
        resp.close()  # hang up
    await asyncio.wait_for(upstream.disconnected.wait(), timeout=5)


async def test_refused_connection_is_redispatched_and_marked_unhealthy(
        upstream: FakeUpstream, start_router: Start) -> None:
    dead = dead_url()
    router = await start_router(upstream.url, dead)
    statuses = [(await post(router + "/v1/chat/completions", CHAT))[0] for _ in range(6)]
    assert statuses == [200] * 6
    async with aiohttp.ClientSession() as session, session.get(router + "/workers") as resp:
        workers = {w["url"]: w["healthy"] for w in (await resp.json())["workers"]}
    assert workers == {upstream.url: True, dead: False}


async def test_no_healthy_worker_is_503(start_router: Start) -> None:
    router = await start_router(dead_url())
    status, body, _ = await post(router + "/v1/chat/completions", CHAT)
    assert status == 503
    assert body["error"]["code"] == "no_healthy_worker"  # type: ignore[index]
    async with aiohttp.ClientSession() as session, session.get(router + "/health") as resp:
        assert resp.status == 503


async def test_models_metrics_and_unknown_route(upstream: FakeUpstream,
                                                start_router: Start) -> None:
    router = await start_router(upstream.url, policy="load_aware")
    await post(router + "/v1/chat/completions", CHAT)
    async with aiohttp.ClientSession() as session:
        async with session.get(router + "/v1/models") as resp:
            assert [m["id"] for m in (await resp.json())["data"]] == ["m"]
        async with session.get(router + "/metrics") as resp:
            text = await resp.text()
            assert 'banaserve_router_requests_total{route="chat",status="200"} 1.0' in text
            assert f'banaserve_router_worker_healthy{{worker="{upstream.url}"}} 1.0' in text
        async with session.get(router + "/nope") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["type"] == "not_found_error"
        async with session.get(router + "/v1/chat/completions") as resp:
            assert resp.status == 405  # wrong method, JSON error body
            assert "error" in await resp.json()


async def test_kv_index_match_rejects_bad_bodies_and_answers_an_empty_index(
        upstream: FakeUpstream, start_router: Start) -> None:
    """``POST /kv_index/match``: bad input is a 400 naming ``input_ids``; a fake worker that
    publishes no KV events leaves the index empty (the real stream: test_kv_events.py)."""
    url = await start_router(upstream.url)
    for raw in (b"{", b"[]", b'{"input_ids": "abc"}', b'{"input_ids": [1, "x"]}', b"{}"):
        status, body, _ = await post(url + "/kv_index/match", raw=raw)
        assert status == 400, (raw, body)
        error = body["error"]
        assert isinstance(error, dict) and error["param"] == "input_ids", body
        assert error["type"] == "invalid_request_error"
    status, body, _ = await post(url + "/kv_index/match", {"input_ids": [1, 2, 3]})
    assert status == 200 and body == {"input_tokens": 3, "workers": {}}
