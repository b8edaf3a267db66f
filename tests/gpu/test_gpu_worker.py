"""GPU path: SGLang's standard CUDA stack, CPU patches inactive, served through the router.

Skipped without CUDA (see tests/conftest.py). Run on a GPU machine after `scripts/setup.sh --gpu`.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from runtime_patches import models
from runtime_patches.launch import WorkerConfig, WorkerProcess, build_command
from tests.integration.cluster import RouterProcess, free_port, http_json

pytestmark = pytest.mark.gpu


def test_launcher_uses_sglang_gpu_defaults() -> None:
    argv, env = build_command(WorkerConfig(model_path="/m", port=30001))
    assert "--device" not in argv and "--sleep-on-idle" not in argv
    assert "SGLANG_USE_CPU_ENGINE" not in env


def test_cpu_patches_inactive_in_gpu_processes() -> None:
    env = {k: v for k, v in os.environ.items() if k != "SGLANG_USE_CPU_ENGINE"}
    probe = ("import sgl_kernel, runtime_patches.boot as b; "
             "print(b.standin_active(), sgl_kernel.__file__)")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == "False"
    assert "runtime_patches" not in out[1]  # the real CUDA kernel package


def test_gpu_worker_serves_through_router() -> None:
    path = models.prepare("tiny")
    worker = WorkerProcess(WorkerConfig(model_path=path, port=free_port(), device="cuda",
                                        served_model_name="tiny-llama",
                                        extra_args=("--mem-fraction-static", "0.3")),
                           log_path="logs/tests/gpu-worker.log")
    worker.start()
    router = None
    try:
        worker.wait_ready(900)
        router = RouterProcess([worker.url], tag="router-gpu")
        router.wait_ready()
        body = {"text": "def hello(name):", "sampling_params": {"max_new_tokens": 16,
                                                                "temperature": 0}}
        direct = http_json("POST", worker.url + "/generate", body)[1]
        routed = http_json("POST", router.url + "/generate", body)[1]
        assert routed["output_ids"] == direct["output_ids"]
    finally:
        if router:
            router.stop()
        worker.stop()
