"""Forwarding and the streaming relay. No policy here: the caller passes a ``choose`` function.

Who calls it: ``handlers`` call ``Proxy.forward()`` once per validated, admitted request.
Guarantees:
- The request body is forwarded byte for byte.
- Retries (``RetryConfig``): a connection error, a timeout, a worker failing while the router
  reads a non-streamed answer, or a 5xx answer, all before any byte reached the client, make the
  router try another worker after an exponential backoff with jitter. Nothing is retried once
  the router has started streaming to the client.
- Every attempt's outcome goes to ``WorkerPool.report_result`` (the circuit breaker); a refused
  connection also marks the worker unhealthy at once.
- Server-sent events are relayed chunk by chunk as they arrive. If the worker dies mid-stream, or
  the request runs past its deadline, the client gets an SSE error event and ``data: [DONE]``,
  then the end of the stream, never a hang.
- If the client goes away, the upstream connection is closed, which makes SGLang abort the
  request (it watches for disconnects).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable

import aiohttp
from aiohttp import web

from router.config import RetryConfig
from router.errors import NoHealthyWorker, RequestTimeout, RouterError, UpstreamError
from router.length import response_headers
from router.metrics import RouterMetrics
from router.policy.views import WorkerView
from router.validation import ParsedRequest
from router.workers import WorkerPool

logger = logging.getLogger(__name__)

WORKER_HEADER = "X-BanaServe-Worker"
_UPSTREAM_FAILURES = (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError)
_RETRYABLE_STATUS = frozenset({500, 502, 503, 504})
Chooser = Callable[[set[str]], WorkerView]


def sse_error_event(message: str, code: str = "upstream_failed") -> bytes:
    payload = {"error": {"message": message, "type": "upstream_error", "param": None,
                         "code": code}}
    return f"data: {json.dumps(payload)}\n\ndata: [DONE]\n\n".encode()


class _Retryable(Exception):
    """An attempt failed before anything reached the client; another worker may try."""

    def __init__(self, kind: str, error: RouterError) -> None:
        super().__init__(error.message)
        self.kind = kind
        self.error = error


class Proxy:
    def __init__(self, session: aiohttp.ClientSession, pool: WorkerPool, metrics: RouterMetrics,
                 retry: RetryConfig, read_timeout_s: float, connect_timeout_s: float,
                 forward_auth: bool = True):
        self._session = session
        self._pool = pool
        self._metrics = metrics
        self._retry = retry
        self._rng = random.Random()
        self._read_timeout_s = read_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s,
                                              sock_read=read_timeout_s)
        self._forwarded = ("Authorization", "X-Request-Id") if forward_auth else ("X-Request-Id",)

    async def forward(self, request: web.Request, path: str, parsed: ParsedRequest,
                      choose: Chooser, deadline: float,
                      answered: asyncio.Event | None = None) -> web.StreamResponse:
        """Send ``parsed`` to a worker chosen by ``choose``; ``deadline`` is a loop time.

        ``answered`` is set once a worker's answer is being relayed (no retry after that)."""
        started = time.monotonic()
        tried: set[str] = set()
        headers = {"Content-Type": "application/json"}
        for name in self._forwarded:
            if name in request.headers:
                headers[name] = request.headers[name]
        last: RouterError | None = None
        for attempt in range(self._retry.max_retries + 1):
            if attempt:
                await asyncio.sleep(self._retry.backoff_s(attempt, self._rng.random()))
            try:
                worker = choose(tried)
            except NoHealthyWorker:
                if last is not None:
                    raise last from None
                raise
            tried.add(worker.url)
            try:
                return await self._attempt(request, path, parsed, worker.url, headers, started,
                                           deadline, answered)
            except _Retryable as exc:
                last = exc.error
                self._metrics.retries.labels(worker.url, exc.kind).inc()
                logger.warning("attempt %d on %s failed before the first byte (%s)%s",
                               attempt + 1, worker.url, exc.kind,
                               "; retrying" if attempt < self._retry.max_retries else "")
        raise last or NoHealthyWorker()

    async def _attempt(self, request: web.Request, path: str, parsed: ParsedRequest, url: str,
                       headers: dict[str, str], started: float, deadline: float,
                       answered: asyncio.Event | None) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise RequestTimeout("the request timed out before a worker answered",
                                 code="request_timeout")
        timeout = self._timeout if remaining >= self._read_timeout_s else aiohttp.ClientTimeout(
            total=None, sock_connect=self._connect_timeout_s, sock_read=remaining)
        tokens = parsed.prompt_tokens + (parsed.max_tokens or 0)
        with self._pool.track(url, tokens):
            self._metrics.dispatched.labels(url).inc()
            try:
                async with asyncio.timeout_at(deadline):
                    upstream = await self._session.post(
                        url + path, data=parsed.raw, headers=headers, timeout=timeout)
            except aiohttp.ClientConnectorError as exc:
                self._pool.report_connect_failure(url)
                self._pool.report_result(url, ok=False)
                raise _Retryable("connect", UpstreamError(
                    f"worker {url} refused the connection: {exc}", code="upstream_failed")) from exc
            except _UPSTREAM_FAILURES as exc:
                self._pool.report_result(url, ok=False)
                self._metrics.upstream_errors.labels(url, "request").inc()
                if loop.time() >= deadline:
                    raise RequestTimeout("the request timed out waiting for a worker",
                                         code="request_timeout") from exc
                raise _Retryable(type(exc).__name__, UpstreamError(
                    f"worker {url} failed before answering: {type(exc).__name__}",
                    code="upstream_failed")) from exc
            try:
                if upstream.status in _RETRYABLE_STATUS:
                    body = await upstream.read()
                    self._pool.report_result(url, ok=False)
                    self._metrics.upstream_errors.labels(url, f"http_{upstream.status}").inc()
                    raise _Retryable(f"http_{upstream.status}", UpstreamError(
                        f"worker {url} answered {upstream.status}: {body[:200]!r}",
                        code="upstream_failed", status=upstream.status))
                self._metrics.first_byte.labels(parsed.route).observe(time.monotonic() - started)
                if answered is not None:
                    answered.set()
                return await self._relay(request, upstream, url, parsed, deadline, started)
            finally:
                upstream.close()

    async def _relay(self, request: web.Request, upstream: aiohttp.ClientResponse,
                     worker_url: str, parsed: ParsedRequest, deadline: float,
                     started: float) -> web.StreamResponse:
        route = parsed.route
        extra = response_headers(parsed.prediction)
        content_type = upstream.headers.get("Content-Type", "application/json")
        if not content_type.startswith("text/event-stream"):
            try:
                async with asyncio.timeout_at(deadline):
                    body = await upstream.read()
            except TimeoutError as exc:
                self._pool.report_result(worker_url, ok=True)
                raise RequestTimeout("the request did not finish within the router's request "
                                     "timeout", code="request_timeout") from exc
            except _UPSTREAM_FAILURES as exc:
                self._pool.report_result(worker_url, ok=False)
                self._metrics.upstream_errors.labels(worker_url, "body").inc()
                raise _Retryable("body", UpstreamError(
                    f"worker {worker_url} failed while answering: {type(exc).__name__}",
                    code="upstream_failed")) from exc
            self._pool.report_result(worker_url, ok=True)
            return web.Response(body=body, status=upstream.status,
                                headers={"Content-Type": content_type, WORKER_HEADER: worker_url,
                                         **extra})
        response = web.StreamResponse(status=upstream.status, headers={
            "Content-Type": content_type, "Cache-Control": "no-cache", WORKER_HEADER: worker_url,
            **extra})
        await response.prepare(request)
        await self._stream(response, upstream, worker_url, route, deadline, started)
        try:
            await response.write_eof()
        except ConnectionResetError:  # the client left after the last chunk: nothing lost
            self._metrics.client_disconnects.labels(route).inc()
        return response

    async def _stream(self, response: web.StreamResponse, upstream: aiohttp.ClientResponse,
                      worker_url: str, route: str, deadline: float, started: float) -> None:
        failure = None
        first = True
        try:
            async with asyncio.timeout_at(deadline):
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                    if first:
                        self._metrics.ttft.labels(route).observe(time.monotonic() - started)
                        first = False
        except (ConnectionResetError, asyncio.CancelledError):
            self._metrics.client_disconnects.labels(route).inc()
            logger.info("client went away; aborting the request on %s", worker_url)
            raise
        except TimeoutError:
            failure = ("timeout", "the request ran past the router's request timeout; "
                                  "the output is incomplete")
        except _UPSTREAM_FAILURES as exc:
            failure = ("stream", f"the worker serving this request failed mid-stream "
                                 f"({type(exc).__name__}); the output is incomplete")
        self._pool.report_result(worker_url, ok=failure is None or failure[0] == "timeout")
        if failure is None:
            return
        self._metrics.upstream_errors.labels(worker_url, failure[0]).inc()
        logger.warning("stream from %s ended early: %s", worker_url, failure[0])
        try:
            code = "request_timeout" if failure[0] == "timeout" else "upstream_failed"
            await response.write(sse_error_event(failure[1], code))
        except ConnectionResetError:
            pass
