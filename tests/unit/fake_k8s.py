"""A fake Kubernetes API server (aiohttp, port 0) with just what service discovery uses.

``GET /api/v1/pods`` and ``GET /api/v1/namespaces/{ns}/pods``: a list (``labelSelector``
honoured, the current resourceVersion in ``metadata``) or, with ``watch=true``, a chunked stream
of newline-delimited JSON events after ``resourceVersion`` (history replayed, then live), ended
after ``timeoutSeconds``. Every pod change bumps one resourceVersion counter, as etcd does.
``compact()`` forgets history, so a watch from an older version gets 410 Gone (as an HTTP status
or, with ``expire_as="event"``, as an ``ERROR`` event, the way the real server mostly answers).
A bearer token is checked when ``token`` is set. Requests are recorded for assertions.

Mutations are plain methods; call them on the server's loop (``FakeKubeThread.call`` from
another thread).
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web

T = TypeVar("T")
_END = object()


def _status(code: int, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
            "reason": "Expired" if code == 410 else "Error", "code": code}


def _matches(labels: dict[str, str], selector: str) -> bool:
    pairs = [p.split("=", 1) for p in selector.split(",") if p]
    return all(labels.get(k) == v for k, v in pairs)


class FakeKubeApi:
    def __init__(self, token: str | None = "secret-token", expire_as: str = "status") -> None:
        self.token = token
        self.expire_as = expire_as
        self.version = 100
        self.compacted = 0
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.history: list[tuple[int, str, dict[str, Any]]] = []
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._watchers: list[tuple[str | None, str, asyncio.Queue[Any]]] = []
        self.app = web.Application()
        self.app.router.add_get("/api/v1/pods", self.pods_route)
        self.app.router.add_get("/api/v1/namespaces/{ns}/pods", self.pods_route)
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> FakeKubeApi:
        self.runner = web.AppRunner(self.app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        self.close_watches()
        if self.runner is not None:
            await self.runner.cleanup()

    # -- pods ---------------------------------------------------------------------------------
    def add_pod(self, name: str, ip: str | None, labels: dict[str, str], ready: bool = True,
                annotations: dict[str, str] | None = None, namespace: str = "default",
                phase: str = "Running") -> None:
        pod: dict[str, Any] = {
            "kind": "Pod", "apiVersion": "v1",
            "metadata": {"name": name, "namespace": namespace, "labels": dict(labels),
                         "annotations": dict(annotations or {})},
            "status": {"phase": phase, "conditions": []}}
        if ip is not None:
            pod["status"]["podIP"] = ip
        self._set_ready(pod, ready)
        self.pods[(namespace, name)] = pod
        self._emit("ADDED", pod)

    def set_ready(self, name: str, ready: bool, namespace: str = "default") -> None:
        pod = self.pods[(namespace, name)]
        self._set_ready(pod, ready)
        self._emit("MODIFIED", pod)

    def start_deleting(self, name: str, namespace: str = "default") -> None:
        """Graceful deletion begins: ``deletionTimestamp`` set, the pod still Running."""
        pod = self.pods[(namespace, name)]
        pod["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        self._emit("MODIFIED", pod)

    def delete_pod(self, name: str, namespace: str = "default") -> None:
        self._emit("DELETED", self.pods.pop((namespace, name)))

    @staticmethod
    def _set_ready(pod: dict[str, Any], ready: bool) -> None:
        pod["status"]["conditions"] = [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Ready", "status": "True" if ready else "False"}]

    def _emit(self, kind: str, pod: dict[str, Any]) -> None:
        self.version += 1
        pod["metadata"]["resourceVersion"] = str(self.version)
        snapshot = copy.deepcopy(pod)
        self.history.append((self.version, kind, snapshot))
        for namespace, selector, queue in self._watchers:
            if self._visible(snapshot, namespace, selector):
                queue.put_nowait({"type": kind, "object": snapshot})

    @staticmethod
    def _visible(pod: dict[str, Any], namespace: str | None, selector: str) -> bool:
        meta = pod["metadata"]
        return ((namespace is None or meta["namespace"] == namespace)
                and _matches(meta["labels"], selector))

    # -- watch control ------------------------------------------------------------------------
    def compact(self) -> None:
        """Forget the history: watches from any version seen so far get 410 Gone."""
        self.compacted = self.version

    def bookmark(self) -> None:
        for _, _, queue in self._watchers:
            queue.put_nowait({"type": "BOOKMARK", "object": {
                "kind": "Pod", "metadata": {"resourceVersion": str(self.version)}}})

    def close_watches(self) -> None:
        """End every open watch stream normally (as ``timeoutSeconds`` would)."""
        for _, _, queue in self._watchers:
            queue.put_nowait(_END)

    def expire_watches(self) -> None:
        """Send every open watch an ERROR event with 410 and end it."""
        for _, _, queue in self._watchers:
            queue.put_nowait({"type": "ERROR", "object": _status(410, "too old resource "
                                                                      "version")})
            queue.put_nowait(_END)

    @property
    def num_watches(self) -> int:
        return len(self._watchers)

    def requests_of(self, kind: str) -> list[dict[str, str]]:
        """Recorded query parameters of ``list`` or ``watch`` requests, in order."""
        return [q for k, q in self.requests if k == kind]

    # -- HTTP ---------------------------------------------------------------------------------
    async def pods_route(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        namespace = request.match_info.get("ns")
        watch = query.get("watch") in ("true", "1")
        self.requests.append(("watch" if watch else "list", {**query, "path": request.path}))
        if self.token is not None and (request.headers.get("Authorization")
                                       != f"Bearer {self.token}"):
            return web.json_response(_status(401, "Unauthorized"), status=401)
        selector = query.get("labelSelector", "")
        if not watch:
            items = [p for p in self.pods.values() if self._visible(p, namespace, selector)]
            return web.json_response({"kind": "PodList", "apiVersion": "v1",
                                      "metadata": {"resourceVersion": str(self.version)},
                                      "items": items})
        return await self._watch(request, namespace, selector, int(query["resourceVersion"]),
                                 float(query.get("timeoutSeconds", 1800)))

    async def _watch(self, request: web.Request, namespace: str | None, selector: str,
                     since: int, timeout_s: float) -> web.StreamResponse:
        if since < self.compacted and self.expire_as == "status":
            return web.json_response(_status(410, "too old resource version"), status=410)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        if since < self.compacted:
            queue.put_nowait({"type": "ERROR", "object": _status(410, "too old resource "
                                                                      "version")})
            queue.put_nowait(_END)
        else:
            for version, kind, pod in self.history:
                if version > since and self._visible(pod, namespace, selector):
                    queue.put_nowait({"type": kind, "object": pod})
        entry = (namespace, selector, queue)
        self._watchers.append(entry)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), deadline - loop.time())
                except TimeoutError:
                    break
                if item is _END:
                    break
                await response.write(json.dumps(item).encode() + b"\n")
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client went away
        finally:
            self._watchers.remove(entry)
        return response


class FakeKubeThread:
    """A ``FakeKubeApi`` on its own event loop in a thread, for tests whose router is another
    process: ``call(fn, ...)`` runs ``fn`` on that loop and returns its result."""

    def __init__(self, api: FakeKubeApi) -> None:
        self.api = api
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(api.start(), self._loop).result(10)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        async def run() -> T:
            return fn(*args, **kwargs)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.api.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
