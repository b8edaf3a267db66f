"""The simulator's event loop with BanaServe's real control plane (scripts/sim/engine.py,
frontend.py, batching.py, rebalance.py): the real policies place requests, a PD split pays the
KV transfer, the real rebalancer's decisions change the instances, the real SLO-ODBS orders a
held queue differently from FCFS, and a seeded run is reproducible."""

from __future__ import annotations

import pytest

from router.batching.config import BatcherConfig
from router.batching.slo_odbs import BatchingConfig, ServiceModel
from router.policy.views import WorkerLoad
from router.rebalance.config import RebalanceConfig
from scripts.sim.costs import CostModel
from scripts.sim.engine import ClusterConfig, Engine
from scripts.sim.instance import Instance
from scripts.sim.rebalance import SimRebalancer
from scripts.sim.request import SimRequest


def model(**changes: object) -> CostModel:
    base = CostModel(
        name="t", num_layers=8, prefill_overhead_s=0.01, prefill_per_token_s=0.0005,
        prefill_attn_s=0.0, decode_overhead_s=0.02, decode_per_seq_s=0.001,
        decode_per_kv_token_s=0.0, kv_bytes_per_token=1000, layer_weight_bytes=10_000,
        activation_bytes_per_token=10, num_kv_heads=4, link_bytes_per_s=1e9,
        store_bytes_per_s=1e9, kv_pool_tokens=4096, max_running_requests=8,
        chunked_prefill_tokens=2048)
    return base.replace(**changes)


def reqs(spec: list[tuple[float, int, int]]) -> list[SimRequest]:
    return [SimRequest(i, at, p, o) for i, (at, p, o) in enumerate(spec)]


def test_round_robin_spreads_requests_evenly() -> None:
    sim = Engine(ClusterConfig(4, policy="round_robin"), model(),
                 reqs([(0.1 * i, 50, 5) for i in range(12)])).run()
    assert [x["served"] for x in sim.instances] == [3, 3, 3, 3]
    assert len(sim.requests) == 12


def test_load_aware_avoids_a_loaded_instance() -> None:
    spec = [(0.0, 100, 2000)] + [(1.0 + i, 50, 3) for i in range(6)]
    engine = Engine(ClusterConfig(3, policy="load_aware", seed=1), model(), reqs(spec))
    sim = engine.run()
    busy = next(r.instance for r in sim.requests if r.index == 0)
    assert all(r.instance != busy for r in sim.requests if r.index > 0)


def test_pd_split_pays_the_kv_transfer() -> None:
    slow = model(link_bytes_per_s=1e5)  # 200 tokens * 1000 B = 2 s over the link
    one = reqs([(0.0, 200, 10)])
    colocated = Engine(ClusterConfig(2), slow, one).run().requests[0]
    split = Engine(ClusterConfig(2, num_prefill=1), slow, reqs([(0.0, 200, 10)])).run()
    r = split.requests[0]
    assert r.instance == 1 and r.decode_instance == 1  # decoded on the decode instance
    assert r.ttft == pytest.approx(colocated.ttft)  # the first token comes from the prefill
    assert r.e2e is not None and colocated.e2e is not None
    assert r.e2e - colocated.e2e == pytest.approx(2.0, abs=0.05)


def test_rebalancer_decisions_are_applied() -> None:
    instances = [Instance(i, model()) for i in range(2)]
    reb = SimRebalancer(RebalanceConfig(compute_windows=2, transfer_bytes_per_s=1e9), instances)
    hot = WorkerLoad(num_running_reqs=8, num_waiting_reqs=4, max_running_requests=8,
                     max_total_num_tokens=4096, at=1.0)
    cold = WorkerLoad(max_running_requests=8, max_total_num_tokens=4096, at=1.0)
    assert not [d for d in reb.period(1.0, [hot, cold]) if d.is_action]
    actions = [d for d in reb.period(2.0, [hot, cold]) if d.is_action]
    assert [d.kind for d in actions] == ["migrate_layers"]
    start, end = actions[0].body["layers"]
    assert instances[0].local_fraction == pytest.approx(1 - (end - start) / 8)
    assert instances[0].helpers == {1: pytest.approx((end - start) / 8)}
    assert instances[0].free_at > 2.0  # paused while the layers move
    assert reb.status(0)["local_layers"] == list(range(start))


def test_head_offload_grows_the_hot_pool() -> None:
    instances = [Instance(i, model()) for i in range(2)]
    reb = SimRebalancer(RebalanceConfig(), instances)
    full = WorkerLoad(num_running_reqs=1, max_running_requests=8, token_usage=0.95,
                      max_total_num_tokens=4096, num_total_tokens=3900, at=1.0)
    empty = WorkerLoad(num_running_reqs=1, max_running_requests=8, max_total_num_tokens=4096,
                       at=1.0)
    actions = [d for d in reb.period(1.0, [full, empty]) if d.is_action]
    assert [d.kind for d in actions] == ["offload_heads"]
    assert instances[0].pool_tokens > 4096 and instances[1].pool_tokens < 4096
    assert instances[0].attn_fraction < 1.0


def test_rebalancer_runs_inside_the_engine() -> None:
    cfg = ClusterConfig(2, policy="round_robin",
                        rebalance=RebalanceConfig(period_s=0.5, compute_windows=1))
    # every other request is long, so round robin loads instance 0 far more than instance 1
    spec = [(0.05 * i, 50, 400 if i % 2 == 0 else 2) for i in range(40)]
    sim = Engine(cfg, model(max_running_requests=4), reqs(spec)).run()
    assert any(d["kind"] == "migrate_layers" for d in sim.decisions)
    assert len(sim.requests) == 40


def _batched(policy: str) -> list[int]:
    batching = BatcherConfig(
        batching=BatchingConfig(policy=policy, max_batch=1,
                                service=ServiceModel(step_s=0.02, prefill_tokens_per_s=1e5)),
        window_ms=0.0, slots_per_worker=1)
    spec = [SimRequest(0, 0.0, 10, 100, slo_s=60.0),  # takes the only slot for a while
            SimRequest(1, 0.1, 10, 200, slo_s=60.0),  # long and relaxed
            SimRequest(2, 0.2, 10, 5, slo_s=3.0)]  # short and urgent
    sim = Engine(ClusterConfig(1, batching=batching), model(), spec).run()
    assert len(sim.requests) == 3
    return sim.dispatch_order


def test_slo_odbs_orders_differently_from_fcfs() -> None:
    assert _batched("fcfs") == [0, 1, 2]
    assert _batched("slo-odbs") == [0, 2, 1]


def test_a_seeded_run_is_reproducible() -> None:
    spec = [(0.03 * i, 40 + 7 * i, 5 + i % 9) for i in range(60)]

    def ttfts(seed: int) -> list[float | None]:
        sim = Engine(ClusterConfig(3, policy="load_aware", seed=seed), model(), reqs(spec))
        return [r.ttft for r in sorted(sim.run().requests, key=lambda r: r.index)]

    assert ttfts(5) == ttfts(5)


def test_requests_longer_than_the_pool_are_rejected() -> None:
    sim = Engine(ClusterConfig(1), model(kv_pool_tokens=100), reqs([(0.0, 90, 20)])).run()
    assert not sim.requests and len(sim.rejected) == 1


def test_cluster_config_names_bad_fields() -> None:
    with pytest.raises(ValueError, match="ClusterConfig.num_prefill"):
        ClusterConfig(2, num_prefill=2)
    with pytest.raises(ValueError, match="ClusterConfig.num_instances"):
        ClusterConfig(0)
