"""Shared pytest set-up: GPU tests skip cleanly without CUDA, and tests that start real worker
processes run one after another on one pytest-xdist worker while the unit tests run beside them.

The README's test command runs ``pytest -n 2 --dist loadgroup``: every test under
``tests/integration/`` and ``tests/gpu/`` is put in one ``xdist_group``, so they keep running
in file order in one process (their real SGLang workers are pinned to cores 0 and 1 and their
session fixtures are shared), and the second xdist process takes the unit tests. Without ``-n``
(plain ``pytest``) the group mark does nothing and everything runs in one process as before.
"""

from __future__ import annotations

import os

import pytest

_SERIAL_DIRS = ("integration", "gpu")
_TESTS = os.path.dirname(os.path.abspath(__file__))


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def _serial(item: pytest.Item) -> bool:
    rel = os.path.relpath(str(item.path), _TESTS)
    return rel.split(os.sep, 1)[0] in _SERIAL_DIRS


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _serial(item):
            item.add_marker(pytest.mark.xdist_group("real-processes"))
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none found)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
