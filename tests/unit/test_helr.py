"""HELR's DP (router/placement/helr.py): equal to brute force on many seeded random instances, for
every mode and both objectives; feasible plans; the blend formula; topology awareness; and the
message naming the binding constraint when nothing fits."""

from __future__ import annotations

import math
import random

import pytest

from router.placement.helr import (
    GIB,
    MODE_WEIGHTS,
    OBJECTIVES,
    InfeasibleError,
    Problem,
    StageAssignment,
    blended_score,
    brute_force,
    evaluate,
    is_feasible,
    solve,
)

NUM_INSTANCES = 400


def random_problem(rng: random.Random) -> Problem:
    """A small instance: <= 8 units (<= 6 layers + embedding + head), <= 3 GPUs; memory tight
    enough that some need several GPUs and some do not fit at all."""
    n, g = rng.randint(1, 8), rng.randint(1, 3)
    weights = tuple(rng.randint(0, 10) for _ in range(n))
    kv = tuple(rng.randint(0, 3) for _ in range(n))
    times = tuple(tuple(rng.uniform(0.1, 2.0) for _ in range(g)) for _ in range(n))
    capacity = tuple(rng.randint(4, 60) for _ in range(g))
    comm = tuple(tuple(0.0 if a == b else rng.uniform(0.0, 1.0) for b in range(g))
                 for a in range(g))
    style = rng.random()
    if style < 0.3:
        cuts: tuple[bool, ...] = ()
    elif style < 0.6 or n < 3:
        cuts = tuple(rng.random() < 0.75 for _ in range(n - 1))
    else:  # the SGLang pattern: no cut after the embedding or before the head
        cuts = tuple(u not in (0, n - 2) for u in range(n - 1))
    shared = min(weights[0], weights[-1]) if n > 1 and rng.random() < 0.4 else 0
    return Problem(tuple(f"u{i}" for i in range(n)), weights, kv, times, capacity, comm,
                   stage_overhead_bytes=rng.randint(0, 3), shared_bytes=shared, cut_allowed=cuts)


def weights_for(rng: random.Random) -> list[float]:
    return [MODE_WEIGHTS["lr"], MODE_WEIGHTS["he"], MODE_WEIGHTS["helr"], rng.random()]


def test_dp_equals_brute_force_on_random_instances() -> None:
    rng = random.Random(20240611)
    solved = infeasible = 0
    for _ in range(NUM_INSTANCES):
        problem = random_problem(rng)
        for weight in weights_for(rng):
            for objective in OBJECTIVES:
                try:
                    expected = brute_force(problem, weight, objective)
                except InfeasibleError as exc:
                    with pytest.raises(InfeasibleError) as got:
                        solve(problem, weight, objective)
                    assert str(got.value) == str(exc)
                    infeasible += 1
                    continue
                got_sol = solve(problem, weight, objective)
                context = (problem, weight, objective)
                assert got_sol.score == pytest.approx(expected.score, rel=1e-9), context
                assert got_sol.latency_s == pytest.approx(expected.latency_s, rel=1e-9), context
                assert got_sol.num_gpus == expected.num_gpus, context
                assert got_sol.t_min_s == pytest.approx(expected.t_min_s, rel=1e-9), context
                assert [k for k, _ in got_sol.best_by_count] == \
                    [k for k, _ in expected.best_by_count], context
                for (_, a), (_, b) in zip(got_sol.best_by_count, expected.best_by_count,
                                          strict=True):
                    assert a == pytest.approx(b, rel=1e-9), context
                solved += 1
    assert solved > 1000 and infeasible > 100  # both kinds of instance were exercised


def test_dp_plans_are_feasible_and_report_their_own_cost() -> None:
    rng = random.Random(7)
    checked = 0
    for _ in range(NUM_INSTANCES):
        problem = random_problem(rng)
        for objective in OBJECTIVES:
            for weight in weights_for(rng):
                try:
                    sol = solve(problem, weight, objective)
                except InfeasibleError:
                    continue
                assert is_feasible(problem, sol.stages)
                assert evaluate(problem, sol.stages, objective) == pytest.approx(sol.latency_s)
                assert sol.score == pytest.approx(blended_score(
                    sol.latency_s, sol.num_gpus, sol.t_min_s, problem.num_gpus, weight))
                for st in sol.stages:
                    assert problem.stage_bytes(st.first, st.end) <= problem.capacity_bytes[st.gpu]
                checked += 1
    assert checked > 500


def uniform_problem(num_units: int, capacity: tuple[int, ...],
                    comm: tuple[tuple[float, ...], ...], time: float = 1.0) -> Problem:
    g = len(capacity)
    return Problem(tuple(f"u{i}" for i in range(num_units)), (10,) * num_units, (0,) * num_units,
                   tuple((time,) * g for _ in range(num_units)), capacity, comm)


def test_lr_takes_the_fast_link_and_he_takes_fewest_gpus() -> None:
    # 4 GPUs; only 0<->3 is a fast link. 6 units of 10 bytes; each GPU holds 30 (2 GPUs needed),
    # GPU 1 holds 60 (fits alone but runs 3x slower).
    slow, fast = 5.0, 0.01
    comm = tuple(tuple(0.0 if a == b else (fast if {a, b} == {0, 3} else slow) for b in range(4))
                 for a in range(4))
    base = uniform_problem(6, (30, 60, 30, 30), comm)
    times = tuple((1.0, 3.0, 1.0, 1.0) for _ in range(6))
    problem = Problem(base.unit_names, base.weight_bytes, base.kv_bytes, times,
                      base.capacity_bytes, comm)
    lr = solve(problem, MODE_WEIGHTS["lr"], "sum")
    assert {st.gpu for st in lr.stages} == {0, 3}
    assert lr.latency_s == pytest.approx(6.0 + fast)
    he = solve(problem, MODE_WEIGHTS["he"], "sum")
    assert he.stages == (StageAssignment(1, 0, 6),)
    assert he.latency_s == pytest.approx(18.0)
    assert dict(lr.best_by_count)[1] == pytest.approx(18.0)


def test_helr_weight_moves_between_lr_and_he() -> None:
    # bottleneck: one GPU takes 12, two take 6 (hand-off 0.01). J(1) = (1-w)*2 + w/2 and
    # J(2) = (1-w)*1 + w*1 cross at w = 2/3: two GPUs win below it, one above it.
    comm = ((0.0, 0.01), (0.01, 0.0))
    problem = Problem(("a", "b"), (1, 1), (0, 0), ((6.0, 6.0), (6.0, 6.0)), (2, 2), comm)
    assert solve(problem, 0.0, "bottleneck").num_gpus == 2
    assert solve(problem, 2 / 3 - 0.01, "bottleneck").num_gpus == 2
    assert solve(problem, 2 / 3 + 0.01, "bottleneck").num_gpus == 1
    assert solve(problem, 1.0, "bottleneck").num_gpus == 1
    sol = solve(problem, 0.5, "bottleneck")
    assert sol.num_gpus == 2
    assert sol.score == pytest.approx(min(0.5 * 2 + 0.25, 0.5 + 0.5))


def test_blended_score_formula() -> None:
    assert blended_score(10.0, 2, 5.0, 8, 0.0) == pytest.approx(2.0)
    assert blended_score(10.0, 2, 5.0, 8, 1.0) == pytest.approx(0.25)
    assert blended_score(10.0, 2, 5.0, 8, 0.5) == pytest.approx(0.5 * 2.0 + 0.5 * 0.25)


def test_bottleneck_objective_balances_stages() -> None:
    # Sum: splitting only adds hand-off time, so one GPU; bottleneck: an even split halves it.
    comm = tuple(tuple(0.0 if a == b else 0.1 for b in range(2)) for a in range(2))
    problem = uniform_problem(6, (100, 100), comm)
    assert solve(problem, 0.0, "sum").num_gpus == 1
    sol = solve(problem, 0.0, "bottleneck")
    assert [(st.first, st.end) for st in sol.stages] == [(0, 3), (3, 6)]
    assert sol.latency_s == pytest.approx(3.0)


def test_no_cut_where_cut_allowed_is_false() -> None:
    comm = ((0.0, 0.0), (0.0, 0.0))
    cuts = (False, True, True, False)  # never right after unit 0 or right before unit 4
    problem = Problem(tuple("abcde"), (10,) * 5, (0,) * 5, ((1.0, 1.0),) * 5, (30, 30), comm,
                      cut_allowed=cuts)
    sol = solve(problem, 0.0, "bottleneck")
    assert [(st.first, st.end) for st in sol.stages] in ([(0, 2), (2, 5)], [(0, 3), (3, 5)])


def test_shared_bytes_only_saved_by_a_single_stage() -> None:
    # embedding and head 10 each, tied (shared 10): one stage needs 20 + 10 - 10 = 20.
    comm = ((0.0, 0.5), (0.5, 0.0))
    problem = Problem(("embedding", "layer 0", "lm_head"), (10, 10, 10), (0, 0, 0),
                      ((1.0, 1.0),) * 3, (20, 20), comm, shared_bytes=10)
    assert problem.stage_bytes(0, 3) == 20
    assert problem.stage_bytes(0, 2) == 20
    assert solve(problem, 0.0).num_gpus == 1


def test_unit_too_big_names_the_unit() -> None:
    names = ("embedding",) + tuple(f"layer {i}" for i in range(14)) + ("lm_head",)
    weights = [GIB] * 16
    weights[13] = int(3.1 * GIB)  # layer 12
    problem = Problem(names, tuple(weights), (0,) * 16, ((1.0, 1.0),) * 16,
                      (2 * GIB, GIB), ((0.0, 1.0), (1.0, 0.0)))
    with pytest.raises(InfeasibleError) as exc:
        solve(problem)
    assert exc.value.constraint == "unit_memory"
    assert str(exc.value).startswith("layer 12 alone needs 3.10 GiB")
    assert "largest GPU has 2.00 GiB free after headroom" in str(exc.value)


def test_group_that_cannot_be_split_is_named_together() -> None:
    cuts = (False, True, False)
    problem = Problem(("embedding", "layer 0", "layer 1", "lm_head"), (GIB,) * 4, (0,) * 4,
                      ((1.0,),) * 4, (int(1.5 * GIB),), ((0.0,),), cut_allowed=cuts)
    with pytest.raises(InfeasibleError, match=r"^embedding \+ layer 0 together need 2\.00 GiB"):
        solve(problem)


def test_total_memory_message() -> None:
    problem = Problem(tuple(f"layer {i}" for i in range(4)), (10 * GIB,) * 4, (GIB,) * 4,
                      ((1.0, 1.0),) * 4, (16 * GIB, 16 * GIB), ((0.0, 1.0), (1.0, 0.0)))
    with pytest.raises(InfeasibleError) as exc:
        solve(problem)
    assert exc.value.constraint == "total_memory"
    assert str(exc.value) == ("the model needs 44.00 GiB in total (40.00 GiB weights + "
                              "4.00 GiB KV cache) but all 2 GPUs together have 32.00 GiB free "
                              "after headroom")


def test_packing_message_when_parts_fit_but_no_split_does() -> None:
    # three units of 6 on two GPUs of 9: total 18 <= 18, but any split puts 12 on one GPU.
    problem = Problem(("a", "b", "c"), (6, 6, 6), (0, 0, 0), ((1.0, 1.0),) * 3, (9, 9),
                      ((0.0, 1.0), (1.0, 0.0)))
    with pytest.raises(InfeasibleError) as exc:
        solve(problem)
    assert exc.value.constraint == "packing"


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"weight_bytes": (1, -1)}, "weight_bytes[1]"),
    ({"kv_bytes": (0,)}, "kv_bytes"),
    ({"capacity_bytes": ()}, "capacity_bytes"),
    ({"unit_times": ((1.0,), (math.nan,))}, "unit_times[1][0]"),
    ({"comm_s": ((0.0,), (1.0,))}, "comm_s"),
    ({"cut_allowed": (True, True)}, "cut_allowed"),
    ({"stage_overhead_bytes": -1}, "stage_overhead_bytes"),
])
def test_problem_validation_names_the_field(kwargs: dict[str, object], field: str) -> None:
    fields: dict[str, object] = {
        "unit_names": ("a", "b"), "weight_bytes": (1, 1), "kv_bytes": (0, 0),
        "unit_times": ((1.0,), (1.0,)), "capacity_bytes": (10,), "comm_s": ((0.0,),)}
    fields.update(kwargs)
    with pytest.raises(ValueError, match=r"^" + field.replace("[", r"\[").replace("]", r"\]")):
        Problem(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(("weight", "objective", "field"),
                         [(1.5, "sum", "weight"), (True, "sum", "weight"),
                          (0.5, "max", "objective")])
def test_solver_rejects_bad_objective(weight: float, objective: str, field: str) -> None:
    problem = uniform_problem(2, (100,), ((0.0,),))
    with pytest.raises(ValueError, match=f"^{field}:"):
        solve(problem, weight, objective)
    with pytest.raises(ValueError, match=f"^{field}:"):
        brute_force(problem, weight, objective)


def test_large_instance_solves_and_is_consistent() -> None:
    # 82 units over 8 GPUs (Llama-70B shape): the DP answers, and its plan is feasible; 82 x 11
    # bytes do not fit on 3 GPUs of 300, so every count from 4 to 8 is feasible.
    rng = random.Random(3)
    n, g = 82, 8
    times = tuple(tuple(rng.uniform(0.9, 1.1) for _ in range(g)) for _ in range(n))
    comm = tuple(tuple(0.0 if a == b else rng.uniform(0.01, 0.1) for b in range(g))
                 for a in range(g))
    problem = Problem(tuple(f"u{i}" for i in range(n)), (10,) * n, (1,) * n, times,
                      (300,) * g, comm)
    for objective in OBJECTIVES:
        sol = solve(problem, 0.5, objective)
        assert is_feasible(problem, sol.stages)
        assert evaluate(problem, sol.stages, objective) == pytest.approx(sol.latency_s)
        assert [k for k, _ in sol.best_by_count] == list(range(4, 9))
