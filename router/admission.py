"""Admission control: a concurrency limit with a bounded waiting queue.

Who calls it: ``handlers`` wrap each generation request in ``async with admission.slot():``
after validation. At most ``max_concurrent`` requests run; up to ``max_queued`` more wait (FIFO)
for at most ``queue_timeout_s``; anything beyond is refused at once with ``Overloaded`` (429 with
``Retry-After``), as is a request that waited too long. ``max_concurrent=0`` disables the limit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from router.cli_fields import flag
from router.errors import Overloaded


@dataclass(frozen=True)
class AdmissionConfig:
    """Router-wide admission limits."""

    max_concurrent: int = field(default=0, metadata=flag(
        "--max-concurrent-requests", "requests forwarded at once; 0 means unlimited "
        "(%(default)s)"))
    """Requests forwarded at once (0: unlimited)."""
    max_queued: int = field(default=256, metadata=flag(
        "--max-queued-requests", "requests waiting for a slot before 429 (%(default)s)"))
    """Requests allowed to wait for a slot; more are answered 429."""
    queue_timeout_s: float = field(default=30.0, metadata=flag(
        "--queue-timeout", "longest wait for a slot in seconds before 429 (%(default)s)"))
    """Longest wait for a slot before answering 429."""
    retry_after_s: int = field(default=1, metadata=flag(
        "--retry-after", "Retry-After seconds sent with 429 (%(default)s)"))
    """Value of the Retry-After header on 429."""

    def __post_init__(self) -> None:
        if self.max_concurrent < 0 or self.max_queued < 0:
            raise ValueError("AdmissionConfig.max_concurrent/max_queued: must be >= 0")
        if self.queue_timeout_s <= 0:
            raise ValueError(f"AdmissionConfig.queue_timeout_s: {self.queue_timeout_s} <= 0")


class Admission:
    def __init__(self, cfg: AdmissionConfig) -> None:
        self.cfg = cfg
        self.active = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    async def _acquire(self) -> None:
        limit = self.cfg.max_concurrent
        if limit == 0 or (self.active < limit and not self._waiters):
            self.active += 1
            return
        if len(self._waiters) >= self.cfg.max_queued:
            raise Overloaded(f"the router is at capacity ({self.active} running, "
                             f"{len(self._waiters)} queued); retry later", self.cfg.retry_after_s)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.cfg.queue_timeout_s)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if waiter.done() and not waiter.cancelled():
                self._release()  # a slot was handed over just as we gave up: pass it on
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise Overloaded(f"no slot freed within {self.cfg.queue_timeout_s:.0f}s; retry later",
                             self.cfg.retry_after_s) from None

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to the next waiter: active unchanged
                return
        self.active -= 1
