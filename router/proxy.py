"""Forwarding and the streaming relay. No policy here: the caller passes a ``choose`` function.

Who calls it: ``handlers`` call ``Proxy.forward()`` once per validated request.
Guarantees:
- The request body is forwarded byte for byte.
- A worker that refuses the connection got nothing, so the request is re-dispatched to another
  worker (``max_connect_retries`` times) and the worker is reported to ``WorkerPool``.
  Nothing is retried once the worker may have seen the request.
- Server-sent events are relayed chunk by chunk as they arrive. If the worker dies mid-stream the
  client gets an SSE error event and ``data: [DONE]``, then the end of the stream, never a hang.
- If the client goes away, the upstream connection is closed, which makes SGLang abort the
  request (it watches for disconnects).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

import aiohttp
from aiohttp import web

from router.errors import NoHealthyWorker, UpstreamError
from router.metrics import RouterMetrics
from router.validation import ParsedRequest
from router.workers import WorkerPool, WorkerView

logger = logging.getLogger(__name__)

WORKER_HEADER = "X-BanaServe-Worker"
_FORWARDED_HEADERS = ("Authorization", "X-Request-Id")
_UPSTREAM_FAILURES = (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError)
Chooser = Callable[[set[str]], WorkerView]


def sse_error_event(message: str, code: str = "upstream_failed") -> bytes:
    payload = {"error": {"message": message, "type": "upstream_error", "param": None,
                         "code": code}}
    return f"data: {json.dumps(payload)}\n\ndata: [DONE]\n\n".encode()


class Proxy:
    def __init__(self, session: aiohttp.ClientSession, pool: WorkerPool, metrics: RouterMetrics,
                 max_connect_retries: int, read_timeout_s: float, connect_timeout_s: float):
        self._session = session
        self._pool = pool
        self._metrics = metrics
        self._max_retries = max_connect_retries
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s)

    async def forward(self, request: web.Request, path: str, parsed: ParsedRequest,
                      choose: Chooser) -> web.StreamResponse:
        started = time.monotonic()
        tried: set[str] = set()
        headers = {"Content-Type": "application/json"}
        for name in _FORWARDED_HEADERS:
            if name in request.headers:
                headers[name] = request.headers[name]
        for _ in range(self._max_retries + 1):
            worker = choose(tried)
            tried.add(worker.url)
            with self._pool.track(worker.url, parsed.prompt_tokens + (parsed.max_tokens or 0)):
                self._metrics.dispatched.labels(worker.url).inc()
                try:
                    upstream = await self._session.post(
                        worker.url + path, data=parsed.raw, headers=headers,
                        timeout=self._timeout)
                except aiohttp.ClientConnectorError as exc:
                    logger.warning("worker %s refused the connection (%s); re-dispatching",
                                   worker.url, exc)
                    self._pool.report_connect_failure(worker.url)
                    self._metrics.connect_retries.labels(worker.url).inc()
                    continue
                except _UPSTREAM_FAILURES as exc:
                    self._metrics.upstream_errors.labels(worker.url, "request").inc()
                    raise UpstreamError(f"worker {worker.url} failed before answering: "
                                        f"{type(exc).__name__}", code="upstream_failed") from exc
                self._metrics.first_byte.labels(parsed.route).observe(time.monotonic() - started)
                try:
                    return await self._relay(request, upstream, worker.url, parsed.route)
                finally:
                    upstream.close()
        raise NoHealthyWorker(f"every worker tried ({len(tried)}) refused the connection")

    async def _relay(self, request: web.Request, upstream: aiohttp.ClientResponse,
                     worker_url: str, route: str) -> web.StreamResponse:
        content_type = upstream.headers.get("Content-Type", "application/json")
        if not content_type.startswith("text/event-stream"):
            try:
                body = await upstream.read()
            except _UPSTREAM_FAILURES as exc:
                self._metrics.upstream_errors.labels(worker_url, "body").inc()
                raise UpstreamError(f"worker {worker_url} failed while answering: "
                                    f"{type(exc).__name__}", code="upstream_failed") from exc
            return web.Response(body=body, status=upstream.status,
                                headers={"Content-Type": content_type, WORKER_HEADER: worker_url})
        response = web.StreamResponse(status=upstream.status, headers={
            "Content-Type": content_type, "Cache-Control": "no-cache", WORKER_HEADER: worker_url})
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
        except (ConnectionResetError, asyncio.CancelledError):
            self._metrics.client_disconnects.labels(route).inc()
            logger.info("client went away; aborting the request on %s", worker_url)
            raise
        except _UPSTREAM_FAILURES as exc:
            self._metrics.upstream_errors.labels(worker_url, "stream").inc()
            logger.warning("worker %s failed mid-stream: %s", worker_url, exc)
            try:
                await response.write(sse_error_event(
                    f"the worker serving this request failed mid-stream ({type(exc).__name__}); "
                    "the output is incomplete"))
            except ConnectionResetError:
                pass
        await response.write_eof()
        return response
