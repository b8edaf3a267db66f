"""The rebalancer (``--rebalance``): the planner on scripted load patterns, status parsing, the
config, and the loop and the whole router against fake workers on port 0."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from router.__main__ import parse_args
from router.app import create_app
from router.config import HealthConfig, RouterConfig
from router.metrics import RouterMetrics
from router.policy.views import WorkerLoad
from router.rebalance.config import RebalanceConfig
from router.rebalance.decide import Decision, Planner
from router.rebalance.loop import Rebalancer
from router.rebalance.signals import (
    Ewma,
    HeadOffload,
    InstanceSignals,
    LayerRange,
    StatusError,
    WorkerStatus,
    compute_util,
    parse_status,
)
from router.workers import WorkerPool

A, B, C = "http://a:1", "http://b:2", "http://c:3"
HOSTS = {A: "ha:7101", B: "hb:7101", C: "hc:7101"}


def status(url: str, num_layers: int = 32, ranges: tuple[LayerRange, ...] = (),
           offloads: tuple[HeadOffload, ...] = (), targets: dict[str, str] | None = None,
           **kw: Any) -> WorkerStatus:
    """Each worker reaches every other worker's layer host as ``to<letter>``."""
    migrated = {i for r in ranges for i in range(r.start, r.end)}
    if targets is None:
        targets = {f"to{u[7]}": h for u, h in HOSTS.items() if u != url}
    fields: dict[str, Any] = dict(num_kv_heads=8, num_q_heads=32, pool_tokens=1000,
                                  base_pool_tokens=1000, capacity_tokens=1000,
                                  bytes_per_token=0, layer_weight_bytes=1_000_000)
    fields.update(kw)
    return WorkerStatus(num_layers=num_layers,
                        local_layer_ids=tuple(i for i in range(num_layers) if i not in migrated),
                        ranges=ranges, targets=tuple(sorted(targets.items())),
                        layer_host=HOSTS[url], offloads=offloads, **fields)


def sig(url: str, c: float = 0.0, kv: float = 0.0, st: WorkerStatus | None = None,
        healthy: bool = True) -> InstanceSignals:
    return InstanceSignals(url, healthy, c, kv, status=st or status(url))


def run(planner: Planner, pattern: list[list[InstanceSignals]], t0: float = 0.0,
        ) -> list[list[Decision]]:
    return [planner.observe(signals, t0 + i) for i, signals in enumerate(pattern)]


def actions(rounds: list[list[Decision]]) -> list[Decision]:
    return [d for r in rounds for d in r if d.is_action]


# -- the planner: layers ---------------------------------------------------------------------
def test_sustained_compute_gap_migrates_the_tail_layers() -> None:
    planner = Planner(RebalanceConfig(max_layer_fraction=0.5))
    rounds = run(planner, [[sig(A, 0.9), sig(B, 0.4)]] * 3)
    assert [actions(rounds[:i]) for i in (1, 2)] == [[], []]
    (d,) = rounds[2]
    # k = ceil(32 * 0.5 / (2 * 0.9)) = 9, the tail of the local layers
    assert (d.kind, d.worker, d.target, d.peer) == ("migrate_layers", A, "tob", B)
    assert d.body == {"layers": [23, 32], "target": "tob"}
    assert d.path == "/banaserve/migrate_layers"
    assert d.est_cost_ms == pytest.approx(10 + 9 * 1.0)
    assert "compute gap 0.50" in d.reason and "3 periods" in d.reason


def test_a_gap_for_only_two_periods_does_nothing() -> None:
    planner = Planner(RebalanceConfig())
    gap, calm = [sig(A, 0.9), sig(B, 0.1)], [sig(A, 0.5), sig(B, 0.4)]
    assert actions(run(planner, [gap, gap, calm, gap, gap])) == []


def test_migration_is_capped_at_a_quarter_of_the_layers() -> None:
    planner = Planner(RebalanceConfig())
    (d,) = actions(run(planner, [[sig(A, 1.0), sig(B, 0.0)]] * 3))
    assert d.body["layers"] == [24, 32]  # wanted 16, cap floor(32 * 0.25) = 8
    st = status(A, ranges=(LayerRange(24, 32, "tob"),))
    rounds = run(planner, [[sig(A, 1.0, st=st), sig(B, 0.0)]] * 5, t0=20)
    skips = [d for r in rounds for d in r]
    assert len(skips) == 1 and skips[0].kind == "skip"  # reported once, not every period
    assert "already has 8 of 32 layers migrated" in skips[0].reason


def test_cost_over_budget_reduces_k_then_skips() -> None:
    planner = Planner(RebalanceConfig(max_layer_fraction=0.5))
    st = status(A, layer_weight_bytes=20_000_000)  # 20 ms a layer at 1 GB/s, 10 ms overhead
    (d,) = actions(run(planner, [[sig(A, 0.9, st=st), sig(B, 0.4)]] * 3))
    assert d.body["layers"] == [28, 32]  # 9 wanted, floor((100 - 10) / 20) = 4 fit
    assert d.est_cost_ms == pytest.approx(90.0)
    planner = Planner(RebalanceConfig())
    st = status(A, layer_weight_bytes=200_000_000)
    rounds = run(planner, [[sig(A, 0.9, st=st), sig(B, 0.4)]] * 3)
    assert actions(rounds) == []
    assert "would take about 210 ms > budget 100 ms" in rounds[2][0].reason


def test_kv_in_use_counts_in_the_estimate() -> None:
    planner = Planner(RebalanceConfig(max_layer_fraction=0.5))
    # 1000 tokens x 32 kB over 32 local layers = 1 MB of KV a layer, plus 1 MB of weights
    st = status(A, bytes_per_token=32_000)
    (d,) = actions(run(planner, [[sig(A, 0.9, kv=1.0, st=st), sig(B, 0.4, kv=0.9)]] * 3))
    assert d.est_cost_ms == pytest.approx(10 + 9 * 2.0)


def test_tail_skips_layers_with_head_offloads() -> None:
    planner = Planner(RebalanceConfig(max_layer_fraction=0.5))
    st = status(A, offloads=(HeadOffload(1, (30, 31), (7,), "tob"),))
    (d,) = actions(run(planner, [[sig(A, 0.9, st=st), sig(B, 0.4)]] * 3))
    assert d.body["layers"] == [21, 30]


def test_hot_goes_to_the_coldest_reachable_worker_and_says_once_when_a_pair_is_unusable(
        ) -> None:
    planner = Planner(RebalanceConfig())
    # C is colder, but A has no target for C's layer host
    st = status(A, targets={"tob": HOSTS[B]})
    rounds = run(planner, [[sig(A, 0.9, st=st), sig(B, 0.3), sig(C, 0.0)]] * 3)
    skips = [d for r in rounds for d in r if not d.is_action]
    assert len(skips) == 1 and f"pair {A} -> {C} cannot be used" in skips[0].reason
    (d,) = actions(rounds)
    assert (d.worker, d.peer, d.target) == (A, B, "tob")


def test_cooldown_is_respected() -> None:
    planner = Planner(RebalanceConfig(cooldown_s=10))
    (first,) = actions(run(planner, [[sig(A, 0.9), sig(B, 0.1)]] * 3))
    assert first.body["layers"] == [24, 32]
    st = status(A, ranges=(LayerRange(30, 32, "tob"),))  # a smaller range, room left
    after = run(planner, [[sig(A, 0.9, st=st), sig(B, 0.1)]] * 12, t0=3.0)
    moves = [(i, d) for i, r in enumerate(after) for d in r if d.is_action]
    assert [i for i, _ in moves] == [9]  # t = 12 >= 2 + 10, once the gap held 3 more periods
    assert moves[0][1].body["layers"][1] == 30  # the tail continues below the migrated range


def test_busy_unhealthy_or_acting_workers_are_left_alone() -> None:
    for st in (status(A, pending_restore=((24, 32),)), status(A, pending_recall=(1,)),
               status(A, invalidating=True)):
        planner = Planner(RebalanceConfig())
        assert actions(run(planner, [[sig(A, 0.9, st=st), sig(B, 0.1)]] * 6)) == []
    planner = Planner(RebalanceConfig())
    assert actions(run(planner, [[sig(A, 0.9, healthy=False), sig(B, 0.1)]] * 6)) == []
    busy_cold = status(B, invalidating=True)
    assert actions(run(planner, [[sig(A, 0.9), sig(B, 0.1, st=busy_cold)]] * 6)) == []
    acting = dataclasses.replace(sig(A, 0.9), acting=True)
    assert actions(run(planner, [[acting, sig(B, 0.1)]] * 6)) == []
    no_status = InstanceSignals(A, True, 0.9, 0.0)
    assert actions(run(planner, [[no_status, sig(B, 0.1)]] * 6)) == []


def test_reverse_imbalance_brings_the_cold_workers_layers_home() -> None:
    planner = Planner(RebalanceConfig())
    st_b = status(B, ranges=(LayerRange(28, 32, "toa"),))  # B's layers run beside A
    (d,) = actions(run(planner, [[sig(A, 0.9), sig(B, 0.1, st=st_b)]] * 3))
    assert (d.kind, d.worker, d.peer, d.body) == ("restore_layers", B, A, {"layers": [28, 32]})


# -- the planner: heads ----------------------------------------------------------------------
def test_memory_pressure_offloads_the_last_kv_heads_on_every_free_local_layer() -> None:
    planner = Planner(RebalanceConfig())
    st = status(A, ranges=(LayerRange(28, 32, "tob"),),
                offloads=(HeadOffload(1, (0, 1), (7,), "tob"),))
    (d,) = planner.observe([sig(A, 0.5, kv=0.95, st=st), sig(B, 0.5, kv=0.3)], 0.0)
    # rho = (0.95 - 0.7) / 0.95 = 0.26; round(0.26 * 8) = 2 heads: 6 and 7
    assert (d.kind, d.worker, d.target, d.peer) == ("offload_heads", A, "tob", B)
    assert d.body == {"layers": list(range(2, 28)), "heads": [6, 7], "target": "tob"}


def test_head_count_is_clamped_to_leave_one_head() -> None:
    planner = Planner(RebalanceConfig(head_target_util=0.01, kv_low=0.005))
    (d,) = planner.observe([sig(A, kv=1.0, st=status(A, num_kv_heads=2)),
                            sig(B, kv=0.0)], 0.0)
    assert d.body["heads"] == [1]


def test_no_cold_peer_no_offload() -> None:
    planner = Planner(RebalanceConfig())
    assert actions(run(planner, [[sig(A, kv=0.95), sig(B, kv=0.7)]] * 4)) == []
    assert actions(run(planner, [[sig(A, kv=0.95)]] * 4)) == []
    unreachable = status(A, targets={})
    rounds = run(planner, [[sig(A, kv=0.95, st=unreachable), sig(B, kv=0.1)]] * 4)
    assert actions(rounds) == [] and len([d for r in rounds for d in r]) == 1


# -- the planner: undo -----------------------------------------------------------------------
def test_restore_after_five_balanced_periods_and_not_before() -> None:
    planner = Planner(RebalanceConfig())
    st = status(A, ranges=(LayerRange(24, 32, "tob"),))
    balanced = [sig(A, 0.5, st=st), sig(B, 0.45)]
    rounds = run(planner, [balanced] * 4 + [[sig(A, 0.7, st=st), sig(B, 0.45)]] + [balanced] * 5)
    (d,) = actions(rounds)
    assert rounds[-1] == [d]  # the streak restarted after the unbalanced period
    assert (d.kind, d.worker, d.body, d.target) == ("restore_layers", A, {"layers": [24, 32]},
                                                    "tob")


def test_recall_after_five_periods_of_low_projected_use() -> None:
    planner = Planner(RebalanceConfig())
    st = status(A, offloads=(HeadOffload(3, (0, 1, 2), (6, 7), "tob"),),
                capacity_tokens=2000, base_pool_tokens=1000)
    rounds = run(planner, [[sig(A, kv=0.25, st=st), sig(B, kv=0.2)]] * 5)
    (d,) = actions(rounds)
    assert rounds[4] == [d] and (d.kind, d.worker, d.body) == ("recall_heads", A, {"id": 3})
    assert "projected U_kv without head offloads 0.50" in d.reason


def test_no_recall_while_the_projected_use_is_high() -> None:
    planner = Planner(RebalanceConfig())
    st = status(A, offloads=(HeadOffload(3, (0, 1, 2), (6, 7), "tob"),),
                capacity_tokens=2000, base_pool_tokens=1000)
    # 0.35 looks low, but 0.35 x 2000 / 1000 = 0.7 once recalled: it would offload again
    assert actions(run(planner, [[sig(A, kv=0.35, st=st), sig(B, kv=0.2)]] * 10)) == []
    assert planner.projected_kv_util(sig(A, kv=0.35, st=st)) == pytest.approx(0.7)


# -- signals and status ----------------------------------------------------------------------
def test_compute_util_and_ewma() -> None:
    load = WorkerLoad(num_running_reqs=3, num_waiting_reqs=3, max_running_requests=4)
    assert compute_util(load) == 1.0
    assert compute_util(WorkerLoad(num_running_reqs=1, max_running_requests=4)) == 0.25
    assert compute_util(WorkerLoad(num_running_reqs=1)) == 1.0  # max_running unknown: 1 slot
    ewma = Ewma(0.3)
    assert ewma.update("a", 1.0) == 1.0
    assert ewma.update("a", 0.0) == pytest.approx(0.7)
    ewma.retain(set())
    assert ewma.update("a", 0.0) == 0.0


STATUS = {"num_layers": 4, "local_layers": [0, 1], "ranges": [{"layers": [2, 4], "target": "x",
                                                             "bytes": 10}],
          "targets": {"x": "127.0.0.1:7101"}, "layer_host": "127.0.0.1:7102",
          "heads": {"num_kv_heads": 3, "num_q_heads": 9,
                    "offloads": [{"id": 1, "layers": [0], "heads": [2], "target": "x"}]},
          "kv": {"pool_tokens": 10, "base_pool_tokens": 5, "capacity_tokens": 10,
                 "bytes_per_token": 64},
          "model": {"layer_weight_bytes": 1000}, "pending_restore": [], "pending_recall": [],
          "invalidating": False}


def test_parse_status() -> None:
    st = parse_status(STATUS)
    assert st.ranges == (LayerRange(2, 4, "x"),) and st.num_migrated_layers == 2
    assert st.offloads == (HeadOffload(1, (0,), (2,), "x"),) and st.num_offloaded_heads == 1
    assert st.target_for("http://127.0.0.1:7101/") == "x" and st.target_for("h:1") is None
    assert (st.layer_weight_bytes, st.capacity_tokens, st.busy) == (1000, 10, False)
    bare = parse_status({"num_layers": 4, "local_layers": [0, 1, 2, 3]})
    assert (bare.layer_host, bare.num_kv_heads, bare.layer_weight_bytes) == (None, 0, None)
    assert parse_status({**STATUS, "pending_recall": [1]}).busy


@pytest.mark.parametrize(("change", "field"), [
    ({"num_layers": "four"}, "num_layers"), ({"local_layers": None}, "local_layers"),
    ({"ranges": [{"layers": [3, 2], "target": "x"}]}, "ranges[].layers"),
    ({"targets": ["x"]}, "targets"), ({"kv": {"capacity_tokens": -1}}, "capacity_tokens"),
    ({"heads": {"offloads": [{"id": 1, "layers": [0], "heads": "2", "target": "x"}]}},
     "heads.offloads[].heads"), ({"layer_host": 7}, "layer_host")])
def test_malformed_status_names_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(StatusError, match=field.replace("[", r"\[").replace("]", r"\]")):
        parse_status({**STATUS, **change})
    with pytest.raises(StatusError, match="required"):
        parse_status({"local_layers": []})


# -- config and CLI --------------------------------------------------------------------------
@pytest.mark.parametrize(("change", "field"), [
    ({"period_s": 0}, "period_s"), ({"ewma_alpha": 1.5}, "ewma_alpha"),
    ({"compute_windows": 0}, "compute_windows"), ({"kv_low": 0.9}, "kv_low"),
    ({"head_target_util": 0.9}, "head_target_util"), ({"revert_gap": 0.5}, "revert_gap"),
    ({"max_layer_fraction": 0}, "max_layer_fraction"), ({"cooldown_s": -1}, "cooldown_s"),
    ({"transfer_bytes_per_s": 0}, "transfer_bytes_per_s")])
def test_config_errors_name_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"RebalanceConfig.{field}: .*got"):
        RebalanceConfig(**change)


def test_cli_flags_build_the_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_args(["--workers", A]).rebalance is None
    cfg = parse_args(["--workers", A, "--rebalance", "--rebalance-period", "0.5",
                      "--rebalance-compute-gap", "0.3", "--rebalance-compute-windows", "4",
                      "--rebalance-cooldown", "2", "--rebalance-dry-run"]).rebalance
    assert cfg == RebalanceConfig(period_s=0.5, compute_gap=0.3, compute_windows=4,
                                  cooldown_s=2.0, dry_run=True)
    for argv in (["--prefill", A, "--decode", B, "--rebalance"],
                 ["--workers", A, "--rebalance", "--rebalance-kv-low", "0.9"]):
        with pytest.raises(SystemExit):
            parse_args(argv)
        err = capsys.readouterr().err.strip()
        assert err.startswith("router: R") and "\n" not in err and "rebalance" in err.lower()


# -- against fake workers --------------------------------------------------------------------
class FakeWorker:
    """A worker with the control API: it applies the POSTs to its status and records them."""

    def __init__(self, name: str, peer: str) -> None:
        self.name, self.peer = name, peer
        self.load = {"num_running_reqs": 0, "num_waiting_reqs": 0, "token_usage": 0.0,
                     "max_running_requests": 8, "max_total_num_tokens": 1000}
        self.posts: list[tuple[str, dict[str, Any]]] = []
        self.refuse: int | None = None
        self.patched = True
        self.status: dict[str, Any] = {
            "num_layers": 8, "local_layers": list(range(8)), "ranges": [], "targets": {},
            "layer_host": None, "heads": {"num_kv_heads": 4, "num_q_heads": 16, "offloads": []},
            "kv": {"pool_tokens": 1000, "base_pool_tokens": 1000, "capacity_tokens": 1000,
                   "bytes_per_token": 100}, "model": {"layer_weight_bytes": 1000},
            "pending_restore": [], "pending_recall": [], "invalidating": False}
        self.app = web.Application()
        for path, answer in (
                ("/health", lambda: {}), ("/v1/loads", lambda: {"loads": [self.load]}),
                ("/model_info", lambda: {"served_model_name": "m", "model_path": "/nonexistent",
                                         "tokenizer_path": None}),
                ("/v1/models", lambda: {"object": "list",
                                        "data": [{"id": "m", "max_model_len": 4096}]})):
            self.app.router.add_get(path, self.answering(answer))
        self.app.router.add_get("/banaserve/status", self.get_status)
        self.app.router.add_post("/banaserve/{op}", self.control)
        self.url = ""

    @staticmethod
    def answering(answer: Callable[[], Any]) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.Response:
            return web.json_response(answer())

        return handle

    async def get_status(self, request: web.Request) -> web.Response:
        if not self.patched:
            raise web.HTTPNotFound()
        return web.json_response(self.status)

    async def control(self, request: web.Request) -> web.Response:
        op, body = request.match_info["op"], await request.json()
        self.posts.append((op, body))
        if self.refuse:
            return web.json_response({"error": "a flush is under way"}, status=self.refuse)
        st = self.status
        if op == "migrate_layers":
            s, e = body["layers"]
            st["ranges"].append({"layers": [s, e], "target": body["target"]})
            st["local_layers"] = [i for i in st["local_layers"] if not s <= i < e]
        elif op == "restore_layers":
            st["ranges"] = [r for r in st["ranges"] if r["layers"] != body["layers"]]
            st["local_layers"] = sorted({*st["local_layers"], *range(*body["layers"])})
        return web.json_response({"done": op})


@pytest.fixture
async def workers() -> AsyncIterator[tuple[FakeWorker, FakeWorker]]:
    pair = FakeWorker("a", "b"), FakeWorker("b", "a")
    runners = []
    for worker in pair:
        runner = web.AppRunner(worker.app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        worker.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    (a, b), hosts = pair, {"a": "127.0.0.1:7101", "b": "127.0.0.1:7102"}
    for worker, other in ((a, b), (b, a)):
        worker.status["layer_host"] = hosts[worker.name]
        worker.status["targets"] = {f"to{other.name}": hosts[other.name]}
    yield pair
    for runner in runners:
        await runner.cleanup()


async def stepper(pool: WorkerPool, session: aiohttp.ClientSession, cfg: RebalanceConfig,
                  ) -> tuple[Rebalancer, RouterMetrics, Callable[[], Any]]:
    metrics = RouterMetrics([pool])
    clock = [0.0]
    rebalancer = Rebalancer(cfg, pool, metrics, clock=lambda: clock[0])
    metrics.watch_rebalancer(lambda: rebalancer.signals)

    async def step() -> list[Decision]:
        for url in pool.urls:
            await pool.poll_load(session, url)
        decisions = await rebalancer.step(session)
        await rebalancer.wait_idle()
        clock[0] += 1.0
        return decisions

    return rebalancer, metrics, step


async def test_loop_posts_records_and_exports(workers: tuple[FakeWorker, FakeWorker],
                                              caplog: pytest.LogCaptureFixture) -> None:
    a, b = workers
    b.patched = False
    pool = WorkerPool((a.url, b.url), HealthConfig(), 0.05)
    cfg = RebalanceConfig(compute_windows=2, revert_windows=2, ewma_alpha=1.0, cooldown_s=0)
    async with aiohttp.ClientSession() as session, pool.running(session):
        rebalancer, metrics, step = await stepper(pool, session, cfg)
        a.load["num_running_reqs"] = 8
        with caplog.at_level(logging.WARNING, logger="router.rebalance.loop"):
            for _ in range(3):
                assert [d for d in await step() if d.is_action] == []  # b cannot receive
        notes = [r.getMessage() for r in caplog.records if "404" in r.getMessage()]
        assert len(notes) == 1 and b.url in notes[0]  # logged once, keeps serving
        b.patched = True
        await step()
        (decision,) = await step()
        assert a.posts == [("migrate_layers", {"layers": [6, 8], "target": "tob"})]
        assert decision.kind == "migrate_layers" and decision.peer == b.url
        state = rebalancer.describe()
        assert state["recent_decisions"][-1]["outcome"] == "ok"
        signals = {s["url"]: s for s in state["signals"]}
        assert signals[a.url]["compute_util"] == 1.0 and signals[b.url]["compute_util"] == 0.0
        await step()  # a's status now shows the range; the gauge follows
        text = metrics.render().decode()
        assert f'banaserve_rebalance_migrated_layers{{worker="{a.url}"}} 2.0' in text
        assert 'banaserve_rebalance_decisions_total{kind="migrate_layers",outcome="ok"} 1.0' \
            in text
        assert f'banaserve_rebalance_compute_util{{worker="{a.url}"}} 1.0' in text

        a.refuse, a.load["num_running_reqs"] = 409, 0
        for _ in range(2):
            await step()
        assert a.posts[-1] == ("restore_layers", {"layers": [6, 8]})
        last = rebalancer.describe()["recent_decisions"][-1]
        assert (last["outcome"], last["detail"]) == ("refused", "409: a flush is under way")
        assert 'outcome="refused"} 1.0' in metrics.render().decode()


async def test_a_worker_that_cannot_send_is_not_a_source_but_may_receive(
        workers: tuple[FakeWorker, FakeWorker], caplog: pytest.LogCaptureFixture) -> None:
    """A worker whose status says it can never move (it runs the hierarchical cache for the
    global KV store) is never asked to send, however hot; it is named once, keeps serving, and
    its layer host may still receive from others."""
    a, b = workers
    a.status["cannot_move"] = "layer migration cannot run with the hierarchical cache"
    pool = WorkerPool((a.url, b.url), HealthConfig(), 0.05)
    cfg = RebalanceConfig(compute_windows=1, ewma_alpha=1.0, cooldown_s=0)
    async with aiohttp.ClientSession() as session, pool.running(session):
        rebalancer, _, step = await stepper(pool, session, cfg)
        a.load["num_running_reqs"] = 8
        with caplog.at_level(logging.WARNING, logger="router.rebalance.loop"):
            for _ in range(3):
                assert [d for d in await step() if d.is_action] == []
        notes = [r.getMessage() for r in caplog.records if "cannot send" in r.getMessage()]
        assert len(notes) == 1 and a.url in notes[0] and "hierarchical cache" in notes[0]
        assert a.posts == [] and b.posts == []
        a.load["num_running_reqs"], b.load["num_running_reqs"] = 0, 8  # b hot: a receives
        await step()
        assert b.posts and b.posts[0][0] == "migrate_layers"
        assert b.posts[0][1]["target"] == "toa"


async def test_dry_run_decides_and_sends_nothing(workers: tuple[FakeWorker, FakeWorker]) -> None:
    a, b = workers
    pool = WorkerPool((a.url, b.url), HealthConfig(), 0.05)
    cfg = RebalanceConfig(compute_windows=1, ewma_alpha=1.0, dry_run=True)
    async with aiohttp.ClientSession() as session, pool.running(session):
        rebalancer, metrics, step = await stepper(pool, session, cfg)
        a.load["num_running_reqs"] = 8
        (decision,) = await step()
        assert decision.kind == "migrate_layers" and a.posts == [] and b.posts == []
        assert rebalancer.describe()["recent_decisions"][-1]["outcome"] == "dry_run"
        assert 'kind="migrate_layers",outcome="dry_run"} 1.0' in metrics.render().decode()


async def test_router_rebalances_and_serves_get_rebalance(
        workers: tuple[FakeWorker, FakeWorker]) -> None:
    a, b = workers
    cfg = RouterConfig(workers=(a.url, b.url), load_poll_interval_s=0.02,
                       health=HealthConfig(interval_s=0.05, timeout_s=1, failure_threshold=1),
                       rebalance=RebalanceConfig(period_s=0.05, compute_windows=2,
                                                 revert_windows=2, cooldown_s=0))
    runner = web.AppRunner(create_app(cfg))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    router = f"http://127.0.0.1:{runner.addresses[0][1]}"

    async def until(done: Callable[[], bool]) -> None:
        for _ in range(200):
            if done():
                return
            await asyncio.sleep(0.02)
        raise AssertionError("timed out")

    try:
        a.load["num_running_reqs"] = 8
        await until(lambda: bool(a.posts))
        assert a.posts == [("migrate_layers", {"layers": [6, 8], "target": "tob"})]
        a.load["num_running_reqs"] = 0
        await until(lambda: len(a.posts) == 2)
        assert a.posts[1] == ("restore_layers", {"layers": [6, 8]})
        async with aiohttp.ClientSession() as session:
            async with session.get(router + "/rebalance") as resp:
                assert resp.status == 200
                state = await resp.json()
            async with session.get(router + "/metrics") as resp:
                text = await resp.text()
        kinds = [(d["kind"], d["outcome"]) for d in state["recent_decisions"] if d["kind"]
                 != "skip"]
        assert kinds == [("migrate_layers", "ok"), ("restore_layers", "ok")]
        assert state["config"]["period_s"] == 0.05 and len(state["signals"]) == 2
        assert 'banaserve_rebalance_decisions_total{kind="restore_layers",outcome="ok"} 1.0' \
            in text
    finally:
        await runner.cleanup()
