"""The rebalancing controller's loop (``--rebalance``): reads, decides, acts, records.

Who calls what:
- ``router/app.py`` builds one ``Rebalancer`` when ``RouterConfig.rebalance`` is set and runs
  ``running(session)`` in the app's cleanup context: a background task calls ``step()`` every
  ``period_s`` until the app stops (control requests still in flight are then cancelled).
- ``step()`` (also called directly by tests) reads ``WorkerPool.snapshot()`` (the pool owns the
  ``/v1/loads`` readings), smooths U_c and U_kv, reads ``GET /banaserve/status`` of every healthy
  worker, asks ``Planner.observe`` for decisions and starts each action as its own task, so the
  loop keeps observing while a migration pauses a worker. Workers with an action in flight are
  left out of decisions until it ends.
- ``router/rebalance/api.py`` calls ``describe()`` for ``GET /rebalance``; the metrics collector
  calls ``signals`` at scrape time.
This module owns the smoothed signals, the in-flight actions and the recent decisions.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from router.metrics import RouterMetrics
from router.rebalance.config import RebalanceConfig
from router.rebalance.decide import Decision, Planner
from router.rebalance.messages import ControlMessageError, ControlRequest
from router.rebalance.signals import (
    Ewma,
    InstanceSignals,
    WorkerStatus,
    compute_util,
    kv_util,
    parse_status,
)
from router.workers import WorkerPool

logger = logging.getLogger(__name__)

STATUS_PATH = "/banaserve/status"


@dataclass
class _Record:
    """One decision and what became of it (``outcome`` is updated when its request ends)."""

    decision: Decision
    at: float
    """Wall-clock time of the decision."""
    outcome: str = "pending"
    """``noted`` (skip), ``dry_run``, ``pending``, ``ok`` (200), ``accepted`` (202, finishing on
    the worker), ``refused`` (4xx/5xx: nothing changed), ``error`` (no answer), ``cancelled``."""
    detail: str = ""
    duration_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {**self.decision.as_dict(), "at": round(self.at, 3), "outcome": self.outcome,
                "detail": self.detail, "duration_s": self.duration_s}


def _error_text(payload: Any, fallback: str) -> str:
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    return str(error) if error else fallback[:300]


class Rebalancer:
    def __init__(self, cfg: RebalanceConfig, pool: WorkerPool, metrics: RouterMetrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self._pool = pool
        self._metrics = metrics
        self._clock = clock
        self._planner = Planner(cfg)
        self._compute = Ewma(cfg.ewma_alpha)
        self._kv = Ewma(cfg.ewma_alpha)
        self._signals: list[InstanceSignals] = []
        self._recent: deque[_Record] = deque(maxlen=cfg.max_recent)
        self._acting: dict[str, _Record] = {}  # worker URL -> the action involving it
        self._tasks: set[asyncio.Task[None]] = set()
        self._status_notes: dict[str, str] = {}  # worker URL -> last status problem logged
        self.num_periods = 0

    @property
    def signals(self) -> list[InstanceSignals]:
        """The latest period's signals (read-only rows)."""
        return list(self._signals)

    def describe(self) -> dict[str, Any]:
        """What ``GET /rebalance`` shows."""
        return {"config": dataclasses.asdict(self.cfg), "num_periods": self.num_periods,
                "signals": [s.as_dict() for s in self._signals],
                "in_flight": [r.as_dict() for r in {id(r): r for r in
                                                    self._acting.values()}.values()],
                "recent_decisions": [r.as_dict() for r in self._recent]}

    # -- reading ------------------------------------------------------------------------------
    def _note_status(self, url: str, problem: str | None) -> None:
        """Log a worker's status problem when it changes, not every period."""
        before = self._status_notes.pop(url, None)
        if problem is None:
            if before is not None:
                logger.info("rebalance: %s answers %s again", url, STATUS_PATH)
            return
        self._status_notes[url] = problem
        if problem != before:
            logger.warning("rebalance: %s: %s", url, problem)

    async def _read_status(self, session: aiohttp.ClientSession,
                           url: str) -> tuple[WorkerStatus | None, str | None]:
        timeout = aiohttp.ClientTimeout(total=self.cfg.status_timeout_s)
        problem: str | None
        try:
            async with session.get(url + STATUS_PATH, timeout=timeout) as resp:
                if resp.status == 404:
                    problem = (f"no {STATUS_PATH} (404): the worker runs without the migration "
                               "patches and cannot be rebalanced; it keeps serving")
                    payload = None
                elif resp.status != 200:
                    problem, payload = f"{STATUS_PATH} answered {resp.status}", None
                else:
                    problem, payload = None, await resp.json(content_type=None)
        except TimeoutError:
            problem = f"{STATUS_PATH} gave no answer within {self.cfg.status_timeout_s:g} s"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            problem = f"{STATUS_PATH} failed: {type(exc).__name__}: {exc}"
        status = None
        if problem is None:
            try:
                status = parse_status(payload)
            except ControlMessageError as exc:
                problem = f"malformed {STATUS_PATH}: {exc}"
            if status is not None and status.cannot_move:
                # noted once; the worker may still receive (its layer host does the work)
                problem = (f"cannot send layers or heads ({status.cannot_move}); it keeps "
                           "serving and may still receive")
        self._note_status(url, problem)
        return status, problem

    async def _read(self, session: aiohttp.ClientSession) -> list[InstanceSignals]:
        views = [v for v in self._pool.snapshot() if v.load.at]  # never read: nothing to say
        urls = {v.url for v in views}
        self._compute.retain(urls)
        self._kv.retain(urls)
        for url in [u for u in self._status_notes if u not in urls]:
            del self._status_notes[url]
        usable = [v.healthy and not v.draining and v.url not in self._acting for v in views]

        async def nothing() -> tuple[None, None]:
            return None, None

        statuses = await asyncio.gather(*(
            self._read_status(session, v.url) if ok else nothing()
            for v, ok in zip(views, usable, strict=True)))
        signals = []
        for view, (status, problem) in zip(views, statuses, strict=True):
            raw_c, raw_kv = compute_util(view.load), kv_util(view.load)
            signals.append(InstanceSignals(
                url=view.url, healthy=view.healthy and not view.draining,
                compute_util=self._compute.update(view.url, raw_c),
                kv_util=self._kv.update(view.url, raw_kv), raw_compute_util=raw_c,
                raw_kv_util=raw_kv, status=status, status_error=problem,
                acting=view.url in self._acting))
        return signals

    # -- acting -------------------------------------------------------------------------------
    def _record(self, decision: Decision, outcome: str) -> _Record:
        record = _Record(decision, time.time(), outcome)
        self._recent.append(record)
        d = decision
        if d.is_action:
            direction = "to" if d.kind in ("migrate_layers", "offload_heads") else "from"
            logger.info("rebalance: %s on %s%s %s (est %.0f ms): %s", d.kind, d.worker,
                        f" {direction} {d.target}" if d.target else "", json.dumps(d.body),
                        d.est_cost_ms or 0.0, d.reason)
        else:
            logger.info("rebalance: skip (%s): %s", d.worker, d.reason)
        if outcome != "pending":
            self._metrics.count_rebalance(d.kind, outcome)
        return record

    def _finish(self, record: _Record, outcome: str, detail: str, started: float) -> None:
        record.outcome, record.detail = outcome, detail
        record.duration_s = round(time.monotonic() - started, 3)
        self._metrics.count_rebalance(record.decision.kind, outcome)
        log = logger.info if outcome in ("ok", "accepted") else logger.warning
        log("rebalance: %s on %s -> %s after %.1f s%s", record.decision.kind,
            record.decision.worker, outcome, record.duration_s, f": {detail}" if detail else "")

    async def _post(self, session: aiohttp.ClientSession, record: _Record,
                    request: ControlRequest) -> None:
        d = record.decision
        started = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=self.cfg.action_timeout_s)
        try:
            async with session.post(d.worker + d.path, json=request.to_json(),
                                    timeout=timeout) as resp:
                text = await resp.text()
                code = resp.status
        except asyncio.CancelledError:
            self._finish(record, "cancelled", "the router stopped first", started)
            raise
        except TimeoutError:
            self._finish(record, "error", f"no answer within {self.cfg.action_timeout_s:g} s",
                         started)
            return
        except (aiohttp.ClientError, OSError) as exc:
            self._finish(record, "error", f"{type(exc).__name__}: {exc}", started)
            return
        finally:
            for url in (d.worker, d.peer):
                if url is not None and self._acting.get(url) is record:
                    del self._acting[url]
        try:
            payload: Any = json.loads(text) if text else None
        except ValueError:
            payload = None
        if code in (200, 202):
            self._finish(record, "ok" if code == 200 else "accepted",
                         "still draining; it finishes by itself" if code == 202 else "", started)
        else:
            self._finish(record, "refused", f"{code}: {_error_text(payload, text)}", started)

    def _carry_out(self, session: aiohttp.ClientSession, decision: Decision) -> None:
        if decision.request is None:  # a skip
            self._record(decision, "noted")
            return
        if self.cfg.dry_run:
            self._record(decision, "dry_run")
            return
        record = self._record(decision, "pending")
        for url in (decision.worker, decision.peer):
            if url is not None:
                self._acting[url] = record
        task = asyncio.create_task(self._post(session, record, decision.request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def step(self, session: aiohttp.ClientSession) -> list[Decision]:
        """One period: read, decide, start the actions; returns the decisions."""
        signals = await self._read(session)
        self._signals = signals
        decisions = self._planner.observe(signals, self._clock())
        for decision in decisions:
            self._carry_out(session, decision)
        self.num_periods += 1
        return decisions

    async def wait_idle(self) -> None:
        """Wait for the control requests in flight (tests; shutdown)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- background loop ----------------------------------------------------------------------
    async def _loop(self, session: aiohttp.ClientSession) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.step(session)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in one period must not stop rebalancing
                logger.exception("rebalance period failed")
            await asyncio.sleep(max(0.0, self.cfg.period_s - (time.monotonic() - started)))

    @contextlib.asynccontextmanager
    async def running(self, session: aiohttp.ClientSession) -> AsyncIterator[None]:
        """Run a decision round every ``period_s`` while the context is open."""
        logger.info("rebalancer on: every %g s%s", self.cfg.period_s,
                    " (dry run: decisions are logged, not sent)" if self.cfg.dry_run else "")
        task = asyncio.create_task(self._loop(session))
        try:
            yield
        finally:
            task.cancel()
            for pending in list(self._tasks):
                pending.cancel()
            await asyncio.gather(task, *self._tasks, return_exceptions=True)
