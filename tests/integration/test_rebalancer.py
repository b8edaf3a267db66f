"""The router's rebalancer against real SGLang CPU workers and a real layer host.

Two tiny-model workers: "hot" (core 0, a small KV pool) may send layers and heads to the layer
host running beside "cold" (core 1). The router runs with ``--rebalance`` and short periods.
A scripted load sent straight to the hot worker (so the router's dispatch cannot spread it):
1. two long requests fill the hot worker's KV pool: the rebalancer offloads KV heads to the
   cold worker's host, and recalls them once the requests are done;
2. many short requests queue on the hot worker (compute bound): the rebalancer migrates tail
   layers to the cold worker's host, and restores them once the queue is gone.
Every request completes (the actions happen between scheduler steps, under load).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from runtime_patches import models
from runtime_patches.launch import WorkerConfig, WorkerProcess
from runtime_patches.migration.host_process import LayerHostConfig, LayerHostProcess
from tests.integration.cluster import LOG_DIR, free_port, http_json, wait_until

pytestmark = pytest.mark.integration

HOT_POOL = 1024
COLD_CPU = str(1 % (os.cpu_count() or 1))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Fleet:
    def __init__(self) -> None:
        path = models.prepare("tiny")
        self.served = models.recipe("tiny").served_name
        self.host = LayerHostProcess(LayerHostConfig(port=free_port(), cpus=[int(COLD_CPU)],
                                                     warm_model=path),
                                     log_path=os.path.join(LOG_DIR, "rebalance-host.log"))
        self.hot = WorkerProcess(WorkerConfig(
            model_path=path, port=free_port(), served_model_name=self.served, device="cpu",
            cpus="0", max_total_tokens=HOT_POOL, max_running_requests=4,
            layer_hosts=(("cold", self.host.address),)),
            log_path=os.path.join(LOG_DIR, "rebalance-hot.log"))
        self.cold = WorkerProcess(WorkerConfig(
            model_path=path, port=free_port(), served_model_name=self.served, device="cpu",
            cpus=COLD_CPU, max_total_tokens=4096, own_layer_host=self.host.address),
            log_path=os.path.join(LOG_DIR, "rebalance-cold.log"))
        self.router: subprocess.Popen[bytes] | None = None
        self.router_url = ""

    def start(self) -> None:
        self.host.start()
        self.hot.start()
        self.cold.start()
        self.host.wait_ready()
        self.hot.wait_ready(600)
        self.cold.wait_ready(600)

    def start_router(self, *flags: str) -> None:
        """A router with the rebalancer on short periods (and ``flags``), replacing any other."""
        self.stop_router()
        port = free_port()
        argv = [sys.executable, "-m", "router", "--workers", self.hot.url, self.cold.url,
                "--port", str(port), "--load-poll-interval", "0.1", "--rebalance",
                "--rebalance-period", "0.25", "--rebalance-cooldown", "1",
                "--rebalance-compute-windows", "2", "--rebalance-revert-windows", "4", *flags]
        with open(os.path.join(LOG_DIR, "rebalance-router.log"), "ab") as out:
            self.router = subprocess.Popen(argv, cwd=ROOT, stdout=out,
                                           stderr=subprocess.STDOUT)
        self.router_url = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: _ok(self.router_url + "/health"), 120)

    def stop_router(self) -> None:
        if self.router is not None:
            self.router.terminate()
            self.router.wait(30)
            self.router = None

    def stop(self) -> None:
        self.stop_router()
        for proc in (self.hot, self.cold):
            proc.stop()
        self.host.stop()

    def decisions(self) -> list[dict[str, Any]]:
        status, out, _ = http_json("GET", self.router_url + "/rebalance")
        assert status == 200, out
        return list(out["recent_decisions"])

    def hot_status(self) -> dict[str, Any]:
        status, out, _ = http_json("GET", self.hot.url + "/banaserve/status")
        assert status == 200, out
        return dict(out)

    def load(self, prompt: str, max_tokens: int) -> tuple[int, Any]:
        body = {"model": self.served, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True}
        status, out, _ = http_json("POST", self.hot.url + "/v1/completions", body, timeout=600)
        return status, out


def _ok(url: str) -> bool:
    try:
        return http_json("GET", url)[0] == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    fleet = Fleet()
    fleet.start()
    try:
        yield fleet
    finally:
        fleet.stop()


def _kinds(fleet: Fleet, outcome: str = "ok") -> list[str]:
    return [d["kind"] for d in fleet.decisions() if d.get("outcome") == outcome]


def _until(check: Callable[[], bool], timeout: float, what: str, fleet: Fleet) -> None:
    assert wait_until(check, timeout), (what, fleet.decisions()[-5:])


def test_memory_pressure_offloads_heads_then_recalls_them(fleet: Fleet) -> None:
    """Three requests of about 400 prompt + 500 output tokens on a 1,024-token pool: SGLang
    runs one at a time and queues the others for memory (the compute rule is kept out of the
    way with a gap of 0.9: one running and two waiting of 4 slots is 0.75)."""
    fleet.start_router("--rebalance-compute-gap", "0.9", "--rebalance-revert-gap", "0.05")
    body = "".join(f"def f{j}(x):\n    return x * {j}\n" for j in range(30))
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(fleet.load, f"# request {i}\n" + body, 500) for i in range(3)]
        _until(lambda: "offload_heads" in _kinds(fleet), 120, "no head offload", fleet)
        offloads = fleet.hot_status()["heads"]["offloads"]
        results = [f.result() for f in futures]
    assert all(code == 200 for code, _ in results), results
    assert offloads and offloads[0]["target"] == "cold"
    decision = next(d for d in fleet.decisions() if d["kind"] == "offload_heads")
    assert "KV" in decision["reason"] or "kv" in decision["reason"].lower()
    # The load is gone: after the revert windows the heads come back and the pool shrinks.
    _until(lambda: "recall_heads" in _kinds(fleet), 120, "no recall", fleet)
    _until(lambda: not fleet.hot_status()["heads"]["offloads"], 60, "offload left", fleet)
    assert fleet.hot_status()["kv"]["pool_tokens"] == HOT_POOL
    status, metrics, _ = http_json("GET", fleet.router_url + "/metrics")
    assert status == 200
    for kind in ("offload_heads", "recall_heads"):
        assert f'banaserve_rebalance_decisions_total{{kind="{kind}",outcome="ok"}}' in metrics


def test_a_compute_backlog_migrates_layers_then_restores_them(fleet: Fleet) -> None:
    """48 short requests on 4 running slots: a queue with little KV (U_c 1 against 0)."""
    fleet.start_router()
    before = len(fleet.decisions())
    with ThreadPoolExecutor(48) as pool:
        futures = [pool.submit(fleet.load, f"x{i} = ", 80) for i in range(48)]
        _until(lambda: "migrate_layers" in _kinds(fleet), 120, "no migration", fleet)
        ranges = fleet.hot_status()["ranges"]
        results = [f.result() for f in futures]
    assert all(code == 200 and out["usage"]["completion_tokens"] == 80
               for code, out in results), results
    assert ranges and ranges[0]["target"] == "cold"
    assert ranges[0]["layers"][1] == 4  # tail layers
    migrate = next(d for d in fleet.decisions()[before:] if d["kind"] == "migrate_layers")
    assert migrate["worker"] == fleet.hot.url
    _until(lambda: "restore_layers" in _kinds(fleet), 120, "no restore", fleet)
    _until(lambda: not fleet.hot_status()["ranges"], 60, "range left", fleet)
    status, metrics, _ = http_json("GET", fleet.router_url + "/metrics")
    assert status == 200
    for kind in ("migrate_layers", "restore_layers"):
        assert f'banaserve_rebalance_decisions_total{{kind="{kind}",outcome="ok"}}' in metrics
