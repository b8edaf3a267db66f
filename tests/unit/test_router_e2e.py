"""The whole router (``create_app`` + handlers + proxy) on port 0 against fake upstream workers.

Each fake is a small aiohttp app on port 0 that answers like an SGLang worker and records every
generation request it receives, so a test can assert that bad input never reached it.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from router.app import create_app
from router.config import HealthConfig, RouterConfig

LOADS = {"loads": [{"num_running_reqs": 2, "num_waiting_reqs": 1,
                    "num_waiting_uncached_tokens": 100, "token_usage": 0.25,
                    "max_running_requests": 8, "max_total_num_tokens": 4096,
                    "gen_throughput": 3.5}]}
MESSAGES: list[dict[str, Any]] = [{"role": "user", "content": "hi"}]
CHAT: dict[str, Any] = {"model": "m", "messages": MESSAGES}
ROUTES: list[tuple[str, dict[str, Any]]] = [
    ("/v1/chat/completions", CHAT), ("/v1/completions", {"model": "m", "prompt": "hi"}),
    ("/generate", {"text": "hi"})]
TIMEOUT_S = 5.0


def sse(payload: object) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


class FakeWorker:
    """Answers like an SGLang worker. ``mode``: ``ok``; ``gated`` (a stream waits for ``gate``
    after its first chunk); ``die`` (a stream closes the connection after two chunks)."""

    def __init__(self) -> None:
        self.health_status = 200
        self.mode = "ok"
        self.gate = asyncio.Event()
        self.received: list[tuple[str, bytes]] = []
        self.url = ""
        app = web.Application()
        for path in ("/v1/chat/completions", "/v1/completions", "/generate"):
            app.router.add_post(path, self.generate)
        app.router.add_get("/health", self.health)
        app.router.add_get("/model_info", self.model_info)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/loads", self.loads)
        self.runner = web.AppRunner(app)

    async def start(self) -> FakeWorker:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=self.health_status)

    async def model_info(self, request: web.Request) -> web.Response:
        return web.json_response({"served_model_name": "m", "tokenizer_path": None,
                                  "model_path": "/nonexistent"})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "m", "max_model_len": 4096}]})

    async def loads(self, request: web.Request) -> web.Response:
        return web.json_response(LOADS)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.received.append((request.path, raw))
        if not json.loads(raw).get("stream"):
            return web.json_response({"id": "cmpl-1", "path": request.path, "worker": self.url})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse({"i": 0}))
        if self.mode == "gated":
            await asyncio.wait_for(self.gate.wait(), TIMEOUT_S)
        await response.write(sse({"i": 1}))
        if self.mode == "die":
            assert request.transport is not None
            request.transport.close()  # the worker process dies mid-stream
            return response
        await response.write(sse({"i": 2}))
        await response.write(b"data: [DONE]\n\n")
        return response


StartRouter = Callable[..., Awaitable[str]]


@pytest.fixture
async def worker() -> AsyncIterator[FakeWorker]:
    fake = await FakeWorker().start()
    yield fake
    await fake.runner.cleanup()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as session:
        yield session


@pytest.fixture
async def start_router() -> AsyncIterator[StartRouter]:
    runners: list[web.AppRunner] = []

    async def start(*urls: str, interval_s: float = 0.1) -> str:
        cfg = RouterConfig(workers=urls, policy="round_robin", load_poll_interval_s=0.1,
                           health=HealthConfig(interval_s=interval_s, timeout_s=1.0))
        runner = web.AppRunner(create_app(cfg))
        await runner.setup()  # runs the initial health check of every worker
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


def dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"  # closed again: nothing listens


async def post(client: aiohttp.ClientSession, url: str, body: object
               ) -> tuple[int, Any, aiohttp.ClientResponse]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with client.post(url, data=data, headers={"Content-Type": "application/json"}) as resp:
        return resp.status, await resp.json(content_type=None), resp


def assert_openai_error(body: Any, error_type: str, code: str | None) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == error_type and body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


# -- bad input: 400 before any worker sees it ---------------------------------------------------
BAD_INPUTS: list[tuple[str, object, str | None, str | None]] = [
    ("/v1/chat/completions", b'{"model": "m", "messages": [', "invalid_json", None),
    ("/v1/chat/completions", b"", None, None),
    ("/v1/chat/completions", b"[1, 2]", None, None),
    ("/v1/chat/completions", {"messages": MESSAGES}, "missing_field", "model"),
    ("/v1/chat/completions", {"model": "nope", "messages": MESSAGES}, "model_not_found",
     "model"),
    ("/v1/chat/completions", {"model": "m", "messages": []}, "empty_messages", "messages"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": "5"}, "invalid_type", "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "stream": "yes"}, "invalid_type", "stream"),
    ("/v1/completions", b"{not json}", "invalid_json", None),
    ("/v1/completions", b'"a string"', None, None),
    ("/v1/completions", {"prompt": "hi"}, "missing_field", "model"),
    ("/v1/completions", {"model": "x", "prompt": "hi"}, "model_not_found", "model"),
    ("/v1/completions", {"model": "m", "prompt": ""}, "empty_prompt", "prompt"),
    ("/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": "5"}, "invalid_type",
     "max_tokens"),
    ("/v1/completions", {"model": "m", "prompt": [5, -1]}, "invalid_token_id", "prompt"),
    ("/generate", b"{", "invalid_json", None),
    ("/generate", {"sampling_params": {}}, "missing_field", "text"),
    ("/generate", {"text": ""}, "empty_prompt", "text"),
    ("/generate", {"text": "hi", "stream": "yes"}, "invalid_type", "stream"),
    ("/generate", {"input_ids": [1, -2]}, "invalid_token_id", "input_ids"),
]


@pytest.mark.parametrize(("path", "body", "code", "param"), BAD_INPUTS)
async def test_bad_input_is_400_with_openai_body_and_never_reaches_the_worker(
        worker: FakeWorker, start_router: StartRouter, client: aiohttp.ClientSession,
        path: str, body: object, code: str | None, param: str | None) -> None:
    router = await start_router(worker.url)
    status, answer, resp = await post(client, router + path, body)
    assert status == 400
    assert resp.headers["Content-Type"].startswith("application/json")
    assert_openai_error(answer, "invalid_request_error", code)
    assert answer["error"]["param"] == param
    assert worker.received == []


async def test_good_input_after_bad_input_reaches_the_worker_byte_for_byte(
        worker: FakeWorker, start_router: StartRouter, client: aiohttp.ClientSession) -> None:
    router = await start_router(worker.url)
    await post(client, router + "/v1/chat/completions", {"model": "m", "messages": []})
    raw = b'{"model":"m",  "messages":[{"role":"user","content":"hi"}], "x_extra": 1}'
    status, answer, resp = await post(client, router + "/v1/chat/completions", raw)
    assert status == 200 and answer["id"] == "cmpl-1"
    assert resp.headers["X-BanaServe-Worker"] == worker.url
    assert worker.received == [("/v1/chat/completions", raw)]


@pytest.mark.parametrize(("path", "body"), ROUTES)
async def test_each_route_is_forwarded_to_the_same_upstream_path(
        worker: FakeWorker, start_router: StartRouter, client: aiohttp.ClientSession,
        path: str, body: dict[str, Any]) -> None:
    router = await start_router(worker.url)
    status, answer, _ = await post(client, router + path, body)
    assert status == 200 and answer["path"] == path
    assert [p for p, _ in worker.received] == [path]


async def test_unhashable_role_is_400_not_500(worker: FakeWorker, start_router: StartRouter,
                                              client: aiohttp.ClientSession) -> None:
    router = await start_router(worker.url)
    body = {"model": "m", "messages": [{"role": ["user"], "content": "hi"}]}
    status, _, _ = await post(client, router + "/v1/chat/completions", body)
    assert status == 400


# -- no healthy worker: 503 ---------------------------------------------------------------------
async def test_no_healthy_worker_is_503_with_error_body(
        worker: FakeWorker, start_router: StartRouter, client: aiohttp.ClientSession) -> None:
    worker.health_status = 500
    router = await start_router(worker.url)
    for path, body in ROUTES:
        status, answer, _ = await post(client, router + path, body)
        assert status == 503
        assert_openai_error(answer, "service_unavailable", "no_healthy_worker")
    assert worker.received == []
    async with client.get(router + "/health") as resp:
        assert resp.status == 503
        assert_openai_error(await resp.json(), "service_unavailable", "no_healthy_worker")


async def test_only_a_dead_worker_is_503(start_router: StartRouter,
                                         client: aiohttp.ClientSession) -> None:
    router = await start_router(dead_url())
    status, answer, _ = await post(client, router + "/v1/chat/completions", CHAT)
    assert status == 503
    assert_openai_error(answer, "service_unavailable", "no_healthy_worker")


async def wait_for_health(client: aiohttp.ClientSession, router: str, url: str,
                          healthy: bool) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        while True:
            async with client.get(router + "/workers") as resp:
                states = {w["url"]: w["healthy"] for w in (await resp.json())["workers"]}
            if states[url] is healthy:
                return
            await asyncio.sleep(0.05)


async def test_worker_failing_health_checks_turns_requests_into_503(
        worker: FakeWorker, start_router: StartRouter, client: aiohttp.ClientSession) -> None:
    router = await start_router(worker.url)
    assert (await post(client, router + "/v1/chat/completions", CHAT))[0] == 200
    worker.health_status = 500
    await wait_for_health(client, router, worker.url, healthy=False)
    assert (await post(client, router + "/v1/chat/completions", CHAT))[0] == 503
    worker.health_status = 200
    await wait_for_health(client, router, worker.url, healthy=True)
    assert (await post(client, router + "/v1/chat/completions", CHAT))[0] == 200
    assert len(worker.received) == 2


# -- streaming ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("path", "body"), ROUTES)
async def test_sse_is_relayed_chunk_by_chunk(
        worker: FakeWorker, start_router: StartRouter, client: aiohttp.ClientSession,
        path: str, body: dict[str, Any]) -> None:
    worker.mode = "gated"  # the worker holds its second chunk until the client saw the first
    router = await start_router(worker.url)
    async with client.post(router + path, json={**body, "stream": True}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["X-BanaServe-Worker"] == worker.url
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), TIMEOUT_S)
        assert first == sse({"i": 0})
        worker.gate.set()
        rest = await asyncio.wait_for(resp.content.read(), TIMEOUT_S)
    assert rest == sse({"i": 1}) + sse({"i": 2}) + b"data: [DONE]\n\n"


async def test_worker_dying_mid_stream_ends_with_an_error_event_and_done(
        worker: FakeWorker, start_router: StartRouter, client: aiohttp.ClientSession) -> None:
    worker.mode = "die"
    router = await start_router(worker.url)
    async with client.post(router + "/v1/chat/completions",
                           json={**CHAT, "stream": True}) as resp:
        assert resp.status == 200
        text = (await asyncio.wait_for(resp.read(), TIMEOUT_S)).decode()
    events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
    assert events[:2] == ['{"i": 0}', '{"i": 1}']
    error = json.loads(events[2])["error"]
    assert error["code"] == "upstream_failed" and "mid-stream" in error["message"]
    assert events[3:] == ["[DONE]"]


# -- dead workers are skipped -------------------------------------------------------------------
async def workers_health(client: aiohttp.ClientSession, router: str) -> dict[str, bool]:
    async with client.get(router + "/workers") as resp:
        assert resp.status == 200
        return {w["url"]: w["healthy"] for w in (await resp.json())["workers"]}


async def test_refusing_worker_is_skipped_and_reported_unhealthy(
        worker: FakeWorker, start_router: StartRouter, client: aiohttp.ClientSession) -> None:
    dead = dead_url()
    router = await start_router(dead, worker.url)
    for _ in range(6):
        status, answer, resp = await post(client, router + "/v1/chat/completions", CHAT)
        assert status == 200 and resp.headers["X-BanaServe-Worker"] == worker.url
    assert len(worker.received) == 6
    assert await workers_health(client, router) == {dead: False, worker.url: True}


async def test_worker_that_dies_after_start_is_skipped_by_the_proxy(
        worker: FakeWorker, start_router: StartRouter, client: aiohttp.ClientSession) -> None:
    doomed = await FakeWorker().start()
    router = await start_router(doomed.url, worker.url, interval_s=60.0)  # no health loop help
    assert await workers_health(client, router) == {doomed.url: True, worker.url: True}
    await doomed.runner.cleanup()  # its port now refuses connections
    statuses = [(await post(client, router + "/v1/completions",
                            {"model": "m", "prompt": "hi"}))[0] for _ in range(4)]
    assert statuses == [200] * 4 and len(worker.received) == 4
    assert await workers_health(client, router) == {doomed.url: False, worker.url: True}


async def test_workers_lists_polled_load(worker: FakeWorker, start_router: StartRouter,
                                         client: aiohttp.ClientSession) -> None:
    router = await start_router(worker.url)
    async with asyncio.timeout(TIMEOUT_S):
        while True:
            async with client.get(router + "/workers") as resp:
                body = await resp.json()
            load = body["workers"][0]["load"]
            if load["age_s"] is not None:
                break
            await asyncio.sleep(0.05)
    assert body["policy"] == "round_robin"
    assert (load["num_running_reqs"], load["num_waiting_reqs"]) == (2, 1)
    assert (load["token_usage"], load["max_running_requests"]) == (0.25, 8)


# -- other routes -------------------------------------------------------------------------------
async def test_metrics_is_prometheus_text_counting_requests(
        worker: FakeWorker, start_router: StartRouter, client: aiohttp.ClientSession) -> None:
    router = await start_router(worker.url)
    await post(client, router + "/v1/chat/completions", CHAT)
    await post(client, router + "/v1/chat/completions", b"{")
    async with client.get(router + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    assert "# TYPE banaserve_router_requests_total counter" in text
    assert 'banaserve_router_requests_total{route="chat",status="200"} 1.0' in text
    assert 'banaserve_router_requests_total{route="chat",status="400"} 1.0' in text


async def test_models_lists_the_served_model(worker: FakeWorker, start_router: StartRouter,
                                             client: aiohttp.ClientSession) -> None:
    router = await start_router(worker.url)
    async with client.get(router + "/v1/models") as resp:
        data = (await resp.json())["data"]
    assert [(m["id"], m["max_model_len"]) for m in data] == [("m", 4096)]


@pytest.mark.parametrize(("method", "path"), [("GET", "/nope"), ("POST", "/v1/nope"),
                                              ("GET", "/v1/chat")])
async def test_unknown_route_is_404_with_json_error(
        worker: FakeWorker, start_router: StartRouter, client: aiohttp.ClientSession,
        method: str, path: str) -> None:
    router = await start_router(worker.url)
    async with client.request(method, router + path) as resp:
        assert resp.status == 404
        assert_openai_error(await resp.json(), "not_found_error", None)
    assert worker.received == []


async def test_wrong_method_is_405_with_json_error(
        worker: FakeWorker, start_router: StartRouter, client: aiohttp.ClientSession) -> None:
    router = await start_router(worker.url)
    async with client.get(router + "/v1/chat/completions") as resp:
        assert resp.status == 405
        assert_openai_error(await resp.json(), "invalid_request_error", "method_not_allowed")
