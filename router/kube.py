"""The Kubernetes API, as far as service discovery needs it: list and watch pods over HTTP.

No ``kubernetes`` client package: two GET requests on an ``aiohttp`` session. Who calls what:
- ``app`` calls ``KubeApi.from_config()`` once in ``create_app``: in-cluster settings from the
  pod's environment and service-account files, or ``--k8s-api-url`` (with
  ``--k8s-token-file`` / ``--k8s-ca-file``). A setting that cannot work is a ValueError there,
  so the router does not start.
- ``discovery`` calls ``list_pods()`` (``GET .../pods?labelSelector=...``), then
  ``watch_pods()`` from the list's resourceVersion, which yields ``WatchEvent``s from the
  newline-delimited JSON stream until the API server ends it. ``ResourceExpired`` (410 Gone, as
  an HTTP status or an ``ERROR`` event) means "list again"; ``KubeApiError`` is any other failure.
This module keeps no state between calls; the bearer token is read from its file before each
request, since service-account tokens are rotated by the kubelet.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from router.config import DiscoveryConfig

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
LIST_TIMEOUT_S = 30.0


class KubeApiError(Exception):
    """A list or watch that failed: a network error, an error status, an unreadable answer."""


class ResourceExpired(KubeApiError):
    """410 Gone: the resourceVersion is older than the API server keeps; list again."""


@dataclass(frozen=True)
class WatchEvent:
    """One line of a watch stream: ``type`` is ADDED, MODIFIED, DELETED or BOOKMARK."""

    type: str
    obj: dict[str, Any]

    @property
    def resource_version(self) -> str | None:
        return (self.obj.get("metadata") or {}).get("resourceVersion")


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class KubeApi:
    def __init__(self, base_url: str, namespace: str | None = None,
                 token_file: str | None = None, ssl_context: ssl.SSLContext | None = None,
                 watch_timeout_s: int = 300) -> None:
        self.base_url = base_url.rstrip("/")
        self.namespace = namespace
        self._token_file = token_file
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._watch_timeout_s = watch_timeout_s

    @classmethod
    def from_config(cls, cfg: DiscoveryConfig,
                    env: Mapping[str, str] | None = None) -> KubeApi:
        """Resolve where the API is and how to authenticate; ValueError if it cannot work."""
        env = os.environ if env is None else env
        token_file, ca_file = cfg.token_file, cfg.ca_file
        if cfg.api_url is not None:
            base_url = cfg.api_url
        else:
            host = env.get("KUBERNETES_SERVICE_HOST")
            if not host:
                raise ValueError("DiscoveryConfig.api_url: not running in a Kubernetes pod "
                                 "(KUBERNETES_SERVICE_HOST is unset); give --k8s-api-url")
            base_url = f"https://{_bracket(host)}:{env.get('KUBERNETES_SERVICE_PORT', '443')}"
            token_file = token_file or os.path.join(SERVICE_ACCOUNT_DIR, "token")
            ca_file = ca_file or os.path.join(SERVICE_ACCOUNT_DIR, "ca.crt")
        if token_file is not None and not os.path.isfile(token_file):
            raise ValueError(f"DiscoveryConfig.token_file: {token_file} is not a file")
        context = None
        if base_url.startswith("https://") and ca_file is not None:
            try:
                context = ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"DiscoveryConfig.ca_file: cannot load {ca_file}: {exc}") from None
        return cls(base_url, cfg.namespace, token_file, context, cfg.watch_timeout_s)

    @property
    def pods_url(self) -> str:
        if self.namespace is None:
            return f"{self.base_url}/api/v1/pods"
        return f"{self.base_url}/api/v1/namespaces/{self.namespace}/pods"

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self._token_file is not None:
            try:
                with open(self._token_file) as f:
                    headers["Authorization"] = f"Bearer {f.read().strip()}"
            except OSError as exc:
                raise KubeApiError(f"cannot read the token file {self._token_file}: {exc}") from exc
        return headers

    async def list_pods(self, session: aiohttp.ClientSession,
                        label_selector: str) -> tuple[list[dict[str, Any]], str]:
        """The pods matching ``label_selector`` and the list's resourceVersion."""
        params = {"labelSelector": label_selector}
        timeout = aiohttp.ClientTimeout(total=LIST_TIMEOUT_S)
        try:
            async with session.get(self.pods_url, params=params, headers=self._headers(),
                                   ssl=self._ssl, timeout=timeout) as resp:
                await _raise_for_status(resp)
                body = await resp.json(content_type=None)
            return list(body.get("items") or []), str(body["metadata"]["resourceVersion"])
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError,
                AttributeError) as exc:
            raise KubeApiError(f"listing pods failed: {type(exc).__name__}: {exc}") from exc

    async def watch_pods(self, session: aiohttp.ClientSession, label_selector: str,
                         resource_version: str) -> AsyncGenerator[WatchEvent, None]:
        """Changes after ``resource_version`` until the API server ends the stream."""
        params = {"labelSelector": label_selector, "watch": "true",
                  "resourceVersion": resource_version, "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(self._watch_timeout_s)}
        # the server sends a bookmark about every minute; silence much longer than the
        # watch's own timeout means the connection is dead
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=LIST_TIMEOUT_S,
                                        sock_read=self._watch_timeout_s + 60)
        try:
            async with session.get(self.pods_url, params=params, headers=self._headers(),
                                   ssl=self._ssl, timeout=timeout) as resp:
                await _raise_for_status(resp)
                buffer = b""
                async for chunk in resp.content.iter_any():
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        if line.strip():
                            yield _event(json.loads(line))
                if buffer.strip():
                    yield _event(json.loads(buffer))
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise KubeApiError(f"watching pods failed: {type(exc).__name__}: {exc}") from exc


def _event(payload: Any) -> WatchEvent:
    if not isinstance(payload, dict):
        raise KubeApiError(f"unexpected watch line {payload!r:.100}")
    kind, obj = payload.get("type"), payload.get("object") or {}
    if kind == "ERROR":  # obj is a metav1.Status
        if obj.get("code") == 410:
            raise ResourceExpired(f"watch expired: {obj.get('message')}")
        raise KubeApiError(f"watch error {obj.get('code')}: {obj.get('message')}")
    if kind not in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK"):
        raise KubeApiError(f"unexpected watch event type {kind!r}")
    return WatchEvent(kind, obj)


async def _raise_for_status(resp: aiohttp.ClientResponse) -> None:
    if resp.status == 200:
        return
    text = (await resp.text(errors="replace"))[:300]
    try:
        message = str(json.loads(text).get("message", text))
    except (ValueError, AttributeError):
        message = text
    if resp.status == 410:
        raise ResourceExpired(f"410 Gone: {message}")
    hint = (" (the router's service account needs get/list/watch on pods in that namespace, "
            "or every namespace without --service-discovery-namespace)"
            if resp.status in (401, 403) else "")
    raise KubeApiError(f"{resp.method} {resp.url.path} answered {resp.status}: {message}{hint}")
