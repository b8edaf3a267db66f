"""Prometheus metrics for ``GET /metrics``.

Counters and histograms are updated by ``handlers`` and ``proxy`` as requests pass; per-worker
gauges are read from ``WorkerPool.snapshot()`` at scrape time, so worker state has one owner.
Names follow Prometheus conventions with the ``banaserve_router_`` prefix; the rebalancer's
(``--rebalance``, ``watch_rebalancer``) use ``banaserve_rebalance_``. Service discovery's
(``--service-discovery``, ``watch_discovery``) are read from ``Discovery`` at scrape time too.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from router.admission import Admission
from router.workers import WorkerPool

if TYPE_CHECKING:
    from router.cache_report import CacheCounters
    from router.rebalance.signals import InstanceSignals
    from router.store_index import StoreIndexStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0)
disable_created_metrics()
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


M = TypeVar("M", Counter, Histogram)


class _Labelled(Generic[M]):
    """A labelled metric whose children are looked up once per label set.

    ``prometheus_client``'s ``labels()`` validates and locks on every call (about 5 us); the hot
    path calls it five times per request, so children are cached (label sets are few: routes,
    statuses, worker URLs, reasons)."""

    def __init__(self, metric: M) -> None:
        self.metric = metric
        self.labels: Any = functools.lru_cache(maxsize=4096)(metric.labels)


class _WorkerCollector(Collector):
    def __init__(self, pools: list[WorkerPool], admission: Admission | None) -> None:
        self._pools = pools
        self._admission = admission

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = time.monotonic()
        families = {
            "healthy": GaugeMetricFamily("banaserve_router_worker_healthy",
                                         "1 if the worker passes health checks", labels=["worker"]),
            "in_flight": GaugeMetricFamily("banaserve_router_worker_in_flight",
                                           "Requests sent by this router and not finished",
                                           labels=["worker"]),
            "running": GaugeMetricFamily("banaserve_router_worker_running_requests",
                                         "num_running_reqs from the worker's last /v1/loads",
                                         labels=["worker"]),
            "waiting": GaugeMetricFamily("banaserve_router_worker_waiting_requests",
                                         "num_waiting_reqs from the worker's last /v1/loads",
                                         labels=["worker"]),
            "usage": GaugeMetricFamily("banaserve_router_worker_kv_usage",
                                       "KV pool usage (0-1) from the worker's last /v1/loads",
                                       labels=["worker"]),
            "age": GaugeMetricFamily("banaserve_router_worker_load_age_seconds",
                                     "Age of the last load reading", labels=["worker"]),
            "breaker": GaugeMetricFamily("banaserve_router_worker_breaker_state",
                                         "Circuit breaker: 0 closed, 1 open, 2 half-open",
                                         labels=["worker"]),
        }
        for view in (v for pool in self._pools for v in pool.snapshot()):
            labels = [view.url]
            families["healthy"].add_metric(labels, 1.0 if view.healthy else 0.0)
            families["in_flight"].add_metric(labels, view.in_flight)
            families["running"].add_metric(labels, view.load.num_running_reqs)
            families["waiting"].add_metric(labels, view.load.num_waiting_reqs)
            families["usage"].add_metric(labels, view.load.token_usage)
            families["breaker"].add_metric(labels, view.breaker.value)
            if view.load.at:
                families["age"].add_metric(labels, now - view.load.at)
        yield from families.values()
        if self._admission is not None:
            active = GaugeMetricFamily("banaserve_router_active_requests",
                                       "Requests admitted and being forwarded")
            active.add_metric([], self._admission.active)
            queued = GaugeMetricFamily("banaserve_router_queued_requests",
                                       "Requests waiting for an admission slot")
            queued.add_metric([], self._admission.queued)
            yield active
            yield queued


class _BatcherCollector(Collector):
    def __init__(self, num_waiting: Callable[[], int]) -> None:
        self._num_waiting = num_waiting

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("banaserve_router_batcher_waiting_requests",
                                   "Requests held by --batching for a batch")
        family.add_metric([], self._num_waiting())
        yield family


class _CacheReportCollector(Collector):
    """Each worker's own prompt and cached-token counters (``router.cache_report``)."""

    def __init__(self, read: Callable[[], dict[str, CacheCounters]]) -> None:
        self._read = read

    def collect(self) -> Iterator[CounterMetricFamily]:
        prompt = CounterMetricFamily("banaserve_worker_prompt_tokens",
                                     "Prompt tokens a worker was sent (its "
                                     "sglang:prompt_tokens_total, read by the router)",
                                     labels=["worker"])
        cached = CounterMetricFamily("banaserve_worker_cached_tokens",
                                     "Prompt tokens a worker found cached, per tier (device: "
                                     "radix cache; host: HiCache host tier; storage: the L3, "
                                     "e.g. the kvstore); its sglang:cached_tokens_total",
                                     labels=["worker", "tier"])
        for url, c in self._read().items():
            prompt.add_metric([url], c.prompt_tokens)
            for tier, n in c.cached_tokens.items():
                cached.add_metric([url, tier], n)
        yield prompt
        yield cached


class _KvIndexCollector(Collector):
    """The prefix index's per-worker counts (``router.kv_events``), read at scrape time."""

    def __init__(self, read: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        blocks = GaugeMetricFamily("banaserve_kv_index_blocks",
                                   "KV blocks the router's index holds for a worker, per medium "
                                   "(GPU: device radix cache; CPU: HiCache host tier)",
                                   labels=["worker", "medium"])
        events = CounterMetricFamily("banaserve_kv_index_events",
                                     "KV events applied from a worker", labels=["worker"])
        resets = CounterMetricFamily("banaserve_kv_index_resets",
                                     "Times a worker's indexed cache was dropped (lost events, "
                                     "bad batch, stream failure)", labels=["worker"])
        for url, row in self._read().items():
            for medium, n in row["num_blocks"].items():
                blocks.add_metric([url, medium], n)
            events.add_metric([url], row["num_events"])
            resets.add_metric([url], row["num_resets"])
        yield blocks
        yield events
        yield resets


class _StoreIndexCollector(Collector):
    """The shared store's lookups (``--kvstore``, ``router.store_index``), read at scrape time."""

    def __init__(self, stats: StoreIndexStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[CounterMetricFamily]:
        lookups = CounterMetricFamily("banaserve_store_lookups",
                                      "Prompts looked up in the shared kvstore before dispatch, "
                                      "by result (hit, miss, error, skipped)", labels=["result"])
        for result, n in self._stats.lookups.items():
            lookups.add_metric([result], n)
        yield lookups
        yield CounterMetricFamily("banaserve_store_lookup_tokens",
                                  "Leading prompt tokens the lookups found in the store",
                                  value=self._stats.tokens)


class _RebalanceCollector(Collector):
    """Per-worker rebalancer gauges, read from the rebalancer's latest signals at scrape time."""

    def __init__(self, read: Callable[[], list[InstanceSignals]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        compute = GaugeMetricFamily("banaserve_rebalance_compute_util",
                                    "Smoothed compute utilisation U_c (running + waiting per "
                                    "running slot) the rebalancer decides on", labels=["worker"])
        kv = GaugeMetricFamily("banaserve_rebalance_kv_util",
                               "Smoothed KV utilisation U_kv the rebalancer decides on",
                               labels=["worker"])
        layers = GaugeMetricFamily("banaserve_rebalance_migrated_layers",
                                   "Decoder layers of the worker running on a layer host",
                                   labels=["worker"])
        heads = GaugeMetricFamily("banaserve_rebalance_offloaded_heads",
                                  "KV heads of the worker offloaded, summed over its offloads",
                                  labels=["worker"])
        for s in self._read():
            compute.add_metric([s.url], s.compute_util)
            kv.add_metric([s.url], s.kv_util)
            if s.status is not None:
                layers.add_metric([s.url], s.status.num_migrated_layers)
                heads.add_metric([s.url], s.status.num_offloaded_heads)
        yield from (compute, kv, layers, heads)


class _DiscoveryCollector(Collector):
    """Service discovery's counts, read from ``Discovery`` (their owner) at scrape time."""

    def __init__(self, num_discovered: Callable[[], dict[str, int]],
                 restarts: Callable[[], dict[tuple[str, str], int]]) -> None:
        self._num_discovered = num_discovered
        self._restarts = restarts

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        workers = GaugeMetricFamily("banaserve_router_discovered_workers",
                                    "Workers added by Kubernetes service discovery, by role",
                                    labels=["role"])
        for role, count in self._num_discovered().items():
            workers.add_metric([role], count)
        restarts = CounterMetricFamily("banaserve_router_discovery_watch_restarts",
                                       "Pod list/watch restarts by role and reason (closed: "
                                       "resumed after the server ended it, expired: 410 Gone, "
                                       "error)", labels=["role", "reason"])
        for (role, reason), count in sorted(self._restarts().items()):
            restarts.add_metric([role, reason], count)
        yield workers
        yield restarts


class RouterMetrics:
    def __init__(self, pools: list[WorkerPool], admission: Admission | None = None) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry

        def counter(name: str, doc: str, labels: list[str]) -> _Labelled[Counter]:
            return _Labelled(Counter(name, doc, labels, registry=reg))

        def histogram(name: str, doc: str, labels: list[str]) -> _Labelled[Histogram]:
            return _Labelled(Histogram(name, doc, labels, buckets=LATENCY_BUCKETS, registry=reg))

        self.requests = counter("banaserve_router_requests",
                                "Requests answered, by route and HTTP status", ["route", "status"])
        self.duration = histogram("banaserve_router_request_duration_seconds",
                                  "Time from request to the last byte of the answer", ["route"])
        self.first_byte = histogram("banaserve_router_time_to_first_byte_seconds",
                                    "Time from request to the first byte from the worker",
                                    ["route"])
        self.ttft = histogram("banaserve_router_time_to_first_token_seconds",
                              "Streams: time from request to the first relayed chunk", ["route"])
        self.dispatched = counter("banaserve_router_worker_requests", "Requests sent to a worker",
                                  ["worker"])
        self.retries = counter("banaserve_router_retries", "Attempts that failed before the "
                               "first byte and were retried or given up, by worker and reason",
                               ["worker", "reason"])
        self.decisions = counter("banaserve_router_routing_decisions",
                                 "Workers chosen by the policy", ["policy", "worker"])
        self.rejected = counter("banaserve_router_rejected",
                                "Requests refused before dispatch, by reason", ["reason"])
        self.upstream_errors = counter("banaserve_router_upstream_errors",
                                       "Worker failures while answering, by kind",
                                       ["worker", "kind"])
        self.client_disconnects = counter("banaserve_router_client_disconnects",
                                          "Requests whose client went away before the end "
                                          "(the upstream request is aborted)", ["route"])
        self.length_predictions = counter(
            "banaserve_router_length_predictions", "Output-length annotations by result (ok, "
            "timeout, error, no_text)", ["result"])
        self.length_seconds = Histogram(
            "banaserve_router_length_prediction_seconds", "Time a request waited for its "
            "output-length prediction (batching wait + forward pass)", buckets=(
                0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0), registry=reg)
        self.length_batch_size = Histogram(
            "banaserve_router_length_prediction_batch_size", "Requests per prediction batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=reg)
        self.batches = counter("banaserve_router_batches", "Batches dispatched by --batching, "
                               "by policy", ["policy"])
        self.batch_size = Histogram(
            "banaserve_router_batch_size", "Requests per dispatched batch (--batching)",
            buckets=(1, 2, 4, 8, 16, 32, 64), registry=reg)
        self.slo = counter("banaserve_router_slo", "Requests with an SLO (--batching) that "
                           "finished within it (met) or not (missed)", ["result"])
        self.batch_wait = Histogram(
            "banaserve_router_batch_wait_seconds", "Time a request waited in the batcher",
            buckets=LATENCY_BUCKETS, registry=reg)
        self.rebalance_decisions: _Labelled[Counter] | None = None  # watch_rebalancer()
        self.registry.register(_WorkerCollector(pools, admission))

    def watch_batcher(self, num_waiting: Callable[[], int]) -> None:
        """Export the batcher's waiting count at scrape time (the batcher owns it)."""
        self.registry.register(_BatcherCollector(num_waiting))

    def watch_discovery(self, num_discovered: Callable[[], dict[str, int]],
                        restarts: Callable[[], dict[tuple[str, str], int]]) -> None:
        """Export service discovery's worker counts and watch restarts (``--service-discovery``)."""
        self.registry.register(_DiscoveryCollector(num_discovered, restarts))

    def watch_kv_index(self, read: Callable[[], dict[str, dict[str, Any]]]) -> None:
        """Export the prefix index's per-worker counts (``router.kv_events``)."""
        self.registry.register(_KvIndexCollector(read))

    def watch_store_index(self, stats: StoreIndexStats) -> None:
        """Export the shared store's lookups (``router.store_index``)."""
        self.registry.register(_StoreIndexCollector(stats))

    def watch_cache_report(self, read: Callable[[], dict[str, CacheCounters]]) -> None:
        """Export each worker's prompt and per-tier cached tokens (``router.cache_report``)."""
        self.registry.register(_CacheReportCollector(read))

    def watch_rebalancer(self, read: Callable[[], list[InstanceSignals]]) -> None:
        """Export the rebalancer's decisions and its per-worker signals (``--rebalance``)."""
        self.rebalance_decisions = _Labelled(Counter(
            "banaserve_rebalance_decisions", "Rebalancer decisions by kind and outcome (ok, "
            "accepted, refused, error, cancelled, dry_run; noted for skips)",
            ["kind", "outcome"], registry=self.registry))
        self.registry.register(_RebalanceCollector(read))

    def count_rebalance(self, kind: str, outcome: str) -> None:
        assert self.rebalance_decisions is not None, "watch_rebalancer() was not called"
        self.rebalance_decisions.labels(kind, outcome).inc()

    def batch_dispatched(self, policy: str, size: int) -> None:
        self.batches.labels(policy).inc()
        self.batch_size.observe(size)

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))
