"""Kubernetes service discovery against a fake Kubernetes API server (real aiohttp, port 0)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from router import discovery as discovery_module
from router.__main__ import parse_args
from router.app import create_app
from router.config import DiscoveryConfig, HealthConfig, PrefillWorker, RouterConfig
from router.discovery import Discovery, pod_worker
from router.kube import KubeApi
from router.workers import WorkerPool
from tests.unit.fake_k8s import FakeKubeApi
from tests.unit.fake_upstream import FakeUpstream

TOKEN = "secret-token"
APP = {"app": "sglang"}


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again: nothing listens


PORT = dead_port()


def url(ip: str, port: int = PORT) -> str:
    return f"http://{ip}:{port}"


@pytest.fixture
async def kube() -> AsyncIterator[FakeKubeApi]:
    fake = await FakeKubeApi(token=TOKEN).start()
    yield fake
    await fake.stop()


@pytest.fixture(autouse=True)
def quick_watch_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    """A watch may end (and resume) 0.1 s after it started without counting as a failure."""
    monkeypatch.setattr(discovery_module, "MIN_WATCH_S", 0.1)


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


def config(kube: FakeKubeApi, token_file: Path, **overrides: Any) -> DiscoveryConfig:
    fields: dict[str, Any] = {"selector": (("app", "sglang"),), "port": PORT,
                              "api_url": kube.url, "token_file": str(token_file),
                              "initial_backoff_s": 0.05, "max_backoff_s": 0.2}
    return DiscoveryConfig(**{**fields, **overrides})


def new_pool(*urls: str) -> WorkerPool:
    return WorkerPool(urls, HealthConfig(), 0.5)  # not running: membership only, no network


@contextlib.asynccontextmanager
async def discovering(cfg: DiscoveryConfig, pools: dict[str, WorkerPool],
                      sink: Callable[[str, int | None], None] | None = None,
                      synced: bool = True) -> AsyncIterator[Discovery]:
    found = Discovery(cfg, KubeApi.from_config(cfg), pools)
    async with found.running(sink):
        if synced:
            await asyncio.wait_for(found.wait_synced(), 5)
        yield found


async def eventually(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# -- which pods are workers ---------------------------------------------------------------------
def _pod(**status: Any) -> dict[str, Any]:
    base = {"phase": "Running", "podIP": "10.1.2.3",
            "conditions": [{"type": "Ready", "status": "True"}]}
    return {"metadata": {"name": "p", "namespace": "ns"}, "status": {**base, **status}}


@pytest.mark.parametrize(("pod", "expected"), [
    (_pod(), "http://10.1.2.3:8000"),
    (_pod(podIP="fd00::7"), "http://[fd00::7]:8000"),
    (_pod(phase="Pending"), None),
    (_pod(podIP=None), None),
    (_pod(conditions=[{"type": "Ready", "status": "False"}]), None),
    (_pod(conditions=[]), None),
    ({**_pod(), "metadata": {"name": "p", "deletionTimestamp": "2026-01-01T00:00:00Z"}}, None),
])
def test_pod_is_a_worker_only_when_running_ready_and_not_deleting(
        pod: dict[str, Any], expected: str | None) -> None:
    worker = pod_worker(pod, 8000, "sglang.ai/bootstrap-port")
    assert (worker.url if worker else None) == expected


@pytest.mark.parametrize(("value", "port"), [("9001", 9001), ("nope", None), ("0", None)])
def test_bootstrap_port_from_annotation(value: str, port: int | None) -> None:
    pod = _pod()
    pod["metadata"]["annotations"] = {"sglang.ai/bootstrap-port": value}
    worker = pod_worker(pod, 8000, "sglang.ai/bootstrap-port")
    assert worker is not None and worker.bootstrap_port == port


# -- membership follows the pods ----------------------------------------------------------------
async def test_ready_pods_join_and_unready_or_deleted_pods_leave(
        kube: FakeKubeApi, token_file: Path) -> None:
    kube.add_pod("w1", "127.0.0.11", APP)
    kube.add_pod("w2", "127.0.0.12", APP, ready=False)
    kube.add_pod("other", "127.0.0.13", {"app": "other"})
    kube.add_pod("pending", None, APP, phase="Pending")
    pool = new_pool()
    async with discovering(config(kube, token_file), {"regular": pool}) as found:
        assert pool.urls == (url("127.0.0.11"),)
        kube.set_ready("w2", True)
        await eventually(lambda: url("127.0.0.12") in pool.urls)
        assert found.num_discovered() == {"regular": 2}
        kube.set_ready("w1", False)
        await eventually(lambda: url("127.0.0.11") not in pool.urls)
        kube.start_deleting("w2")  # terminating pods take no new requests
        await eventually(lambda: pool.urls == ())
        kube.add_pod("w3", "127.0.0.14", APP)
        await eventually(lambda: pool.urls == (url("127.0.0.14"),))
        kube.delete_pod("w3")
        await eventually(lambda: pool.urls == ())
        assert found.num_discovered() == {"regular": 0}


async def test_removed_worker_drains_its_in_flight_requests(
        kube: FakeKubeApi, token_file: Path) -> None:
    kube.add_pod("w1", "127.0.0.11", APP)
    pool = new_pool()
    async with discovering(config(kube, token_file), {"regular": pool}):
        with pool.track(url("127.0.0.11")):
            kube.delete_pod("w1")
            await eventually(lambda: pool.snapshot()[0].draining)
            assert pool.urls == (url("127.0.0.11"),) and not pool.healthy()
        assert pool.urls == ()


async def test_static_workers_are_never_removed(kube: FakeKubeApi, token_file: Path) -> None:
    static = (url("127.0.0.21"), url("127.0.0.22"))
    kube.add_pod("same-as-static", "127.0.0.21", APP)
    kube.add_pod("w1", "127.0.0.11", APP)
    pool = new_pool(*static)
    async with discovering(config(kube, token_file), {"regular": pool}) as found:
        assert set(pool.urls) == {*static, url("127.0.0.11")}
        assert found.num_discovered() == {"regular": 1}  # the static one is not discovery's
        kube.delete_pod("same-as-static")
        kube.delete_pod("w1")
        await eventually(lambda: url("127.0.0.11") not in pool.urls)
        assert pool.urls == static
        assert not any(view.draining for view in pool.snapshot())


async def test_selector_namespace_and_versions_are_passed_through(
        kube: FakeKubeApi, token_file: Path) -> None:
    kube.add_pod("w1", "127.0.0.11", {"app": "sglang", "tier": "a"}, namespace="inference")
    kube.add_pod("w2", "127.0.0.12", {"app": "sglang", "tier": "a"}, namespace="elsewhere")
    kube.add_pod("w3", "127.0.0.13", {"app": "sglang", "tier": "b"}, namespace="inference")
    pool = new_pool()
    cfg = config(kube, token_file, selector=(("app", "sglang"), ("tier", "a")),
                 namespace="inference")
    async with discovering(cfg, {"regular": pool}):
        await eventually(lambda: kube.num_watches == 1)
        assert pool.urls == (url("127.0.0.11"),)
        (listed,) = kube.requests_of("list")
        assert listed["path"] == "/api/v1/namespaces/inference/pods"
        assert listed["labelSelector"] == "app=sglang,tier=a"
        (watched,) = kube.requests_of("watch")
        assert watched["labelSelector"] == "app=sglang,tier=a"
        assert watched["watch"] == "true" and watched["allowWatchBookmarks"] == "true"
        assert watched["resourceVersion"] == str(kube.version)
        assert watched["timeoutSeconds"] == "300"


async def test_all_namespaces_without_a_namespace(kube: FakeKubeApi, token_file: Path) -> None:
    kube.add_pod("w1", "127.0.0.11", APP, namespace="a")
    kube.add_pod("w2", "127.0.0.12", APP, namespace="b")
    pool = new_pool()
    async with discovering(config(kube, token_file), {"regular": pool}):
        assert set(pool.urls) == {url("127.0.0.11"), url("127.0.0.12")}
        assert kube.requests_of("list")[0]["path"] == "/api/v1/pods"


async def test_bearer_token_is_checked_and_reread(kube: FakeKubeApi, token_file: Path) -> None:
    kube.add_pod("w1", "127.0.0.11", APP)
    token_file.write_text("wrong")
    pool = new_pool()
    async with discovering(config(kube, token_file), {"regular": pool}, synced=False) as found:
        await eventually(lambda: found.watch_restarts().get(("regular", "error"), 0) >= 2)
        assert pool.urls == ()
        token_file.write_text(TOKEN)  # rotated: the next attempt reads the new token
        await asyncio.wait_for(found.wait_synced(), 5)
        assert pool.urls == (url("127.0.0.11"),)


# -- prefill/decode -----------------------------------------------------------------------------
async def test_prefill_and_decode_selectors_with_bootstrap_annotation(
        kube: FakeKubeApi, token_file: Path) -> None:
    prefill_labels, decode_labels = {"app": "sglang", "role": "prefill"}, \
        {"app": "sglang", "role": "decode"}
    kube.add_pod("p1", "127.0.0.31", prefill_labels,
                 annotations={"sglang.ai/bootstrap-port": "9001"})
    kube.add_pod("p2", "127.0.0.32", prefill_labels)
    kube.add_pod("d1", "127.0.0.41", decode_labels)
    ports: dict[str, int | None] = {}
    prefill, decode = new_pool(), new_pool()
    cfg = config(kube, token_file, selector=(),
                 prefill_selector=(("app", "sglang"), ("role", "prefill")),
                 decode_selector=(("app", "sglang"), ("role", "decode")))
    async with discovering(cfg, {"prefill": prefill, "decode": decode},
                           ports.__setitem__) as found:
        assert set(prefill.urls) == {url("127.0.0.31"), url("127.0.0.32")}
        assert decode.urls == (url("127.0.0.41"),)
        assert ports == {url("127.0.0.31"): 9001, url("127.0.0.32"): None}
        assert sorted(q["labelSelector"] for q in kube.requests_of("list")) == [
            "app=sglang,role=decode", "app=sglang,role=prefill"]
        kube.delete_pod("d1")
        kube.add_pod("d2", "127.0.0.42", decode_labels)
        await eventually(lambda: decode.urls == (url("127.0.0.42"),))
        assert found.num_discovered() == {"prefill": 2, "decode": 1}


# -- restarts -----------------------------------------------------------------------------------
@pytest.mark.parametrize("expire_as", ["status", "event"])
async def test_relists_after_410_gone(kube: FakeKubeApi, token_file: Path,
                                      expire_as: str) -> None:
    kube.expire_as = expire_as
    kube.add_pod("w1", "127.0.0.11", APP)
    pool = new_pool()
    async with discovering(config(kube, token_file), {"regular": pool}) as found:
        await eventually(lambda: kube.num_watches == 1)
        await asyncio.sleep(discovery_module.MIN_WATCH_S + 0.1)
        # the stream ends and, before it comes back (no await in between), changes happen
        # and the history is compacted: the watch cannot resume and must list again
        kube.close_watches()
        kube.delete_pod("w1")
        kube.add_pod("w2", "127.0.0.12", APP)
        kube.compact()
        await eventually(lambda: pool.urls == (url("127.0.0.12"),))
        assert len(kube.requests_of("list")) == 2
        assert found.watch_restarts()[("regular", "expired")] == 1


async def test_expired_event_on_an_open_watch_relists(kube: FakeKubeApi,
                                                      token_file: Path) -> None:
    kube.add_pod("w1", "127.0.0.11", APP)
    pool = new_pool()
    async with discovering(config(kube, token_file), {"regular": pool}) as found:
        await eventually(lambda: kube.num_watches == 1)
        kube.expire_watches()
        await eventually(lambda: len(kube.requests_of("list")) == 2)
        assert found.watch_restarts() == {("regular", "expired"): 1}
        assert pool.urls == (url("127.0.0.11"),)


async def test_ended_watch_resumes_from_the_last_version(kube: FakeKubeApi,
                                                         token_file: Path) -> None:
    pool = new_pool()
    async with discovering(config(kube, token_file), {"regular": pool}) as found:
        await eventually(lambda: kube.num_watches == 1)
        kube.add_pod("w1", "127.0.0.11", APP)
        kube.bookmark()
        await eventually(lambda: pool.urls == (url("127.0.0.11"),))
        seen = kube.version
        await asyncio.sleep(discovery_module.MIN_WATCH_S + 0.1)
        kube.close_watches()
        await eventually(lambda: len(kube.requests_of("watch")) == 2)
        assert kube.requests_of("watch")[1]["resourceVersion"] == str(seen)
        assert len(kube.requests_of("list")) == 1  # no re-list needed
        assert found.watch_restarts() == {("regular", "closed"): 1}


async def test_api_down_at_start_is_retried(token_file: Path) -> None:
    port = dead_port()
    cfg = DiscoveryConfig(selector=(("app", "sglang"),), api_url=f"http://127.0.0.1:{port}",
                          initial_backoff_s=0.05, max_backoff_s=0.1)
    fake = FakeKubeApi(token=None)
    fake.add_pod("w1", "127.0.0.11", APP)
    pool = new_pool()
    async with discovering(cfg, {"regular": pool}, synced=False) as found:
        await eventually(lambda: found.watch_restarts().get(("regular", "error"), 0) >= 1)
        runner = web.AppRunner(fake.app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            await asyncio.wait_for(found.wait_synced(), 5)
            assert pool.urls == (url("127.0.0.11", 80),)
        finally:
            fake.close_watches()
            await runner.cleanup()


# -- the whole router ---------------------------------------------------------------------------
async def test_router_with_only_discovery_serves_and_forgets_deleted_pods(
        kube: FakeKubeApi, token_file: Path) -> None:
    upstream = await FakeUpstream().start()
    port = int(upstream.url.rsplit(":", 1)[1])
    cfg = RouterConfig(discovery=config(kube, token_file, port=port), policy="round_robin",
                       load_poll_interval_s=0.1,
                       health=HealthConfig(interval_s=0.1, timeout_s=1, failure_threshold=1))
    kube.add_pod("w1", "127.0.0.1", APP)
    runner = web.AppRunner(create_app(cfg))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    router = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as session:
            async def get(path: str) -> Any:
                async with session.get(router + path) as resp:
                    return resp.status, await resp.text()

            for _ in range(100):  # the pod's worker is health-checked before it serves
                if (await get("/health"))[0] == 200:
                    break
                await asyncio.sleep(0.05)
            chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            async with session.post(router + "/v1/chat/completions", json=chat) as resp:
                assert resp.status == 200
                assert resp.headers["X-BanaServe-Worker"] == upstream.url
            _, metrics = await get("/metrics")
            assert 'banaserve_router_discovered_workers{role="regular"} 1.0' in metrics
            kube.delete_pod("w1")
            for _ in range(100):
                if json.loads((await get("/workers"))[1])["workers"] == []:
                    break
                await asyncio.sleep(0.05)
            assert json.loads((await get("/workers"))[1])["workers"] == []
            _, metrics = await get("/metrics")
            assert 'banaserve_router_discovered_workers{role="regular"} 0.0' in metrics
    finally:
        await runner.cleanup()
        await upstream.stop()


async def test_router_pd_mode_uses_the_discovered_bootstrap_port(
        kube: FakeKubeApi, token_file: Path) -> None:
    prefill, decode = await FakeUpstream().start(), await FakeUpstream().start()
    prefill_port = int(prefill.url.rsplit(":", 1)[1])
    discovery = config(kube, token_file, selector=(), port=prefill_port,
                       prefill_selector=(("role", "prefill"),))
    cfg = RouterConfig(decode=(decode.url,), discovery=discovery, load_poll_interval_s=0.1,
                       health=HealthConfig(interval_s=0.1, timeout_s=1, failure_threshold=1))
    kube.add_pod("p1", "127.0.0.1", {"role": "prefill"},
                 annotations={"sglang.ai/bootstrap-port": "9123"})
    runner = web.AppRunner(create_app(cfg))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    router = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                async with session.get(router + "/health") as resp:
                    if resp.status == 200:
                        break
                await asyncio.sleep(0.05)
            body = {"model": "m", "prompt": "hi", "max_tokens": 2}
            async with session.post(router + "/v1/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
        (sent,) = prefill.received
        assert sent["bootstrap_port"] == 9123 and sent["bootstrap_host"] == "127.0.0.1"
        assert decode.received == [sent]
    finally:
        await runner.cleanup()
        await prefill.stop()
        await decode.stop()


# -- configuration ------------------------------------------------------------------------------
def test_cli_builds_the_discovery_config() -> None:
    cfg = parse_args(["--service-discovery", "--selector", "app=sglang", "tier=a env=prod",
                      "--service-discovery-port", "30000", "--service-discovery-namespace",
                      "inference", "--k8s-api-url", "http://127.0.0.1:8001"])
    assert cfg.workers == () and not cfg.pd_mode
    assert cfg.discovery == DiscoveryConfig(
        selector=(("app", "sglang"), ("tier", "a"), ("env", "prod")), port=30000,
        namespace="inference", api_url="http://127.0.0.1:8001")
    pd = parse_args(["--service-discovery", "--prefill-selector", "role=prefill",
                     "--decode-selector", "role=decode"])
    assert pd.pd_mode and pd.discovery is not None and pd.discovery.port == 80


@pytest.mark.parametrize(("argv", "message"), [
    (["--selector", "app=x", "--workers", "http://a:1"], "only with --service-discovery"),
    (["--service-discovery"], "needs --selector"),
    (["--service-discovery", "--selector", "app"], "'app' is not KEY=VALUE"),
    (["--service-discovery", "--selector", "a=b", "--prefill-selector", "r=p"], "not both"),
    (["--service-discovery", "--prefill-selector", "r=p"], "decode workers"),
    (["--service-discovery", "--decode-selector", "r=d", "--workers", "http://a:1"],
     "no --workers"),
    (["--service-discovery", "--selector", "a=b", "--service-discovery-port", "0"],
     "DiscoveryConfig.port"),
    (["--service-discovery", "--selector", "a=b", "--k8s-api-url", "ftp://x"],
     "DiscoveryConfig.api_url"),
])
def test_cli_refuses_bad_discovery_flags(argv: list[str], message: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_static_prefill_may_pair_with_discovered_decode() -> None:
    cfg = RouterConfig(prefill=(PrefillWorker("http://127.0.0.1:1", 9000),),
                       discovery=DiscoveryConfig(decode_selector=(("role", "decode"),)))
    assert cfg.pd_mode


def test_in_cluster_settings(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t")
    import certifi

    cfg = DiscoveryConfig(selector=(("a", "b"),), token_file=str(token), ca_file=certifi.where())
    api = KubeApi.from_config(cfg, {"KUBERNETES_SERVICE_HOST": "10.96.0.1",
                                    "KUBERNETES_SERVICE_PORT": "443"})
    assert api.pods_url == "https://10.96.0.1:443/api/v1/pods"
    api6 = KubeApi.from_config(cfg, {"KUBERNETES_SERVICE_HOST": "fd00::1"})
    assert api6.base_url == "https://[fd00::1]:443"
    with pytest.raises(ValueError, match="--k8s-api-url"):
        KubeApi.from_config(cfg, {})
    with pytest.raises(ValueError, match="ca_file"):
        KubeApi.from_config(DiscoveryConfig(selector=(("a", "b"),), token_file=str(token),
                                            ca_file=str(tmp_path / "missing.crt")),
                            {"KUBERNETES_SERVICE_HOST": "10.96.0.1"})
    with pytest.raises(ValueError, match="token_file"):
        KubeApi.from_config(DiscoveryConfig(selector=(("a", "b"),), api_url="http://x:1",
                                            token_file=str(tmp_path / "missing")))


def test_create_app_refuses_discovery_outside_a_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    cfg = RouterConfig(discovery=DiscoveryConfig(selector=(("a", "b"),)))
    with pytest.raises(ValueError, match="KUBERNETES_SERVICE_HOST"):
        create_app(cfg)
