"""Session fixtures: two real SGLang CPU workers on the tiny model, and the router in front."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from runtime_patches.launch import WorkerProcess
from tests.integration.cluster import RouterProcess, start_workers


@pytest.fixture(scope="session")
def tiny_workers() -> Iterator[list[WorkerProcess]]:
    workers = start_workers("tiny", 2, "tiny-worker")
    yield workers
    for w in workers:
        w.stop()


@pytest.fixture(scope="session")
def router(tiny_workers: list[WorkerProcess]) -> Iterator[RouterProcess]:
    proc = RouterProcess([w.url for w in tiny_workers], tag="router-tiny")
    proc.wait_ready()
    yield proc
    proc.stop()
