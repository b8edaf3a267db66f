"""SLO-ODBS (or another ``router.batching.slo_odbs`` policy) as the SGLang worker's queue order.

What it changes: SGLang's scheduler sorts its ``waiting_queue`` in place with
``SchedulePolicy.calc_priority`` and then admits requests from the head while memory and
``--max-running-requests`` allow (``Scheduler._get_new_batch_prefill_raw`` in
``srt/managers/scheduler.py``). With ``BANASERVE_QUEUE_POLICY`` set to a policy other than
``fcfs``, the wrapped ``calc_priority`` lets SGLang's own ordering run first and then reorders the
queue by :func:`router.batching.slo_odbs.queue_order`. SGLang's ordering (``--schedule-policy``,
priority scheduling) is overridden while a BanaServe policy is on.

Who calls what, and when:

- ``runtime_patches.boot.install`` calls :func:`register` once per process; the import hook then
  calls :func:`_wrap_calc_priority` when ``schedule_policy`` is imported. It reads the environment
  once (:func:`config_from_env`); a bad value raises ``PatchError`` and the process stops. Without
  a BanaServe policy it returns SGLang's method unchanged.
- SGLang's scheduler calls the wrapped ``calc_priority`` before each prefill admission (only
  when there is room for a request); the wrapper calls :func:`reorder` with a ``perf_counter``
  ``now``. The first call logs the active policy and its parameters.

Per request (read by :func:`read_req`; a missing or unusable value falls back):

- SLO: ``sampling_params.custom_params["banaserve_slo_ms"]``, else
  ``BANASERVE_QUEUE_DEFAULT_SLO_MS``;
- predicted output tokens: ``custom_params["banaserve_predicted_len"]``, else ``max_new_tokens``;
- arrival: ``time_stats.scheduler_recv_time`` (``time.perf_counter``, set when the scheduler built
  the ``Req``), else the first time the wrapper saw the request (:class:`QueueMemory`);
- prompt tokens: ``len(origin_input_ids)``.

``/generate`` carries ``custom_params`` inside ``sampling_params``; the OpenAI routes
(``/v1/chat/completions``, ``/v1/completions``) carry it as a top-level field.

Environment (set by ``runtime_patches.launch`` from ``WorkerConfig.queue_policy`` and
``queue_default_slo_ms``; the other two only through ``extra_env``):

- ``BANASERVE_QUEUE_POLICY``: one of ``slo_odbs.POLICIES``; unset, empty or ``fcfs``: no change;
- ``BANASERVE_QUEUE_DEFAULT_SLO_MS``: SLO of requests that carry none (default 30000);
- ``BANASERVE_QUEUE_MAX_BATCH``: ``BatchingConfig.max_batch`` (default: the worker's
  ``--max-running-requests`` when SGLang has it, else 8);
- ``BANASERVE_QUEUE_STEP_MS``: ``ServiceModel.step_s`` in milliseconds, the decode time per token
  the policy predicts SLO misses with (default 20).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from router.batching.slo_odbs import POLICIES, BatchingConfig, Job, ServiceModel, queue_order
from runtime_patches import SGLANG_VERSION
from runtime_patches.registry import REGISTRY, Patch, PatchError

logger = logging.getLogger(__name__)

ENV_POLICY = "BANASERVE_QUEUE_POLICY"
ENV_DEFAULT_SLO_MS = "BANASERVE_QUEUE_DEFAULT_SLO_MS"
ENV_MAX_BATCH = "BANASERVE_QUEUE_MAX_BATCH"
ENV_STEP_MS = "BANASERVE_QUEUE_STEP_MS"
SLO_KEY = "banaserve_slo_ms"
"""``custom_params`` key of a request's end-to-end SLO in milliseconds."""
PREDICTED_LEN_KEY = "banaserve_predicted_len"
"""``custom_params`` key of a request's predicted output tokens."""
DEFAULT_SLO_MS = 30000.0
FALLBACK_MAX_BATCH = 8
LOG_PREFIX = "queue policy:"
"""Start of the line the wrapper logs on its first call; tests look for it."""


@dataclass(frozen=True)
class QueueConfig:
    """How one worker orders its waiting queue."""

    policy: str = "fcfs"
    """One of ``slo_odbs.POLICIES``; ``fcfs`` leaves SGLang's order alone."""
    default_slo_ms: float = DEFAULT_SLO_MS
    """SLO of a request without ``banaserve_slo_ms``."""
    max_batch: int | None = None
    """``BatchingConfig.max_batch``; ``None``: the worker's max running requests (else 8)."""
    step_ms: float | None = None
    """``ServiceModel.step_s`` in ms; ``None``: the ``ServiceModel`` default."""

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"QueueConfig.policy: {self.policy!r} is not one of {POLICIES}")
        if not (math.isfinite(self.default_slo_ms) and self.default_slo_ms > 0):
            raise ValueError(f"QueueConfig.default_slo_ms: must be > 0, got {self.default_slo_ms}")
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError(f"QueueConfig.max_batch: must be >= 1, got {self.max_batch}")
        if self.step_ms is not None and not (math.isfinite(self.step_ms) and self.step_ms > 0):
            raise ValueError(f"QueueConfig.step_ms: must be > 0, got {self.step_ms}")

    @property
    def active(self) -> bool:
        return self.policy != "fcfs"

    def batching(self, max_running_requests: int | None = None) -> BatchingConfig:
        """The ``BatchingConfig`` for a worker that runs at most ``max_running_requests``."""
        max_batch = self.max_batch or max_running_requests or FALLBACK_MAX_BATCH
        service = (ServiceModel() if self.step_ms is None
                   else ServiceModel(step_s=self.step_ms / 1000.0))
        return BatchingConfig(policy=self.policy, max_batch=max_batch, service=service)


def _env_number(env: Mapping[str, str], name: str, kind: type[float] | type[int]) -> Any:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a{'n integer' if kind is int else ' number'}") \
            from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}={raw!r} must be > 0")
    return value


def config_from_env(env: Mapping[str, str]) -> QueueConfig:
    """The queue configuration in ``env``; ValueError naming the variable if one is bad."""
    policy = env.get(ENV_POLICY, "").strip() or "fcfs"
    if policy not in POLICIES:
        raise ValueError(f"{ENV_POLICY}={policy!r} is not one of {', '.join(POLICIES)}")
    slo_ms = _env_number(env, ENV_DEFAULT_SLO_MS, float)
    return QueueConfig(policy=policy,
                       default_slo_ms=DEFAULT_SLO_MS if slo_ms is None else slo_ms,
                       max_batch=_env_number(env, ENV_MAX_BATCH, int),
                       step_ms=_env_number(env, ENV_STEP_MS, float))


@dataclass(frozen=True)
class QueuedReq:
    """What the policy reads from one waiting request (raw ``custom_params`` values)."""

    rid: str
    arrival_s: float | None
    """Receive time on the ``now`` clock; ``None`` if the request does not say."""
    slo_ms: Any
    predicted_len: Any
    max_new_tokens: Any
    prompt_len: int


def read_req(req: Any) -> QueuedReq:
    """Read an SGLang ``Req`` (0.5.23 attribute names)."""
    params = req.sampling_params
    custom = params.custom_params if isinstance(params.custom_params, dict) else {}
    received = getattr(getattr(req, "time_stats", None), "scheduler_recv_time", 0.0)
    return QueuedReq(rid=str(req.rid), arrival_s=float(received) if received else None,
                     slo_ms=custom.get(SLO_KEY), predicted_len=custom.get(PREDICTED_LEN_KEY),
                     max_new_tokens=params.max_new_tokens, prompt_len=len(req.origin_input_ids))


class QueueMemory:
    """Per-scheduler state of the wrapper: first-seen times of requests without a receive time
    and which requests were already warned about. Entries leave with their requests."""

    def __init__(self) -> None:
        self._first_seen: dict[str, float] = {}
        self._warned: set[str] = set()

    def arrival_s(self, rid: str, now: float) -> float:
        return self._first_seen.setdefault(rid, now)

    def warn_once(self, rid: str, message: str, *args: Any) -> None:
        if rid not in self._warned:
            self._warned.add(rid)
            logger.warning(message, *args)

    def retain(self, rids: set[str]) -> None:
        """Forget every request not in ``rids`` (those that left the queue)."""
        for rid in [r for r in self._first_seen if r not in rids]:
            del self._first_seen[rid]
        self._warned &= rids

    def __len__(self) -> int:
        return len(self._first_seen) + len(self._warned)


def _positive(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value) if math.isfinite(value) and value >= 0 else None


def to_job(index: int, facts: QueuedReq, now: float, cfg: QueueConfig, batching: BatchingConfig,
           memory: QueueMemory) -> Job:
    """The ``Job`` for the request at ``index``: its id is the index (rids may repeat)."""
    slo_ms = _positive(facts.slo_ms)
    if slo_ms is None:
        if facts.slo_ms is not None:
            memory.warn_once(facts.rid, "%s request %s: %s=%r is not a positive number; using "
                             "%s ms", LOG_PREFIX, facts.rid, SLO_KEY, facts.slo_ms,
                             cfg.default_slo_ms)
        slo_ms = cfg.default_slo_ms
    predicted = _count(facts.predicted_len)
    if predicted is None:
        if facts.predicted_len is not None:
            memory.warn_once(facts.rid, "%s request %s: %s=%r is not a token count; using "
                             "max_new_tokens", LOG_PREFIX, facts.rid, PREDICTED_LEN_KEY,
                             facts.predicted_len)
        predicted = _count(facts.max_new_tokens)
        if predicted is None:
            predicted = batching.len_ref
    arrival = facts.arrival_s if facts.arrival_s is not None else memory.arrival_s(facts.rid, now)
    return Job(id=str(index), arrival_s=arrival, slo_s=slo_ms / 1000.0,
               predicted_len=predicted, prompt_len=facts.prompt_len)


def reorder(waiting_queue: list[Any], now: float, cfg: QueueConfig,
            read: Callable[[Any], QueuedReq] = read_req, memory: QueueMemory | None = None,
            max_running_requests: int | None = None) -> None:
    """Sort ``waiting_queue`` in place into the order ``cfg.policy`` admits it in.

    ``read`` turns a queue entry into :class:`QueuedReq` (default: an SGLang ``Req``); ``now`` is
    on the clock of its ``arrival_s``. ``memory`` keeps first-seen times across calls.
    """
    if not cfg.active or len(waiting_queue) < 2:
        return
    memory = memory if memory is not None else QueueMemory()
    batching = cfg.batching(max_running_requests)
    facts = [read(req) for req in waiting_queue]
    jobs = [to_job(i, f, now, cfg, batching, memory) for i, f in enumerate(facts)]
    order = queue_order(jobs, now, batching)
    assert len(order) == len(waiting_queue), "queue_order must return every job once"
    waiting_queue[:] = [waiting_queue[int(job.id)] for job in order]
    memory.retain({f.rid for f in facts})


def _worker_max_running_requests() -> int | None:
    """``--max-running-requests`` as SGLang 0.5.23 publishes it (``None`` when unset)."""
    try:
        from sglang.srt.runtime_context import get_schedule

        value = get_schedule().max_running_requests
    except (ImportError, ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, int) and value > 0 else None


def _wrap_calc_priority(original: Callable[..., None]) -> Callable[..., None]:
    try:
        cfg = config_from_env(os.environ)
    except ValueError as exc:
        raise PatchError(f"runtime_patches: queue policy: {exc}; refusing to start") from None
    if not cfg.active:
        return original
    memory = QueueMemory()
    max_running: list[int | None] = []  # resolved on the first call, when SGLang has it

    @functools.wraps(original)
    def calc_priority(self: Any, waiting_queue: list[Any], *args: Any, **kwargs: Any) -> None:
        original(self, waiting_queue, *args, **kwargs)
        if not max_running:
            max_running.append(_worker_max_running_requests())
            batching = cfg.batching(max_running[0])
            logger.info("%s %s (max_batch %d, step %.1f ms, default SLO %.0f ms)", LOG_PREFIX,
                        cfg.policy, batching.max_batch, batching.service.step_s * 1000.0,
                        cfg.default_slo_ms)
        reorder(waiting_queue, time.perf_counter(), cfg, memory=memory,
                max_running_requests=max_running[0])

    return calc_priority


def register() -> None:
    """Add the queue-order patch to the registry (called once by ``runtime_patches.boot``)."""
    REGISTRY.add(Patch(
        name="queue.slo_odbs_order",
        target="sglang.srt.managers.schedule_policy:SchedulePolicy.calc_priority",
        kind="wrap", new=_wrap_calc_priority,
        rationale="Reorders the scheduler's waiting queue by SLO-ODBS (or spf / s3) from each "
                  "request's SLO and predicted length in custom_params, after SGLang's own "
                  "sort, when BANASERVE_QUEUE_POLICY is set; otherwise SGLang's method is kept.",
        package="sglang", version=SGLANG_VERSION,
    ))
