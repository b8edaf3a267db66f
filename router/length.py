"""Output-length annotation: the router's one owner of the length predictor and its batch queue.

Who calls what: `router/app.py` builds a `LengthAnnotator` at start-up when ``--length-predictor``
is given (loading the predictor there, so a bad folder stops start-up with one line) and runs
`running()` in the app's cleanup context; `router/handlers.py` awaits `annotate()` once per
request, after validation and before admission, and stores the result on the `ParsedRequest`;
policies read it from `RequestFeatures`; `router/proxy.py` adds `response_headers()` to the answer.

Requests arriving together are predicted together: the batch loop takes every request waiting
(up to ``max_batch``; with ``max_wait_ms`` > 0 it first waits that long for more) and runs them on
one worker thread (torch releases the GIL), so the event loop never blocks; requests arriving
meanwhile form the next batch, so batches grow with load and an idle router adds no wait. A
prediction that fails or takes longer than ``timeout_ms`` leaves the request unannotated; it is
dispatched all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from router.cli_fields import flag

log = logging.getLogger(__name__)

BUCKET_HEADER = "X-BanaServe-Predicted-Bucket"
LENGTH_HEADER = "X-BanaServe-Predicted-Length"


@dataclass(frozen=True)
class LengthConfig:
    """``--length-predictor`` and its knobs."""

    path: str = field(metadata=flag(
        "--length-predictor", "a predictor folder from 'python -m profiler_ft train': each "
        "request is annotated with its predicted output-length bucket and length, visible to "
        "policies and in the X-BanaServe-Predicted-Bucket/-Length response headers",
        metavar="PATH", default=None))
    """A predictor folder written by ``python -m profiler_ft train``."""
    max_batch: int = field(default=32, metadata=flag(
        "--length-predictor-batch", "most requests predicted in one forward pass (%(default)s)"))
    """Most requests predicted in one forward pass."""
    max_wait_ms: float = field(default=0.0, metadata=flag(
        "--length-predictor-wait-ms", "longest a request waits for others to share its "
        "prediction batch; 0: none, requests arriving during a batch form the next one "
        "(%(default)s ms)"))
    """Longest the first request of a batch waits for others to join it. 0: no wait; requests
    that arrive while a batch runs form the next batch (batches grow with load by themselves)."""
    timeout_ms: float = field(default=250.0, metadata=flag(
        "--length-predictor-timeout-ms", "a request whose prediction is slower than this is "
        "dispatched without one (%(default)s ms)"))
    """A request whose prediction is not back after this long is dispatched without one."""
    threads: int = field(default=1, metadata=flag(
        "--length-predictor-threads", "torch threads for prediction in the router (%(default)s)"))
    """Torch threads for prediction in the router process (the workers need the other cores)."""

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("LengthConfig.path: must name a predictor folder")
        if self.max_batch < 1:
            raise ValueError(f"LengthConfig.max_batch: must be >= 1, got {self.max_batch}")
        if self.max_wait_ms < 0 or self.timeout_ms <= 0:
            raise ValueError("LengthConfig.max_wait_ms must be >= 0 and timeout_ms > 0")
        if self.threads < 1:
            raise ValueError(f"LengthConfig.threads: must be >= 1, got {self.threads}")


@dataclass(frozen=True)
class LengthEstimate:
    """What the router knows about a request's output length before it runs."""

    bucket: int
    label: str
    """The bucket as text (``33-64``)."""
    length: int
    """Implied output tokens."""


class Predictor(Protocol):
    """`profiler_ft.predictor.LengthPredictor` or a test double."""

    def predict(self, texts: Sequence[str]) -> Sequence[Any]:
        """Objects with ``bucket``, ``label`` and ``length``, one per text, in order."""
        ...


def response_headers(estimate: LengthEstimate | None) -> dict[str, str]:
    if estimate is None:
        return {}
    return {BUCKET_HEADER: estimate.label, LENGTH_HEADER: str(estimate.length)}


def load_predictor(cfg: LengthConfig) -> Predictor:
    """Load the profiler_ft predictor; ValueError with one readable line if it cannot be."""
    import torch

    from profiler_ft.errors import ProfilerError
    from profiler_ft.predictor import LengthPredictor

    torch.set_num_threads(cfg.threads)
    try:
        predictor = LengthPredictor.load(cfg.path)
    except ProfilerError as exc:
        raise ValueError(f"--length-predictor: {exc}") from None
    log.info("length predictor loaded from %s (batches of up to %d, %d thread(s))",
             cfg.path, cfg.max_batch, cfg.threads)
    return predictor


class LengthAnnotator:
    def __init__(self, predictor: Predictor, cfg: LengthConfig, metrics: Any) -> None:
        self._predictor = predictor
        self._cfg = cfg
        self._metrics = metrics
        self._queue: asyncio.Queue[tuple[str, asyncio.Future[LengthEstimate | None]]] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="length-predictor")

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        self._queue = asyncio.Queue()
        task = asyncio.create_task(self._batch_loop(), name="length-predictor")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def annotate(self, text: str | None) -> LengthEstimate | None:
        """The estimate for a request's text, or None (no text, an error, or too slow)."""
        if text is None or self._queue is None:
            self._metrics.length_predictions.labels("no_text").inc()
            return None
        started = time.monotonic()
        future: asyncio.Future[LengthEstimate | None] = (
            asyncio.get_running_loop().create_future())
        self._queue.put_nowait((text, future))
        try:
            estimate = await asyncio.wait_for(asyncio.shield(future),
                                              self._cfg.timeout_ms / 1000)
        except TimeoutError:
            self._metrics.length_predictions.labels("timeout").inc()
            return None
        self._metrics.length_seconds.observe(time.monotonic() - started)
        self._metrics.length_predictions.labels("ok" if estimate else "error").inc()
        return estimate

    async def _collect(self) -> list[tuple[str, asyncio.Future[LengthEstimate | None]]]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        deadline = asyncio.get_running_loop().time() + self._cfg.max_wait_ms / 1000
        while len(batch) < self._cfg.max_batch:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            texts = [text for text, _ in batch]
            self._metrics.length_batch_size.observe(len(batch))
            try:
                preds = await loop.run_in_executor(self._executor, self._predictor.predict, texts)
                estimates: list[LengthEstimate | None] = [
                    LengthEstimate(int(p.bucket), str(p.label), int(p.length)) for p in preds]
                if len(estimates) != len(batch):
                    raise RuntimeError(f"{len(estimates)} predictions for {len(batch)} prompts")
            except Exception:  # noqa: BLE001 - a predictor failure must not fail requests
                log.exception("length prediction failed for a batch of %d", len(batch))
                estimates = [None] * len(batch)
            for (_, future), estimate in zip(batch, estimates, strict=True):
                if not future.done():
                    future.set_result(estimate)
