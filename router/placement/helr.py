"""HELR: place a model's layers onto GPUs as contiguous pipeline stages (UELLM's deployer).

Who calls what:
  ``solve``        placement.py, once per plan: the exact DP over (last unit, used-GPU set, GPU)
  ``brute_force``  tests: every ordered GPU sequence and every contiguous split (tiny instances)
  ``evaluate`` / ``is_feasible``  tests and placement.py: recompute a plan's cost independently
  ``diagnose``     ``solve`` when nothing fits: the constraint that binds, as an InfeasibleError

Units 0..n-1 are placed in order; a stage is a GPU and a half-open unit range. The objective for
``g`` GPUs used out of ``G`` is ``J = (1 - weight) * T / T_min + weight * g / G`` where ``T`` is
the plan's latency (``sum``: stage times plus hand-offs; ``bottleneck``: the largest stage time
or hand-off) and ``T_min`` the best latency over all GPU counts; ties go to the lower latency,
then to fewer GPUs. ``weight`` 0 is LR, 1 is HE, 0.5 is HELR. For a fixed count the best ``J`` is
the best latency, so the DP keeps the used-GPU set in its state and the pick is made over counts
at the end. Memory is exact integer bytes; times are floats. See docs/helr.md.
"""

from __future__ import annotations

import itertools
import logging
import math
from bisect import bisect_left, bisect_right
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

GIB = 1 << 30
MAX_GPUS = 12
"""2^G used-GPU sets are kept per unit; plan larger clusters one node at a time."""
OBJECTIVES = ("sum", "bottleneck")
MODE_WEIGHTS: dict[str, float] = {"lr": 0.0, "he": 1.0, "helr": 0.5}
"""The blend weight each mode stands for (``helr`` is the default; it may take any weight)."""


class InfeasibleError(ValueError):
    """No placement fits; ``constraint`` names what binds: ``unit_memory``, ``total_memory`` or
    ``packing``."""

    def __init__(self, message: str, constraint: str) -> None:
        super().__init__(message)
        self.constraint = constraint


def _check_ints(name: str, values: tuple[int, ...]) -> None:
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 0:
            raise ValueError(f"{name}[{i}]: expected an integer >= 0, got {v!r}")


def _check_times(name: str, rows: tuple[tuple[float, ...], ...], width: int,
                 skip_diagonal: bool = False) -> None:
    for a, row in enumerate(rows):
        if len(row) != width:
            raise ValueError(f"{name}[{a}]: expected {width} entries, got {len(row)}")
        for b, v in enumerate(row):
            if skip_diagonal and a == b:
                continue
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name}[{a}][{b}]: expected a finite time >= 0, got {v!r}")


@dataclass(frozen=True)
class Problem:
    """One placement instance, all in bytes and seconds."""

    unit_names: tuple[str, ...]
    """Names for messages (``embedding``, ``layer 3``...)."""
    weight_bytes: tuple[int, ...]
    """Weights each unit pins on its GPU."""
    kv_bytes: tuple[int, ...]
    """KV cache each unit reserves on its GPU (reserved tokens x KV bytes per token)."""
    unit_times: tuple[tuple[float, ...], ...]
    """``unit_times[u][g]``: seconds unit u takes on GPU position g."""
    capacity_bytes: tuple[int, ...]
    """Usable memory per GPU position (free memory after headroom)."""
    comm_s: tuple[tuple[float, ...], ...]
    """``comm_s[a][b]``: seconds to hand activations from GPU a to GPU b (diagonal unused)."""
    stage_overhead_bytes: int = 0
    """Memory every stage needs besides its units (activation workspace)."""
    shared_bytes: int = 0
    """Bytes a single stage holding every unit saves (tied embedding and LM head)."""
    cut_allowed: tuple[bool, ...] = ()
    """``cut_allowed[u]``: a stage may end after unit u; empty means everywhere."""

    def __post_init__(self) -> None:
        n, g = len(self.unit_names), len(self.capacity_bytes)
        if n < 1:
            raise ValueError("unit_names: expected at least one unit")
        if not 1 <= g <= MAX_GPUS:
            raise ValueError(f"capacity_bytes: expected 1..{MAX_GPUS} GPUs, got {g}")
        for name in ("weight_bytes", "kv_bytes", "unit_times"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name}: expected {n} entries, got {len(getattr(self, name))}")
        _check_ints("weight_bytes", self.weight_bytes)
        _check_ints("kv_bytes", self.kv_bytes)
        _check_ints("capacity_bytes", self.capacity_bytes)
        _check_ints("stage_overhead_bytes", (self.stage_overhead_bytes,))
        _check_ints("shared_bytes", (self.shared_bytes,))
        _check_times("unit_times", self.unit_times, g)
        if len(self.comm_s) != g:
            raise ValueError(f"comm_s: expected {g} rows, got {len(self.comm_s)}")
        _check_times("comm_s", self.comm_s, g, skip_diagonal=True)
        if self.cut_allowed and len(self.cut_allowed) != n - 1:
            raise ValueError(f"cut_allowed: expected {n - 1} entries, got {len(self.cut_allowed)}")

    @property
    def num_units(self) -> int:
        """Units to place."""
        return len(self.unit_names)

    @property
    def num_gpus(self) -> int:
        """GPU positions available."""
        return len(self.capacity_bytes)

    def can_cut_after(self, unit: int) -> bool:
        """A stage may end after ``unit`` (and the next one start)."""
        return not self.cut_allowed or bool(self.cut_allowed[unit])

    def stage_bytes(self, first: int, end: int) -> int:
        """Memory a stage holding units ``[first, end)`` needs."""
        units = sum(self.weight_bytes[first:end]) + sum(self.kv_bytes[first:end])
        whole = first == 0 and end == self.num_units
        return units + self.stage_overhead_bytes - (self.shared_bytes if whole else 0)


@dataclass(frozen=True)
class StageAssignment:
    """One pipeline stage: units ``[first, end)`` on GPU position ``gpu``."""

    gpu: int
    """Position in the problem's GPU list."""
    first: int
    """First unit."""
    end: int
    """One past the last unit."""


@dataclass(frozen=True)
class Solution:
    """The chosen placement and how it compares."""

    stages: tuple[StageAssignment, ...]
    """Stages in pipeline order."""
    latency_s: float
    """The plan's latency under ``objective``."""
    score: float
    """Blended objective J (see the module docstring)."""
    t_min_s: float
    """Best latency over every GPU count (the LR optimum), J's normaliser."""
    best_by_count: tuple[tuple[int, float], ...]
    """(GPUs used, best latency with exactly that many) for every feasible count."""
    weight: float
    """Blend weight used (0 = LR, 1 = HE)."""
    objective: str
    """``sum`` or ``bottleneck``."""

    @property
    def num_gpus(self) -> int:
        """GPUs the plan uses."""
        return len(self.stages)


def check_objective(weight: float, objective: str) -> None:
    """Raise ``ValueError`` naming ``weight`` or ``objective`` when out of range."""
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 <= weight <= 1:
        raise ValueError(f"weight: expected a number in [0, 1], got {weight!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective: expected one of {', '.join(OBJECTIVES)}, got {objective!r}")


def blended_score(latency: float, num_gpus: int, t_min: float, total_gpus: int,
                  weight: float) -> float:
    """J = (1 - weight) * latency / t_min + weight * num_gpus / total_gpus."""
    ratio = latency / t_min if t_min > 0 else (1.0 if latency == 0 else math.inf)
    return (1 - weight) * ratio + weight * num_gpus / total_gpus


def selection_key(score: float, latency: float, num_gpus: int) -> tuple[float, float, int]:
    """Order candidates: J, then latency, then fewer GPUs (rounded against float noise)."""
    return (round(score, 9), round(latency, 12), num_gpus)


def evaluate(problem: Problem, stages: tuple[StageAssignment, ...], objective: str) -> float:
    """Latency of ``stages`` by direct summation (independent of the DP's prefix sums)."""
    parts: list[float] = []
    hand_offs: list[float] = []
    for k, st in enumerate(stages):
        parts.append(sum(problem.unit_times[u][st.gpu] for u in range(st.first, st.end)))
        if k:
            hand_offs.append(problem.comm_s[stages[k - 1].gpu][st.gpu])
    if objective == "sum":
        return sum(parts) + sum(hand_offs)
    return max(parts + hand_offs)


def is_feasible(problem: Problem, stages: tuple[StageAssignment, ...]) -> bool:
    """Stages cover every unit in order, on distinct GPUs, at allowed cuts, within memory."""
    if not stages or stages[0].first != 0 or stages[-1].end != problem.num_units:
        return False
    if len({st.gpu for st in stages}) != len(stages):
        return False
    for k, st in enumerate(stages):
        if st.first >= st.end or (k and st.first != stages[k - 1].end):
            return False
        if st.end < problem.num_units and not problem.can_cut_after(st.end - 1):
            return False
        if problem.stage_bytes(st.first, st.end) > problem.capacity_bytes[st.gpu]:
            return False
    return True


def _finish(candidates: list[tuple[float, int, tuple[StageAssignment, ...]]], problem: Problem,
            weight: float, objective: str) -> Solution:
    t_min = min(lat for lat, _, _ in candidates)
    best: dict[int, float] = {}
    for lat, k, _ in candidates:
        best[k] = min(best.get(k, math.inf), lat)
    scored = [(blended_score(lat, k, t_min, problem.num_gpus, weight), lat, k, stages)
              for lat, k, stages in candidates]
    score, lat, _, stages = min(scored, key=lambda c: selection_key(c[0], c[1], c[2]))
    return Solution(stages, lat, score, t_min, tuple(sorted(best.items())), weight, objective)


def brute_force(problem: Problem, weight: float = 0.5, objective: str = "sum") -> Solution:
    """Try every GPU sequence and contiguous split; for tests on tiny instances only."""
    check_objective(weight, objective)
    n = problem.num_units
    cuts = [c for c in range(1, n) if problem.can_cut_after(c - 1)]
    candidates = []
    for k in range(1, min(problem.num_gpus, len(cuts) + 1) + 1):
        for chosen in itertools.combinations(cuts, k - 1):
            bounds = (0, *chosen, n)
            for gpus in itertools.permutations(range(problem.num_gpus), k):
                stages = tuple(StageAssignment(g, bounds[s], bounds[s + 1])
                               for s, g in enumerate(gpus))
                if is_feasible(problem, stages):
                    candidates.append((evaluate(problem, stages, objective), k, stages))
    if not candidates:
        raise diagnose(problem)
    return _finish(candidates, problem, weight, objective)


def solve(problem: Problem, weight: float = 0.5, objective: str = "sum") -> Solution:
    """The exact optimum by DP, in O(n^2 G 2^G + n G^2 2^G) numpy-vectorised steps."""
    check_objective(weight, objective)
    tables = _Tables(problem, objective)
    tables.fill()
    final = tables.f[problem.num_units - 1]
    if not np.isfinite(final).any():
        raise diagnose(problem)
    counts = np.array([bin(s).count("1") for s in range(final.shape[0])])
    candidates = []
    for k in range(1, problem.num_gpus + 1):
        sub = np.where((counts == k)[:, None], final, np.inf)
        flat = int(sub.argmin())
        if math.isfinite(sub.flat[flat]):
            used, gpu = divmod(flat, problem.num_gpus)
            candidates.append((float(sub.flat[flat]), k, tables.walk_back(used, gpu)))
    return _finish(candidates, problem, weight, objective)


class _Tables:
    """The DP tables. ``f[j, S, g]``: best latency for units 0..j on GPU set S, the last stage
    on g. ``h[j, S, g]``: best ``f[j, S, g'] (+) comm[g'][g]`` over g' in S, for g not in S, so
    a stage on g can start at unit j + 1. ``(+)`` is ``+`` for sum and ``max`` for bottleneck."""

    def __init__(self, problem: Problem, objective: str) -> None:
        self.p = problem
        n, g = problem.num_units, problem.num_gpus
        self.combine = np.add if objective == "sum" else np.maximum
        self.prefix_t = np.vstack([np.zeros(g), np.cumsum(np.asarray(problem.unit_times), 0)])
        self.prefix_m = [0, *itertools.accumulate(w + k for w, k in
                                                  zip(problem.weight_bytes, problem.kv_bytes,
                                                      strict=True))]
        self.comm = np.array(problem.comm_s, dtype=float)
        np.fill_diagonal(self.comm, np.inf)
        sets = 1 << g
        self.f = np.full((n, sets, g), np.inf)
        self.h = np.full((n, sets, g), np.inf)
        self.start = np.zeros((n, sets, g), dtype=np.int16)
        self.prev = np.zeros((n, sets, g), dtype=np.int8)
        self.has = ((np.arange(sets)[:, None] >> np.arange(g)[None, :]) & 1).astype(bool)
        self.without = [np.flatnonzero(~self.has[:, q] & (np.arange(sets) > 0)) for q in range(g)]
        self.starts = [i for i in range(1, n) if problem.can_cut_after(i - 1)]
        self.starts_np = np.array(self.starts, dtype=np.int64)

    def fill(self) -> None:
        n = self.p.num_units
        for j in range(n):
            if j == n - 1 or self.p.can_cut_after(j):
                for gpu in range(self.p.num_gpus):
                    self._end_stage(j, gpu)
                if j < n - 1:
                    self._hand_off(j)

    def _end_stage(self, j: int, gpu: int) -> None:
        """Best ways to finish a stage on ``gpu`` at unit ``j``: f[j, *, gpu]."""
        p, bit = self.p, 1 << gpu
        cap, need_j = p.capacity_bytes[gpu], self.prefix_m[j + 1] + p.stage_overhead_bytes
        whole = p.shared_bytes if j == p.num_units - 1 else 0
        if need_j - whole <= cap:
            self.f[j, bit, gpu] = self.prefix_t[j + 1, gpu]
        lowest = max(1, bisect_left(self.prefix_m, need_j - cap))  # memory shrinks as i grows
        lo, hi = bisect_left(self.starts, lowest), bisect_right(self.starts, j)
        if lo >= hi:
            return
        idx = self.starts_np[lo:hi]
        stage = self.prefix_t[j + 1, gpu] - self.prefix_t[idx, gpu]
        cand = self.combine(self.h[idx - 1, :, gpu], stage[:, None])
        rows = cand.argmin(axis=0)
        best = cand[rows, np.arange(cand.shape[1])]
        src = self.without[gpu]
        self.f[j, src | bit, gpu] = best[src]
        self.start[j, src | bit, gpu] = idx[rows[src]]

    def _hand_off(self, j: int) -> None:
        both = self.combine(self.f[j][:, :, None], self.comm[None, :, :])
        self.prev[j] = both.argmin(axis=1)
        self.h[j] = np.where(self.has, np.inf, both.min(axis=1))

    def walk_back(self, used: int, gpu: int) -> tuple[StageAssignment, ...]:
        stages = []
        j = self.p.num_units - 1
        while True:
            first = int(self.start[j, used, gpu])
            stages.append(StageAssignment(gpu, first, j + 1))
            if first == 0:
                return tuple(reversed(stages))
            used ^= 1 << gpu
            gpu, j = int(self.prev[first - 1, used, gpu]), first - 1


def _gib(num_bytes: float) -> str:
    if abs(num_bytes) < GIB:
        return f"{num_bytes / (1 << 20):.1f} MiB"
    return f"{num_bytes / GIB:.2f} GiB"


def _describe(problem: Problem, first: int, end: int) -> str:
    names = problem.unit_names[first:end]
    return " + ".join(names) if len(names) <= 3 else f"{names[0]} .. {names[-1]}"


def _breakdown(problem: Problem, first: int, end: int) -> str:
    weights = sum(problem.weight_bytes[first:end])
    if first == 0 and end == problem.num_units:
        weights -= problem.shared_bytes
    parts = [f"{_gib(weights)} weights"]
    kv = sum(problem.kv_bytes[first:end])
    if kv:
        parts.append(f"{_gib(kv)} KV cache")
    if problem.stage_overhead_bytes:
        parts.append(f"{_gib(problem.stage_overhead_bytes)} activations")
    return " + ".join(parts)


def diagnose(problem: Problem) -> InfeasibleError:
    """Name the constraint that makes ``problem`` infeasible (call only when it is)."""
    largest = max(problem.capacity_bytes)
    bounds = [0, *(c for c in range(1, problem.num_units) if problem.can_cut_after(c - 1)),
              problem.num_units]
    for first, end in itertools.pairwise(bounds):
        need = problem.stage_bytes(first, end)
        if need > largest:
            what = _describe(problem, first, end)
            verb = "alone needs" if end - first == 1 else "together need"
            return InfeasibleError(
                f"{what} {verb} {_gib(need)} ({_breakdown(problem, first, end)}) but the "
                f"largest GPU has {_gib(largest)} free after headroom", "unit_memory")
    total_need = problem.stage_bytes(0, problem.num_units)
    total_free = sum(problem.capacity_bytes)
    if total_need > total_free:
        parts = _breakdown(problem, 0, problem.num_units)
        return InfeasibleError(
            f"the model needs {_gib(total_need)} in total ({parts}) "
            f"but all {problem.num_gpus} GPUs together have {_gib(total_free)} free after "
            f"headroom", "total_memory")
    return InfeasibleError(
        f"no split into contiguous stages fits: {_gib(total_need)} for one stage, "
        f"{_gib(total_free)} free after headroom over {problem.num_gpus} GPUs, but each extra "
        f"stage costs {_gib(problem.stage_overhead_bytes)} and layers cannot be divided to fill "
        f"every GPU", "packing")
