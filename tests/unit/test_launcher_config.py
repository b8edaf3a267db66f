"""The worker launcher's command line is a pure function of its config."""

from __future__ import annotations

import pytest

from router.config import RouterConfig
from runtime_patches.launch import WorkerConfig, build_command


def test_cpu_command_has_the_cpu_flags() -> None:
    argv, env = build_command(WorkerConfig(model_path="/m", port=31000, device="cpu", cpus="1",
                                           served_model_name="x", extra_args=("--page-size",
                                                                              "64")))
    for flag in ("--sleep-on-idle", "--device", "--attention-backend", "--grammar-backend"):
        assert flag in argv
    assert argv[argv.index("--max-total-tokens") + 1] == "4096"
    assert argv[argv.index("--served-model-name") + 1] == "x"
    assert argv[-2:] == ["--page-size", "64"]
    assert env["SGLANG_USE_CPU_ENGINE"] == "1" and env["SGLANG_CPU_OMP_THREADS_BIND"] == "1"


def test_gpu_command_uses_sglang_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "1")
    argv, env = build_command(WorkerConfig(model_path="/m", port=31000, device="cuda"))
    assert "--sleep-on-idle" not in argv and "--device" not in argv
    assert "SGLANG_USE_CPU_ENGINE" not in env


@pytest.mark.parametrize("kwargs", [{"port": 0}, {"device": "tpu"}, {"max_total_tokens": 0}])
def test_worker_config_rejects_bad_values(kwargs: dict[str, object]) -> None:
    base: dict[str, object] = {"model_path": "/m", "port": 31000}
    with pytest.raises(ValueError, match="WorkerConfig"):
        WorkerConfig(**{**base, **kwargs})  # type: ignore[arg-type]


def test_router_config_normalises_and_validates_urls() -> None:
    cfg = RouterConfig(workers=("127.0.0.1:8000", "http://localhost:8001/"))
    assert cfg.workers == ("http://127.0.0.1:8000", "http://localhost:8001")
    with pytest.raises(ValueError, match="at least one"):
        RouterConfig(workers=())
    with pytest.raises(ValueError, match="duplicate"):
        RouterConfig(workers=("a:1", "http://a:1"))
    with pytest.raises(ValueError, match="HOST:PORT"):
        RouterConfig(workers=("http://nohost",))
