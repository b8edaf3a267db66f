"""The import hook that applies registered patches, loaded in every Python process of the venv.

Who calls it: the ``banaserve_runtime_patches.pth`` file in the venv's site-packages runs
``import runtime_patches.boot; runtime_patches.boot.install()`` at interpreter start, so the hook
is in place before SGLang imports anything, in the launcher and in every process SGLang spawns
(scheduler, detokenizer, ...). ``python -m runtime_patches install-pth`` writes that file.

Why a ``.pth`` file and not only SGLang's plugin entry point: SGLang's ``load_plugins()`` runs after
each process has imported its top-level modules, and ``sgl_kernel`` is imported by those modules,
so the kernel stand-in and the torchvision fix must exist earlier. Post-import fixes are applied the
moment their target module executes, before any other module can bind the unpatched object.
The entry point (:mod:`runtime_patches.plugin`) then verifies, inside each SGLang process, that the
hook ran and every patch whose module is loaded was applied.

Importing this module is cheap: no torch, no SGLang.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from runtime_patches.cpu import cpu_engine_enabled
from runtime_patches.registry import REGISTRY

_STANDIN_DIR = os.path.join(os.path.dirname(__file__), "cpu", "sgl_kernel")
STANDIN_MODULE = "sgl_kernel"

_installed: _PatchFinder | None = None


class _PatchFinder(importlib.abc.MetaPathFinder):
    """Serves the CPU ``sgl_kernel`` stand-in and runs patches after target modules execute."""

    def __init__(self, targets: set[str], standin: bool) -> None:
        self._targets = targets
        self._standin = standin

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if self._standin and fullname == STANDIN_MODULE:
            return importlib.util.spec_from_file_location(
                STANDIN_MODULE,
                os.path.join(_STANDIN_DIR, "__init__.py"),
                submodule_search_locations=[_STANDIN_DIR],
            )
        if fullname not in self._targets:
            return None
        spec = self._find_real_spec(fullname, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        original_exec = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            original_exec(module)
            REGISTRY.on_import(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec

    def _find_real_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None
    ) -> importlib.machinery.ModuleSpec | None:
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                return spec
        return None


def install() -> None:
    """Register the patches and put the hook first on ``sys.meta_path`` (idempotent)."""
    global _installed
    if _installed is not None:
        return
    from runtime_patches import hicache_layerwise, slo_queue
    from runtime_patches.cpu import fixes, pipeline
    from runtime_patches.migration import patches as migration

    fixes.register()
    pipeline.register()
    hicache_layerwise.register()
    slo_queue.register()
    migration.register()
    _installed = _PatchFinder(REGISTRY.target_modules(), standin=cpu_engine_enabled())
    sys.meta_path.insert(0, _installed)
    # A target imported before the hook (rare: only if something imported it from a .pth that
    # ran earlier) is patched now rather than missed.
    for name in list(_installed._targets):
        module = sys.modules.get(name)
        if module is not None:
            REGISTRY.on_import(module)


def is_installed() -> bool:
    return _installed is not None


def standin_active() -> bool:
    return _installed is not None and _installed._standin
