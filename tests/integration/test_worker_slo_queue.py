"""SLO-ODBS as a real SGLang CPU worker's queue order (``--queue-policy``, ``slo_queue``).

Two tiny-model workers that run one request at a time (``max_running_requests=1``), one with the
default order and one with ``queue_policy="slo-odbs"``. On each, one long request occupies the
worker; while it runs, four requests arrive 150 ms apart, each with its SLO and predicted length
in ``custom_params`` (three through ``/generate``, one through ``/v1/chat/completions``) and
exactly that many output tokens (``ignore_eos``). When the long request finishes, the FCFS worker
serves them in arrival order; the SLO-ODBS worker in deadline order (one request per batch, none
of them hopeless): tight SLOs first. Had a request's ``custom_params`` not reached the scheduler,
it would carry the 600 s default SLO and run last, so the order also proves both routes deliver.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from runtime_patches import models
from runtime_patches.launch import LaunchError, WorkerConfig, WorkerProcess
from runtime_patches.slo_queue import ENV_STEP_MS, LOG_PREFIX
from tests.integration.cluster import LOG_DIR, free_port, http_json

pytestmark = pytest.mark.integration

BLOCKER_TOKENS = 600
"""About 4 s on one core (the tiny model decodes ~7 ms a token here): the four queued requests
are sent by 0.9 s and all in the queue soon after."""
STAGGER_S = 0.15
DEFAULT_SLO_MS = 600_000.0
QUEUED = (  # name, route, SLO (ms), predicted = max_new_tokens; in arrival order
    ("A", "generate", 120_000, 64),
    ("B", "generate", 10_000, 16),
    ("C", "generate", 60_000, 48),
    ("D", "chat", 20_000, 32),
)
FCFS_ORDER = ["A", "B", "C", "D"]
SLO_ODBS_ORDER = ["B", "D", "C", "A"]  # earliest deadline (arrival + SLO) first


def _config(port: int, cpus: str, **overrides: Any) -> WorkerConfig:
    return WorkerConfig(model_path=models.prepare("tiny"), port=port,
                        served_model_name=models.recipe("tiny").served_name, device="cpu",
                        cpus=cpus, max_running_requests=1, **overrides)


@pytest.fixture(scope="module")
def workers() -> Iterator[dict[str, WorkerProcess]]:
    cores = sorted(os.sched_getaffinity(0))
    started = {
        "fcfs": WorkerProcess(_config(free_port(), str(cores[0])),
                              log_path=os.path.join(LOG_DIR, "slo-queue-fcfs.log")),
        "slo-odbs": WorkerProcess(
            _config(free_port(), str(cores[-1]), queue_policy="slo-odbs",
                    queue_default_slo_ms=DEFAULT_SLO_MS),
            log_path=os.path.join(LOG_DIR, "slo-queue-slo-odbs.log")),
    }
    try:
        for w in started.values():
            w.start()
        with ThreadPoolExecutor(len(started)) as pool:
            list(pool.map(lambda w: w.wait_ready(300), started.values()))
        yield started
    finally:
        for w in started.values():
            w.stop()


def _send(worker: WorkerProcess, route: str, slo_ms: float | None, tokens: int) -> int:
    """One greedy request of exactly ``tokens`` output tokens; returns the count SGLang made."""
    custom = {} if slo_ms is None else {"banaserve_slo_ms": slo_ms,
                                        "banaserve_predicted_len": tokens}
    if route == "chat":
        body = {"model": worker.cfg.served_model_name, "temperature": 0, "max_tokens": tokens,
                "ignore_eos": True, "custom_params": custom,
                "messages": [{"role": "user", "content": "def main():"}]}
        status, out, _ = http_json("POST", worker.url + "/v1/chat/completions", body)
        assert status == 200, out
        return int(out["usage"]["completion_tokens"])
    body = {"text": "import os\n", "sampling_params": {
        "max_new_tokens": tokens, "temperature": 0, "ignore_eos": True, "custom_params": custom}}
    status, out, _ = http_json("POST", worker.url + "/generate", body)
    assert status == 200, out
    return len(out["output_ids"])


def _waiting(worker: WorkerProcess) -> int:
    status, loads, _ = http_json("GET", worker.url + "/v1/loads", timeout=10)
    assert status == 200, loads
    return int(sum(r["num_waiting_reqs"] for r in loads["loads"]))


def completion_order(worker: WorkerProcess) -> list[str]:
    """Occupy ``worker`` with one long request, queue QUEUED behind it, return who finished when."""
    done: list[str] = []
    lock = threading.Lock()

    def run(name: str, route: str, slo_ms: float | None, tokens: int) -> None:
        assert _send(worker, route, slo_ms, tokens) == tokens, name
        with lock:
            done.append(name)

    with ThreadPoolExecutor(len(QUEUED) + 1) as pool:
        blocker = pool.submit(run, "blocker", "generate", None, BLOCKER_TOKENS)
        time.sleep(0.3)  # the blocker is admitted and decoding
        futures = []
        for spec in QUEUED:
            futures.append(pool.submit(run, *spec))
            time.sleep(STAGGER_S)
        # each request reaches the scheduler's queue through the tokenizer process: give the
        # last one a moment (on a loaded machine it can trail its send)
        deadline = time.monotonic() + 3.0
        while (queued := _waiting(worker)) < len(QUEUED) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not blocker.done() and queued == len(QUEUED), (
            f"the long request must still run with all {len(QUEUED)} queued behind it "
            f"(waiting: {queued}); make BLOCKER_TOKENS larger")
        for future in [blocker, *futures]:
            future.result(timeout=120)
    assert done[0] == "blocker", done
    return done[1:]


def test_fcfs_worker_serves_in_arrival_order(workers: dict[str, WorkerProcess]) -> None:
    assert completion_order(workers["fcfs"]) == FCFS_ORDER


def test_slo_odbs_worker_serves_tight_slos_first(workers: dict[str, WorkerProcess]) -> None:
    assert completion_order(workers["slo-odbs"]) == SLO_ODBS_ORDER


def test_only_the_slo_odbs_worker_logs_a_queue_policy(workers: dict[str, WorkerProcess]) -> None:
    def policy_lines(worker: WorkerProcess) -> list[str]:
        assert worker.log_path is not None
        with open(worker.log_path, errors="replace") as f:
            return [line for line in f if LOG_PREFIX in line]

    assert _send(workers["slo-odbs"], "generate", 1000, 2) == 2  # the line comes with a request
    lines = policy_lines(workers["slo-odbs"])
    assert len(lines) == 1 and "queue policy: slo-odbs (max_batch 1," in lines[0], lines
    assert "default SLO 600000 ms" in lines[0]
    assert policy_lines(workers["fcfs"]) == []


def test_bad_queue_setting_stops_the_worker_with_one_line() -> None:
    worker = WorkerProcess(
        _config(free_port(), str(min(os.sched_getaffinity(0))), queue_policy="slo-odbs",
                extra_env=((ENV_STEP_MS, "fast"),)),
        log_path=os.path.join(LOG_DIR, "slo-queue-bad-env.log"))
    worker.start()
    try:
        with pytest.raises(LaunchError, match=r"PatchError: runtime_patches: queue policy: "
                                              r"BANASERVE_QUEUE_STEP_MS='fast' is not a number"):
            worker.wait_ready(300)
    finally:
        worker.stop()
