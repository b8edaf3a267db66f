"""SLO-ODBS (UELLM): batches formed from SLOs and predicted output lengths, and its baselines.

Pure: no I/O, no clock; the caller passes ``now``. Who calls it: the router's batcher
(``router/batcher.py``) each time a worker has room, the worker's queue policy
(``runtime_patches/slo_queue.py``) each scheduler step, and the sidecar's
``POST /v1/plan/batches``. Every ordering policy returns the same thing, a list of batches in the
order they should run, so FCFS, shortest-predicted-first and S3 run through the same code path.

The objective (``slo-odbs`` mode)
---------------------------------
A batch B runs its members together; under continuous batching the batch lasts as long as its
longest member, and every extra member slows each decode step a little. For a candidate batch B
(n members, longest predicted output O_max, start delay ``wait``)::

    service(B)   = prefill(B) + O_max * step_s * (1 + L1 * (n - 1))
    latency_x    = (now - arrival_x) + wait + service(B)                    for x in B
    T_l(B)       = mean over x of latency_x / slo_x          (fraction of each SLO used)
    T_o(B)       = sum over x of (O_max - len_x) / (n * O_max)
                   (the share of reserved decode slots the length spread wastes: KV waste)
    cost(B)      = w1 * T_l(B) + w2 * T_o(B)

Both terms are normalised (T_l is 1 when the average member just meets its SLO, T_o is in
[0, 1)), so one ``threshold`` (default 1) bounds their weighted sum, as §1.8 of the digest
suggests for the paper's unit-mixing ``w1*T_l + w2*T_o <= Threshold``. Greedy, as in the paper:
sort the waiting requests by urgency (``a * slack/slo_ref + b * len/len_ref``, slack = time left
to the deadline), then add each to the open batch while the batch has room (``max_batch``),
``cost <= threshold`` and joining makes no member miss an SLO it would otherwise meet;
otherwise close the batch and open a new one with it. Requests that would miss their SLO even
alone, started now, are set aside and run last (they cannot be saved; running them first would
sink others too). Batches
then run in order of their earliest deadline. ``code`` mode reproduces the original code's rule
instead (sort by ``SLO + 0.5 * len``; admit while ``(len - O_max) * (n + 1) * 1.2 <= 15000``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from router.cli_fields import flag

POLICIES = ("fcfs", "spf", "s3", "slo-odbs", "slo-odbs-code")


@dataclass(frozen=True)
class Job:
    """A waiting request as the batcher sees it."""

    id: str
    """The caller's handle for the request (returned in the batches)."""
    arrival_s: float
    """When it arrived, on the caller's clock (seconds)."""
    slo_s: float
    """End-to-end latency target (seconds from arrival)."""
    predicted_len: int
    """Predicted (or known) output tokens."""
    prompt_len: int = 0
    """Prompt tokens."""

    def __post_init__(self) -> None:
        if self.slo_s <= 0:
            raise ValueError(f"Job.slo_s: must be > 0, got {self.slo_s} (request {self.id})")
        if self.predicted_len < 0 or self.prompt_len < 0:
            raise ValueError(f"Job.predicted_len/prompt_len: must be >= 0 (request {self.id})")

    @property
    def deadline_s(self) -> float:
        return self.arrival_s + self.slo_s


@dataclass(frozen=True)
class ServiceModel:
    """How long a batch takes on one worker (calibrate to the served model and hardware)."""

    step_s: float = field(default=0.02, metadata=flag(
        "--slo-step-ms", "service model: ms per decode step of one request on a worker "
        "(%(default).0f)", to_cli=lambda s: s * 1000, from_cli=lambda ms: ms / 1000.0))
    """Seconds per decode step of one request (SmolLM2 on one CPU core: about 20 ms)."""
    prefill_tokens_per_s: float = field(default=2000.0, metadata=flag(
        "--slo-prefill-tokens-per-s",
        "service model: prompt tokens prefilled per second (%(default).0f)"))
    """Prompt tokens prefilled per second."""
    batch_slowdown: float = 0.1
    """L1: each extra batch member makes every decode step this fraction slower."""

    def __post_init__(self) -> None:
        if self.step_s <= 0 or self.prefill_tokens_per_s <= 0 or self.batch_slowdown < 0:
            raise ValueError(f"ServiceModel: step_s and prefill_tokens_per_s must be > 0 and "
                             f"batch_slowdown >= 0, got {self}")

    def service_s(self, jobs: Sequence[Job]) -> float:
        """Predicted time for ``jobs`` to finish when run together from now."""
        if not jobs:
            return 0.0
        prefill = sum(j.prompt_len for j in jobs) / self.prefill_tokens_per_s
        longest = max(j.predicted_len for j in jobs)
        return prefill + longest * self.step_s * (1 + self.batch_slowdown * (len(jobs) - 1))


@dataclass(frozen=True)
class BatchingConfig:
    """Which policy forms the batches, and SLO-ODBS's parameters."""

    policy: str = field(default="slo-odbs", metadata=flag(
        "--batching", "none (default): dispatch at once; fcfs, spf (shortest predicted first), "
        "s3 (S3 length binning), slo-odbs, slo-odbs-code (the original code's admission rule)",
        choices=["none", *POLICIES], default="none"))
    """One of ``fcfs``, ``spf`` (shortest predicted first), ``s3`` (S3's length binning),
    ``slo-odbs`` (the objective above) or ``slo-odbs-code`` (the original code's rule)."""
    max_batch: int = field(default=8, metadata=flag(
        "--batch-max-size", "most requests in one batch (%(default)s)"))
    """Most requests in one batch (the worker's ``--max-running-requests`` is a good value)."""
    w1: float = field(default=1.0, metadata=flag(
        "--slo-odbs-w1", "weight of the latency term (%(default)s)"))
    """Weight of the latency term T_l."""
    w2: float = field(default=0.5, metadata=flag(
        "--slo-odbs-w2", "weight of the length-spread (KV waste) term (%(default)s)"))
    """Weight of the length-spread (KV waste) term T_o."""
    threshold: float = field(default=1.0, metadata=flag(
        "--slo-odbs-threshold", "bound on w1*T_l + w2*T_o for a batch to grow (%(default)s)"))
    """Bound on ``w1*T_l + w2*T_o`` for a batch to take one more member."""
    a: float = 1.0
    """Sort key weight of the slack (in units of ``slo_ref_s``)."""
    b: float = 0.5
    """Sort key weight of the predicted length (in units of ``len_ref``)."""
    slo_ref_s: float = 10.0
    """Slack normalisation for the sort key (seconds)."""
    len_ref: int = 256
    """Length normalisation for the sort key (tokens)."""
    s3_token_budget: int = 1024
    """S3: most predicted output tokens in one batch."""
    code_threshold: float = 15000.0
    """``slo-odbs-code``: THRESHOLD of the original code (tokens)."""
    code_overhead: float = 1.2
    """``slo-odbs-code``: the original's per-member overhead factor."""
    service: ServiceModel = field(default_factory=ServiceModel)
    """Batch service-time model used to predict SLO misses."""

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"BatchingConfig.policy: {self.policy!r} is not one of {POLICIES}")
        if self.max_batch < 1:
            raise ValueError(f"BatchingConfig.max_batch: must be >= 1, got {self.max_batch}")
        for name in ("w1", "w2", "threshold", "a", "b"):
            if getattr(self, name) < 0:
                raise ValueError(f"BatchingConfig.{name}: must be >= 0, got {getattr(self, name)}")
        if self.slo_ref_s <= 0 or self.len_ref <= 0 or self.s3_token_budget <= 0:
            raise ValueError("BatchingConfig.slo_ref_s/len_ref/s3_token_budget: must be > 0")


def latency_term(batch: Sequence[Job], now: float, wait_s: float, service: ServiceModel) -> float:
    """T_l: the mean share of its SLO each member uses if ``batch`` starts ``wait_s`` from now."""
    done = now + wait_s + service.service_s(batch)
    return sum((done - j.arrival_s) / j.slo_s for j in batch) / len(batch)


def waste_term(batch: Sequence[Job]) -> float:
    """T_o: the share of the batch's reserved decode slots that length spread leaves unused."""
    longest = max(j.predicted_len for j in batch)
    if longest == 0:
        return 0.0
    return sum(longest - j.predicted_len for j in batch) / (len(batch) * longest)


def batch_cost(batch: Sequence[Job], now: float, wait_s: float, cfg: BatchingConfig) -> float:
    """``w1 * T_l + w2 * T_o`` of ``batch`` started ``wait_s`` from now."""
    return (cfg.w1 * latency_term(batch, now, wait_s, cfg.service)
            + cfg.w2 * waste_term(batch))


def misses(batch: Sequence[Job], now: float, wait_s: float, service: ServiceModel) -> list[Job]:
    """Members predicted to finish after their deadline."""
    done = now + wait_s + service.service_s(batch)
    return [j for j in batch if done > j.deadline_s]


def _fcfs(jobs: Sequence[Job], now: float, cfg: BatchingConfig) -> list[list[Job]]:
    ordered = sorted(jobs, key=lambda j: j.arrival_s)
    return _chunks(ordered, cfg.max_batch)


def _spf(jobs: Sequence[Job], now: float, cfg: BatchingConfig) -> list[list[Job]]:
    ordered = sorted(jobs, key=lambda j: (j.predicted_len, j.arrival_s))
    return _chunks(ordered, cfg.max_batch)


def _s3(jobs: Sequence[Job], now: float, cfg: BatchingConfig) -> list[list[Job]]:
    """S3 (Jin et al. 2023): sort by predicted length, pack while the batch's tokens fit."""
    batches: list[list[Job]] = []
    current: list[Job] = []
    for job in sorted(jobs, key=lambda j: (j.predicted_len, j.arrival_s)):
        tokens = sum(j.predicted_len for j in current) + job.predicted_len
        if current and (len(current) >= cfg.max_batch or tokens > cfg.s3_token_budget):
            batches.append(current)
            current = []
        current.append(job)
    if current:
        batches.append(current)
    return batches


def _code(jobs: Sequence[Job], now: float, cfg: BatchingConfig) -> list[list[Job]]:
    """The original code: sort by ``SLO + 0.5*len``, admit while the padded-length jump is small."""
    batches: list[list[Job]] = []
    current: list[Job] = []
    longest = 0
    for job in sorted(jobs, key=lambda j: (j.slo_s + 0.5 * j.predicted_len, j.arrival_s)):
        n = len(current)
        fits = (n < cfg.max_batch and (job.predicted_len - longest) * (n + 1) * cfg.code_overhead
                <= cfg.code_threshold)
        if current and not fits:
            batches.append(current)
            current, longest = [], 0
        current.append(job)
        longest = max(longest, job.predicted_len)
    if current:
        batches.append(current)
    return batches


def urgency(job: Job, now: float, cfg: BatchingConfig) -> float:
    """SLO-ODBS's sort key: ``a * slack / slo_ref + b * len / len_ref`` (smaller runs first)."""
    slack = job.deadline_s - now
    return cfg.a * slack / cfg.slo_ref_s + cfg.b * job.predicted_len / cfg.len_ref


def _slo_odbs(jobs: Sequence[Job], now: float, cfg: BatchingConfig) -> list[list[Job]]:
    service = cfg.service
    hopeless = [j for j in jobs if misses([j], now, 0.0, service)]
    lost = {j.id for j in hopeless}
    ordered = sorted((j for j in jobs if j.id not in lost),
                     key=lambda j: (urgency(j, now, cfg), j.arrival_s))
    batches: list[list[Job]] = []
    current: list[Job] = []
    wait = 0.0  # batches run one after another on the worker: later ones start later
    for job in ordered:
        candidate = [*current, job]
        fits = (len(candidate) <= cfg.max_batch
                and batch_cost(candidate, now, wait, cfg) <= cfg.threshold
                and not _new_misses(current, job, now, wait, service))
        if current and not fits:
            batches.append(current)
            wait += service.service_s(current)
            candidate = [job]
        current = candidate
    if current:
        batches.append(current)
    batches.sort(key=lambda b: min(j.deadline_s for j in b))
    return batches + _chunks(sorted(hopeless, key=lambda j: (j.deadline_s, j.id)),
                             cfg.max_batch)


def _new_misses(current: list[Job], job: Job, now: float, wait: float,
                service: ServiceModel) -> list[Job]:
    """Members that ``job`` joining ``current`` would make miss (misses that happen anyway, in
    ``current`` or for ``job`` alone at this point, do not count)."""
    already = {j.id for j in misses(current, now, wait, service)}
    already |= {j.id for j in misses([job], now, wait, service)}
    return [j for j in misses([*current, job], now, wait, service) if j.id not in already]


def _chunks(jobs: list[Job], size: int) -> list[list[Job]]:
    return [jobs[i:i + size] for i in range(0, len(jobs), size)]


_FORMERS: dict[str, Callable[[Sequence[Job], float, BatchingConfig], list[list[Job]]]] = {
    "fcfs": _fcfs, "spf": _spf, "s3": _s3, "slo-odbs": _slo_odbs, "slo-odbs-code": _code,
}


def form_batches(jobs: Sequence[Job], now: float, cfg: BatchingConfig) -> list[list[Job]]:
    """Every job exactly once, grouped into batches in the order they should run (ties keep
    the input order)."""
    ids = [j.id for j in jobs]
    if len(set(ids)) != len(ids):
        raise ValueError("form_batches: request ids must be unique")
    if not jobs:
        return []
    return _FORMERS[cfg.policy](jobs, now, cfg)


def queue_order(jobs: Sequence[Job], now: float, cfg: BatchingConfig) -> list[Job]:
    """The batches flattened: the order a continuous-batching queue should admit ``jobs`` in."""
    return [j for batch in form_batches(jobs, now, cfg) for j in batch]
