"""Dispatch policies: the seam is in ``base``, its inputs in ``views``; each other module
registers one policy."""

from __future__ import annotations

import importlib
import pkgutil

from router.policy.base import Policy, RequestFeatures, build, names, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "views", "kv_index"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Policy", "RequestFeatures", "build", "names", "register"]
