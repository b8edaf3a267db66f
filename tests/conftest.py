"""Shared pytest set-up: GPU tests skip cleanly without CUDA, and the suite runs in two
processes (``pytest -n 2``, pytest-xdist) that never meet.

- Scheduling: a module is one unit of work, run whole by one process (its module fixtures
  start once, its tests keep their order); the modules in ``GROUPS`` share a cluster
  (``tests/integration/shared.py``) and form one unit, run one after another, so the cluster
  starts once and stops when they are done. Units go out longest first (``GROUPS`` order,
  then collection order). The same order holds in a plain ``pytest`` run.
- Isolation: each process picks listening ports from its own slice (``BANASERVE_PORTS``, read by
  ``runtime_patches.launch.free_port`` here and in the processes it starts) and writes its logs
  under ``logs/tests/<worker>/``.

pytest 9 ignores pytest-xdist's ``--dist loadgroup`` marks (it renames node ids, which pytest 9
no longer reads back), hence the scheduler of our own (``pytest_xdist_make_scheduler``).
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from tests.integration.shared import SHARED

FIRST_PORT, LAST_PORT = 10000, 21999  # below SGLang's own picks (launch.SGLANG_PORT_PICKS)
"""Listening ports the test processes share out: below Linux's default ephemeral range."""

_I = "tests/integration/"
GROUPS: dict[str, tuple[str, ...]] = {
    # the session's two tiny workers and router (fixtures tiny_workers, router): ~900 s
    "tiny-router": tuple(_I + m for m in (
        "test_bench_suite.py", "test_bench_replay.py", "test_discovery_worker.py",
        "test_kv_events.py", "test_pd_disaggregation.py", "test_router_batching.py",
        "test_router_errors.py", "test_router_hardening.py", "test_router_length_predictor.py",
        "test_router_serving.py", "test_runtime_patches.py", "test_worker_failure.py")),
    # the layer-migration / head-offload clusters (migration_tiny, migration_smollm2): ~300 s
    "migration": (_I + "test_head_offload.py", _I + "test_layer_migration.py"),
    # long on their own (about 190 and 130 s), so handed out early
    "multihost": (_I + "test_multihost_ssh.py",),
    "rebalancer": (_I + "test_rebalancer.py",),
}
SHARED_FIXTURES = {"tiny_workers": "tiny-router", "router": "tiny-router",
                   "migration_tiny": "migration", "migration_smollm2": "migration"}
"""Each shared cluster's fixture, and the group every module that uses it must be in."""
_GROUP_OF = {module: group for group, modules in GROUPS.items() for module in modules}


def module_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def unit_of(nodeid: str) -> str:
    """The scheduling unit of a test: its group, or its module."""
    module = module_of(nodeid)
    return _GROUP_OF.get(module, module)


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def pytest_configure(config: pytest.Config) -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker:
        return
    index, count = int(worker.removeprefix("gw")), int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    size = (LAST_PORT - FIRST_PORT + 1) // count
    lo = FIRST_PORT + index * size
    os.environ["BANASERVE_PORTS"] = f"{lo}-{lo + size - 1}"
    logs = os.environ.get("BANASERVE_TEST_LOGS", os.path.join(os.getcwd(), "logs", "tests"))
    os.environ["BANASERVE_TEST_LOGS"] = os.path.join(logs, worker)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for name in SHARED_FIXTURES.keys() & set(item.fixturenames):
            module, group = module_of(item.nodeid), SHARED_FIXTURES[name]
            if _GROUP_OF.get(module) != group:
                raise pytest.UsageError(f"{module} uses the shared fixture {name!r}: add it to "
                                        f"GROUPS[{group!r}] in tests/conftest.py")
            SHARED.note_users(name, [module])
    rank = {group: i for i, group in enumerate(GROUPS)}
    first_seen: dict[str, int] = {}
    for item in items:
        first_seen.setdefault(unit_of(item.nodeid), len(first_seen))
    items.sort(key=lambda item: (rank.get(unit_of(item.nodeid), len(rank)),
                                 first_seen[unit_of(item.nodeid)]))
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none found)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling

    class ByUnit(LoadScopeScheduling):
        """Whole units (``unit_of``) to one process each, in collection order."""

        def __init__(self, config: pytest.Config, log: Any = None) -> None:
            super().__init__(config, log)
            config.option.loadscopereorder = False  # keep our order, not largest-count first

        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

    return ByUnit(config, log)
