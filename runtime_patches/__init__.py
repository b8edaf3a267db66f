"""Patches that make stock SGLang 0.5.23 run on CPU and expose BanaServe's hooks.

Every patch is a :class:`runtime_patches.registry.Patch` in :data:`REGISTRY`, applied by the import
hook in :mod:`runtime_patches.boot` the moment its target module is imported, in every Python
process of the venv (a ``.pth`` file installs the hook; see ``python -m runtime_patches --help``).
"""

from __future__ import annotations

SGLANG_VERSION = "0.5.23"
"""The one SGLang release every patch in this package was written and verified against."""
