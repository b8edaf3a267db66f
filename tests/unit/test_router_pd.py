"""Prefill/decode mode against fake workers: bootstrap fields, pairing, prefill failures."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from router.app import create_app
from router.config import HealthConfig, PrefillWorker, RetryConfig, RouterConfig
from tests.unit.fake_upstream import FakeUpstream

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture
async def fakes() -> AsyncIterator[list[FakeUpstream]]:
    started = [await FakeUpstream().start() for _ in range(3)]
    yield started
    for fake in started:
        await fake.stop()


async def start(prefill: list[PrefillWorker], decode: list[str]) -> tuple[str, web.AppRunner]:
    cfg = RouterConfig(prefill=tuple(prefill), decode=tuple(decode), policy="round_robin",
                       health=HealthConfig(interval_s=0.1, timeout_s=1, failure_threshold=1),
                       retry=RetryConfig(max_retries=2, initial_backoff_s=0, max_backoff_s=0))
    runner = web.AppRunner(create_app(cfg), handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return f"http://127.0.0.1:{runner.addresses[0][1]}", runner


async def test_both_halves_get_the_same_bootstrap_fields(fakes: list[FakeUpstream]) -> None:
    prefill, decode, _ = fakes
    router, runner = await start([PrefillWorker(prefill.url, 9123)], [decode.url])
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(router + "/v1/chat/completions", json=CHAT) as resp:
                assert resp.status == 200
                assert resp.headers["X-BanaServe-Worker"] == decode.url
            async with session.get(router + "/workers") as resp:
                roles = {w["url"]: w["role"] for w in (await resp.json())["workers"]}
    finally:
        await runner.cleanup()
    (sent_p,), (sent_d,) = prefill.received, decode.received
    assert sent_p == sent_d
    assert sent_p["bootstrap_host"] == "127.0.0.1" and sent_p["bootstrap_port"] == 9123
    assert 0 <= sent_p["bootstrap_room"] < 2**63
    assert {k: v for k, v in sent_p.items() if not k.startswith("bootstrap_")} == CHAT
    assert roles == {prefill.url: "prefill", decode.url: "decode"}


async def test_each_request_gets_a_fresh_room(fakes: list[FakeUpstream]) -> None:
    prefill, decode, _ = fakes
    router, runner = await start([PrefillWorker(prefill.url)], [decode.url])
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                async with session.post(router + "/v1/completions",
                                        json={"model": "m", "prompt": "x"}) as resp:
                    assert resp.status == 200
    finally:
        await runner.cleanup()
    rooms = [b["bootstrap_room"] for b in decode.received]
    assert len(set(rooms)) == 3 and "bootstrap_port" not in decode.received[0]


async def test_failing_prefill_is_replaced_before_the_decode_answers(
        fakes: list[FakeUpstream]) -> None:
    bad, good, decode = fakes
    bad.mode = "http_503"
    decode.mode, decode.delay_s = "slow", 0.5  # a decode waits for the KV transfer
    router, runner = await start([PrefillWorker(bad.url), PrefillWorker(good.url)], [decode.url])
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(2):
                async with session.post(router + "/v1/chat/completions", json=CHAT) as resp:
                    assert resp.status == 200
    finally:
        await runner.cleanup()
    assert len(good.received) == 2  # every request ended up paired with the good prefill
    paired_rooms = {b["bootstrap_room"] for b in good.received}
    answered_rooms = {b["bootstrap_room"] for b in decode.received}
    assert paired_rooms <= answered_rooms
