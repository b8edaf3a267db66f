"""SLO-aware batching in the router (``--batching``): the one owner of requests held for a batch.

Who calls what: `router/app.py` builds a `Batcher` when ``--batching`` is set and runs
`running()` in the app's cleanup context; `router/handlers.py`, after validation, length
prediction and admission, enters ``async with batcher.hold(job) as worker_url`` and forwards the
request to ``worker_url`` (the policy is asked again only for a retry); leaving the block frees
the worker slot.

How it works: each worker gets ``slots_per_worker`` requests from the router at once (its
``--max-running-requests`` is a good value: beyond it, requests would only queue inside SGLang,
in arrival order). Requests beyond the free slots wait here. Whenever a slot frees or a request
arrives, the dispatch loop waits at most ``window_ms`` for the oldest waiting request's companions
to arrive, forms batches from everything waiting with the configured policy
(`router/batching/slo_odbs.py`: FCFS, shortest-predicted-first, S3 or SLO-ODBS), and hands the first
batch to the worker with the most free slots (a batch larger than the free slots is split; the rest
waits for the next round, re-batched with newer arrivals). Everything goes through the same path,
so the policies differ only in the order and grouping they choose.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from router.batching.config import BatcherConfig
from router.batching.slo_odbs import Job, form_batches
from router.errors import InvalidRequest, NoHealthyWorker, Overloaded

log = logging.getLogger(__name__)

SLO_HEADER = "X-BanaServe-SLO-Ms"
LENGTH_HINT_HEADER = "X-BanaServe-Output-Length"


def _positive_number(value: Any, param: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = -1.0
    if isinstance(value, bool) or not number > 0 or number == float("inf"):
        raise InvalidRequest(f"{param} must be a positive number of milliseconds, got {value!r}",
                             param=param)
    return number


def request_slo_ms(headers: Any, body: dict[str, Any], default_ms: float) -> float:
    """The request's SLO: the body's ``slo_ms``, else the header, else the default."""
    if "slo_ms" in body:
        return _positive_number(body["slo_ms"], "slo_ms")
    if SLO_HEADER in headers:
        return _positive_number(headers[SLO_HEADER], SLO_HEADER)
    return default_ms


def length_hint(headers: Any) -> int | None:
    """A client-supplied output length (``X-BanaServe-Output-Length``), e.g. an oracle length."""
    if LENGTH_HINT_HEADER not in headers:
        return None
    raw = headers[LENGTH_HINT_HEADER]
    if not raw.isdigit():
        raise InvalidRequest(f"{LENGTH_HINT_HEADER} must be a non-negative integer, got {raw!r}",
                             param=LENGTH_HINT_HEADER)
    return int(raw)


@dataclass
class _Waiting:
    job: Job
    granted: asyncio.Future[str]


class Batcher:
    def __init__(self, cfg: BatcherConfig, healthy_urls: Callable[[], list[str]],
                 metrics: Any, clock: Callable[[], float] | None = None) -> None:
        self.cfg = cfg
        self._healthy_urls = healthy_urls
        self._metrics = metrics
        self._clock = clock or (lambda: asyncio.get_running_loop().time())
        self._waiting: dict[str, _Waiting] = {}
        self._running: dict[str, int] = {}
        self._ids = itertools.count()
        self._wake = asyncio.Event()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def running_on(self, url: str) -> int:
        return self._running.get(url, 0)

    def new_job(self, slo_ms: float, predicted_len: int, prompt_len: int) -> Job:
        return Job(id=str(next(self._ids)), arrival_s=self._clock(), slo_s=slo_ms / 1000.0,
                   predicted_len=predicted_len, prompt_len=prompt_len)

    @contextlib.asynccontextmanager
    async def hold(self, job: Job) -> AsyncIterator[str]:
        """Wait until ``job``'s batch is dispatched; yield its worker; free the slot on exit."""
        if len(self._waiting) >= self.cfg.max_waiting:
            raise Overloaded(f"the batcher holds {len(self._waiting)} requests; retry later", 1)
        granted: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiting[job.id] = _Waiting(job, granted)
        self._wake.set()
        try:
            url = await asyncio.shield(granted)
        except asyncio.CancelledError:
            if self._waiting.pop(job.id, None) is None and granted.done() \
                    and not granted.cancelled():
                self._release(granted.result())  # granted just as the client left
            raise
        try:
            yield url
        finally:
            self._release(url)

    def _release(self, url: str) -> None:
        self._running[url] = max(0, self._running.get(url, 0) - 1)
        self._wake.set()

    def _free_slots(self) -> dict[str, int]:
        urls = self._healthy_urls()
        for url in list(self._running):
            if url not in urls and self._running[url] == 0:
                del self._running[url]
        return {u: self.cfg.slots_per_worker - self._running.get(u, 0) for u in urls}

    def dispatch_once(self) -> int:
        """Form batches from everything waiting and hand out batches while slots are free.
        Returns the number of requests dispatched (the loop calls it; tests may too)."""
        dispatched = 0
        while self._waiting:
            free = self._free_slots()
            if not free:
                self._fail_all(NoHealthyWorker())
                return dispatched
            url, slots = max(free.items(), key=lambda kv: (kv[1], -self._running.get(kv[0], 0)))
            if slots <= 0:
                return dispatched
            batches = form_batches([w.job for w in self._waiting.values()], self._clock(),
                                   self.cfg.batching)
            batch = batches[0][:slots]
            for job in batch:
                waiting = self._waiting.pop(job.id)
                self._running[url] = self._running.get(url, 0) + 1
                waiting.granted.set_result(url)
            self._metrics.batch_dispatched(self.cfg.batching.policy, len(batch))
            dispatched += len(batch)
        return dispatched

    def _fail_all(self, exc: Exception) -> None:
        for waiting in self._waiting.values():
            if not waiting.granted.done():
                waiting.granted.set_exception(exc)
        self._waiting.clear()

    async def _hold_window(self) -> None:
        """Wait until the oldest waiting request has been held ``window_ms``."""
        if not self._waiting or self.cfg.window_ms == 0:
            return
        oldest = min(w.job.arrival_s for w in self._waiting.values())
        delay = oldest + self.cfg.window_ms / 1000.0 - self._clock()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._waiting or max(self._free_slots().values(), default=1) <= 0:
                continue
            await self._hold_window()
            try:
                self.dispatch_once()
            except Exception:  # never let the loop die: fail the waiting requests instead
                log.exception("batch forming failed; failing the waiting requests")
                self._fail_all(RuntimeError("batch forming failed; see the router log"))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        task = asyncio.create_task(self._loop(), name="batcher")
        log.info("batching with %s: window %.0f ms, %d slots per worker, default SLO %.0f ms",
                 self.cfg.batching.policy, self.cfg.window_ms, self.cfg.slots_per_worker,
                 self.cfg.default_slo_ms)
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self._fail_all(NoHealthyWorker("the router is shutting down"))
