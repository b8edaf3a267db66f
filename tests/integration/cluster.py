"""Helpers that start real processes for integration tests: SGLang CPU workers and the router."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from runtime_patches import models
from runtime_patches.launch import WorkerConfig, WorkerProcess
from runtime_patches.launch import free_port as launch_free_port

LOG_DIR = os.environ.get("BANASERVE_TEST_LOGS", os.path.join(os.getcwd(), "logs", "tests"))


def free_port() -> int:
    """A port free to listen on now, outside the ephemeral range (``runtime_patches.launch``)."""
    return launch_free_port("127.0.0.1")


def start_workers(model: str, count: int, tag: str,
                  per_worker: list[dict[str, Any]] | None = None,
                  **overrides: Any) -> list[WorkerProcess]:
    """Start ``count`` workers of a prepared model in parallel and wait until all are healthy
    (``per_worker[i]``: more ``WorkerConfig`` fields for worker i only)."""
    path = models.prepare(model)
    served = models.recipe(model).served_name
    ncpu = os.cpu_count() or 1
    workers = []
    for i in range(count):
        own = {**overrides, **(per_worker[i] if per_worker else {})}
        cfg = WorkerConfig(model_path=path, port=free_port(), served_model_name=served,
                           device="cpu", cpus=str(i % ncpu), **own)
        workers.append(WorkerProcess(cfg, log_path=os.path.join(LOG_DIR, f"{tag}-{i}.log")))
    for w in workers:
        w.start()
    try:
        with ThreadPoolExecutor(len(workers)) as pool:
            list(pool.map(lambda w: w.wait_ready(600), workers))
    except BaseException:
        for w in workers:
            w.stop()
        raise
    return workers


class RouterProcess:
    """``python -m router`` as a real subprocess on a free port."""

    def __init__(self, worker_urls: list[str], *extra: str, tag: str = "router") -> None:
        """``worker_urls`` go after ``--workers``; a list starting with ``--`` (for example
        ``["--prefill", URL, PORT, "--decode", URL]``) is passed as it is."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        os.makedirs(LOG_DIR, exist_ok=True)
        self._log = open(os.path.join(LOG_DIR, f"{tag}.log"), "wb")
        workers = worker_urls if worker_urls[0].startswith("--") else ["--workers", *worker_urls]
        argv = [sys.executable, "-m", "router", *workers, "--port",
                str(self.port), "--health-interval", "0.5", "--health-failure-threshold", "1",
                *extra]
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "router exited during start-up"
            try:
                if http_json("GET", self.url + "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError("router not healthy in time")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def http_json(method: str, url: str, body: Any = None, raw: bytes | None = None,
              timeout: float = 120.0) -> tuple[int, Any, dict[str, str]]:
    """Send a request; return (status, decoded JSON body or text, headers)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, payload, headers = resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        status, payload, headers = exc.code, exc.read(), dict(exc.headers)
    try:
        return status, json.loads(payload), headers
    except ValueError:
        return status, payload.decode(errors="replace"), headers


def generate(worker: WorkerProcess, text: str, max_new_tokens: int = 8) -> dict[str, Any]:
    """SGLang's native ``/generate``, greedy; the whole JSON answer (``meta_info`` included)."""
    body = {"text": text, "sampling_params": {"max_new_tokens": max_new_tokens,
                                              "temperature": 0}}
    status, out, _ = http_json("POST", worker.url + "/generate", body)
    assert status == 200, out
    return out


def storage_tokens(out: dict[str, Any]) -> int:
    """Prompt tokens SGLang loaded from its L3 for this answer (``cached_tokens_details``)."""
    return int((out["meta_info"].get("cached_tokens_details") or {}).get("storage", 0))


def wait_until(predicate: Any, timeout_s: float, interval_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())


def running_requests(worker_url: str) -> int:
    status, loads, _ = http_json("GET", worker_url + "/v1/loads", timeout=10)
    assert status == 200
    return int(sum(r["num_running_reqs"] + r["num_waiting_reqs"] for r in loads["loads"]))
