"""Prefill/decode disaggregation: one request, two workers, SGLang's bootstrap handshake.

Who calls it: ``handlers`` call ``PDProxy.forward()`` instead of ``Proxy.forward()`` when the
router runs with ``--prefill``/``--decode``. For each attempt it asks the prefill and the decode
policy for one worker each, adds SGLang's bootstrap fields to the body (``bootstrap_host``: the
prefill worker's host, ``bootstrap_port``: its ``--disaggregation-bootstrap-port``,
``bootstrap_room``: a fresh random 63-bit id that pairs the two halves), and sends the same body
to both at once, as SGLang's router does. The prefill worker computes the prompt's KV and ships
it to the decode worker (mooncake); the decode worker's answer is relayed to the client (streamed
or not) by ``Proxy``, so retries, breakers, deadlines and disconnects behave as in plain mode.
The prefill answer is read and dropped; if the prefill leg fails before the decode side has sent
anything, the decode leg is cancelled and the pair is retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import replace
from urllib.parse import urlparse

import aiohttp
import orjson
from aiohttp import web

from router.errors import NoHealthyWorker, RouterError, UpstreamError
from router.proxy import Chooser, Proxy
from router.validation import ParsedRequest
from router.workers import WorkerPool

logger = logging.getLogger(__name__)


def with_bootstrap(body: dict[str, object], prefill_url: str, bootstrap_port: int | None,
                   room: int) -> bytes:
    """The request body with SGLang's PD bootstrap fields added."""
    fields: dict[str, object] = {"bootstrap_host": urlparse(prefill_url).hostname,
                                 "bootstrap_room": room}
    if bootstrap_port is not None:
        fields["bootstrap_port"] = bootstrap_port
    return orjson.dumps({**body, **fields})


class PDProxy:
    def __init__(self, proxy: Proxy, session: aiohttp.ClientSession, prefill_pool: WorkerPool,
                 bootstrap_ports: dict[str, int | None], max_retries: int) -> None:
        self._proxy = proxy
        self._session = session
        self._prefill_pool = prefill_pool
        self._ports = bootstrap_ports
        self._max_retries = max_retries
        self._rng = random.Random()

    def set_bootstrap_port(self, url: str, port: int | None) -> None:
        self._ports[url] = port

    async def forward(self, request: web.Request, path: str, parsed: ParsedRequest,
                      choose_prefill: Chooser, choose_decode: Chooser,
                      deadline: float) -> web.StreamResponse:
        tried: set[str] = set()
        last: RouterError = NoHealthyWorker("no healthy prefill worker")
        for attempt in range(self._max_retries + 1):
            try:
                prefill = choose_prefill(tried)
            except NoHealthyWorker:
                raise (last if attempt else NoHealthyWorker("no healthy prefill worker")) from None
            tried.add(prefill.url)
            room = self._rng.getrandbits(63)
            raw = with_bootstrap(parsed.body, prefill.url, self._ports.get(prefill.url), room)
            paired = replace(parsed, raw=raw)
            prefill_leg = asyncio.create_task(self._prefill(prefill.url, path, raw, parsed))
            answered = asyncio.Event()
            decode_leg = asyncio.create_task(self._proxy.forward(
                request, path, paired, choose_decode, deadline, answered=answered))
            try:
                try:
                    done, _ = await asyncio.wait({prefill_leg, decode_leg},
                                                 return_when=asyncio.FIRST_COMPLETED)
                except asyncio.CancelledError:  # the client went away: stop the decode leg
                    decode_leg.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await decode_leg
                    raise
                if decode_leg in done:
                    return decode_leg.result()
                failure = prefill_leg.exception()
                if failure is None:  # prefill done; the decode side finishes the request
                    return await decode_leg
                if answered.is_set():  # the decode side already answers: it must finish
                    return await decode_leg
                decode_leg.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await decode_leg
                last = failure if isinstance(failure, RouterError) else UpstreamError(
                    f"prefill worker {prefill.url} failed: {failure}", code="upstream_failed")
                logger.warning("prefill leg on %s failed (%s); %s", prefill.url, last.message,
                               "retrying" if attempt < self._max_retries else "giving up")
            finally:
                await self._finish(prefill_leg)
        raise last

    async def _prefill(self, worker: str, path: str, raw: bytes, parsed: ParsedRequest) -> None:
        """Send the prefill half and drain its answer; raise on failure."""
        with self._prefill_pool.track(worker, parsed.prompt_tokens):
            try:
                async with self._session.post(worker + path, data=raw, headers={
                        "Content-Type": "application/json"}) as resp:
                    body = await resp.read()
            except aiohttp.ClientConnectorError as exc:
                self._prefill_pool.report_connect_failure(worker)
                self._prefill_pool.report_result(worker, ok=False)
                raise UpstreamError(f"prefill worker {worker} refused the connection",
                                    code="upstream_failed") from exc
            except (aiohttp.ClientError, TimeoutError) as exc:
                self._prefill_pool.report_result(worker, ok=False)
                raise UpstreamError(f"prefill worker {worker} failed: {type(exc).__name__}",
                                    code="upstream_failed") from exc
        self._prefill_pool.report_result(worker, ok=resp.status < 500)
        if resp.status >= 400:
            raise UpstreamError(f"prefill worker {worker} answered {resp.status}: "
                                f"{body[:200]!r}", code="upstream_failed",
                                status=resp.status if resp.status >= 500 else 502)

    @staticmethod
    async def _finish(task: asyncio.Task[None]) -> None:
        if not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=30)
            except (TimeoutError, asyncio.CancelledError):
                task.cancel()
        if task.done() and not task.cancelled():
            task.exception()  # mark retrieved

