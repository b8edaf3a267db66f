"""Pure logic of the hardening pieces: circuit breaker, retry backoff, admission queue."""

from __future__ import annotations

import asyncio

import pytest

from router.admission import Admission, AdmissionConfig
from router.breaker import BreakerConfig, BreakerState, CircuitBreaker
from router.config import RetryConfig
from router.errors import Overloaded


def test_breaker_opens_after_consecutive_failures_only() -> None:
    breaker = CircuitBreaker(BreakerConfig(failure_threshold=3, open_s=10))
    for ok in (False, False, True, False, False):
        breaker.on_result(ok, now=0.0)
    assert breaker.state is BreakerState.CLOSED  # the success reset the count
    breaker.on_result(False, now=1.0)
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allows(now=5.0)


def test_breaker_half_open_admits_limited_probes_then_closes() -> None:
    breaker = CircuitBreaker(BreakerConfig(failure_threshold=1, success_threshold=2, open_s=10,
                                           half_open_max=1))
    breaker.on_result(False, now=0.0)
    assert breaker.allows(now=10.0) and breaker.state is BreakerState.HALF_OPEN
    breaker.on_start()
    assert not breaker.allows(now=10.1)  # one probe at a time
    breaker.on_result(True, now=10.2)
    assert breaker.state is BreakerState.HALF_OPEN and breaker.allows(now=10.3)
    breaker.on_start()
    breaker.on_result(True, now=10.4)
    assert breaker.state is BreakerState.CLOSED


def test_breaker_failed_probe_reopens() -> None:
    breaker = CircuitBreaker(BreakerConfig(failure_threshold=1, open_s=5))
    breaker.on_result(False, now=0.0)
    assert breaker.allows(now=5.0)
    breaker.on_start()
    breaker.on_result(False, now=5.1)
    assert breaker.state is BreakerState.OPEN and not breaker.allows(now=9.0)
    assert breaker.allows(now=10.2)


def test_breaker_config_validation() -> None:
    with pytest.raises(ValueError):
        BreakerConfig(failure_threshold=0)
    with pytest.raises(ValueError):
        BreakerConfig(open_s=0)


def test_retry_backoff_doubles_caps_and_jitters() -> None:
    retry = RetryConfig(max_retries=5, initial_backoff_s=0.1, max_backoff_s=0.3, jitter=0.5)
    assert [retry.backoff_s(n, rand=0.0) for n in (1, 2, 3, 4)] == [0.1, 0.2, 0.3, 0.3]
    assert retry.backoff_s(1, rand=0.999) == pytest.approx(0.05, rel=1e-2)
    with pytest.raises(ValueError):
        RetryConfig(jitter=2)
    with pytest.raises(ValueError):
        RetryConfig(initial_backoff_s=2, max_backoff_s=1)


async def test_admission_queues_then_refuses_with_retry_after() -> None:
    admission = Admission(AdmissionConfig(max_concurrent=1, max_queued=1, queue_timeout_s=5,
                                          retry_after_s=3))
    release = asyncio.Event()
    order: list[str] = []

    async def hold(name: str) -> None:
        async with admission.slot():
            order.append(name)
            await release.wait()

    first = asyncio.create_task(hold("first"))
    await asyncio.sleep(0)
    second = asyncio.create_task(hold("second"))
    await asyncio.sleep(0)
    assert (admission.active, admission.queued) == (1, 1)
    with pytest.raises(Overloaded) as excinfo:
        async with admission.slot():
            pass
    assert excinfo.value.headers["Retry-After"] == "3" and excinfo.value.status == 429
    release.set()
    await asyncio.gather(first, second)
    assert order == ["first", "second"] and (admission.active, admission.queued) == (0, 0)


async def test_admission_queue_timeout_is_429_and_frees_the_place() -> None:
    admission = Admission(AdmissionConfig(max_concurrent=1, max_queued=4, queue_timeout_s=0.1))
    async with admission.slot():
        with pytest.raises(Overloaded, match="no slot freed"):
            async with admission.slot():
                pass
        assert admission.queued == 0
    assert admission.active == 0


async def test_admission_unlimited_by_default() -> None:
    admission = Admission(AdmissionConfig())
    async with admission.slot(), admission.slot(), admission.slot():
        assert admission.active == 3
