"""Pipeline parallelism in the launcher: ``WorkerConfig.pp_size`` / ``pp_layer_partition``
validation, the argv and environment ``build_command`` makes of them, and the CLI flags."""

from __future__ import annotations

import os

import pytest

from runtime_patches import launch
from runtime_patches.cpu.pipeline import LOG_PREFIX, format_owned_layers
from runtime_patches.launch import (
    PP_PARTITION_ENV,
    WorkerConfig,
    build_command,
    format_cpus,
    parse_cpus,
    parse_partition,
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SGLANG_USE_CPU_ENGINE", "SGLANG_CPU_OMP_THREADS_BIND", PP_PARTITION_ENV):
        monkeypatch.delenv(name, raising=False)


def cfg(**overrides: object) -> WorkerConfig:
    fields: dict[str, object] = {"model_path": "/m", "port": 12345, "device": "cpu", **overrides}
    return WorkerConfig(**fields)  # type: ignore[arg-type]


# -- validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -1])
def test_pp_size_below_one_is_rejected(bad: int) -> None:
    with pytest.raises(ValueError, match=r"WorkerConfig.pp_size: must be >= 1, got " + str(bad)):
        cfg(pp_size=bad)


def test_partition_length_must_equal_pp_size() -> None:
    with pytest.raises(ValueError, match=r"pp_layer_partition: \(1, 3\) has 2 entries, pp_size "
                                         r"is 3"):
        cfg(pp_size=3, pp_layer_partition=(1, 3))
    with pytest.raises(ValueError, match="has 2 entries, pp_size is 1"):
        cfg(pp_layer_partition=(2, 2))


@pytest.mark.parametrize("partition", [(0, 4), (3, -1)])
def test_every_rank_needs_at_least_one_layer(partition: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="fewer than 1 layer"):
        cfg(pp_size=2, pp_layer_partition=partition)


@pytest.mark.parametrize("args", [("--pp-size", "2"), ("--pipeline-parallel-size", "2"),
                                  ("--pp-size=2",)])
def test_pp_flags_in_extra_args_are_rejected(args: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="WorkerConfig.extra_args: .* use pp_size instead"):
        cfg(extra_args=args)


def test_partition_in_extra_env_is_rejected() -> None:
    with pytest.raises(ValueError, match=f"WorkerConfig.extra_env: {PP_PARTITION_ENV}"):
        cfg(pp_size=2, extra_env=((PP_PARTITION_ENV, "1,3"),))


def test_valid_plans_are_accepted() -> None:
    assert cfg(pp_size=2, pp_layer_partition=(1, 3)).pp_layer_partition == (1, 3)
    assert cfg(pp_size=2).pp_layer_partition is None
    assert cfg(pp_size=1, pp_layer_partition=(4,)).pp_size == 1


# -- build_command ------------------------------------------------------------------------------
def test_single_rank_adds_no_pp_flag_and_drops_an_inherited_partition(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PP_PARTITION_ENV, "2,2")  # left over in the launching shell
    argv, env = build_command(cfg(cpus="0"))
    assert "--pp-size" not in argv
    assert PP_PARTITION_ENV not in env
    assert env["SGLANG_CPU_OMP_THREADS_BIND"] == "0"


def test_planned_partition_becomes_pp_size_and_env() -> None:
    argv, env = build_command(cfg(pp_size=2, pp_layer_partition=(1, 3), cpus="0-1"))
    assert argv[argv.index("--pp-size") + 1] == "2"
    assert argv.count("--pp-size") == 1
    assert env[PP_PARTITION_ENV] == "1,3"
    # one "|" group per rank, each rank on the worker's whole core set
    assert env["SGLANG_CPU_OMP_THREADS_BIND"] == "0-1|0-1"
    assert env["OMP_NUM_THREADS"] == "2"


def test_even_split_leaves_the_partition_to_sglang(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PP_PARTITION_ENV, "1,3")
    _, env = build_command(cfg(pp_size=2))
    assert PP_PARTITION_ENV not in env


def test_pp_without_cpus_binds_each_rank_to_the_usable_cores() -> None:
    _, env = build_command(cfg(pp_size=3))
    groups = env["SGLANG_CPU_OMP_THREADS_BIND"].split("|")
    assert len(groups) == 3 and len(set(groups)) == 1
    usable = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    if usable is not None:
        assert parse_cpus(groups[0]) == usable


def test_cuda_pp_gets_the_flag_and_env_but_no_cpu_binding() -> None:
    argv, env = build_command(cfg(device="cuda", pp_size=4, pp_layer_partition=(8, 8, 8, 6)))
    assert argv[argv.index("--pp-size") + 1] == "4"
    assert env[PP_PARTITION_ENV] == "8,8,8,6"
    assert "SGLANG_CPU_OMP_THREADS_BIND" not in env


# -- helpers and CLI ----------------------------------------------------------------------------
@pytest.mark.parametrize(("cores", "spec"), [([0], "0"), ([0, 1, 2, 3, 6], "0-3,6"),
                                             ([1, 3, 4], "1,3-4")])
def test_format_cpus_round_trips_with_parse_cpus(cores: list[int], spec: str) -> None:
    assert format_cpus(cores) == spec
    assert parse_cpus(spec) == cores


def test_parse_partition() -> None:
    assert parse_partition("1,3") == (1, 3)
    assert parse_partition(" 2, 2 ") == (2, 2)
    with pytest.raises(ValueError, match="'1;3' is not a comma-separated list"):
        parse_partition("1;3")


def test_cli_flags_reach_the_worker_config() -> None:
    args, extra = launch._parse(["--port", "36001", "--pp-size", "2",
                                 "--pp-layer-partition", "1,3", "--", "--log-level", "warning"])
    assert args.pp_size == 2 and parse_partition(args.pp_layer_partition) == (1, 3)
    assert extra == ["--log-level", "warning"]
    defaults, _ = launch._parse(["--port", "36001"])
    assert defaults.pp_size == 1 and defaults.pp_layer_partition is None


def test_rank_report_line_is_parseable() -> None:
    line = format_owned_layers(1, 2, 1, 4, 4, 3)
    assert line == f"{LOG_PREFIX} rank 1 of 2 owns layers [1, 4) of 4 (3 built)"


def test_rank_report_is_a_registered_cpu_only_wrap() -> None:
    from runtime_patches import SGLANG_VERSION, boot
    from runtime_patches.registry import REGISTRY

    boot.install()
    (patch,) = [p for p in REGISTRY.patches() if p.name == "cpu.pp_log_owned_layers"]
    assert patch.kind == "wrap" and patch.version == SGLANG_VERSION and patch.rationale
    assert patch.target.endswith("layer_setup:resolve_layer_indices")
    assert not patch.when()  # the autouse fixture unset SGLANG_USE_CPU_ENGINE: inactive off CPU
