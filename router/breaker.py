"""A per-worker circuit breaker: closed -> open -> half-open -> closed.

Owned by ``workers.WorkerPool`` (one per worker); ``proxy`` reports each attempt's outcome through
the pool, and the pool asks ``allows(now)`` when it lists dispatch candidates.

- closed: requests flow; ``failure_threshold`` consecutive failures open the breaker.
- open: no requests for ``open_s`` seconds; then the breaker turns half-open.
- half-open: at most ``half_open_max`` probe requests at a time; ``success_threshold``
  consecutive successes close it, any failure opens it again.
A failure is a connection error, a timeout or a 5xx answer; 4xx answers are the client's fault
and count as successes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from router.cli_fields import flag


class BreakerState(Enum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


@dataclass(frozen=True)
class BreakerConfig:
    """Circuit breaker settings (per worker)."""

    failure_threshold: int = field(default=5, metadata=flag(
        "--breaker-failure-threshold",
        "consecutive failures that open a worker's breaker (%(default)s)"))
    """Consecutive failed requests that open the breaker."""
    success_threshold: int = field(default=2, metadata=flag(
        "--breaker-success-threshold", "successful probes that close it (%(default)s)"))
    """Consecutive successful probes that close it again."""
    open_s: float = field(default=10.0, metadata=flag(
        "--breaker-open-seconds", "seconds an open breaker waits before probing (%(default)s)"))
    """Seconds an open breaker refuses requests before probing."""
    half_open_max: int = 1
    """Concurrent probe requests allowed while half-open."""

    def __post_init__(self) -> None:
        if self.failure_threshold < 1 or self.success_threshold < 1 or self.half_open_max < 1:
            raise ValueError("BreakerConfig: thresholds and half_open_max must be >= 1")
        if self.open_s <= 0:
            raise ValueError(f"BreakerConfig.open_s: {self.open_s} must be > 0")


class CircuitBreaker:
    def __init__(self, cfg: BreakerConfig) -> None:
        self.cfg = cfg
        self.state = BreakerState.CLOSED
        self._failures = 0
        self._successes = 0
        self._opened_at = 0.0
        self._probes = 0

    def allows(self, now: float) -> bool:
        """May a request be sent now? (Turns an expired open breaker half-open.)"""
        if self.state is BreakerState.OPEN and now - self._opened_at >= self.cfg.open_s:
            self.state, self._successes, self._probes = BreakerState.HALF_OPEN, 0, 0
        if self.state is BreakerState.OPEN:
            return False
        if self.state is BreakerState.HALF_OPEN:
            return self._probes < self.cfg.half_open_max
        return True

    def on_start(self) -> None:
        if self.state is BreakerState.HALF_OPEN:
            self._probes += 1

    def on_result(self, ok: bool, now: float) -> None:
        if self.state is BreakerState.HALF_OPEN:
            self._probes = max(0, self._probes - 1)
            if not ok:
                self._open(now)
                return
            self._successes += 1
            if self._successes >= self.cfg.success_threshold:
                self.state, self._failures = BreakerState.CLOSED, 0
            return
        if ok:
            self._failures = 0
            return
        self._failures += 1
        if self.state is BreakerState.CLOSED and self._failures >= self.cfg.failure_threshold:
            self._open(now)

    def _open(self, now: float) -> None:
        self.state, self._opened_at, self._failures = BreakerState.OPEN, now, 0
