"""The one owner of worker state: health, load, in-flight requests, model info.

Who calls what:
- ``app`` starts ``WorkerPool.run()`` in the app's cleanup context; it runs one health loop and
  one load-poll loop per worker until the app stops.
- ``handlers`` call ``snapshot()`` (read-only ``WorkerView``s for the policy), ``model_info()``,
  and wrap each forwarded request in ``track(url)`` so in-flight counts stay exact.
- ``proxy`` calls ``report_connect_failure(url)`` when a worker refuses a connection, which marks
  it unhealthy at once (the health loop brings it back), and ``report_result(url, ok)`` after
  every attempt, which drives the worker's circuit breaker (``router.breaker``).
- ``handlers`` call ``note_dispatch(url, prefill_tokens)`` for every pick, so views carry the
  prefill dispatched since the last load reading (``WorkerView.prefill_since_load``); ``track``
  counts the requests that finished since that reading (``WorkerView.finished_since_load``).
- ``handlers`` call ``add(url)`` / ``remove(url)`` for ``POST``/``DELETE /workers``: a removed
  worker takes no new requests and leaves the pool once its in-flight requests have finished.
Everyone else gets snapshots (``WorkerView``, ``WorkerLoad``: ``router.policy.views``); only this
module mutates worker state.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from router.breaker import BreakerConfig, CircuitBreaker
from router.config import HealthConfig
from router.model_info import ModelInfo
from router.policy.views import WorkerLoad, WorkerView

logger = logging.getLogger(__name__)


@dataclass
class _WorkerState:
    url: str
    breaker: CircuitBreaker
    healthy: bool = False
    draining: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    in_flight: int = 0
    in_flight_tokens: int = 0
    total_requests: int = 0
    load: WorkerLoad = field(default_factory=WorkerLoad)
    dispatched: deque[tuple[float, int]] = field(default_factory=deque)
    """(monotonic time, uncached prompt tokens) of picks not yet seen by a load reading and
    still in flight (requests are taken to finish in the order they were sent)."""
    finished_since_load: int = 0
    """Requests this router sent here that finished after the last load reading: each freed a
    running slot, so the reading's waiting requests are that many fewer now."""
    last_alive: float = 0.0  # monotonic time of the last health answer or load reading


class WorkerPool:
    def __init__(self, urls: tuple[str, ...], health: HealthConfig, load_poll_interval_s: float,
                 tokenizer_path: str | None = None,
                 breaker: BreakerConfig | None = None) -> None:
        self._breaker_cfg = breaker or BreakerConfig()
        self._states = {url: self._new_state(url) for url in urls}
        self._session: aiohttp.ClientSession | None = None
        self._health = health
        self._poll_interval = load_poll_interval_s
        self._tokenizer_path = tokenizer_path
        self._model_info: ModelInfo | None = None
        self._model_info_lock = asyncio.Lock()
        self._listeners: list[Callable[[str, bool], None]] = []

    def _new_state(self, url: str) -> _WorkerState:
        return _WorkerState(url, CircuitBreaker(self._breaker_cfg))

    # -- reads --------------------------------------------------------------------------------
    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(self._states)

    def snapshot(self) -> list[WorkerView]:
        return [self._view(s) for s in self._states.values()]

    def healthy(self) -> list[WorkerView]:
        """Workers that may take new requests: healthy, not draining, breaker not open."""
        now = time.monotonic()
        return [self._view(s) for s in self._states.values()
                if s.healthy and not s.draining and s.breaker.allows(now)]

    @staticmethod
    def _view(s: _WorkerState) -> WorkerView:
        while s.dispatched and (s.dispatched[0][0] <= s.load.at
                                or len(s.dispatched) > s.in_flight):
            s.dispatched.popleft()  # seen by a reading, or (oldest first) finished since
        return WorkerView(s.url, s.healthy, s.in_flight, s.load, s.total_requests,
                          s.in_flight_tokens, s.breaker.state, s.draining,
                          sum(tokens for _, tokens in s.dispatched), s.finished_since_load)

    def has_healthy(self) -> bool:
        """``bool(self.healthy())`` without building the views."""
        now = time.monotonic()
        for s in self._states.values():
            if s.healthy and not s.draining and s.breaker.allows(now):
                return True
        return False

    # -- membership ---------------------------------------------------------------------------
    def add(self, url: str) -> bool:
        """Add a worker (health-checked before it takes requests); False if already present."""
        state = self._states.get(url)
        if state is not None and not state.draining:
            return False
        if state is not None:  # re-added while draining: keep serving it
            state.draining = False
            return True
        state = self._states[url] = self._new_state(url)
        if self._session is not None:
            self._start_loops(self._session, state)
        logger.info("worker %s added", url)
        return True

    def remove(self, url: str) -> bool:
        """Stop sending ``url`` new requests; it leaves once idle. False if unknown."""
        state = self._states.get(url)
        if state is None or state.draining:
            return False
        state.draining = True
        logger.info("worker %s removed (%d requests in flight finish first)", url,
                    state.in_flight)
        self._forget_if_drained(state)
        return True

    def _forget_if_drained(self, state: _WorkerState) -> None:
        if state.draining and state.in_flight == 0 and self._states.get(state.url) is state:
            del self._states[state.url]
            for task in state.tasks:
                task.cancel()

    def model_info(self) -> ModelInfo | None:
        return self._model_info

    def on_health_change(self, listener: Callable[[str, bool], None]) -> None:
        self._listeners.append(listener)

    # -- in-flight accounting -----------------------------------------------------------------
    @contextlib.contextmanager
    def track(self, url: str, tokens: int = 0) -> Any:
        state = self._states[url]
        state.in_flight += 1
        state.in_flight_tokens += tokens
        state.total_requests += 1
        state.breaker.on_start()
        try:
            yield
        finally:
            state.in_flight -= 1
            state.in_flight_tokens -= tokens
            state.finished_since_load += 1
            self._forget_if_drained(state)

    def note_dispatch(self, url: str, prefill_tokens: int) -> None:
        """A request was just sent (or is about to be) to ``url`` with this many prompt tokens
        to prefill there; counted in its views until a load reading taken later shows it or the
        worker has fewer requests in flight than such picks (the oldest count as finished)."""
        state = self._states.get(url)
        if state is not None:
            state.dispatched.append((time.monotonic(), max(0, prefill_tokens)))
            if len(state.dispatched) > 4096:  # no reading for a long time: keep it bounded
                state.dispatched.popleft()

    def report_result(self, url: str, ok: bool) -> None:
        """Outcome of one attempt on ``url``: drives its circuit breaker."""
        state = self._states.get(url)
        if state is None:
            return
        before = state.breaker.state
        state.breaker.on_result(ok, time.monotonic())
        if state.breaker.state is not before:
            logger.warning("worker %s circuit breaker: %s -> %s", url, before.name.lower(),
                           state.breaker.state.name.lower())

    # -- health -------------------------------------------------------------------------------
    def report_connect_failure(self, url: str) -> None:
        state = self._states.get(url)
        if state is None:
            return
        state.consecutive_successes = 0
        state.consecutive_failures = max(state.consecutive_failures, self._health.failure_threshold)
        self._set_healthy(state, False, "connection refused while forwarding")

    def _record_check(self, state: _WorkerState, ok: bool, why: str) -> None:
        if ok:
            state.consecutive_failures = 0
            state.consecutive_successes += 1
            if not state.healthy and state.consecutive_successes >= self._health.success_threshold:
                self._set_healthy(state, True, why)
        else:
            state.consecutive_successes = 0
            state.consecutive_failures += 1
            if state.healthy and state.consecutive_failures >= self._health.failure_threshold:
                self._set_healthy(state, False, why)

    def _set_healthy(self, state: _WorkerState, healthy: bool, why: str) -> None:
        if state.healthy == healthy:
            return
        state.healthy = healthy
        log = logger.info if healthy else logger.warning
        log("worker %s is now %s (%s)", state.url, "healthy" if healthy else "unhealthy", why)
        for listener in self._listeners:
            listener(state.url, healthy)

    async def check_health(self, session: aiohttp.ClientSession, url: str) -> None:
        state = self._states.get(url)
        if state is None:
            return
        timeout = aiohttp.ClientTimeout(total=self._health.timeout_s)
        try:
            async with session.get(url + "/health", timeout=timeout) as resp:
                ok, why = resp.status == 200, f"/health answered {resp.status}"
                state.last_alive = time.monotonic()
        except TimeoutError:
            silent_for = time.monotonic() - state.last_alive
            if state.healthy and state.in_flight and silent_for < self._health.busy_grace_s:
                logger.debug("worker %s is busy: /health timed out with %d requests in flight",
                             url, state.in_flight)
                return
            ok, why = False, f"/health timed out (nothing from the worker for {silent_for:.0f} s)"
        except (aiohttp.ClientError, OSError) as exc:
            ok, why = False, f"/health failed: {type(exc).__name__}"
        if ok and self._model_info is None:
            await self._load_model_info(session, url)
        self._record_check(state, ok, why)

    async def _load_model_info(self, session: aiohttp.ClientSession, url: str) -> None:
        async with self._model_info_lock:
            if self._model_info is not None:
                return
            try:
                async with session.get(url + "/model_info") as resp:
                    model_info = await resp.json()
                async with session.get(url + "/v1/models") as resp:
                    models = await resp.json()
            except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
                logger.warning("cannot read model info from %s: %s", url, exc)
                return
            loop = asyncio.get_running_loop()
            info = await loop.run_in_executor(
                None, ModelInfo.from_worker, model_info, models, self._tokenizer_path)
            self._model_info = info
            logger.info("serving %s (context %s tokens, vocab %s, exact prompt counting %s)",
                        sorted(info.served_names), info.context_length, info.vocab_size,
                        "on" if info.counter else "off")

    async def poll_load(self, session: aiohttp.ClientSession, url: str) -> None:
        state = self._states.get(url)
        if state is None:
            return
        timeout = aiohttp.ClientTimeout(total=max(self._poll_interval * 4, 1.0))
        try:
            async with session.get(url + "/v1/loads", timeout=timeout) as resp:
                if resp.status != 200:
                    return
                payload = await resp.json()
        except (TimeoutError, aiohttp.ClientError, ValueError, OSError):
            return  # stale load stays; health checking decides about the worker
        state.load = WorkerLoad.from_loads(payload, time.monotonic())
        state.finished_since_load = 0
        state.last_alive = state.load.at

    # -- background loops ---------------------------------------------------------------------
    async def _loop(self, interval: float, step: Callable[[], Awaitable[None]]) -> None:
        while True:
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in one check must not stop the loop
                logger.exception("worker background step failed")
            await asyncio.sleep(interval)

    def _start_loops(self, session: aiohttp.ClientSession, state: _WorkerState) -> None:
        state.tasks = [
            asyncio.create_task(self._loop(
                self._health.interval_s, functools.partial(self.check_health, session, state.url))),
            asyncio.create_task(self._loop(
                self._poll_interval, functools.partial(self.poll_load, session, state.url))),
        ]

    @contextlib.asynccontextmanager
    async def running(self, session: aiohttp.ClientSession) -> AsyncIterator[None]:
        """Run health and load loops for every worker while the context is open."""
        self._session = session
        await asyncio.gather(*(self.check_health(session, u) for u in self.urls))
        for state in self._states.values():
            self._start_loops(session, state)
        try:
            yield
        finally:
            self._session = None
            tasks = [t for s in self._states.values() for t in s.tasks]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
