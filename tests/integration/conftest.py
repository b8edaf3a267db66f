"""Clusters shared by several modules (``tests/integration/shared.py``: each starts on first use
and stops once the run moves on to a module that does not use it; the fixtures are per module,
the clusters behind them are not): two real SGLang CPU workers
on the tiny model with the router in front, and the layer-migration / head-offload clusters
(tiny and SmolLM2) of ``test_layer_migration`` and ``test_head_offload``."""

from __future__ import annotations

import pytest

from runtime_patches.launch import WorkerProcess
from tests.integration.cluster import RouterProcess, start_workers
from tests.integration.migration_cluster import TINY_POOL, Cluster
from tests.integration.shared import SHARED


def _stop_workers(workers: list[WorkerProcess]) -> None:
    for w in workers:
        w.stop()


def _start_router(workers: list[WorkerProcess]) -> RouterProcess:
    proc = RouterProcess([w.url for w in workers], tag="router-tiny")
    proc.wait_ready()
    return proc


def _migration_cluster(model: str, tag: str, **kwargs: int) -> Cluster:
    cluster = Cluster(model, tag, **kwargs)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="module")
def tiny_workers() -> list[WorkerProcess]:
    """Two tiny-model workers, one per core (a test may replace one; the list is shared)."""
    workers: list[WorkerProcess] = SHARED.get(
        "tiny_workers", lambda: start_workers("tiny", 2, "tiny-worker"), _stop_workers)
    return workers


@pytest.fixture(scope="module")
def router(tiny_workers: list[WorkerProcess]) -> RouterProcess:
    """The router in front of ``tiny_workers``, with its defaults (``cost_aware``, KV index)."""
    proc: RouterProcess = SHARED.get("router", lambda: _start_router(tiny_workers),
                                     RouterProcess.stop)
    return proc


@pytest.fixture(scope="module")
def migration_tiny() -> Cluster:
    """Tiny worker (KV pool of ``TINY_POOL`` tokens) on core 0, layer hosts on core 1."""
    cluster: Cluster = SHARED.get(
        "migration_tiny",
        lambda: _migration_cluster("tiny", "migration-tiny", max_total_tokens=TINY_POOL),
        Cluster.stop)
    return cluster


@pytest.fixture(scope="module")
def migration_smollm2() -> Cluster:
    """SmolLM2-135M worker on core 0, layer hosts on core 1."""
    cluster: Cluster = SHARED.get(
        "migration_smollm2", lambda: _migration_cluster("smollm2", "migration-smollm2"),
        Cluster.stop)
    return cluster


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    SHARED.release_for(nextitem.nodeid.split("::", 1)[0] if nextitem is not None else None)


def pytest_sessionfinish(session: pytest.Session) -> None:
    SHARED.stop_all()
