"""The worker's queue order (``runtime_patches.slo_queue``) on fake requests: ``reorder`` admits in
``queue_order``'s order, in place; missing or bad per-request values fall back to the defaults;
the environment is validated; the patch is a registered wrap; the launcher wires the flag."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest

from router.batching.slo_odbs import POLICIES, BatchingConfig, Job, queue_order
from runtime_patches import SGLANG_VERSION, launch, slo_queue
from runtime_patches.launch import WorkerConfig, build_command
from runtime_patches.registry import PatchError
from runtime_patches.slo_queue import (
    ENV_DEFAULT_SLO_MS,
    ENV_MAX_BATCH,
    ENV_POLICY,
    ENV_STEP_MS,
    QueueConfig,
    QueueMemory,
    config_from_env,
    read_req,
    reorder,
)

NOW = 1000.0


def req(rid: str, arrival: float | None, slo_ms: Any = None, predicted: Any = None,
        max_new_tokens: int = 64, prompt_len: int = 10, **extra: Any) -> SimpleNamespace:
    """An object with the attributes of an SGLang 0.5.23 ``Req`` that the policy reads."""
    custom = {k: v for k, v in (("banaserve_slo_ms", slo_ms),
                                ("banaserve_predicted_len", predicted)) if v is not None}
    return SimpleNamespace(
        rid=rid, origin_input_ids=[1] * prompt_len,
        time_stats=SimpleNamespace(scheduler_recv_time=arrival or 0.0),
        sampling_params=SimpleNamespace(custom_params={**custom, **extra} or None,
                                        max_new_tokens=max_new_tokens))


def rids(queue: list[SimpleNamespace]) -> list[str]:
    return [r.rid for r in queue]


# Arrival order a..f; SLOs and lengths chosen so every policy orders them differently. At NOW,
# f (500 ms SLO, arrived 0.5 s ago) cannot make its deadline any more.
QUEUE_SPEC = [("a", 999.0, 60000, 200), ("b", 999.1, 4000, 30), ("c", 999.2, 20000, 120),
              ("d", 999.3, 3000, 10), ("e", 999.4, 9000, 400), ("f", 999.5, 500, 5)]


def queue() -> list[SimpleNamespace]:
    return [req(rid, at, slo, pred) for rid, at, slo, pred in QUEUE_SPEC]


def expected_order(cfg: QueueConfig, max_running: int | None) -> list[str]:
    jobs = [Job(id=rid, arrival_s=at, slo_s=slo / 1000.0, predicted_len=pred, prompt_len=10)
            for rid, at, slo, pred in QUEUE_SPEC]
    return [j.id for j in queue_order(jobs, NOW, cfg.batching(max_running))]


# -- reorder --------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "fcfs"])
@pytest.mark.parametrize("max_running", [1, 2, 8])
def test_order_matches_queue_order(policy: str, max_running: int) -> None:
    cfg = QueueConfig(policy=policy)
    waiting = queue()
    reorder(waiting, NOW, cfg, max_running_requests=max_running)
    assert rids(waiting) == expected_order(cfg, max_running)


def test_slo_odbs_runs_the_earliest_deadlines_first_and_lost_causes_last() -> None:
    waiting = queue()
    reorder(waiting, NOW, QueueConfig(policy="slo-odbs"), max_running_requests=1)
    assert rids(waiting) == ["d", "b", "e", "c", "a", "f"]


def test_reorder_is_in_place_and_keeps_every_request() -> None:
    waiting = queue()
    before = list(waiting)
    reorder(waiting, NOW, QueueConfig(policy="spf"))
    assert sorted(map(id, waiting)) == sorted(map(id, before))
    assert rids(waiting) == ["f", "d", "b", "c", "a", "e"]  # by predicted length


def test_fcfs_leaves_the_queue_alone() -> None:
    waiting = queue()
    reorder(waiting, NOW, QueueConfig(policy="fcfs"))
    assert rids(waiting) == [r for r, *_ in QUEUE_SPEC]


def test_repeated_rids_are_kept_apart() -> None:
    waiting = [req("x", 990.0, 60000, 100), req("x", 991.0, 1000, 5)]
    reorder(waiting, NOW + 0.1, QueueConfig(policy="spf"))
    assert [r.sampling_params.custom_params["banaserve_predicted_len"] for r in waiting] == [5, 100]


# -- defaults -------------------------------------------------------------------------------------
def test_missing_slo_uses_the_default_and_missing_prediction_uses_max_new_tokens() -> None:
    memory = QueueMemory()
    cfg = QueueConfig(policy="slo-odbs", default_slo_ms=7000.0)
    batching = cfg.batching(1)
    job = slo_queue.to_job(3, read_req(req("r", 990.0, max_new_tokens=17)), NOW, cfg, batching,
                           memory)
    assert (job.id, job.slo_s, job.predicted_len, job.prompt_len) == ("3", 7.0, 17, 10)


def test_the_default_slo_decides_the_order_of_requests_without_one() -> None:
    # "late" carries no SLO: with a tight default it runs first, with a loose one last.
    def run(default_ms: float) -> list[str]:
        waiting = [req("early", 990.0, 20000, 10), req("late", 995.0, None, 10)]
        reorder(waiting, NOW, QueueConfig(policy="slo-odbs", default_slo_ms=default_ms),
                max_running_requests=1)
        return rids(waiting)

    assert run(10000.0) == ["late", "early"]
    assert run(600000.0) == ["early", "late"]


@pytest.mark.parametrize("bad", [-5, "fast", True, float("nan"), [1]])
def test_unusable_values_fall_back_with_one_warning_per_request(
        bad: Any, caplog: pytest.LogCaptureFixture) -> None:
    memory = QueueMemory()
    cfg = QueueConfig(policy="slo-odbs", default_slo_ms=5000.0)
    facts = read_req(req("r", 990.0, slo_ms=bad, predicted=bad, max_new_tokens=9))
    with caplog.at_level(logging.WARNING, logger="runtime_patches.slo_queue"):
        for _ in range(3):
            job = slo_queue.to_job(0, facts, NOW, cfg, cfg.batching(1), memory)
    assert (job.slo_s, job.predicted_len) == (5.0, 9)
    assert len(caplog.records) == 1 and "request r" in caplog.text


def test_receive_time_is_the_arrival() -> None:
    job = slo_queue.to_job(0, read_req(req("r", 990.5, 1000, 4)), NOW, QueueConfig("spf"),
                           BatchingConfig(policy="spf"), QueueMemory())
    assert job.arrival_s == 990.5


def test_without_a_receive_time_the_first_sighting_counts_and_is_forgotten_on_leaving() -> None:
    memory = QueueMemory()
    cfg = QueueConfig(policy="slo-odbs")
    a, b, c, d = (req(rid, None, 5000, 10) for rid in "abcd")
    waiting = [a, b]
    reorder(waiting, 100.0, cfg, memory=memory, max_running_requests=1)
    waiting.append(c)
    reorder(waiting, 101.0, cfg, memory=memory, max_running_requests=1)
    assert rids(waiting) == ["a", "b", "c"]  # equal SLOs: first seen, first served
    assert memory.arrival_s("a", 999.0) == 100.0 and memory.arrival_s("c", 999.0) == 101.0
    waiting = [c, d]  # a and b were admitted
    reorder(waiting, 102.0, cfg, memory=memory, max_running_requests=1)
    assert len(memory) == 2 and memory.arrival_s("c", 999.0) == 101.0


# -- configuration --------------------------------------------------------------------------------
def test_env_unset_means_fcfs() -> None:
    cfg = config_from_env({})
    assert cfg == QueueConfig() and not cfg.active


def test_env_values_reach_the_batching_config() -> None:
    cfg = config_from_env({ENV_POLICY: "slo-odbs", ENV_DEFAULT_SLO_MS: "1500",
                           ENV_MAX_BATCH: "3", ENV_STEP_MS: "7.5"})
    assert cfg.active and cfg.default_slo_ms == 1500.0
    batching = cfg.batching(max_running_requests=16)
    assert batching.policy == "slo-odbs" and batching.max_batch == 3
    assert batching.service.step_s == pytest.approx(0.0075)


def test_max_batch_defaults_to_the_worker_then_to_eight() -> None:
    cfg = config_from_env({ENV_POLICY: "s3"})
    assert cfg.batching(max_running_requests=5).max_batch == 5
    assert cfg.batching(None).max_batch == slo_queue.FALLBACK_MAX_BATCH == 8


@pytest.mark.parametrize(("name", "value", "message"), [
    (ENV_POLICY, "edf", "BANASERVE_QUEUE_POLICY='edf' is not one of"),
    (ENV_DEFAULT_SLO_MS, "soon", "BANASERVE_QUEUE_DEFAULT_SLO_MS='soon' is not a number"),
    (ENV_DEFAULT_SLO_MS, "0", "BANASERVE_QUEUE_DEFAULT_SLO_MS='0' must be > 0"),
    (ENV_MAX_BATCH, "2.5", "BANASERVE_QUEUE_MAX_BATCH='2.5' is not an integer"),
    (ENV_MAX_BATCH, "-1", "BANASERVE_QUEUE_MAX_BATCH='-1' must be > 0"),
    (ENV_STEP_MS, "nan", "BANASERVE_QUEUE_STEP_MS='nan' must be > 0"),
])
def test_bad_env_values_are_named(name: str, value: str, message: str) -> None:
    env = {ENV_POLICY: "slo-odbs", name: value}
    with pytest.raises(ValueError, match=message):
        config_from_env(env)


def test_bad_env_stops_the_patch_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_POLICY, "slo-odbs")
    monkeypatch.setenv(ENV_STEP_MS, "fast")
    with pytest.raises(PatchError, match=r"BANASERVE_QUEUE_STEP_MS='fast' is not a number; "
                                         r"refusing to start"):
        slo_queue._wrap_calc_priority(lambda self, queue, *a, **k: None)


# -- the wrapper ----------------------------------------------------------------------------------
def test_without_a_policy_sglang_method_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    def original(self: Any, queue: list[Any]) -> None: ...

    monkeypatch.delenv(ENV_POLICY, raising=False)
    assert slo_queue._wrap_calc_priority(original) is original
    monkeypatch.setenv(ENV_POLICY, "fcfs")
    assert slo_queue._wrap_calc_priority(original) is original


def test_wrapper_reorders_after_sglang_and_logs_the_policy_once(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    calls: list[list[str]] = []

    def original(self: Any, queue: list[Any], running_batch: Any = None,
                 processed_tokens: int = 0) -> None:
        calls.append(rids(queue))
        queue.reverse()  # SGLang's own sort runs first; the policy decides the final order

    monkeypatch.setenv(ENV_POLICY, "spf")
    monkeypatch.setenv(ENV_MAX_BATCH, "2")
    monkeypatch.setattr(slo_queue.time, "perf_counter", lambda: NOW)
    wrapped = slo_queue._wrap_calc_priority(original)
    waiting = queue()
    with caplog.at_level(logging.INFO, logger="runtime_patches.slo_queue"):
        wrapped(object(), waiting, None, processed_tokens=0)
        wrapped(object(), waiting, None, processed_tokens=0)
    assert calls[0] == [r for r, *_ in QUEUE_SPEC]
    assert rids(waiting) == ["f", "d", "b", "c", "a", "e"]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("queue policy:")]
    assert lines == ["queue policy: spf (max_batch 2, step 20.0 ms, default SLO 30000 ms)"]


def test_patch_is_a_registered_wrap_active_on_every_device(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime_patches import boot
    from runtime_patches.registry import REGISTRY

    monkeypatch.delenv("SGLANG_USE_CPU_ENGINE", raising=False)
    boot.install()
    (patch,) = [p for p in REGISTRY.patches() if p.name == "queue.slo_odbs_order"]
    assert patch.kind == "wrap" and patch.package == "sglang"
    assert patch.version == SGLANG_VERSION and patch.rationale
    assert patch.target == "sglang.srt.managers.schedule_policy:SchedulePolicy.calc_priority"
    assert patch.when()


# -- the launcher ---------------------------------------------------------------------------------
def worker(**overrides: Any) -> WorkerConfig:
    return WorkerConfig(model_path="/m", port=12345, device="cpu", **overrides)


def test_worker_config_validates_the_queue_fields() -> None:
    with pytest.raises(ValueError, match=r"WorkerConfig.queue_policy: 'edf' is not one of"):
        worker(queue_policy="edf")
    with pytest.raises(ValueError, match=r"WorkerConfig.queue_default_slo_ms: must be > 0"):
        worker(queue_default_slo_ms=0)
    with pytest.raises(ValueError, match=r"WorkerConfig.extra_env: \['BANASERVE_QUEUE_POLICY'\]"):
        worker(extra_env=((ENV_POLICY, "spf"),))


def test_build_command_sets_the_queue_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_POLICY, "spf")  # left over in the launching shell: overridden
    _, env = build_command(worker())
    assert env[ENV_POLICY] == "fcfs"
    _, env = build_command(worker(queue_policy="slo-odbs", queue_default_slo_ms=1500,
                                  extra_env=((ENV_STEP_MS, "8"),)))
    cfg = config_from_env(env)
    assert (cfg.policy, cfg.default_slo_ms, cfg.step_ms) == ("slo-odbs", 1500.0, 8.0)


def test_cli_flag_reaches_the_parser() -> None:
    args, _ = launch._parse(["--port", "36001", "--queue-policy", "slo-odbs",
                             "--queue-default-slo-ms", "2500"])
    assert args.queue_policy == "slo-odbs" and args.queue_default_slo_ms == 2500.0
    defaults, _ = launch._parse(["--port", "36001"])
    assert defaults.queue_policy == "fcfs" and defaults.queue_default_slo_ms == 30000.0
    with pytest.raises(SystemExit):
        launch._parse(["--port", "36001", "--queue-policy", "edf"])
