"""The kvstore server's counters and its HTTP side port: ``GET /stats`` and ``GET /metrics``.

Who calls it: ``kvstore.server`` owns one ``ServerCounters``, records every connection and
request in it, and serves ``create_http_app`` on ``ServerConfig.http_port``. Tier figures are
read from ``PageStore.stats()`` at request time (the store owns them), in the server's thread
pool because a store may lock or touch disk. Prometheus names carry the ``banaserve_kvstore_``
prefix: tier sizes are gauges, tier and request counts are counters.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Iterator
from concurrent.futures import Executor
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvstore.backends.base import PageStore, TierStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_PREFIX = "banaserve_kvstore_"


class ServerCounters:
    """Connection and request counters of one server; thread-safe, monotonic except
    ``connections`` (the connections open now)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connections = 0
        self._connections_total = 0
        self._requests: dict[str, int] = {}
        self._keys: dict[str, int] = {}
        self._errors: dict[str, int] = {}
        self._bytes_in = 0
        self._bytes_out = 0

    def connection_opened(self) -> None:
        with self._lock:
            self._connections += 1
            self._connections_total += 1

    def connection_closed(self) -> None:
        with self._lock:
            self._connections -= 1

    def record(self, op: str | None, error: str | None, num_keys: int, bytes_in: int,
               bytes_out: int) -> None:
        """One answered frame: ``op`` if it was readable, ``error`` code if it failed."""
        with self._lock:
            if op is not None:
                self._requests[op] = self._requests.get(op, 0) + 1
                self._keys[op] = self._keys.get(op, 0) + num_keys
            if error is not None:
                self._errors[error] = self._errors.get(error, 0) + 1
            self._bytes_in += bytes_in
            self._bytes_out += bytes_out

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"connections": self._connections,
                    "connections_total": self._connections_total,
                    "requests": dict(self._requests), "keys": dict(self._keys),
                    "errors": dict(self._errors),
                    "bytes_in": self._bytes_in, "bytes_out": self._bytes_out}


def stats_document(store: PageStore, counters: ServerCounters) -> dict[str, Any]:
    """The ``/stats`` body and the ``stats`` op's results: tiers (fastest first) and server."""
    return {"tiers": [dataclasses.asdict(tier) for tier in store.stats()],
            "server": counters.snapshot()}


class _Snapshot(Collector):
    """Metric families built from one stats snapshot (a fresh registry per scrape)."""

    def __init__(self, tiers: list[TierStats], server: dict[str, Any]) -> None:
        self._tiers = tiers
        self._server = server

    def collect(self) -> Iterator[Metric]:
        yield from self._tier_families()
        server = self._server
        yield GaugeMetricFamily(_PREFIX + "connections", "Client connections open now",
                                value=server["connections"])
        yield CounterMetricFamily(_PREFIX + "connections_accepted", "Client connections accepted",
                                  value=server["connections_total"])
        for name, doc, values, label in (
                ("requests", "Requests answered, by op", server["requests"], "op"),
                ("keys", "Keys named in requests, by op", server["keys"], "op"),
                ("errors", "Error replies, by error code", server["errors"], "code")):
            family = CounterMetricFamily(_PREFIX + name, doc, labels=[label])
            for value_label, value in sorted(values.items()):
                family.add_metric([value_label], value)
            yield family
        yield CounterMetricFamily(_PREFIX + "received_bytes", "Frame bytes received",
                                  value=server["bytes_in"])
        yield CounterMetricFamily(_PREFIX + "sent_bytes", "Frame bytes sent",
                                  value=server["bytes_out"])

    def _tier_families(self) -> Iterator[Metric]:
        gauges = {"pages": "Pages stored in the tier", "bytes": "Page bytes stored in the tier",
                  "capacity_bytes": "Page bytes the tier may hold"}
        counters = {"hits": "Pages found", "misses": "Pages not found", "puts": "Pages stored",
                    "evictions": "Pages evicted to make room",
                    "errors": "Corrupted or unreadable pages found (each removed)"}
        for name, doc in gauges.items():
            family = GaugeMetricFamily(f"{_PREFIX}tier_{name}", doc, labels=["tier"])
            for tier in self._tiers:
                family.add_metric([tier.name], getattr(tier, name))
            yield family
        for name, doc in counters.items():
            family = CounterMetricFamily(f"{_PREFIX}tier_{name}", doc, labels=["tier"])
            for tier in self._tiers:
                family.add_metric([tier.name], getattr(tier, name))
            yield family
        extra = GaugeMetricFamily(_PREFIX + "tier_extra", "Backend-specific tier figures",
                                  labels=["tier", "name"])
        for tier in self._tiers:
            for name, value in sorted(tier.extra.items()):
                extra.add_metric([tier.name, name], value)
        yield extra


def render_metrics(store: PageStore, counters: ServerCounters) -> bytes:
    """The Prometheus text exposition of the store's tiers and the server's counters."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(store.stats(), counters.snapshot()))
    return generate_latest(registry)


_STORE = web.AppKey("store", PageStore)
_COUNTERS = web.AppKey("counters", ServerCounters)
_EXECUTOR = web.AppKey("executor", Executor)


def create_http_app(store: PageStore, counters: ServerCounters,
                    executor: Executor) -> web.Application:
    """The side-port app; store reads run on ``executor`` (the server's thread pool)."""
    app = web.Application()
    app[_STORE], app[_COUNTERS], app[_EXECUTOR] = store, counters, executor
    app.router.add_get("/stats", _get_stats)
    app.router.add_get("/metrics", _get_metrics)
    return app


async def _get_stats(request: web.Request) -> web.Response:
    app = request.app
    document = await asyncio.get_running_loop().run_in_executor(
        app[_EXECUTOR], stats_document, app[_STORE], app[_COUNTERS])
    return web.json_response(document)


async def _get_metrics(request: web.Request) -> web.Response:
    app = request.app
    body = await asyncio.get_running_loop().run_in_executor(
        app[_EXECUTOR], render_metrics, app[_STORE], app[_COUNTERS])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
