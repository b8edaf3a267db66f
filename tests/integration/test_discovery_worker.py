"""Kubernetes service discovery end to end: the router, started with no static worker, finds a
real SGLang CPU worker as a pod in a fake Kubernetes API, serves through it, and forgets it once
the pod is deleted."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime_patches.launch import WorkerProcess
from tests.integration.cluster import RouterProcess, http_json, wait_until
from tests.unit.fake_k8s import FakeKubeApi, FakeKubeThread

pytestmark = pytest.mark.integration
MODEL = "tiny-llama"
TOKEN = "integration-token"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "def fibonacci(n):"}],
        "max_tokens": 8, "temperature": 0}


@pytest.fixture
def kube() -> Iterator[FakeKubeThread]:
    fake = FakeKubeThread(FakeKubeApi(token=TOKEN))
    yield fake
    fake.stop()


def _listed(router: RouterProcess) -> list[str]:
    status, body, _ = http_json("GET", router.url + "/workers", timeout=10)
    assert status == 200, body
    return [w["url"] for w in body["workers"]]


def test_discovered_pod_serves_then_leaves(tiny_workers: list[WorkerProcess],
                                           kube: FakeKubeThread, tmp_path: Path) -> None:
    worker = tiny_workers[0]
    host, port = worker.url.removeprefix("http://").rsplit(":", 1)
    token = tmp_path / "token"
    token.write_text(TOKEN)
    kube.call(kube.api.add_pod, "sglang-0", host, {"app": "sglang", "role": "worker"},
              namespace="inference")
    kube.call(kube.api.add_pod, "sglang-1", "127.0.0.99", {"app": "sglang", "role": "worker"},
              ready=False, namespace="inference")
    router = RouterProcess(["--service-discovery", "--selector", "app=sglang", "role=worker",
                            "--service-discovery-namespace", "inference",
                            "--service-discovery-port", port, "--k8s-api-url", kube.api.url,
                            "--k8s-token-file", str(token)], tag="router-discovery")
    try:
        router.wait_ready()  # healthy only once the discovered worker passed a health check
        assert _listed(router) == [worker.url]  # the unready pod is not a worker
        status, body, headers = http_json("POST", router.url + "/v1/chat/completions", CHAT)
        assert status == 200, body
        assert body["usage"]["completion_tokens"] == 8
        assert headers["X-BanaServe-Worker"] == worker.url
        _, metrics, _ = http_json("GET", router.url + "/metrics")
        assert 'banaserve_router_discovered_workers{role="regular"} 1.0' in metrics

        kube.call(kube.api.delete_pod, "sglang-0", namespace="inference")
        assert wait_until(lambda: _listed(router) == [], 10)
        status, body, _ = http_json("POST", router.url + "/v1/chat/completions", CHAT)
        assert status == 503, body
        assert http_json("GET", worker.url + "/health")[0] == 200  # the worker itself is fine
    finally:
        router.stop()
