"""A fake SGLang worker (aiohttp, port 0) for router unit tests: it records what it receives."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

LOADS = {"loads": [{"num_running_reqs": 0, "num_waiting_reqs": 0,
                    "num_waiting_uncached_tokens": 0, "token_usage": 0.0,
                    "max_running_requests": 8, "max_total_num_tokens": 4096,
                    "gen_throughput": 0.0}]}


class FakeUpstream:
    """Answers like a worker. ``mode`` is ``ok``, ``die_mid_stream``, ``slow_stream``,
    ``http_503`` (every generation answered 503) or ``slow`` (non-streamed answer after
    ``delay_s``)."""

    def __init__(self, name: str = "m") -> None:
        self.name = name
        self.mode = "ok"
        self.delay_s = 1.0
        self.received: list[dict[str, Any]] = []
        self.disconnected = asyncio.Event()
        self.app = web.Application()
        for path in ("/v1/chat/completions", "/v1/completions", "/generate"):
            self.app.router.add_post(path, self.generate)
        self.app.router.add_get("/health", self.health)
        self.app.router.add_get("/v1/loads", self.loads)
        self.app.router.add_get("/model_info", self.model_info)
        self.app.router.add_get("/v1/models", self.models)
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> FakeUpstream:
        self.runner = web.AppRunner(self.app, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def loads(self, request: web.Request) -> web.Response:
        return web.json_response(LOADS)

    async def model_info(self, request: web.Request) -> web.Response:
        return web.json_response({"served_model_name": self.name, "model_path": "/nonexistent",
                                  "tokenizer_path": None})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list",
                                  "data": [{"id": self.name, "max_model_len": 4096}]})

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append(body)
        if self.mode == "http_503":
            return web.json_response({"error": "overloaded"}, status=503)
        if self.mode == "slow":
            await asyncio.sleep(self.delay_s)
        if not body.get("stream"):
            return web.json_response({"object": "chat.completion", "echo": body})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for i in range(5):
                await response.write(f"data: {json.dumps({'i': i})}\n\n".encode())
                if self.mode == "die_mid_stream" and i == 1:
                    assert request.transport is not None
                    request.transport.abort()  # the worker process dies
                    return response
                if self.mode == "slow_stream":
                    await asyncio.sleep(0.2)
            await response.write(b"data: [DONE]\n\n")
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnected.set()
            raise
        return response
