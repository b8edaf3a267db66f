"""The patch registry: every change BanaServe makes to a third-party module, in one table.

Contract (who calls what, and when):
- Patch modules call ``REGISTRY.add(Patch(...))`` at import time, once per patch. A patch names a
  dotted ``target`` (``package.module:Attr.path``), a ``kind``, the distribution and exact version
  it was written against, and why it exists.
- The import hook (``runtime_patches.boot``) calls ``REGISTRY.on_import(module)`` right after a
  target module has executed, in every process of the venv, so no other module can bind the
  unpatched object first.
- ``REGISTRY.check_versions()`` is called by the launcher and ``python -m runtime_patches doctor``
  before any SGLang process starts; ``on_import`` repeats the check inside each process.
- A version or target mismatch raises :class:`PatchError` with a one-line message; start-up stops.
  Serving with a patch silently skipped could serve wrong results, so nothing is ever skipped.

Kinds:
- ``replace``: the attribute must exist; it is replaced by ``new``.
- ``wrap``: the attribute must exist; it is replaced by ``new(original)``.
- ``provide``: the attribute must be missing (the module was built for another device); ``new``
  is installed.
- ``set``: the attribute must exist; it is set to the value ``new``.
- ``call``: ``new(module)`` runs after the module executed (for fixes that are not one attribute);
  the target's attribute path is checked to exist first when one is given.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Literal

logger = logging.getLogger(__name__)

PatchKind = Literal["replace", "wrap", "provide", "set", "call"]
_MISSING = object()


class PatchError(RuntimeError):
    """A patch cannot be applied as written; start-up must stop."""


@dataclass(frozen=True)
class Patch:
    """One change to a third-party module."""

    name: str
    """Short unique name, shown by ``python -m runtime_patches doctor``."""
    target: str
    """``module.path`` or ``module.path:Attr.sub_attr``; the module is what triggers the patch."""
    kind: PatchKind
    """How ``new`` is applied; see the module docstring."""
    new: Any
    """The replacement, the wrapper factory, the value, or the ``call`` function."""
    package: str
    """Distribution whose version is pinned, e.g. ``sglang``."""
    version: str
    """Exact version of ``package`` the patch was written and verified against."""
    rationale: str
    """Why the patch exists, one or two sentences."""
    when: Callable[[], bool] = field(default=lambda: True, compare=False)
    """Whether the patch is active in this process (e.g. only on the CPU engine)."""

    def __post_init__(self) -> None:
        if self.kind not in ("replace", "wrap", "provide", "set", "call"):
            raise ValueError(f"Patch.kind: unknown kind {self.kind!r} in patch {self.name!r}")
        if not self.target or self.target.startswith(":"):
            raise ValueError(f"Patch.target: {self.target!r} names no module ({self.name!r})")

    @property
    def module(self) -> str:
        return self.target.partition(":")[0]

    @property
    def attr_path(self) -> list[str]:
        attrs = self.target.partition(":")[2]
        return attrs.split(".") if attrs else []


def installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


class PatchRegistry:
    """Owns the table of patches and which of them were applied in this process."""

    def __init__(self) -> None:
        self._patches: dict[str, Patch] = {}
        self._applied: set[str] = set()

    # -- registration -------------------------------------------------------------------------
    def add(self, patch: Patch) -> Patch:
        if patch.name in self._patches:
            raise ValueError(f"Patch.name: duplicate patch name {patch.name!r}")
        self._patches[patch.name] = patch
        return patch

    def patches(self) -> list[Patch]:
        return list(self._patches.values())

    def active(self) -> list[Patch]:
        return [p for p in self._patches.values() if p.when()]

    def target_modules(self) -> set[str]:
        return {p.module for p in self.active()}

    def is_applied(self, name: str) -> bool:
        return name in self._applied

    # -- checks -------------------------------------------------------------------------------
    def check_version(self, patch: Patch) -> None:
        found = installed_version(patch.package)
        if found != patch.version:
            raise PatchError(
                f"runtime_patches: patch {patch.name!r} ({patch.target}) was written for "
                f"{patch.package}=={patch.version} but {patch.package}=={found} is installed; "
                f"refusing to start (reinstall with scripts/setup.sh or port the patch)"
            )

    def check_versions(self) -> None:
        for patch in self.active():
            self.check_version(patch)

    # -- application --------------------------------------------------------------------------
    def on_import(self, module: ModuleType) -> None:
        """Apply every active patch whose target module is ``module`` (called by the hook)."""
        for patch in self.active():
            if patch.module == module.__name__ and patch.name not in self._applied:
                self.apply(patch, module)

    def apply(self, patch: Patch, module: ModuleType) -> None:
        self.check_version(patch)
        path = patch.attr_path
        owner: Any = module
        for part in path[:-1]:
            owner = getattr(owner, part, _MISSING)
            if owner is _MISSING:
                raise PatchError(self._missing(patch, part))
        if patch.kind == "call":
            if path and getattr(owner, path[-1], _MISSING) is _MISSING:
                raise PatchError(self._missing(patch, path[-1]))
            patch.new(module)
        else:
            if not path:
                raise PatchError(f"runtime_patches: patch {patch.name!r} of kind {patch.kind} "
                                 "needs an attribute in its target")
            self._apply_attr(patch, owner, path[-1])
        self._applied.add(patch.name)
        logger.debug("applied patch %s to %s", patch.name, patch.target)

    def _apply_attr(self, patch: Patch, owner: Any, attr: str) -> None:
        current = getattr(owner, attr, _MISSING)
        if patch.kind == "provide":
            if current is not _MISSING:
                raise PatchError(
                    f"runtime_patches: patch {patch.name!r} provides {patch.target} but the "
                    "installed module already defines it; the patch is out of date")
            setattr(owner, attr, patch.new)
            return
        if current is _MISSING:
            raise PatchError(self._missing(patch, attr))
        if patch.kind == "replace" or patch.kind == "set":
            setattr(owner, attr, patch.new)
        elif patch.kind == "wrap":
            setattr(owner, attr, patch.new(current))

    @staticmethod
    def _missing(patch: Patch, attr: str) -> str:
        return (f"runtime_patches: patch {patch.name!r}: {patch.target} has no attribute "
                f"{attr!r} in {patch.package}=={installed_version(patch.package)}; "
                "the patched internals changed, refusing to start")


REGISTRY = PatchRegistry()
