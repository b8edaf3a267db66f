"""Pure configuration: ``runtime_patches.launch.build_command`` / ``WorkerConfig`` and
``router.config`` (URL normalisation and validation)."""

from __future__ import annotations

import os
from typing import Any

import pytest

from router.config import HealthConfig, RetryConfig, RouterConfig, normalize_url
from runtime_patches import launch
from runtime_patches.launch import WorkerConfig, build_command

CPU_FLAGS = ("--sleep-on-idle", "--max-total-tokens", "--max-running-requests",
             "--attention-backend", "--grammar-backend")


def flag_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SGLANG_USE_CPU_ENGINE", raising=False)
    monkeypatch.delenv("SGLANG_CPU_OMP_THREADS_BIND", raising=False)


# -- build_command ------------------------------------------------------------------------------
def test_cpu_command_has_the_cpu_flags_and_environment() -> None:
    argv, env = build_command(WorkerConfig(model_path="/models/x", port=12345, device="cpu",
                                           max_total_tokens=2048, max_running_requests=4,
                                           cpus="0-3"), python="/py")
    assert argv[:3] == ["/py", "-m", "sglang.launch_server"]
    assert flag_value(argv, "--model-path") == "/models/x"
    assert flag_value(argv, "--port") == "12345" and flag_value(argv, "--host") == "127.0.0.1"
    assert flag_value(argv, "--device") == "cpu"
    assert flag_value(argv, "--max-total-tokens") == "2048"
    assert flag_value(argv, "--max-running-requests") == "4"
    assert flag_value(argv, "--attention-backend") == "torch_native"
    for flag in CPU_FLAGS:
        assert flag in argv
    assert env["SGLANG_USE_CPU_ENGINE"] == "1"
    assert env["SGLANG_CPU_OMP_THREADS_BIND"] == "0-3"


def test_a_cpu_decode_worker_tolerates_a_slow_prefill_heartbeat(
        monkeypatch: pytest.MonkeyPatch) -> None:
    key = "SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE"
    monkeypatch.delenv(key, raising=False)
    for mode, want in (("decode", str(launch.CPU_PD_HEARTBEAT_MAX_FAILURE)), ("prefill", None)):
        _, env = build_command(WorkerConfig(
            model_path="/m", port=12345, device="cpu",
            extra_args=("--disaggregation-mode", mode)))
        assert env.get(key) == want
    _, env = build_command(WorkerConfig(model_path="/m", port=12345, device="cpu",
                                        extra_args=("--disaggregation-mode=decode",)))
    assert env[key] == str(launch.CPU_PD_HEARTBEAT_MAX_FAILURE)
    monkeypatch.setenv(key, "3")  # the operator's own setting wins
    _, env = build_command(WorkerConfig(model_path="/m", port=12345, device="cpu",
                                        extra_args=("--disaggregation-mode", "decode")))
    assert env[key] == "3"


def test_pd_workers_get_mooncake_tcp_queues_that_hold_a_burst(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Both roles get the larger queues (within Mooncake's bound of 65,535, above which it
    silently keeps its default); a worker outside PD keeps the environment as it was, and an
    operator's own value wins."""
    for name, _ in launch.MOONCAKE_TCP_QUEUES:
        monkeypatch.delenv(name, raising=False)
    for mode in ("prefill", "decode"):
        _, env = build_command(WorkerConfig(model_path="/m", port=12345, device="cpu",
                                            extra_args=("--disaggregation-mode", mode)))
        for name, value in launch.MOONCAKE_TCP_QUEUES:
            assert env[name] == value and 1 <= int(value) <= 65535
    _, env = build_command(WorkerConfig(model_path="/m", port=12345, device="cpu"))
    assert not any(name in env for name, _ in launch.MOONCAKE_TCP_QUEUES)
    monkeypatch.setenv("MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER", "4096")
    _, env = build_command(WorkerConfig(model_path="/m", port=12345, device="cpu",
                                        extra_args=("--disaggregation-mode", "prefill")))
    assert env["MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER"] == "4096"


def test_a_cpu_worker_stops_without_sglangs_gpu_crash_diagnostics(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """SGLang sleeps 5 s on every stop before a py-spy dump and a CUDA core dump unless both are
    off; CPU workers turn them off, GPU workers keep SGLang's default, an operator's value wins."""
    for name in launch.CPU_NO_CRASH_DIAGNOSTICS:
        monkeypatch.delenv(name, raising=False)
    _, env = build_command(WorkerConfig(model_path="/m", port=12345, device="cpu"))
    assert all(env[name] == "0" for name in launch.CPU_NO_CRASH_DIAGNOSTICS)
    _, env = build_command(WorkerConfig(model_path="/m", port=12345, device="cuda"))
    assert not any(name in env for name in launch.CPU_NO_CRASH_DIAGNOSTICS)
    monkeypatch.setenv("SGLANG_PYSPY_DUMP_BEFORE_CRASH", "1")
    _, env = build_command(WorkerConfig(model_path="/m", port=12345, device="cpu"))
    assert env["SGLANG_PYSPY_DUMP_BEFORE_CRASH"] == "1"


def test_cpu_command_defaults() -> None:
    """Without sizes or cpus: the default token budget, and no thread binding."""
    argv, env = build_command(WorkerConfig(model_path="/m", port=12345, device="cpu"))
    assert flag_value(argv, "--max-total-tokens") == "4096"
    assert env["SGLANG_USE_CPU_ENGINE"] == "1"
    assert "SGLANG_CPU_OMP_THREADS_BIND" not in env


def test_cuda_command_has_no_cpu_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "1")  # inherited from a CPU shell
    argv, env = build_command(WorkerConfig(model_path="/m", port=12345, device="cuda"))
    assert "--device" not in argv
    for flag in CPU_FLAGS:
        assert flag not in argv
    assert "SGLANG_USE_CPU_ENGINE" not in env


def test_optional_flags_follow_the_config() -> None:
    argv, _ = build_command(WorkerConfig(model_path="/m", port=12345, device="cuda",
                                         served_model_name="m", enable_metrics=False,
                                         extra_args=("--page-size", "64")))
    assert flag_value(argv, "--served-model-name") == "m"
    assert "--enable-metrics" not in argv
    assert argv[-2:] == ["--page-size", "64"]
    argv, _ = build_command(WorkerConfig(model_path="/m", port=12345, device="cuda"))
    assert "--enable-metrics" in argv and "--served-model-name" not in argv


@pytest.mark.parametrize("detected", ["cpu", "cuda"])
def test_auto_device_uses_the_detected_one(monkeypatch: pytest.MonkeyPatch,
                                           detected: str) -> None:
    monkeypatch.setattr(launch, "detect_device", lambda: detected)
    argv, env = build_command(WorkerConfig(model_path="/m", port=12345))
    assert ("--sleep-on-idle" in argv) == (detected == "cpu")
    assert ("SGLANG_USE_CPU_ENGINE" in env) == (detected == "cpu")


def test_build_command_does_not_touch_the_process_environment() -> None:
    build_command(WorkerConfig(model_path="/m", port=12345, device="cpu", cpus="0"))
    assert "SGLANG_USE_CPU_ENGINE" not in os.environ


# -- WorkerConfig -------------------------------------------------------------------------------
@pytest.mark.parametrize("port", [0, -1, 65536])
def test_worker_config_rejects_a_bad_port(port: int) -> None:
    with pytest.raises(ValueError, match=r"WorkerConfig\.port"):
        WorkerConfig(model_path="/m", port=port)


def test_worker_config_rejects_an_unknown_device() -> None:
    with pytest.raises(ValueError, match=r"WorkerConfig\.device: 'tpu'"):
        WorkerConfig(model_path="/m", port=12345, device="tpu")


@pytest.mark.parametrize("field", ["max_total_tokens", "max_running_requests"])
def test_worker_config_rejects_non_positive_sizes(field: str) -> None:
    with pytest.raises(ValueError, match=rf"WorkerConfig\..*{field}"):
        WorkerConfig(model_path="/m", port=12345, **{field: 0})  # type: ignore[arg-type]


def test_worker_config_url() -> None:
    assert WorkerConfig(model_path="/m", port=12345, host="0.0.0.0").url == "http://0.0.0.0:12345"


# -- router config ------------------------------------------------------------------------------
def test_router_config_normalises_worker_urls() -> None:
    cfg = RouterConfig(workers=("127.0.0.1:8000", "http://localhost:8001/", "https://h:9"))
    assert cfg.workers == ("http://127.0.0.1:8000", "http://localhost:8001", "https://h:9")


def test_router_config_requires_a_worker() -> None:
    with pytest.raises(ValueError, match="at least one worker"):
        RouterConfig(workers=())


@pytest.mark.parametrize("urls", [("127.0.0.1:8000", "127.0.0.1:8000"),
                                  ("127.0.0.1:8000", "http://127.0.0.1:8000/"),
                                  ("a:1", "http://a:1")])
def test_router_config_rejects_duplicates(urls: tuple[str, str]) -> None:
    with pytest.raises(ValueError, match="duplicate"):
        RouterConfig(workers=urls)


@pytest.mark.parametrize("url", ["localhost", "http://127.0.0.1", "ftp://h:21", "http://:80",
                                 "http://h:notaport", "http://h:70000"])
def test_router_config_rejects_a_bad_url(url: str) -> None:
    with pytest.raises(ValueError, match="must look like http://HOST:PORT"):
        RouterConfig(workers=(url,))


def test_bad_url_error_names_the_url() -> None:
    with pytest.raises(ValueError, match="'ftp://h:21'"):
        normalize_url("ftp://h:21")
    with pytest.raises(ValueError, match="'http://nohost' must look like http://HOST:PORT"):
        RouterConfig(workers=("http://nohost",))


@pytest.mark.parametrize("kwargs", [{"port": 70000}, {"load_poll_interval_s": 0},
                                    {"request_timeout_s": 0}, {"api_key": ""},
                                    {"connect_timeout_s": 0}])
def test_router_config_rejects_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RouterConfig(workers=("127.0.0.1:8000",), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs", [{"interval_s": 0}, {"timeout_s": -1},
                                    {"failure_threshold": 0}, {"success_threshold": 0}])
def test_health_config_rejects_bad_values(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="HealthConfig"):
        HealthConfig(**kwargs)  # type: ignore[arg-type]


def test_retry_backoff_doubles_up_to_the_cap_and_jitter_shrinks_it() -> None:
    retry = RetryConfig(initial_backoff_s=0.1, max_backoff_s=0.3, jitter=0.5)
    assert [retry.backoff_s(n, 0.0) for n in (1, 2, 3)] == pytest.approx([0.1, 0.2, 0.3])
    assert retry.backoff_s(1, 1.0) == pytest.approx(0.05)


# -- CPU pinning --------------------------------------------------------------------------------
@pytest.mark.parametrize(("spec", "cores"), [("0", [0]), ("0-3", [0, 1, 2, 3]),
                                             ("2,0", [0, 2]), ("0-1,1-2", [0, 1, 2])])
def test_cpu_lists_parse(spec: str, cores: list[int]) -> None:
    assert launch.parse_cpus(spec) == cores


@pytest.mark.parametrize("spec", ["", "a", "3-1", "-1", "0,,1"])
def test_bad_cpu_lists_are_rejected_with_the_spec(spec: str) -> None:
    with pytest.raises(ValueError, match="cpus"):
        WorkerConfig(model_path="/m", port=12345, device="cpu", cpus=spec)


def test_pinned_cpu_worker_sizes_its_thread_pool_to_its_cores() -> None:
    _, env = build_command(WorkerConfig(model_path="/m", port=12345, device="cpu", cpus="0-2"))
    assert env["OMP_NUM_THREADS"] == "3"


def test_pinned_worker_processes_run_only_on_their_cores() -> None:
    """The affinity set at start is inherited by the worker's child processes."""
    import subprocess
    import sys

    proc = launch.WorkerProcess(WorkerConfig(model_path="/m", port=12345, device="cpu",
                                             cpus="0"))
    assert proc.cpu_affinity() == [0]
    child = subprocess.run(
        [sys.executable, "-c", "import os, subprocess, sys; print(subprocess.run([sys.executable,"
         " '-c', 'import os; print(sorted(os.sched_getaffinity(0)))'], capture_output=True, "
         "text=True).stdout.strip())"],
        preexec_fn=lambda: os.sched_setaffinity(0, [0]), capture_output=True, text=True,
        check=True)
    assert child.stdout.strip() == "[0]"


# -- kvstore as the shared L3 -------------------------------------------------------------------
def test_kvstore_flag_selects_banaserve_storage_backend_before_user_args() -> None:
    argv, _ = build_command(WorkerConfig(model_path="/m", port=12345, device="cpu",
                                         kvstore="127.0.0.1:7000",
                                         extra_args=("--page-size", "16")))
    assert flag_value(argv, "--hicache-storage-backend") == "dynamic"
    assert '"kvstore_address": "127.0.0.1:7000"' in flag_value(argv,
                                                               "--hicache-storage-backend-extra-config")
    assert flag_value(argv, "--hicache-io-backend") == "direct"  # CPU engine
    assert argv[-2:] == ["--page-size", "16"]  # the user's flags come last and win


def test_bad_kvstore_address_is_rejected() -> None:
    with pytest.raises(ValueError, match="host:port"):
        WorkerConfig(model_path="/m", port=12345, kvstore="nohost")


def test_kvstore_layerwise_sets_its_environment_and_extra_env_is_passed() -> None:
    _, env = build_command(WorkerConfig(model_path="/m", port=12345, device="cpu",
                                        kvstore="127.0.0.1:7000", kvstore_layerwise=True,
                                        extra_env=(("BANASERVE_X", "1"),)))
    assert env["BANASERVE_KV_LAYERWISE"] == "1" and env["BANASERVE_X"] == "1"
    _, env = build_command(WorkerConfig(model_path="/m", port=12345, device="cpu",
                                        kvstore="127.0.0.1:7000"))
    assert "BANASERVE_KV_LAYERWISE" not in env


def test_kvstore_layerwise_needs_a_store_and_the_cpu_engine(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="needs kvstore"):
        WorkerConfig(model_path="/m", port=12345, kvstore_layerwise=True)
    with pytest.raises(ValueError, match="CPU engine only"):
        WorkerConfig(model_path="/m", port=12345, device="cuda", kvstore="127.0.0.1:7000",
                     kvstore_layerwise=True)
    monkeypatch.setattr(launch, "detect_device", lambda: "cuda")
    with pytest.raises(ValueError, match="CPU engine only"):
        build_command(WorkerConfig(model_path="/m", port=12345, kvstore="127.0.0.1:7000",
                                   kvstore_layerwise=True))


def test_launcher_cli_rejects_layerwise_without_a_store_in_one_line(
        tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    assert launch.main(["--model", str(tmp_path), "--port", "12345",
                        "--kvstore-layerwise"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("launch: ") and "needs kvstore" in err and "\n" not in err


def test_free_port_is_outside_the_ephemeral_range_and_never_repeats() -> None:
    """Outgoing connections take their local port from the ephemeral range, so a listening
    port picked there can be taken between the pick and the bind (EADDRINUSE)."""
    import socket

    lo, hi = launch._ephemeral_range()
    ports = [launch.free_port("127.0.0.1") for _ in range(30)]
    assert len(set(ports)) == 30
    assert all(p < lo or p > hi for p in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))  # free to listen on


def test_free_port_stays_in_the_banaserve_ports_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(launch.PORTS_ENV, "12000-12099")
    ports = {launch.free_port("127.0.0.1") for _ in range(20)}
    assert len(ports) == 20 and all(12000 <= p <= 12099 for p in ports)
    for bad in ("12000", "a-b", "200-100", "0-10", "1-70000"):
        monkeypatch.setenv(launch.PORTS_ENV, bad)
        with pytest.raises(ValueError, match="BANASERVE_PORTS"):
            launch.free_port()


def test_mapped_files_finds_what_a_process_has_mapped_under_a_prefix(tmp_path: Any) -> None:
    import mmap

    path = tmp_path / "sglang_loads_x.shm"
    path.write_bytes(b"\0" * 4096)
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 4096):
        assert launch.mapped_files(os.getpid(), str(tmp_path / "sglang_loads_")) == [str(path)]
    assert launch.mapped_files(os.getpid(), str(tmp_path / "sglang_loads_")) == []
    assert launch.mapped_files(2**22 + 12345, "/dev/shm/") == []  # no such process


def test_kv_events_config_is_added_with_the_chosen_ports() -> None:
    import json

    cfg = WorkerConfig(model_path="/m", port=31000, device="cpu", kv_events_ports=(20001, 20002))
    argv, _ = build_command(cfg)
    config = json.loads(argv[argv.index("--kv-events-config") + 1])
    assert config == {"publisher": "zmq", "endpoint": "tcp://*:20001",
                      "replay_endpoint": "tcp://*:20002", "topic": "kv"}
    off = WorkerConfig(model_path="/m", port=31000, device="cpu", kv_events=False,
                       kv_events_ports=(20001, 20002))
    assert "--kv-events-config" not in build_command(off)[0]
    own = WorkerConfig(model_path="/m", port=31000, device="cpu", kv_events_ports=(1, 2),
                       extra_args=("--kv-events-config", "{}"))
    assert build_command(own)[0].count("--kv-events-config") == 1  # the operator's wins
