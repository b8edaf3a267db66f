"""Kubernetes service discovery: worker pods found by label selector join the router's pools.

The one owner of the watch state: the ready pods seen per role and the worker URLs that
discovery itself added. Who calls what:
- ``app`` builds one ``Discovery`` in ``create_app`` (``--service-discovery``) with the pools by
  role (``regular``; or ``prefill`` and ``decode``) and enters ``running()`` in the cleanup
  context after the pools run, handing it the PD proxy's ``set_bootstrap_port`` in prefill/decode
  mode. ``running()`` starts one task per role that has a selector.
- Each task lists the pods matching its selector (``router.kube``), then watches from the list's
  resourceVersion. After the list and after every event it reconciles: a pod that is Running,
  has a podIP, is not being deleted and whose Ready condition is True is the worker
  ``http://{podIP}:{--service-discovery-port}`` and is ``WorkerPool.add``-ed (health-checked
  before it takes requests); a worker discovery added whose pod is gone or no longer ready is
  ``WorkerPool.remove``-d (drained: in-flight requests finish). Static ``--workers`` /
  ``--prefill`` / ``--decode`` are never removed: discovery only removes URLs it added. A prefill
  pod's bootstrap port comes from its ``sglang.ai/bootstrap-port`` annotation.
- A watch that ends normally (the API server's ``timeoutSeconds``) resumes from the last
  resourceVersion (bookmarks keep it fresh); 410 Gone lists again at once; any other failure
  lists again after a backoff (doubling, up to ``max_backoff_s``). Each is counted by reason.
- ``metrics`` reads ``num_discovered()`` and ``watch_restarts()`` at scrape time.

RBAC: the router's service account needs ``get``, ``list`` and ``watch`` on ``pods`` (core API
group) in the watched namespace: a Role and RoleBinding with ``--service-discovery-namespace NS``,
a ClusterRole and ClusterRoleBinding without it (then every namespace is watched, as in smg)::

    rules:
    - apiGroups: [""]
      resources: ["pods"]
      verbs: ["get", "list", "watch"]
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from router.config import DiscoveryConfig, label_selector
from router.kube import KubeApi, KubeApiError, ResourceExpired, WatchEvent
from router.workers import WorkerPool

logger = logging.getLogger(__name__)

BootstrapSink = Callable[[str, "int | None"], None]
MIN_WATCH_S = 1.0
"""A watch ending sooner than this after it started counts as a failure (backoff, list)."""


@dataclass(frozen=True)
class PodWorker:
    """The worker a ready pod serves."""

    url: str
    bootstrap_port: int | None = None


def pod_key(pod: dict[str, Any]) -> str:
    meta = pod.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def pod_worker(pod: dict[str, Any], port: int, annotation: str) -> PodWorker | None:
    """The worker ``pod`` serves, or None when it should take no requests."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    ip = status.get("podIP")
    if meta.get("deletionTimestamp") or status.get("phase") != "Running" or not ip:
        return None
    if not any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in status.get("conditions") or []):
        return None
    host = f"[{ip}]" if ":" in ip else ip
    return PodWorker(f"http://{host}:{port}", _bootstrap_port(pod, annotation))


def _bootstrap_port(pod: dict[str, Any], annotation: str) -> int | None:
    raw = ((pod.get("metadata") or {}).get("annotations") or {}).get(annotation)
    if raw is None:
        return None
    try:
        port = int(raw)
        if 0 < port < 65536:
            return port
    except ValueError:
        pass
    logger.warning("pod %s: annotation %s=%r is not a port; using SGLang's default",
                   pod_key(pod), annotation, raw)
    return None


class Discovery:
    def __init__(self, cfg: DiscoveryConfig, api: KubeApi, pools: dict[str, WorkerPool]) -> None:
        self._cfg = cfg
        self._api = api
        self._selectors = {role: label_selector(sel) for role, sel in cfg.selectors().items()}
        missing = set(self._selectors) - set(pools)
        assert not missing, f"no pool for discovered roles {missing}"
        self._pools = pools
        self._pods: dict[str, dict[str, PodWorker]] = {role: {} for role in self._selectors}
        self._added: dict[str, set[str]] = {role: set() for role in self._selectors}
        self._restarts: Counter[tuple[str, str]] = Counter()
        self._synced = {role: asyncio.Event() for role in self._selectors}
        self._on_bootstrap: BootstrapSink | None = None

    # -- reads --------------------------------------------------------------------------------
    def num_discovered(self) -> dict[str, int]:
        """Role -> workers discovery added (and has not removed since)."""
        return {role: len(urls) for role, urls in self._added.items()}

    def watch_restarts(self) -> dict[tuple[str, str], int]:
        """(role, reason) -> times the list/watch started over; reasons: ``closed`` (the server
        ended the watch; resumed), ``expired`` (410 Gone; listed again), ``error``."""
        return dict(self._restarts)

    async def wait_synced(self) -> None:
        """Until every role's first list has been reconciled."""
        await asyncio.gather(*(e.wait() for e in self._synced.values()))

    # -- reconcile ----------------------------------------------------------------------------
    def _reconcile(self, role: str) -> None:
        pool, added = self._pools[role], self._added[role]
        desired = {w.url: w for w in self._pods[role].values()}
        for url in sorted(added - desired.keys()):
            added.discard(url)
            if pool.remove(url):
                logger.info("discovery: %s worker %s left (pod gone or not ready); draining",
                            role, url)
        for url, worker in desired.items():
            if url not in added:
                if not pool.add(url):  # a static worker, or one added by POST /workers
                    continue
                added.add(url)
                logger.info("discovery: %s worker %s joined", role, url)
            if role == "prefill" and self._on_bootstrap is not None:
                self._on_bootstrap(url, worker.bootstrap_port)

    def _replace(self, role: str, pods: list[dict[str, Any]]) -> None:
        found = {pod_key(p): pod_worker(p, self._cfg.port, self._cfg.bootstrap_port_annotation)
                 for p in pods}
        self._pods[role] = {key: w for key, w in found.items() if w is not None}
        self._reconcile(role)

    def _apply(self, role: str, event: WatchEvent) -> None:
        if event.type == "BOOKMARK":
            return
        key = pod_key(event.obj)
        worker = None if event.type == "DELETED" else pod_worker(
            event.obj, self._cfg.port, self._cfg.bootstrap_port_annotation)
        if worker is None:
            self._pods[role].pop(key, None)
        else:
            self._pods[role][key] = worker
        self._reconcile(role)

    # -- list and watch -----------------------------------------------------------------------
    async def _watch(self, session: aiohttp.ClientSession, role: str, version: str) -> str:
        """Follow one watch stream; return the last resourceVersion seen."""
        stream = self._api.watch_pods(session, self._selectors[role], version)
        async with contextlib.aclosing(stream):  # the response closes even if _apply fails
            async for event in stream:
                version = event.resource_version or version
                self._apply(role, event)
        return version

    async def _follow(self, session: aiohttp.ClientSession, role: str) -> None:
        """List, reconcile, watch; start over as the failure demands. Runs until cancelled."""
        backoff = self._cfg.initial_backoff_s
        while True:
            attempt_started = time.monotonic()
            try:
                pods, version = await self._api.list_pods(session, self._selectors[role])
                self._replace(role, pods)
                self._synced[role].set()
                logger.info("discovery: %d ready %s pods match %s", len(self._pods[role]), role,
                            self._selectors[role])
                while True:
                    started = time.monotonic()
                    version = await self._watch(session, role, version)
                    if time.monotonic() - started < MIN_WATCH_S:
                        raise KubeApiError("the watch stream ended at once")
                    self._restarts[(role, "closed")] += 1
            except ResourceExpired as exc:
                self._restarts[(role, "expired")] += 1
                logger.info("discovery (%s): %s; listing again", role, exc)
            except KubeApiError as exc:
                self._restarts[(role, "error")] += 1
                if time.monotonic() - attempt_started > self._cfg.max_backoff_s:
                    backoff = self._cfg.initial_backoff_s  # it worked for a while: start over
                logger.warning("discovery (%s): %s; listing again in %.1f s", role, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._cfg.max_backoff_s)

    @contextlib.asynccontextmanager
    async def running(self, on_bootstrap_port: BootstrapSink | None = None
                      ) -> AsyncIterator[None]:
        """Watch every role's pods while the context is open (its own ``ClientSession``, which
        decompresses, unlike the app's relay session)."""
        self._on_bootstrap = on_bootstrap_port
        async with aiohttp.ClientSession() as session:
            tasks = [asyncio.create_task(self._guarded(session, role)) for role in self._selectors]
            logger.info("discovery: watching pods at %s (%s)", self._api.pods_url,
                        ", ".join(f"{r}: {s}" for r, s in self._selectors.items()))
            try:
                yield
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _guarded(self, session: aiohttp.ClientSession, role: str) -> None:
        while True:
            try:
                await self._follow(session, role)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not end discovery for good
                self._restarts[(role, "error")] += 1
                logger.exception("discovery (%s) failed; restarting", role)
                await asyncio.sleep(self._cfg.max_backoff_s)
