"""The simulator's cost model and one simulated instance (scripts/sim/costs.py, instance.py):
step arithmetic, the layer-wise pipelined store load, the least-squares fit, and SGLang-like
scheduling: KV-pool admission, prefill priority, chunked prefill, prefix-cache hits, decode
timing and the overlap scheduler's one-step lag."""

from __future__ import annotations

import pytest

from scripts.sim.costs import CostModel, fit_profile, load_profile, profile_names
from scripts.sim.instance import BlockCache, Instance, chain_keys
from scripts.sim.request import SimRequest


def model(**changes: object) -> CostModel:
    base = CostModel(
        name="t", num_layers=4, prefill_overhead_s=0.01, prefill_per_token_s=0.001,
        prefill_attn_s=0.0, decode_overhead_s=0.02, decode_per_seq_s=0.001,
        decode_per_kv_token_s=0.0, kv_bytes_per_token=100, layer_weight_bytes=1000,
        activation_bytes_per_token=10, num_kv_heads=4, link_bytes_per_s=1e6,
        store_bytes_per_s=1e6, kv_pool_tokens=1000, max_running_requests=4,
        chunked_prefill_tokens=256, overlap_schedule=False)
    return base.replace(**changes)


def req(index: int, prompt: int, out: int, blocks: tuple[int, ...] = (), at: float = 0.0,
        block: int = 16) -> SimRequest:
    return SimRequest(index, at, prompt, out, blocks, block)


# -- costs -------------------------------------------------------------------------------------
def test_prefill_and_decode_arithmetic() -> None:
    c = model(prefill_attn_s=1e-6, decode_per_kv_token_s=1e-5)
    assert c.prefill_s([100, 50], [100, 150]) == pytest.approx(
        0.01 + 0.001 * 150 + 1e-6 * (100 * 100 + 50 * 150))
    assert c.prefill_s([], []) == 0.0
    assert c.decode_s(3, 300) == pytest.approx(0.02 + 0.003 + 0.003)
    assert c.decode_s(0, 0) == 0.0


def test_store_load_is_pipelined_not_summed() -> None:
    c = model()
    # 100 tokens * 100 B / 1e6 B/s = 10 ms of transfer against 40 ms of compute, 4 layers:
    # max(40, 10) + 10 / 4 = 42.5 ms, so 2.5 ms extra (the sum would add 10 ms)
    assert c.store_load_s(100, 0.040) == pytest.approx(0.0025)
    assert c.store_load_s(0, 0.040) == 0.0
    assert c.transfer_s(2e6) == pytest.approx(2.0)
    assert c.migration_bytes(2, 40) == pytest.approx(2 * (1000 + 40 * 100 / 4))


def test_cost_model_validates_fields() -> None:
    with pytest.raises(ValueError, match="CostModel.num_layers"):
        model(num_layers=0)
    with pytest.raises(ValueError, match="CostModel.prefill_per_token_s"):
        model(prefill_per_token_s=-1.0)


def test_named_profiles_load() -> None:
    assert {"llama13b_a100", "llama13b_h100", "cpu_smollm2"} <= set(profile_names())
    a100, h100 = load_profile("llama13b_a100"), load_profile("llama13b_h100")
    assert a100.kv_bytes_per_token == 2 * 40 * 5120 * 2 and a100.num_layers == 40
    assert h100.decode_overhead_s < a100.decode_overhead_s  # more HBM bandwidth


def test_fit_recovers_known_coefficients() -> None:
    truth = model(prefill_attn_s=2e-7, decode_per_kv_token_s=3e-6)
    raw = {"request_overhead_s": 0.002,
           "prefill": [{"tokens": n, "latency_s": 0.002 + truth.prefill_s([n], [n])}
                       for n in (16, 64, 128, 512, 1024)],
           "decode": [{"batch": b, "kv_tokens": kv, "step_s": truth.decode_s(b, kv)}
                      for b in (1, 2, 4, 8) for kv in (100 * b, 600 * b)]}
    fitted = fit_profile(raw, model())
    assert fitted.prefill_per_token_s == pytest.approx(0.001, rel=1e-6)
    assert fitted.prefill_attn_s == pytest.approx(2e-7, rel=1e-4)
    assert fitted.decode_per_kv_token_s == pytest.approx(3e-6, rel=1e-6)
    assert fitted.request_overhead_s == 0.002
    assert fitted.kv_bytes_per_token == model().kv_bytes_per_token  # no "served": base's bytes
    # The worker's served dtype and byte counts (from /banaserve/status) replace the base's.
    f32 = fit_profile({**raw, "served": {"dtype": "float32", "kv_bytes_per_token": 46080,
                                         "layer_weight_bytes": 14155776}},
                      model(dtype="bfloat16", activation_bytes_per_token=1152))
    assert (f32.dtype, f32.kv_bytes_per_token, f32.layer_weight_bytes,
            f32.activation_bytes_per_token) == ("float32", 46080, 14155776, 2304)
    assert f32.prefill_per_token_s == fitted.prefill_per_token_s


# -- instance ----------------------------------------------------------------------------------
def run_until_idle(inst: Instance, now: float = 0.0) -> float:
    while inst.has_work:
        duration = inst.start_step(now)
        assert duration is not None
        now += duration
        inst.finish_step(now)
    return now


def test_admission_respects_the_kv_pool() -> None:
    inst = Instance(0, model(kv_pool_tokens=300))
    a, b = req(0, 100, 100), req(1, 100, 100)
    inst.enqueue(a, 0.0)
    inst.enqueue(b, 0.0)
    inst.admit()
    assert inst.running == [a] and list(inst.waiting) == [b]  # 200 + 200 > 300
    run_until_idle(inst)
    assert a.finish_s is not None and b.finish_s is not None
    assert b.first_token_s is not None and b.first_token_s >= a.finish_s


def test_admission_respects_max_running_requests() -> None:
    inst = Instance(0, model(max_running_requests=2))
    for i in range(3):
        inst.enqueue(req(i, 10, 5), 0.0)
    inst.admit()
    assert len(inst.running) == 2 and len(inst.waiting) == 1


def test_prefill_has_priority_over_decode() -> None:
    inst = Instance(0, model())
    first = req(0, 32, 10)
    inst.enqueue(first, 0.0)
    now = inst.start_step(0.0) or 0.0
    inst.finish_step(now)  # first is prefilled and decoding
    second = req(1, 32, 10)
    inst.enqueue(second, now)
    inst.start_step(now)
    assert inst.plan is not None and inst.plan.kind == "prefill"
    assert [r for r, _ in inst.plan.chunks] == [second]


def test_long_prompts_are_chunked() -> None:
    inst = Instance(0, model(chunked_prefill_tokens=100))
    r = req(0, 250, 2)
    inst.enqueue(r, 0.0)
    kinds = []
    now = 0.0
    while inst.has_work:
        now += inst.start_step(now) or 0.0
        assert inst.plan is not None
        kinds.append((inst.plan.kind, inst.step_tokens()))
        inst.finish_step(now)
    assert kinds == [("prefill", 100), ("prefill", 100), ("prefill", 50), ("decode", 1)]


def test_prefix_cache_hit_reduces_prefill_time() -> None:
    inst = Instance(0, model())
    blocks = (7, 8, 9)
    cold, warm = req(0, 48, 1, blocks), req(1, 48, 1, blocks)
    inst.enqueue(cold, 0.0)
    t_cold = inst.start_step(0.0) or 0.0
    inst.finish_step(t_cold)
    inst.enqueue(warm, t_cold)
    t_warm = inst.start_step(t_cold) or 0.0
    assert warm.cached_tokens == 47  # 3 blocks of 16, the last prompt token is always computed
    assert t_warm == pytest.approx(0.01 + 0.001 * 1)
    assert t_cold == pytest.approx(0.01 + 0.001 * 48)


def test_global_store_hit_loads_instead_of_computing() -> None:
    store = BlockCache(100)
    a, b = Instance(0, model(), store=store), Instance(1, model(), store=store)
    first, second = req(0, 48, 1, (1, 2, 3)), req(1, 48, 1, (1, 2, 3))
    a.enqueue(first, 0.0)
    a.finish_step(a.start_step(0.0) or 0.0)
    b.enqueue(second, 0.0)
    duration = b.start_step(0.0) or 0.0
    assert second.cached_tokens == 0 and second.store_tokens == 47
    compute = 0.01 + 0.001
    transfer = 47 * 100 / 1e6
    assert duration == pytest.approx(max(compute, transfer) + min(compute, transfer) / 4)


def test_decode_step_timing() -> None:
    inst = Instance(0, model(decode_per_kv_token_s=1e-5))
    for i in range(3):
        inst.enqueue(req(i, 20, 5), 0.0)
    now = inst.start_step(0.0) or 0.0
    inst.finish_step(now)
    step = inst.start_step(now)
    kv = 3 * (20 + 1)
    assert step == pytest.approx(0.02 + 0.001 * 3 + 1e-5 * kv)


def test_overlap_schedule_admits_arrivals_one_step_later() -> None:
    inst = Instance(0, model(overlap_schedule=True))
    inst.enqueue(req(0, 16, 50), 0.0)
    now = inst.start_step(0.0) or 0.0
    inst.finish_step(now)
    step = inst.start_step(now) or 0.0  # a decode step starts at `now`
    late = req(1, 16, 5)
    inst.enqueue(late, now + step / 2)  # arrives during it
    inst.finish_step(now + step)
    inst.start_step(now + step)  # was decided when the last step started: no prefill yet
    assert inst.plan is not None and inst.plan.kind == "decode"
    assert late in inst.waiting


def test_chain_keys_stand_for_whole_prefixes() -> None:
    a, b = req(0, 48, 1, (1, 2, 3)), req(1, 48, 1, (9, 2, 3))
    assert chain_keys(a)[1:] != chain_keys(b)[1:]  # same block ids after a different start
    assert len(chain_keys(req(2, 40, 1, (1, 2, 3)))) == 2  # the partial last block is not kept


def test_delivery_lag_holds_tokens_while_steps_follow() -> None:
    from scripts.sim.engine import ClusterConfig, Engine

    lagged = model(delivery_lag_steps=1)
    one = Engine(ClusterConfig(1), lagged, [req(0, 32, 4)]).run().requests[0]
    plain = Engine(ClusterConfig(1), model(), [req(0, 32, 4)]).run().requests[0]
    step = model().decode_s(1, 33)
    assert one.ttft == pytest.approx(plain.ttft + step)  # handed out after the next step
    assert one.e2e == pytest.approx(plain.e2e)  # the last token: nothing runs after it


def test_helr_places_llama13b_on_a_pair_of_40g_gpus() -> None:
    from router.placement.helr import InfeasibleError
    from scripts.sim.placement import HelrSpec, helr_costs

    base = load_profile("llama13b_a100")
    one, one_plan = helr_costs(base, HelrSpec(num_gpus=1, batch_size=8))
    pair, pair_plan = helr_costs(base, HelrSpec(num_gpus=2))
    assert one_plan["stages"] == 1 and pair_plan["stages"] == 2
    assert sum(pair_plan["partition"]) == 40
    assert pair.kv_pool_tokens > 3 * one.kv_pool_tokens  # the point of the second GPU
    assert pair.decode_overhead_s > base.decode_overhead_s  # one hand-off per step
    with pytest.raises(InfeasibleError):
        helr_costs(base, HelrSpec(num_gpus=2, gpu_memory_gb=16))
